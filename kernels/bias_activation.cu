// Bias (+ GELU) in place, two channels per thread (half2 loads and stores).
#include "kernels/bias_activation.h"

#include <cstdint>
#include <stdexcept>

#include "kernels/cuda_check.h"

namespace kvserve::cuda {
namespace {

// ---- CUDA kernels

template <BiasActivation ACT>
__device__ __forceinline__ float activate(float v) {
  if constexpr (ACT == BiasActivation::kGeluTanh) {
    constexpr float kSqrt2OverPi = 0.7978845608028654f;
    return 0.5f * v * (1.0f + tanhf(kSqrt2OverPi * (v + 0.044715f * v * v * v)));
  } else if constexpr (ACT == BiasActivation::kGeluErf) {
    return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
  } else {
    return v;
  }
}

template <BiasActivation ACT>
__global__ void bias_activation_forward_kernel(__half2* y, const __half2* bias, int rows,
                                               int half_cols) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= static_cast<int64_t>(rows) * half_cols) return;
  const float2 v = __half22float2(y[e]);
  const float2 b = __half22float2(bias[e % half_cols]);
  y[e] = __floats2half2_rn(activate<ACT>(v.x + b.x), activate<ACT>(v.y + b.y));
}

}  // namespace

// ---- kernel launchers

void bias_activation_forward(__half* y, const __half* bias, int rows, int cols,
                             BiasActivation activation, cudaStream_t stream) {
  if (rows < 0 || cols <= 0 || cols % 2 != 0) {
    throw std::invalid_argument("bias_activation_forward: cols must be positive and even");
  }
  if (rows == 0) return;
  if (!y || !bias) throw std::invalid_argument("bias_activation_forward: null pointer");
  const int64_t total = static_cast<int64_t>(rows) * (cols / 2);
  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
  auto* y2 = reinterpret_cast<__half2*>(y);
  const auto* b2 = reinterpret_cast<const __half2*>(bias);
  switch (activation) {
    case BiasActivation::kNone:
      bias_activation_forward_kernel<BiasActivation::kNone>
          <<<blocks, kThreads, 0, stream>>>(y2, b2, rows, cols / 2);
      break;
    case BiasActivation::kGeluTanh:
      bias_activation_forward_kernel<BiasActivation::kGeluTanh>
          <<<blocks, kThreads, 0, stream>>>(y2, b2, rows, cols / 2);
      break;
    case BiasActivation::kGeluErf:
      bias_activation_forward_kernel<BiasActivation::kGeluErf>
          <<<blocks, kThreads, 0, stream>>>(y2, b2, rows, cols / 2);
      break;
  }
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
