#include "tools/commands.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <stdexcept>

#include "common/text_io.h"
#include "engine/engine_builder.h"
#include "engine/perplexity.h"
#include "engine/tokenizer.h"
#include "server/cli_flags.h"
#include "server/logging.h"
#include "server/serve.h"
#include "tools/bench_decode.h"
#include "tools/bench_engine.h"
#include "tools/bench_memory.h"

namespace kvserve {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  std::istringstream in(text);
  std::string word;
  while (in >> word) {
    try {
      size_t used = 0;
      const long value = std::stol(word, &used);
      if (used != word.size() || value < INT32_MIN || value > INT32_MAX)
        throw std::out_of_range("");
      ids.push_back(static_cast<int32_t>(value));
    } catch (const std::logic_error&) {
      throw UsageError("--prompt-ids: '" + word + "' is not a token id");
    }
  }
  return ids;
}

// ---- generate ---------------------------------------------------------------------------------

struct GenerateFlags {
  ModelFlags model;
  KvFlags kv;
  EngineFlags engine;
  std::string prompt;
  std::string prompt_ids;
  int max_new_tokens = 64;
  bool greedy = false;
  bool ids = false;
  bool ignore_eos = false;
  SamplingParams sampling;
};

int run_generate(const GenerateFlags& flags) {
  if (flags.prompt.empty() == flags.prompt_ids.empty()) {
    throw UsageError("generate needs exactly one of --prompt TEXT or --prompt-ids \"ID ...\"");
  }
  const EngineSpec spec = engine_spec(flags.model, flags.kv, flags.engine);
  std::optional<Tokenizer> tokenizer;
  if (!flags.ids || !flags.prompt.empty())
    tokenizer = load_tokenizer(spec.model, flags.model.tokenizer);
  GenerationRequest request;
  request.prompt =
      flags.prompt.empty() ? parse_ids(flags.prompt_ids) : tokenizer->encode(flags.prompt);
  request.max_new_tokens = flags.max_new_tokens;
  request.ignore_eos = flags.ignore_eos;
  request.sampling = flags.sampling;
  if (flags.greedy) request.sampling.temperature = 0.0f;

  const std::unique_ptr<Engine> built = build_engine(spec);
  Engine& engine = *built;
  const std::string problem = engine.validate(request);
  if (!problem.empty()) throw UsageError(problem);
  const size_t prompt_tokens = request.prompt.size();
  engine.add_request(std::move(request));

  std::optional<IncrementalDecoder> decoder;
  if (!flags.ids) decoder.emplace(*tokenizer);
  std::vector<int32_t> generated;
  FinishReason finish = FinishReason::kNone;
  const auto start = Clock::now();
  std::vector<StepEvent> events;
  while (engine.has_work()) {
    events.clear();
    engine.step(events);
    for (const StepEvent& event : events) {
      if (event.has_token) {
        generated.push_back(event.token);
        // As in the gRPC stream: the token that ends generation (EOS, a stop token id) is
        // reported as an id but not printed as text.
        const bool ending_token =
            event.finish == FinishReason::kEos || event.finish == FinishReason::kStop;
        if (decoder && !ending_token) std::cout << decoder->push(event.token) << std::flush;
      }
      if (event.finish == FinishReason::kError) throw std::runtime_error(event.error);
      if (event.finish != FinishReason::kNone) finish = event.finish;
    }
  }
  if (decoder) {
    std::cout << decoder->finish() << "\n";
  } else {
    for (size_t i = 0; i < generated.size(); ++i) std::cout << (i ? " " : "") << generated[i];
    std::cout << "\n";
  }
  const double elapsed = seconds_since(start);
  spdlog::info("{} prompt + {} generated tokens in {:.2f} s ({:.1f} tokens/s), finish: {}",
               prompt_tokens, generated.size(), elapsed, generated.size() / elapsed,
               to_string(finish));
  return 0;
}

// ---- tokenize ---------------------------------------------------------------------------------

int run_tokenize(const ModelFlags& flags) {
  const std::string model = resolve_model(flags.model);
  const Tokenizer tokenizer = load_tokenizer(model, flags.tokenizer);
  const std::string text((std::istreambuf_iterator<char>(std::cin)),
                         std::istreambuf_iterator<char>());
  const std::vector<int32_t> ids = tokenizer.encode(text);
  for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
  std::cout << "\n";
  return 0;
}

// ---- eval-ppl ---------------------------------------------------------------------------------

struct EvalFlags {
  ModelFlags model;
  KvFlags kv;
  std::string text;
  int windows = 64;
  int seq = 1024;
};

int run_eval_ppl(const EvalFlags& flags) {
  const EngineSpec spec = engine_spec(flags.model, flags.kv);
  const ModelConfig model = read_model_config(spec.model);
  if (flags.seq > model.n_positions) {
    throw UsageError("--seq " + std::to_string(flags.seq) + " exceeds the model's context of " +
                     std::to_string(model.n_positions));
  }
  const Tokenizer tokenizer = load_tokenizer(spec.model, flags.model.tokenizer);
  const std::vector<int32_t> tokens = evaluation_tokens(tokenizer, read_file(flags.text));
  const BuiltBackend built = build_backend(spec);
  const KvCacheConfig& config = built.kv;
  const auto start = Clock::now();
  const PerplexityResult result =
      evaluate_perplexity(*built.backend, *built.cache, tokens, flags.windows, flags.seq);
  const double elapsed = seconds_since(start);
  const nlohmann::json out = {
      {"ppl", result.ppl},
      {"nll", result.nll},
      {"tokens", result.tokens},
      {"windows", result.windows},
      {"seq", flags.seq},
      {"kv", to_string(config.format)},
      {"kv_config",
       {{"key_group", config.key_group},
        {"value_group", config.value_group},
        {"residual", config.residual},
        {"page_tokens", config.page_tokens},
        {"per_token_keys", config.per_token_keys}}},
      {"model", spec.model},
      {"device", built.backend->name()},
      {"seconds", elapsed},
      {"window_nll", result.window_nll},
  };
  std::cout << out.dump() << "\n";
  return 0;
}

}  // namespace

