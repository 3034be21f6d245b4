// A one-thread kernel that traps (kernels/trap.h).
#include "kernels/trap.h"

#include "kernels/cuda_check.h"

namespace kvserve::cuda {
namespace {

__global__ void trap_kernel() {
  __trap();
}

}  // namespace

void trap(cudaStream_t stream) {
  trap_kernel<<<1, 1, 0, stream>>>();
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
