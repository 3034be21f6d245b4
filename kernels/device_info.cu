#include "kernels/device_info.h"

#include <map>
#include <mutex>
#include <stdexcept>
#include <utility>

#include "kernels/cuda_check.h"

namespace kvserve::cuda {

int visible_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver/device" error so later calls start clean
    return 0;
  }
  return count;
}

DeviceInfo device_info(int index) {
  cudaDeviceProp prop{};
  KVSERVE_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
  KVSERVE_CUDA_CHECK(cudaSetDevice(index));
  DeviceInfo info;
  info.name = prop.name;
  info.compute_capability_major = prop.major;
  info.compute_capability_minor = prop.minor;
  KVSERVE_CUDA_CHECK(cudaMemGetInfo(&info.free_memory_bytes, &info.total_memory_bytes));
  return info;
}

double copy_bandwidth(size_t bytes) {
  void *src = nullptr, *dst = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  KVSERVE_CUDA_CHECK(cudaMalloc(&src, bytes));
  KVSERVE_CUDA_CHECK(cudaMalloc(&dst, bytes));
  KVSERVE_CUDA_CHECK(cudaMemset(src, 1, bytes));
  KVSERVE_CUDA_CHECK(cudaEventCreate(&start));
  KVSERVE_CUDA_CHECK(cudaEventCreate(&stop));
  float best_ms = 0.0f;
  for (int i = 0; i < 10; ++i) {  // the first copies warm up clocks and TLBs
    KVSERVE_CUDA_CHECK(cudaEventRecord(start));
    KVSERVE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice));
    KVSERVE_CUDA_CHECK(cudaEventRecord(stop));
    KVSERVE_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    KVSERVE_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (i == 0 || ms < best_ms) best_ms = ms;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(src);
  cudaFree(dst);
  return 2.0 * static_cast<double>(bytes) / (best_ms * 1e-3);
}

void allow_dynamic_shared_memory(const char* op, const void* kernel, size_t bytes,
                                 const std::string& remedy) {
  constexpr size_t kWithoutOptIn = 48 * 1024;
  if (bytes <= kWithoutOptIn) return;
  int device = 0;
  KVSERVE_CUDA_CHECK(cudaGetDevice(&device));
  // What each (device, kernel) may take, opted in at its first launch above 48 KiB: later
  // launches look it up instead of asking the runtime again.
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, size_t> allowed;
  size_t most_dynamic = 0;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    auto it = allowed.find({device, kernel});
    if (it == allowed.end()) {
      int most = 0;
      KVSERVE_CUDA_CHECK(
          cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
      cudaFuncAttributes attributes{};
      KVSERVE_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
      const size_t dynamic = static_cast<size_t>(most) - attributes.sharedSizeBytes;
      KVSERVE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(dynamic)));
      it = allowed.emplace(std::make_pair(device, kernel), dynamic).first;
    }
    most_dynamic = it->second;
  }
  if (bytes > most_dynamic) {
    throw std::invalid_argument(std::string(op) + ": needs " + std::to_string(bytes) +
                                " bytes of shared memory a block, more than the device's " +
                                std::to_string(most_dynamic) +
                                (remedy.empty() ? "" : ": " + remedy));
  }
}

}  // namespace kvserve::cuda
