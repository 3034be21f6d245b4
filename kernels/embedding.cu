// Token plus position embedding, one thread per pair of channels.
#include "kernels/embedding.h"

#include <stdexcept>

#include "kernels/cuda_check.h"

namespace kvserve::cuda {
namespace {

// ---- CUDA kernels

__global__ void embedding_forward_kernel(float2* x, const int32_t* tokens, const int32_t* positions,
                                         const __half2* wte, const __half2* wpe, int rows,
                                         int half_channels) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= static_cast<int64_t>(rows) * half_channels) return;
  const int t = static_cast<int>(e / half_channels), c = static_cast<int>(e % half_channels);
  const float2 a = __half22float2(wte[static_cast<int64_t>(tokens[t]) * half_channels + c]);
  const float2 b = __half22float2(wpe[static_cast<int64_t>(positions[t]) * half_channels + c]);
  x[e] = make_float2(a.x + b.x, a.y + b.y);
}

}  // namespace

// ---- kernel launchers

void embedding_forward(float* x, const int32_t* tokens, const int32_t* positions, const __half* wte,
                       const __half* wpe, int rows, int channels, cudaStream_t stream) {
  if (rows < 0 || channels <= 0 || channels % 2 != 0) {
    throw std::invalid_argument("embedding_forward: channels must be positive and even");
  }
  if (rows == 0) return;
  if (!x || !tokens || !positions || !wte || !wpe) {
    throw std::invalid_argument("embedding_forward: null pointer");
  }
  const int64_t total = static_cast<int64_t>(rows) * (channels / 2);
  constexpr int kThreads = 256;
  embedding_forward_kernel<<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, 0,
                             stream>>>(reinterpret_cast<float2*>(x), tokens, positions,
                                       reinterpret_cast<const __half2*>(wte),
                                       reinterpret_cast<const __half2*>(wpe), rows, channels / 2);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
