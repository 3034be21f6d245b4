// KV write path, part 0: the step's new keys and values quantized to int8 as they enter the
// window. One block of 4 warps per (item, head); a warp takes one (row, keys or values) at a time,
// channels lane, lane + 32, ... (head_dim 256 at most).
#include "kernels/kv_quantize_residual.h"

#include <stdexcept>

#include "kernels/cuda_check.h"
#include "kernels/kv_cache_device.cuh"

namespace kvserve::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxHeadDim = 256;  // engine/kv_format.cc's limit
constexpr int kPerLane = kMaxHeadDim / 32;

__device__ __forceinline__ float warp_min_max(float v, bool max) {
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = max ? fmaxf(v, other) : fminf(v, other);
  }
  return v;
}

// ---- CUDA kernels

__global__ void kv_quantize_residual_kernel(const KvCacheView cache, const KvBatchView batch,
                                            const __half* qkv, int qkv_stride) {
  const int item = blockIdx.x, head = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = cache.head_dim, H = cache.n_head, C = H * D;
  const int count = batch.count[item];
  const int64_t first_row = batch.row[item];
  for (int r = warp; r < 2 * count; r += kWarps) {
    const int64_t row = first_row + r / 2;
    const int which = r % 2;
    const __half* x = qkv + row * qkv_stride + (1 + which) * C + head * D;
    float v[kPerLane];
    float lo = INFINITY, hi = -INFINITY;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int d = lane + 32 * k;
      v[k] = d < D ? __half2float(x[d]) : 0.0f;
      if (d < D) {
        lo = fminf(lo, v[k]);
        hi = fmaxf(hi, v[k]);
      }
    }
    lo = warp_min_max(lo, false);
    hi = warp_min_max(hi, true);
    const __half scale_h = __float2half_rn((hi - lo) / 255.0f);
    const __half zero_h = __float2half_rn(lo);
    const float scale = __half2float(scale_h), zero = __half2float(zero_h);
    const int64_t index = (row * 2 + which) * H + head;
    uint8_t* codes = batch.new_codes + index * D;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int d = lane + 32 * k;
      if (d >= D) continue;
      const float q = scale > 0.0f ? rintf((v[k] - zero) / scale) : 0.0f;
      codes[d] = static_cast<uint8_t>(fminf(fmaxf(q, 0.0f), 255.0f));
    }
    if (lane == 0) {
      const __half2 pair = __halves2half2(scale_h, zero_h);
      batch.new_params[index] = *reinterpret_cast<const uint32_t*>(&pair);
    }
  }
}

}  // namespace

// ---- kernel launchers

void kv_quantize_residual(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                          int qkv_stride, cudaStream_t stream) {
  check_kv_launch("kv_quantize_residual", cache, batch, qkv, qkv_stride);
  if (batch.items == 0 || cache.kind != KvKind::kKivi || !cache.residual_int8) return;
  if (cache.head_dim > kMaxHeadDim) {
    throw std::invalid_argument("kv_quantize_residual: head_dim above 256");
  }
  kv_quantize_residual_kernel<<<dim3(batch.items, cache.n_head), kWarps * 32, 0, stream>>>(
      cache, batch, qkv, qkv_stride);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
