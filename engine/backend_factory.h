// Chooses and builds a backend for --device auto|cpu|cuda.
#pragma once

#include <memory>
#include <string>

#include "engine/backend.h"
#include "engine/kv_cache_manager.h"
#include "engine/model_weights.h"
#include "kernels/decode_attention_variant.h"
#include "kernels/prefill_attention_variant.h"

namespace kvserve {

// Maps "auto" to the backend this build and machine can run, and says why in `reason`.
// Throws std::invalid_argument for an unknown device or one this build cannot run.
std::string resolve_device(const std::string& requested, std::string& reason);

struct BackendOptions {
  // CUDA backend: replay decode steps from CUDA graphs (`--cuda-graphs`).
  bool cuda_graphs = true;
  // CUDA backend: the kernel of KIVI decode attention (`--decode-attention`).
  cuda::DecodeAttentionVariant decode_attention = cuda::DecodeAttentionVariant::kPacked;
  // CUDA backend: the kernel of prefill and mixed steps (`--prefill-attention`).
  cuda::PrefillAttentionVariant prefill_attention = cuda::PrefillAttentionVariant::kTensor;
  // Test hook (`kvserve serve --test-lose-device-at-forward N`, a hidden flag): the backend's Nth
  // forward call, the warm-up's included, loses the device; 0: never. The CPU backend then throws
  // DeviceLostError (engine/fault_injection.h); the CUDA backend launches a trapping kernel first
  // (kernels/trap.h), a real sticky error that its own probe must recognise.
  int64_t lose_device_at_forward = 0;
};

// The backend gets the pool's format and size from `cache`, never the cache itself.
std::unique_ptr<Backend> make_backend(const std::string& device, ModelWeights weights,
                                      const KvCacheManager& cache,
                                      const BackendOptions& options = {});

}  // namespace kvserve
