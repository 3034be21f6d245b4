// KV write path, part 0: the step's new keys and values quantized to int8 as they enter the
// window. A lane takes 8 channels of one (row, keys or values, head) with one 16-byte load; the
// lanes of a head (a segment of D / 8 lanes, rounded up to a power of two) reduce min and max by
// shuffles, and a warp takes 32 / segment heads. One warp per (row, kind, head) with 2 channels a
// lane took 67 us a layer for 16 x 512 rows on an H200 (ncu): some 200,000 warps, each mostly
// waiting on its load and its two 5-step reductions.
#include "kernels/kv_quantize_residual.h"

#include <stdexcept>

#include "kernels/cuda_check.h"
#include "kernels/kv_cache_device.cuh"

namespace kvserve::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxHeadDim = 256;  // engine/kv_format.cc's limit: 32 lanes of 8 channels

// Lanes of one head's segment: D / 8 rounded up to a power of two (at most 32).
__host__ __device__ inline int segment_lanes(int head_dim) {
  int lanes = 1;
  while (lanes < head_dim / 8) lanes *= 2;
  return lanes;
}

// min (max = false) or max over the `lanes` lanes of this lane's segment (lanes a power of two,
// segments aligned to it).
__device__ __forceinline__ float segment_min_max(float v, bool max, int lanes) {
  for (int o = lanes / 2; o > 0; o >>= 1) {
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
  const int lanes = segment_lanes(D), heads_per_warp = 32 / lanes;
  const int head_groups = (H + heads_per_warp - 1) / heads_per_warp;
  // Warp w: head group w % head_groups, keys or values (w / head_groups) % 2, row
  // w / (2 head_groups): consecutive warps read consecutive heads of one row.
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (warp >= static_cast<int64_t>(rows) * 2 * head_groups) return;  // whole warps leave
  const int which = static_cast<int>(warp / head_groups % 2);
  const int head = static_cast<int>(warp % head_groups) * heads_per_warp + lane / lanes;
  const int chunk = lane % lanes;  // channels 8 chunk .. 8 chunk + 7
  const int64_t row = warp / (2 * head_groups);
  const bool active = head < H && chunk < D / 8;
  // fp16 [8] channels of this lane: 16 bytes (qkv_stride, C and D are multiples of 8).
  float v[8];
  float lo = INFINITY, hi = -INFINITY;
  if (active) {
    const uint4 loaded = *reinterpret_cast<const uint4*>(qkv + row * qkv_stride + (1 + which) * C +
                                                         head * D + 8 * chunk);
    const __half2* h = reinterpret_cast<const __half2*>(&loaded);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __half22float2(h[k]);
      v[2 * k] = f.x;
      v[2 * k + 1] = f.y;
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      lo = fminf(lo, v[k]);
      hi = fmaxf(hi, v[k]);
    }
  }
  lo = segment_min_max(lo, false, lanes);
  hi = segment_min_max(hi, true, lanes);
  if (!active) return;
  const __half scale_h = __float2half_rn((hi - lo) / 255.0f);
  const __half zero_h = __float2half_rn(lo);
  const float scale = __half2float(scale_h), zero = __half2float(zero_h), inverse = 1.0f / scale;
  uint32_t packed[2] = {0, 0};
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    packed[k / 4] |= code_integer(quantized_code(v[k] - zero, scale, inverse, 255.0f))
                     << (8 * (k % 4));
  }
  const int64_t index = (row * 2 + which) * H + head;
  *reinterpret_cast<uint2*>(batch.new_codes + index * D + 8 * chunk) =
      make_uint2(packed[0], packed[1]);
  if (chunk == 0) {
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
  if (cache.head_dim > kMaxHeadDim || cache.head_dim % 8 != 0) {
    throw std::invalid_argument("kv_quantize_residual: head_dim not a multiple of 8 up to 256");
  }
  if (qkv_stride % 8 != 0) {
    throw std::invalid_argument("kv_quantize_residual: qkv row stride not a multiple of 8");
  }
  if (rows < batch.items) {
    throw std::invalid_argument("kv_quantize_residual: fewer rows than items");
  }
  const int heads_per_warp = 32 / segment_lanes(cache.head_dim);
  const int64_t head_groups = (cache.n_head + heads_per_warp - 1) / heads_per_warp;
  const int64_t warps = static_cast<int64_t>(rows) * 2 * head_groups;
  const int64_t blocks = (warps + kWarps - 1) / kWarps;
  if (blocks > INT32_MAX) throw std::invalid_argument("kv_quantize_residual: too many rows");
  kv_quantize_residual_kernel<<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(
      cache, batch, qkv, qkv_stride, rows);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
