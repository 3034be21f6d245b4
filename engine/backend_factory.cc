#include "engine/backend_factory.h"

#include <stdexcept>

#include "engine/cpu_backend.h"
#ifdef KVSERVE_WITH_CUDA
#include "kernels/device_info.h"
#endif

namespace kvserve {

std::string resolve_device(const std::string& requested, std::string& reason) {
  if (requested != "auto" && requested != "cpu" && requested != "cuda") {
    throw std::invalid_argument("unknown device '" + requested + "' (use auto, cpu or cuda)");
  }
  if (requested == "cuda") {
    throw std::invalid_argument(
        "--device cuda: the CUDA backend is not implemented yet (planned); use --device cpu");
  }
  if (requested == "cpu") {
    reason = "requested";
    return "cpu";
  }
#ifdef KVSERVE_WITH_CUDA
  const int gpus = cuda::visible_device_count();
  reason = gpus > 0 ? std::to_string(gpus) +
                          " GPU(s) visible, but the CUDA backend is planned, "
                          "not built yet"
                    : "no GPU visible";
#else
  reason = "built without CUDA";
#endif
  return "cpu";
}

std::unique_ptr<Backend> make_backend(const std::string& device, ModelWeights weights,
                                      const KvCacheManager& cache) {
  if (device == "cpu") return std::make_unique<CpuBackend>(std::move(weights), cache);
  throw std::invalid_argument("no backend for device '" + device + "'");
}

}  // namespace kvserve
