#include "engine/backend_factory.h"

#include <spdlog/spdlog.h>

#include <stdexcept>

#include "engine/cpu_backend.h"
#include "engine/fault_injection.h"
#ifdef KVSERVE_WITH_CUDA
#include "engine/cuda/cuda_backend.h"
#include "kernels/device_info.h"
#endif

namespace kvserve {

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
    if (options.lose_device_at_forward > 0) {
      spdlog::warn("test hook: the device will be lost at forward call {}",
                   options.lose_device_at_forward);
      return std::make_unique<DeviceLostInjector>(std::move(cpu), options.lose_device_at_forward);
    }
    return cpu;
  }
#ifdef KVSERVE_WITH_CUDA
  if (device == "cuda") {
    CudaBackendOptions cuda_options;
    cuda_options.cuda_graphs = options.cuda_graphs;
    if (options.lose_device_at_forward > 0) {
      spdlog::warn("test hook: a kernel will trap at forward call {}",
                   options.lose_device_at_forward);
    }
    cuda_options.trap_at_forward = options.lose_device_at_forward;
    cuda_options.decode_attention = options.decode_attention;
    cuda_options.prefill_attention = options.prefill_attention;
    return std::make_unique<CudaBackend>(weights, cache.config(), cache.num_blocks(), cuda_options);
  }
#endif
  throw std::invalid_argument("no backend for device '" + device + "'");
}

}  // namespace kvserve
