#include "server/cli_flags.h"

#include <spdlog/spdlog.h>

#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "engine/checkpoint.h"
#include "engine/kv_quantization_error.h"

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
  // $KVSERVE_MODEL lends its tokenizer only when it is a directory: when it names this dummy
  // model itself, the model must find its tokenizer exactly as it does when given by --model.
  if (const char* env = std::getenv("KVSERVE_MODEL");
      env != nullptr && *env != '\0' && !is_dummy_model(env)) {
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
  app->add_option("--prefill-attention", flags.prefill_attention,
                  "CUDA attention kernel of prefill and mixed steps: tensor (mma on tensor cores, "
                  "sm_80 or newer) or tiled (fp32)")
      ->check(CLI::IsMember({"tensor", "tiled"}));
}

void add_kv_flags(CLI::App* app, KvFlags& flags, KvPoolFlag pool) {
  app->add_option("--kv", flags.format,
                  "KV cache format; kivi2c = kivi2 with --kv-value-group 64, --kv-params fp8 and "
                  "--kv-residual-format int8")
      ->check(CLI::IsMember({"fp16", "int8", "kivi4", "kivi2", "kivi2c"}));
  app->add_option("--kv-group", flags.config.key_group, "KIVI key group G (tokens per channel)");
  app->add_option("--kv-value-group", flags.config.value_group,
                  "KIVI value group GV (channels per token)")
      ->each([&flags](const std::string&) { flags.value_group_given = true; });
  app->add_option("--kv-params", flags.params,
                  "KIVI group scale and zero: fp16, or fp8 (e4m3); default fp16, fp8 for kivi2c")
      ->check(CLI::IsMember({"fp16", "fp8"}));
  app->add_option("--kv-residual-format", flags.residual_format,
                  "KIVI residual tokens: fp16, or int8 (per token and head); default fp16, int8 "
                  "for kivi2c")
      ->check(CLI::IsMember({"fp16", "int8"}));
  app->add_option("--kv-residual", flags.config.residual,
                  "KIVI residual R: newest tokens kept in fp16 (a multiple of G)");
  app->add_option("--kv-page-tokens", flags.config.page_tokens,
                  "tokens per page (a multiple of G)");
  app->add_flag("--kv-per-token-keys", flags.config.per_token_keys,
                "ablation: quantize keys per token instead of per channel");
  if (pool == KvPoolFlag::kOmit) return;
  app->add_option("--kv-pool-mb", flags.pool_mb, "KV pool size in MiB, allocated at start")
      ->check(positive());
}

void add_engine_flags(CLI::App* app, EngineFlags& flags) {
  app->add_option("--max-num-seqs", flags.options.max_num_seqs, "sequences per step")
      ->check(positive());
  app->add_option("--max-batch-tokens", flags.options.max_batch_tokens,
                  "tokens per step (decodes plus prompt chunks); by default the backend's "
                  "(engine/README.md)")
      ->check(positive())
      ->default_str("16384 on cuda, 2048 on cpu");
  app->add_option("--admission", flags.admission,
                  "final-length: admit while every running request fits the pool at prompt + "
                  "max_new_tokens (no preemption); prompt: while the prompt fits (preempts)")
      ->check(CLI::IsMember({"final-length", "prompt"}));
  app->add_option("--prefix-cache", flags.prefix_cache,
                  "on: requests that share a prompt prefix share its full KV pages (KIVI "
                  "formats with a copy of the fp16 residual at a page boundary)")
      ->check(CLI::IsMember({"on", "off"}))
      ->capture_default_str();
}

void add_kv_error_sample_rate_flag(CLI::App* app, EngineFlags& flags) {
  flags.options.kv_error_sample_rate = kDefaultKvErrorSampleRate;
  app->add_option("--kv-error-sample-rate", flags.options.kv_error_sample_rate,
                  "share of the steps whose groups flushed into KV pages have their "
                  "quantization error measured (kvserve_kv_quantization_relative_error), 0 to 1; "
                  "0 disables")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
}

KvCacheConfig kv_config(const KvFlags& flags, const ModelConfig& model) {
  KvCacheConfig config = flags.config;
  if (apply_kv_preset(flags.format, config)) {
    if (flags.value_group_given) config.value_group = flags.config.value_group;
  } else {
    config.format = parse_kv_format(flags.format);
  }
  if (!flags.params.empty()) config.params = parse_kv_params(flags.params);
  if (!flags.residual_format.empty()) {
    config.residual_format = parse_kv_residual_format(flags.residual_format);
  }
  if (const absl::Status problem = validate(config, model); !problem.ok()) {
    throw UsageError(std::string(problem.message()));
  }
  return config;
}

EngineSpec engine_spec(const ModelFlags& model, const KvFlags& kv, const EngineFlags& engine) {
  EngineSpec spec;
  spec.model = resolve_model(model.model);
  spec.device = model.device;
  spec.backend.cuda_graphs = model.cuda_graphs == "on";
  spec.backend.decode_attention = cuda::parse_decode_attention_variant(model.decode_attention);
  spec.backend.prefill_attention = cuda::parse_prefill_attention_variant(model.prefill_attention);
  spec.kv = kv_config(kv, read_model_config(spec.model));
  spec.kv_pool_bytes = kv.pool_mb << 20;
  spec.engine = engine.options;
  spec.engine.admission = engine.admission == "prompt" ? AdmissionPolicy::kPrompt
                                                       : AdmissionPolicy::kReserveFinalLength;
  spec.engine.prefix_cache = engine.prefix_cache == "on";
  if (const absl::Status problem = check(spec); !problem.ok()) {
    throw UsageError(std::string(problem.message()));
  }
  return spec;
}

}  // namespace kvserve
