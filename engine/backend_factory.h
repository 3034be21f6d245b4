// Chooses and builds a backend for --device auto|cpu|cuda.
#pragma once

#include <memory>
#include <string>

#include "engine/backend.h"
#include "engine/kv_cache_manager.h"
#include "engine/model_weights.h"

namespace kvserve {

// Maps "auto" to the backend this build and machine can run, and says why in `reason`.
// Throws std::invalid_argument for an unknown device or one this build cannot run.
std::string resolve_device(const std::string& requested, std::string& reason);

struct BackendOptions {
  // CUDA backend: replay decode steps from CUDA graphs. KVSERVE_CUDA_GRAPHS=0 in the environment
  // turns them off as well.
  bool cuda_graphs = true;
};

std::unique_ptr<Backend> make_backend(const std::string& device, ModelWeights weights,
                                      const KvCacheManager& cache,
                                      const BackendOptions& options = {});

}  // namespace kvserve
