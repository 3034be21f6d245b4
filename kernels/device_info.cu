#include "kernels/device_info.h"

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

}  // namespace kvserve::cuda
