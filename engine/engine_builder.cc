#include "engine/engine_builder.h"

#include <spdlog/spdlog.h>

#include <stdexcept>

#include "engine/checkpoint.h"
#ifdef KVSERVE_WITH_CUDA
#include "kernels/device_info.h"
#endif

namespace kvserve {

ModelConfig read_model_config(const std::string& model) {
  if (is_dummy_model(model)) return dummy_model_config(model);
  return parse_model_config(model + "/config.json");
}

absl::Status check(const EngineSpec& spec) {
  if (spec.device != "auto" && spec.device != "cpu" && spec.device != "cuda") {
    return absl::InvalidArgumentError("unknown device '" + spec.device +
                                      "' (use auto, cpu or cuda)");
  }
  if (spec.kv_pool_blocks < 0) {
    return absl::InvalidArgumentError("the KV pool needs a positive number of blocks");
  }
  if (spec.kv_pool_blocks == 0 && spec.kv_pool_bytes <= 0) {
    return absl::InvalidArgumentError("the KV pool needs a positive size");
  }
  const ModelConfig model = read_model_config(spec.model);
  if (absl::Status problem = validate(spec.kv, model); !problem.ok()) return problem;
  const int32_t blocks = spec.kv_pool_blocks > 0
                             ? spec.kv_pool_blocks
                             : KvCacheManager::blocks_in_budget(spec.kv_pool_bytes, spec.kv, model);
  if (blocks < 1) {
    return absl::InvalidArgumentError("a KV pool of " + std::to_string(spec.kv_pool_bytes >> 20) +
                                      " MiB holds no block of " + describe(spec.kv) +
                                      " for this model");
  }
  return absl::OkStatus();
}

BuiltBackend build_backend(const EngineSpec& spec) {
  if (const absl::Status problem = check(spec); !problem.ok()) {
    throw std::invalid_argument(std::string(problem.message()));
  }
  BuiltBackend built;
  std::string reason;
  built.device = resolve_device(spec.device, reason);
  spdlog::info("device: {} ({}), CUDA graphs {}", built.device, reason,
               spec.backend.cuda_graphs ? "on" : "off");
  ModelWeights weights = load_model(spec.model);  // logs what it loaded and how long it took
  built.model = weights.config;
  built.kv = spec.kv;
  const int32_t blocks = spec.kv_pool_blocks > 0 ? spec.kv_pool_blocks
                                                 : KvCacheManager::blocks_in_budget(
                                                       spec.kv_pool_bytes, spec.kv, built.model);
  built.cache = std::make_unique<KvCacheManager>(spec.kv, built.model, blocks);
  spdlog::info("kv cache: {}, {} blocks of {} bytes ({} MiB pool)", describe(spec.kv), blocks,
               built.cache->bytes_per_block(),
               (static_cast<int64_t>(blocks) * built.cache->bytes_per_block()) >> 20);
  built.backend = make_backend(built.device, std::move(weights), *built.cache, spec.backend);
  return built;
}

std::unique_ptr<Engine> build_engine(BuiltBackend built, const EngineOptions& options) {
  return std::make_unique<Engine>(built.model, std::move(built.cache), std::move(built.backend),
                                  options);
}

std::unique_ptr<Engine> build_engine(const EngineSpec& spec) {
  return build_engine(build_backend(spec), spec.engine);
}

double device_copy_bandwidth(const std::string& device, size_t bytes) {
#ifdef KVSERVE_WITH_CUDA
  if (device == "cuda") return cuda::copy_bandwidth(bytes);
#else
  (void)bytes;
#endif
  (void)device;
  return 0.0;
}

}  // namespace kvserve
