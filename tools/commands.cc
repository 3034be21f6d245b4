#include "tools/commands.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <stdexcept>

#include "common/command_line.h"
#include "common/text_io.h"
#include "engine/engine_builder.h"
#include "engine/perplexity.h"
#include "engine/text_stream.h"
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

// ---- generate ---------------------------------------------------------------------------------

struct GenerateFlags {
  ModelFlags model;
  KvFlags kv;
  EngineFlags engine;
  std::string prompt;
  std::vector<std::string> prompt_ids;
  int max_new_tokens = 64;
  bool greedy = false;
  bool ids = false;
  bool ignore_eos = false;
  std::vector<std::string> stop;
  SamplingParams sampling;
};

int run_generate(const GenerateFlags& flags) {
  if (flags.prompt.empty() == flags.prompt_ids.empty()) {
    throw UsageError("generate needs exactly one of --prompt TEXT or --prompt-ids ID ...");
  }
  const EngineSpec spec = engine_spec(flags.model, flags.kv, flags.engine);
  std::optional<Tokenizer> tokenizer;
  if (!flags.ids || !flags.prompt.empty())
    tokenizer = load_tokenizer(spec.model, flags.model.tokenizer);
  GenerationRequest request;
  request.prompt =
      flags.prompt.empty() ? parse_token_ids(flags.prompt_ids) : tokenizer->encode(flags.prompt);
  request.max_new_tokens = flags.max_new_tokens;
  request.ignore_eos = flags.ignore_eos;
  request.sampling = flags.sampling;
  if (flags.greedy) request.sampling.temperature = 0.0f;

  const std::unique_ptr<Engine> built = build_engine(spec);
  Engine& engine = *built;
  if (const absl::Status problem = engine.validate(request); !problem.ok()) {
    throw UsageError(std::string(problem.message()));
  }
  const size_t prompt_tokens = request.prompt.size();
  engine.add_request(std::move(request));

  // Text goes through the server's TextStream: the same stop strings, hold-back and ending rule.
  std::optional<TextStream> text;
  if (!flags.ids) text.emplace(*tokenizer, flags.stop);
  std::vector<int32_t> generated;
  FinishReason finish = FinishReason::kNone;
  const auto start = Clock::now();
  std::vector<StepEvent> events;
  while (engine.has_work()) {
    events.clear();
    engine.step(events);
    for (const StepEvent& event : events) {
      if (event.finish == FinishReason::kError) throw std::runtime_error(event.error);
      if (event.has_token) generated.push_back(event.token);
      if (text) {
        std::cout << text->push(event) << std::flush;
        if (text->stopped() && event.finish == FinishReason::kNone) engine.cancel(event.request);
      }
      if (event.finish != FinishReason::kNone) finish = event.finish;
    }
  }
  if (text && text->stopped()) finish = FinishReason::kStop;
  if (text) {
    std::cout << "\n";
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

// eval-ppl's progress on a terminal, redrawn in place on stderr after each window: windows done,
// tokens per second and the time left. Nothing when stderr is not a terminal (logs, CI), and never
// on stdout, which holds only the JSON result.
class WindowProgress {
 public:
  WindowProgress(int windows, int seq) : windows_(windows), seq_(seq), start_(Clock::now()) {}

  void operator()(int done) const {
    const double elapsed = seconds_since(start_);
    const double tokens_per_second = elapsed > 0 ? done * static_cast<double>(seq_) / elapsed : 0;
    const int left_s = static_cast<int>(elapsed / done * (windows_ - done) + 0.5);
    constexpr int kWidth = 30;
    const int filled = kWidth * done / windows_;
    std::fprintf(stderr, "\r[%s%s] %d/%d windows, %.0f tokens/s, ETA %d:%02d ",
                 std::string(filled, '#').c_str(), std::string(kWidth - filled, '.').c_str(), done,
                 windows_, tokens_per_second, left_s / 60, left_s % 60);
    if (done == windows_) std::fputc('\n', stderr);
    std::fflush(stderr);
  }

 private:
  int windows_, seq_;
  Clock::time_point start_;
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
  const PerplexityResult result = evaluate_perplexity(
      *built.backend, *built.cache, tokens, flags.windows, flags.seq,
      isatty(STDERR_FILENO) ? WindowDone(WindowProgress(flags.windows, flags.seq)) : WindowDone());
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
        {"per_token_keys", config.per_token_keys},
        {"params", to_string(config.params)},
        {"residual_format", to_string(config.residual_format)}}},
      {"model", spec.model},
      {"device", built.backend->name()},
      {"seconds", elapsed},
      {"window_nll", result.window_nll},
  };
  std::cout << out.dump() << "\n";
  return 0;
}

struct LogFlags {
  std::string level = "info";
  bool json = false;
};

// Added to the top level and to every command, so that each command's --help lists them and they
// may come before or after the command name.
void add_log_flags(CLI::App* app, LogFlags& flags) {
  app->add_option("--log-level", flags.level, "trace, debug, info, warn, error or off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  app->add_flag("--log-json", flags.json, "log JSON lines (time, level, logger, msg) to stderr");
}

}  // namespace

int run_command_line(int argc, char** argv) {
  CLI::App app{"kvserve: GPT-2 serving with a paged KIVI-quantized KV cache"};
  configure_app(app, "kvserve");
  app.require_subcommand(1);
  app.footer("Exit status: 0 on success, 1 on an error, 2 on a usage error (a bad flag or value).");
  LogFlags log;
  // Before the command or after it: every command lists them in its own --help as well.
  add_log_flags(&app, log);

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
  generate_cmd->add_option("--prompt-ids", generate.prompt_ids, kPromptIdsHelp)
      ->check(token_ids())
      ->default_str("");
  generate_cmd->add_option("--max-new-tokens", generate.max_new_tokens, "tokens to generate")
      ->check(positive());
  generate_cmd->add_flag("--greedy", generate.greedy, "greedy decoding (temperature 0)");
  generate_cmd->add_flag("--ids", generate.ids, "print generated token ids instead of text");
  generate_cmd->add_flag("--ignore-eos", generate.ignore_eos, "keep generating after EOS");
  generate_cmd->add_option("--stop", generate.stop,
                           "stop string (repeatable): the text ends before the first one matched");
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
  eval_cmd->add_option("--text", eval.text, "text file (.xz allowed)")
      ->required()
      ->check(CLI::ExistingFile);
  eval_cmd->add_option("--windows", eval.windows, "windows to evaluate")->check(positive());
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

  for (CLI::App* command :
       {serve_cmd, generate_cmd, tokenize_cmd, eval_cmd, memory_cmd, decode_cmd, engine_cmd}) {
    add_log_flags(command, log);
  }
  if (const std::optional<int> status = parse_command_line(app, argc, argv, "kvserve")) {
    return *status;
  }
  configure_logging(log.level, log.json);
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
