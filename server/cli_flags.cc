#include "server/cli_flags.h"

#include <spdlog/spdlog.h>

#include <cstdlib>
#include <filesystem>
#include <optional>
#include <vector>

#include "engine/backend_factory.h"
#include "engine/checkpoint.h"

namespace kvserve {

namespace {

namespace fs = std::filesystem;

constexpr const char* kSharedModel = "shared/models/gpt2-tiny-docs";

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

}  // namespace

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

void add_decode_attention_flag(CLI::App* app, std::string& variant) {
  app->add_option("--decode-attention", variant,
                  "CUDA KIVI decode attention kernel: packed (2-bit codes on tensor cores), "
                  "online (fp32) or tensor")
      ->check(CLI::IsMember({"packed", "online", "tensor"}));
}

void add_model_flags(CLI::App* app, ModelFlags& flags) {
  app->add_option("--model", flags.model,
                  "Hugging Face GPT-2 directory or dummy:gpt2[-medium|-large|-xl] (default: "
                  "$KVSERVE_MODEL, then ../shared/models/gpt2-tiny-docs)");
  app->add_option("--tokenizer", flags.tokenizer,
                  "directory with vocab.json and merges.txt (default: the model's)");
  app->add_option("--device", flags.device, "auto, cpu or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app->add_option("--cuda-graphs", flags.cuda_graphs,
                  "on: CUDA decode steps replay captured graphs; off: every kernel launched")
      ->check(CLI::IsMember({"on", "off"}));
  add_decode_attention_flag(app, flags.decode_attention);
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

LoadedModel load(const ModelFlags& flags) {
  LoadedModel loaded;
  loaded.path = resolve_model(flags.model);
  std::string reason;
  loaded.device = resolve_device(flags.device, reason);
  spdlog::info("device: {} ({})", loaded.device, reason);
  loaded.weights = load_model(loaded.path);  // logs what it loaded and how long it took
  loaded.backend.cuda_graphs = flags.cuda_graphs == "on";
  loaded.backend.decode_attention = cuda::parse_decode_attention_variant(flags.decode_attention);
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

}  // namespace kvserve
