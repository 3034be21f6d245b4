// KV write path, part 0: the step's new keys and values quantized to int8 as they enter the
// window. One warp per (row, keys or values, head) of the step, channels lane, lane + 32, ...
// (head_dim 256 at most): a prefill step's thousands of rows spread over the whole GPU (one block
// per item and head, looping over its rows, took 248 us a layer for 16 x 512 rows on an H100).
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
                                            const __half* qkv, int qkv_stride, int rows) {
  const int lane = threadIdx.x % 32;
  const int D = cache.head_dim, H = cache.n_head, C = H * D;
  // Warp w: head w % H, keys or values (w / H) % 2, row w / (2H): consecutive warps read
  // consecutive heads of one row.
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (warp >= static_cast<int64_t>(rows) * 2 * H) return;
  const int head = static_cast<int>(warp % H), which = static_cast<int>(warp / H % 2);
  const int64_t row = warp / (2 * H);
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
  const float scale = __half2float(scale_h), zero = __half2float(zero_h), inverse = 1.0f / scale;
  const int64_t index = (row * 2 + which) * H + head;
  uint8_t* codes = batch.new_codes + index * D;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int d = lane + 32 * k;
    if (d >= D) continue;
    const float q = scale > 0.0f ? rint_quotient(v[k] - zero, scale, inverse) : 0.0f;
    codes[d] = static_cast<uint8_t>(fminf(fmaxf(q, 0.0f), 255.0f));
  }
  if (lane == 0) {
    const __half2 pair = __halves2half2(scale_h, zero_h);
    batch.new_params[index] = *reinterpret_cast<const uint32_t*>(&pair);
  }
}

}  // namespace

// ---- kernel launchers

void kv_quantize_residual(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                          int qkv_stride, int rows, cudaStream_t stream) {
  check_kv_launch("kv_quantize_residual", cache, batch, qkv, qkv_stride);
  if (batch.items == 0 || cache.kind != KvKind::kKivi || !cache.residual_int8) return;
  if (cache.head_dim > kMaxHeadDim) {
    throw std::invalid_argument("kv_quantize_residual: head_dim above 256");
  }
  if (rows < batch.items) {
    throw std::invalid_argument("kv_quantize_residual: fewer rows than items");
  }
  const int64_t warps = static_cast<int64_t>(rows) * 2 * cache.n_head;
  const int64_t blocks = (warps + kWarps - 1) / kWarps;
  if (blocks > INT32_MAX) throw std::invalid_argument("kv_quantize_residual: too many rows");
  kv_quantize_residual_kernel<<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(
      cache, batch, qkv, qkv_stride, rows);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
