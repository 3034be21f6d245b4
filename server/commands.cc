#include "server/commands.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <stdexcept>

#include "engine/backend_factory.h"
#include "engine/checkpoint.h"
#include "engine/engine.h"
#include "engine/perplexity.h"
#include "engine/text_io.h"
#include "engine/tokenizer.h"
#include "server/bench_decode.h"
#include "server/bench_memory.h"

namespace kvserve {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr const char* kSharedModel = "shared/models/gpt2-tiny-docs";

// A mistake in how the command was called: exit code 2 instead of 1.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct ModelFlags {
  std::string model;
  std::string tokenizer;
  std::string device = "auto";
};

struct KvFlags {
  std::string format = "kivi2";
  KvCacheConfig config;
  int64_t pool_mb = 512;
};

struct EngineFlags {
  EngineOptions options;
};

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The shared test model beside the checkout: ../shared from the working directory, or from the
// repository that holds this executable (build/bin/kvserve).
std::optional<std::string> find_shared_model() {
  std::vector<fs::path> candidates = {fs::path("..") / kSharedModel};
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (fs::path dir = exe.parent_path(); dir.has_relative_path(); dir = dir.parent_path()) {
      candidates.push_back(dir.parent_path() / kSharedModel);
    }
  }
  for (const fs::path& candidate : candidates) {
    if (fs::exists(candidate / "config.json", ec))
      return fs::absolute(candidate).lexically_normal();
  }
  return std::nullopt;
}

std::string resolve_model(const std::string& flag) {
  if (!flag.empty()) return flag;
  if (const char* env = std::getenv("KVSERVE_MODEL"); env != nullptr && *env != '\0') return env;
  if (auto shared = find_shared_model()) return *shared;
  throw UsageError(
      "no model given and none found. Pass --model DIR or set KVSERVE_MODEL to a Hugging Face "
      "GPT-2 directory holding config.json, model.safetensors, vocab.json and merges.txt (for "
      "example the files of openai-community/gpt2 from the Hugging Face hub, downloaded into "
      "~/models/gpt2), or use --model dummy:gpt2 for random weights of GPT-2's real size");
}

Tokenizer load_tokenizer(const std::string& model, const std::string& tokenizer_flag) {
  if (!tokenizer_flag.empty()) return Tokenizer::from_model_dir(tokenizer_flag);
  if (!is_dummy_model(model)) return Tokenizer::from_model_dir(model);
  if (const char* env = std::getenv("KVSERVE_MODEL"); env != nullptr && *env != '\0') {
    return Tokenizer::from_model_dir(env);
  }
  if (auto shared = find_shared_model()) return Tokenizer::from_model_dir(*shared);
  throw UsageError(model +
                   " has no tokenizer: pass --tokenizer DIR (a directory with "
                   "vocab.json and merges.txt) or give the prompt as ids with --prompt-ids");
}