int run_command_line(int argc, char** argv) {
  CLI::App app{"kvserve: GPT-2 serving with a paged KIVI-quantized KV cache"};
  app.require_subcommand(1);
  app.fallthrough();  // global flags such as --log-level may also follow the command
  std::string log_level = "info";
  bool log_json = false;
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error or off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  app.add_flag("--log-json", log_json, "log JSON lines (time, level, logger, msg) to stderr");

  ServeFlags serve;
  CLI::App* serve_cmd = app.add_subcommand(
      "serve", "serve the gRPC Generation API with Prometheus metrics until SIGTERM");
  add_serve_flags(serve_cmd, serve);

  GenerateFlags generate;
  CLI::App* generate_cmd =
      app.add_subcommand("generate", "generate a completion in-process (no network) and print it");
  add_model_flags(generate_cmd, generate.model);
  add_kv_flags(generate_cmd, generate.kv);
  add_engine_flags(generate_cmd, generate.engine);
  generate_cmd->add_option("--prompt", generate.prompt, "prompt text");
  generate_cmd->add_option("--prompt-ids", generate.prompt_ids, "prompt as space-separated ids");
  generate_cmd->add_option("--max-new-tokens", generate.max_new_tokens, "tokens to generate")
      ->check(CLI::PositiveNumber);
  generate_cmd->add_flag("--greedy", generate.greedy, "greedy decoding (temperature 0)");
  generate_cmd->add_flag("--ids", generate.ids, "print generated token ids instead of text");
  generate_cmd->add_flag("--ignore-eos", generate.ignore_eos, "keep generating after EOS");
  generate_cmd->add_option("--temperature", generate.sampling.temperature, "0 = greedy");
  generate_cmd->add_option("--top-k", generate.sampling.top_k, "0 = off");
  generate_cmd->add_option("--top-p", generate.sampling.top_p, "1 = off");
  generate_cmd->add_option("--repetition-penalty", generate.sampling.repetition_penalty, "1 = off");
  generate_cmd->add_option("--seed", generate.sampling.seed, "sampling seed");

  ModelFlags tokenize;
  CLI::App* tokenize_cmd =
      app.add_subcommand("tokenize", "print the token ids of all of standard input");
  tokenize_cmd->add_option("--model", tokenize.model, "model directory (for its tokenizer)");
  tokenize_cmd->add_option("--tokenizer", tokenize.tokenizer,
                           "directory with vocab.json, merges.txt");

  EvalFlags eval;
  CLI::App* eval_cmd =
      app.add_subcommand("eval-ppl", "perplexity on held-out text through the KV cache (JSON)");
  add_model_flags(eval_cmd, eval.model);
  add_kv_flags(eval_cmd, eval.kv);
  eval_cmd->add_option("--text", eval.text, "text file (.xz allowed)")->required();
  eval_cmd->add_option("--windows", eval.windows, "windows to evaluate")
      ->check(CLI::PositiveNumber);
  eval_cmd->add_option("--seq", eval.seq, "tokens per window")->check(CLI::Range(2, 1 << 20));

  BenchMemoryFlags bench_memory;
  CLI::App* bench_cmd = app.add_subcommand("bench", "in-process benchmarks (JSON output)");
  bench_cmd->require_subcommand(1);
  CLI::App* memory_cmd = bench_cmd->add_subcommand(
      "memory", "KV bytes per token, compression and pool capacity for every format");
  add_bench_memory_flags(memory_cmd, bench_memory);
  BenchDecodeFlags bench_decode;
  CLI::App* decode_cmd = bench_cmd->add_subcommand(
      "decode", "decode-step throughput at several batch sizes, one backend and KV format");
  add_bench_decode_flags(decode_cmd, bench_decode);
  BenchEngineFlags bench_engine;
  CLI::App* engine_cmd = bench_cmd->add_subcommand(
      "engine", "closed-loop generation throughput of the in-process engine (no gRPC)");
  add_bench_engine_flags(engine_cmd, bench_engine);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  configure_logging(log_level, log_json);
  try {
    if (serve_cmd->parsed()) return run_serve(serve);
    if (generate_cmd->parsed()) return run_generate(generate);
    if (tokenize_cmd->parsed()) return run_tokenize(tokenize);
    if (eval_cmd->parsed()) return run_eval_ppl(eval);
    if (memory_cmd->parsed()) return run_bench_memory(bench_memory);
    if (decode_cmd->parsed()) return run_bench_decode(bench_decode);
    if (engine_cmd->parsed()) return run_bench_engine(bench_engine);
  } catch (const UsageError& e) {
    std::cerr << "kvserve: " << e.what() << "\n";
    return 2;
  } catch (const std::invalid_argument& e) {
    std::cerr << "kvserve: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "kvserve: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace kvserve
