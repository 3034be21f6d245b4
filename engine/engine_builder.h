// One way from settings to a running engine, used by every command (serve, generate, eval-ppl,
// bench): resolve the device, read the model's geometry, validate the KV cache settings against
// it, load the weights, carve the KV pool, build the backend over that pool and, for commands that
// schedule requests, the Engine. Nothing else may assemble these pieces, so that an option (such
// as the backend's) cannot be dropped by one command and honoured by another.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include <absl/status/status.h>

#include "engine/backend.h"
#include "engine/backend_factory.h"
#include "engine/engine.h"
#include "engine/kv_cache_manager.h"
#include "engine/kv_format.h"
#include "engine/model_config.h"

namespace kvserve {

struct EngineSpec {
  std::string model;            // Hugging Face GPT-2 directory or dummy:NAME
  std::string device = "auto";  // auto, cpu or cuda
  BackendOptions backend;
  KvCacheConfig kv;
  // The KV pool: kv_pool_blocks blocks when > 0, else as many as kv_pool_bytes holds.
  int64_t kv_pool_bytes = int64_t{512} << 20;
  int32_t kv_pool_blocks = 0;
  EngineOptions engine;
};

// The model's geometry without its weights: config.json of a directory, or a dummy geometry.
ModelConfig read_model_config(const std::string& model);

// INVALID_ARGUMENT saying why `spec` cannot be built (an unknown device, KV settings the model's
// geometry does not allow, an empty pool), or OK when it can. Reads only the model's config, never
// its weights.
absl::Status check(const EngineSpec& spec);
// The backend over its cache, before an Engine (or the perplexity evaluation, or a benchmark that
// drives the backend directly) takes them. The backend reads the cache's block tables: keep the
// cache alive as long as the backend.
struct BuiltBackend {
  std::string device;  // resolved: cpu or cuda
  ModelConfig model;
  KvCacheConfig kv;
  std::unique_ptr<KvCacheManager> cache;
  std::unique_ptr<Backend> backend;
};

// Throws std::invalid_argument when check(spec) fails, std::runtime_error when the checkpoint
// cannot be loaded. Logs the device, the pool and the backend options it built with.
BuiltBackend build_backend(const EngineSpec& spec);

// build_backend, then the Engine over that cache and backend with spec.engine.
std::unique_ptr<Engine> build_engine(const EngineSpec& spec);
std::unique_ptr<Engine> build_engine(BuiltBackend built, const EngineOptions& options);

// Device-to-device copy bandwidth of `device` in bytes per second, measured with `bytes`-sized
// copies (the decode benchmark's roofline); 0 for the CPU.
double device_copy_bandwidth(const std::string& device, size_t bytes);

}  // namespace kvserve