void add_model_flags(CLI::App* app, ModelFlags& flags) {
  app->add_option("--model", flags.model,
                  "Hugging Face GPT-2 directory or dummy:gpt2[-medium|-large|-xl] (default: "
                  "$KVSERVE_MODEL, then ../shared/models/gpt2-tiny-docs)");
  app->add_option("--tokenizer", flags.tokenizer,
                  "directory with vocab.json and merges.txt (default: the model's)");
  app->add_option("--device", flags.device, "auto, cpu or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
}

void add_kv_flags(CLI::App* app, KvFlags& flags) {
  app->add_option("--kv", flags.format, "KV cache format")
      ->check(CLI::IsMember({"fp16", "int8", "kivi4", "kivi2"}));
  app->add_option("--kv-group", flags.config.key_group, "KIVI key group G (tokens per channel)");
  app->add_option("--kv-value-group", flags.config.value_group,
                  "KIVI value group GV (channels per token)");
  app->add_option("--kv-residual", flags.config.residual,
                  "KIVI residual R: newest tokens kept in fp16 (a multiple of G)");
  app->add_option("--kv-page-tokens", flags.config.page_tokens,
                  "tokens per page (a multiple of G)");
  app->add_flag("--kv-per-token-keys", flags.config.per_token_keys,
                "ablation: quantize keys per token instead of per channel");
  app->add_option("--kv-pool-mb", flags.pool_mb, "KV pool size in MiB, allocated at start")
      ->check(CLI::PositiveNumber);
}

void add_engine_flags(CLI::App* app, EngineFlags& flags) {
  app->add_option("--max-num-seqs", flags.options.max_num_seqs, "sequences per step")
      ->check(CLI::PositiveNumber);
  app->add_option("--max-batch-tokens", flags.options.max_batch_tokens,
                  "tokens per step (decodes plus prompt chunks)")
      ->check(CLI::PositiveNumber);
}

KvCacheConfig kv_config(const KvFlags& flags, const ModelConfig& model) {
  KvCacheConfig config = flags.config;
  config.format = parse_kv_format(flags.format);
  const std::string problem = validate(config, model);
  if (!problem.empty()) throw UsageError(problem);
  return config;
}

struct LoadedModel {
  std::string path;
  std::string device;
  ModelWeights weights;
};

LoadedModel load(const ModelFlags& flags) {
  LoadedModel loaded;
  loaded.path = resolve_model(flags.model);
  std::string reason;
  loaded.device = resolve_device(flags.device, reason);
  spdlog::info("device: {} ({})", loaded.device, reason);
  loaded.weights = load_model(loaded.path);  // logs what it loaded and how long it took
  return loaded;
}

std::unique_ptr<KvCacheManager> make_cache(const KvCacheConfig& config, const ModelConfig& model,
                                           int64_t pool_mb) {
  const int32_t blocks = KvCacheManager::blocks_in_budget(pool_mb << 20, config, model);
  auto cache = std::make_unique<KvCacheManager>(config, model, blocks);
  spdlog::info("kv cache: {}, {} blocks of {} bytes ({} MiB pool)", describe(config), blocks,
               cache->bytes_per_block(), pool_mb);
  return cache;
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
  LoadedModel loaded = load(flags.model);
  const ModelConfig model = loaded.weights.config;
  std::optional<Tokenizer> tokenizer;
  if (!flags.ids || !flags.prompt.empty())
    tokenizer = load_tokenizer(loaded.path, flags.model.tokenizer);
  GenerationRequest request;
  request.prompt =
      flags.prompt.empty() ? parse_ids(flags.prompt_ids) : tokenizer->encode(flags.prompt);
  request.max_new_tokens = flags.max_new_tokens;
  request.ignore_eos = flags.ignore_eos;
  request.sampling = flags.sampling;
  if (flags.greedy) request.sampling.temperature = 0.0f;

  auto cache = make_cache(kv_config(flags.kv, model), model, flags.kv.pool_mb);
  auto backend = make_backend(loaded.device, std::move(loaded.weights), *cache);
  Engine engine(model, std::move(cache), std::move(backend), flags.engine.options);
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
        if (decoder) std::cout << decoder->push(event.token) << std::flush;
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
  LoadedModel loaded = load(flags.model);
  const ModelConfig model = loaded.weights.config;
  if (flags.seq > model.n_positions) {
    throw UsageError("--seq " + std::to_string(flags.seq) + " exceeds the model's context of " +
                     std::to_string(model.n_positions));
  }
  const Tokenizer tokenizer = load_tokenizer(loaded.path, flags.model.tokenizer);
  const std::vector<int32_t> tokens = evaluation_tokens(tokenizer, read_file(flags.text));
  const KvCacheConfig config = kv_config(flags.kv, model);
  auto cache = make_cache(config, model, flags.kv.pool_mb);
  auto backend = make_backend(loaded.device, std::move(loaded.weights), *cache);
  const auto start = Clock::now();
  const PerplexityResult result =
      evaluate_perplexity(*backend, *cache, tokens, flags.windows, flags.seq);
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
      {"model", loaded.path},
      {"device", backend->name()},
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
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error or off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));

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

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  spdlog::set_default_logger(spdlog::stderr_color_mt("kvserve"));
  spdlog::set_level(spdlog::level::from_str(log_level));
  try {
    if (generate_cmd->parsed()) return run_generate(generate);
    if (tokenize_cmd->parsed()) return run_tokenize(tokenize);
    if (eval_cmd->parsed()) return run_eval_ppl(eval);
    if (memory_cmd->parsed()) return run_bench_memory(bench_memory);
    if (decode_cmd->parsed()) return run_bench_decode(bench_decode);
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
