// Layer norm, one warp per row: a pass for the mean (adding the residual bias on the way), one for
// the variance about that mean (two-pass, as the CPU reference), one to write.
#include "kernels/layer_norm.h"

#include <stdexcept>

#include "kernels/cuda_check.h"

namespace kvserve::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;

// ---- CUDA kernels

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__global__ void layer_norm_forward_kernel(__half* out, float* x, const int32_t* row_index,
                                          const __half* residual_bias, const __half* weight,
                                          const __half* bias, int rows, int channels, float eps) {
  const int r = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (r >= rows) return;
  float* in = x + static_cast<int64_t>(row_index ? row_index[r] : r) * channels;
  float sum = 0.0f;
  for (int c = lane; c < channels; c += 32) {
    float v = in[c];
    if (residual_bias) {
      v += __half2float(residual_bias[c]);
      in[c] = v;
    }
    sum += v;
  }
  const float mean = warp_sum(sum) / channels;
  float var = 0.0f;
  for (int c = lane; c < channels; c += 32) var += (in[c] - mean) * (in[c] - mean);
  const float inv_std = rsqrtf(warp_sum(var) / channels + eps);
  __half* y = out + static_cast<int64_t>(r) * channels;
  for (int c = lane; c < channels; c += 32) {
    y[c] =
        __float2half_rn((in[c] - mean) * inv_std * __half2float(weight[c]) + __half2float(bias[c]));
  }
}

}  // namespace

// ---- kernel launchers

void layer_norm_forward(__half* out, float* x, const int32_t* row_index,
                        const __half* residual_bias, const __half* weight, const __half* bias,
                        int rows, int channels, float eps, cudaStream_t stream) {
  if (rows < 0 || channels <= 0 || !(eps > 0.0f)) {
    throw std::invalid_argument("layer_norm_forward: bad rows, channels or eps");
  }
  if (rows == 0) return;
  if (!out || !x || !weight || !bias)
    throw std::invalid_argument("layer_norm_forward: null pointer");
  const int blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  layer_norm_forward_kernel<<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
      out, x, row_index, residual_bias, weight, bias, rows, channels, eps);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
