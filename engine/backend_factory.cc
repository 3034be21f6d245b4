#include "engine/backend_factory.h"

#include <spdlog/spdlog.h>

#include <cstdlib>
#include <stdexcept>

#include "engine/cpu_backend.h"
#include "engine/fault_injection.h"
#ifdef KVSERVE_WITH_CUDA
#include "engine/cuda/cuda_backend.h"
#include "kernels/device_info.h"
#endif

namespace kvserve {
namespace {

// KVSERVE_INJECT_DEVICE_LOST_AT_FORWARD (backend_factory.h), or 0 when unset.
int64_t injected_device_loss() {
  const char* env = std::getenv("KVSERVE_INJECT_DEVICE_LOST_AT_FORWARD");
  if (env == nullptr || *env == '\0') return 0;
  size_t parsed = 0;
  int64_t call = 0;
  try {
    call = std::stoll(env, &parsed);
  } catch (const std::exception&) {
    parsed = 0;
  }
  if (parsed != std::string(env).size() || call < 1) {
    throw std::invalid_argument(std::string("KVSERVE_INJECT_DEVICE_LOST_AT_FORWARD=") + env +
                                ": expected a forward call number >= 1");
  }
  spdlog::warn("fault injection: the device will be lost at forward call {}", call);
  return call;
}

}  // namespace

std::string resolve_device(const std::string& requested, std::string& reason) {
  if (requested != "auto" && requested != "cpu" && requested != "cuda") {
    throw std::invalid_argument("unknown device '" + requested + "' (use auto, cpu or cuda)");
  }
  if (requested == "cpu") {
    reason = "requested";
    return "cpu";
  }
#ifdef KVSERVE_WITH_CUDA
  const int gpus = cuda::visible_device_count();
  if (gpus > 0) {
    reason = requested == "cuda" ? "requested" : std::to_string(gpus) + " GPU(s) visible";
    return "cuda";
  }
  if (requested == "cuda") {
    throw std::invalid_argument("--device cuda: no CUDA GPU is visible; use --device cpu");
  }
  reason = "no GPU visible";
#else
  if (requested == "cuda") {
    throw std::invalid_argument(
        "--device cuda: this build has no CUDA backend (built without nvcc); use --device cpu");
  }
  reason = "built without CUDA";
#endif
  return "cpu";
}

std::unique_ptr<Backend> make_backend(const std::string& device, ModelWeights weights,
                                      const KvCacheManager& cache, const BackendOptions& options) {
  if (device == "cpu") {
    auto cpu = std::make_unique<CpuBackend>(std::move(weights), cache.config(), cache.num_blocks());
    if (const int64_t lose_at = injected_device_loss(); lose_at > 0) {
      return std::make_unique<DeviceLostInjector>(std::move(cpu), lose_at);
    }
    return cpu;
  }
#ifdef KVSERVE_WITH_CUDA
  if (device == "cuda") {
    CudaBackendOptions cuda_options;
    cuda_options.cuda_graphs = options.cuda_graphs;
    cuda_options.trap_at_forward = injected_device_loss();
    cuda_options.decode_attention = options.decode_attention;
    cuda_options.prefill_attention = options.prefill_attention;
    return std::make_unique<CudaBackend>(weights, cache.config(), cache.num_blocks(), cuda_options);
  }
#endif
  throw std::invalid_argument("no backend for device '" + device + "'");
}

}  // namespace kvserve
