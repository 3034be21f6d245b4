// Flags and loading helpers shared by the kvserve commands (generate, eval-ppl, serve, ...).
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "common/command_line.h"
#include "engine/engine_builder.h"
#include "engine/tokenizer.h"

namespace kvserve {

// A mistake in how the command was called: exit code 2 instead of 1.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct ModelFlags {
  std::string model;
  std::string tokenizer;
  std::string device = "auto";
  std::string cuda_graphs = "on";  // CUDA backend: replay decode steps from CUDA graphs
  // CUDA backend: the KIVI decode attention kernel (kernels/decode_attention_variant.h)
  std::string decode_attention = "packed";
  // CUDA backend: the prefill attention kernel (kernels/prefill_attention_variant.h)
  std::string prefill_attention = "tensor";
};

struct KvFlags {
  std::string format = "kivi2";  // a KvFormat or a preset (apply_kv_preset)
  KvCacheConfig config;
  // --kv-params / --kv-residual-format: empty leaves the format's or preset's choice.
  std::string params;
  std::string residual_format;
  bool value_group_given = false;  // --kv-value-group overrides a preset's value group
  int64_t pool_mb = 512;
};

struct EngineFlags {
  EngineOptions options;
  std::string admission = "final-length";  // or "prompt": AdmissionPolicy
  std::string prefix_cache = "on";         // or "off": EngineOptions::prefix_cache
};

// --model, else $KVSERVE_MODEL, else the shared test model beside the checkout; throws UsageError
// explaining how to get a model when there is none.
std::string resolve_model(const std::string& flag);
// The model's tokenizer, or --tokenizer's; dummy models borrow the one of $KVSERVE_MODEL when it is
// a directory, else the shared test model's.
Tokenizer load_tokenizer(const std::string& model, const std::string& tokenizer_flag);

void add_model_flags(CLI::App* app, ModelFlags& flags);
// --decode-attention packed|online|tensor (part of add_model_flags).
void add_decode_attention_flag(CLI::App* app, std::string& variant);
// Commands that size the pool themselves (bench decode) leave --kv-pool-mb out.
enum class KvPoolFlag { kTake, kOmit };
void add_kv_flags(CLI::App* app, KvFlags& flags, KvPoolFlag pool = KvPoolFlag::kTake);
void add_engine_flags(CLI::App* app, EngineFlags& flags);
// --kv-error-sample-rate (serve, bench engine): sets the default to kDefaultKvErrorSampleRate.
void add_kv_error_sample_rate_flag(CLI::App* app, EngineFlags& flags);

// The validated cache configuration; throws UsageError naming the flag to fix.
KvCacheConfig kv_config(const KvFlags& flags, const ModelConfig& model);

// What the flags ask the engine builder for: the resolved model, the device, the backend options,
// the KV cache and the scheduler's limits. Reads the model's config.json (never its weights) to
// check the KV settings against its geometry, so that a bad flag fails before a long load; throws
// UsageError naming the flag to fix.
EngineSpec engine_spec(const ModelFlags& model, const KvFlags& kv, const EngineFlags& engine = {});

}  // namespace kvserve
