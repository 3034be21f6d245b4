// The int8 residual's quantizer of one new row, lane by lane: shared by kv_quantize_residual
// (every row of a step, a launch of its own) and the decode attention kernels, which in a decode
// step quantize each item's one new row where they first read it (decode_attention's
// DecodeNewRows), so that the step needs no launch for it. Bit-exact with engine/kv_quant.cc's
// quantize_group for 8 bits.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/kv_cache_device.cuh"

namespace kvserve::cuda {

// Lanes of one head's segment in quantize_row_share: D / 8 rounded up to a power of two (at most
// 32 for head_dim up to 256).
__host__ __device__ inline int residual_segment_lanes(int head_dim) {
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

// A lane's share of a row quantized to int8: the codes of its 8 channels (u8 [8], the first in the
// low byte) and the row's fp16 (scale, zero) pair, scale in the low half.
struct Int8RowShare {
  uint2 codes;
  uint32_t pair;
};

// One lane's share of the int8 quantization of one row of one head (keys or values): channels
// x[0 .. 7] (fp16, 16-byte aligned, read only when active), the lanes of a segment (`lanes` =
// residual_segment_lanes(D), aligned) sharing min and max by shuffles, so every lane of the warp
// calls this; lanes without channels pass active = false and get nothing meaningful back.
// scale = fp16((max - min) / 255), zero = fp16(min), codes rint((x - zero) / scale) clamped to
// [0, 255].
__device__ __forceinline__ Int8RowShare quantize_row_share(const __half* x, int lanes,
                                                           bool active) {
  float v[8];
  float lo = INFINITY, hi = -INFINITY;
  if (active) {
    const uint4 loaded = *reinterpret_cast<const uint4*>(x);  // one 16-byte load
    unpack8(loaded, v);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      lo = fminf(lo, v[k]);
      hi = fmaxf(hi, v[k]);
    }
  }
  lo = segment_min_max(lo, false, lanes);
  hi = segment_min_max(hi, true, lanes);
  Int8RowShare share{};
  if (!active) return share;
  const __half scale_h = __float2half_rn((hi - lo) / 255.0f);
  const __half zero_h = __float2half_rn(lo);
  const float scale = __half2float(scale_h), zero = __half2float(zero_h), inverse = 1.0f / scale;
  uint32_t packed[2] = {0, 0};
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    packed[k / 4] |= code_integer(quantized_code(v[k] - zero, scale, inverse, 255.0f))
                     << (8 * (k % 4));
  }
  const __half2 pair = __halves2half2(scale_h, zero_h);
  share.codes = make_uint2(packed[0], packed[1]);
  share.pair = *reinterpret_cast<const uint32_t*>(&pair);
  return share;
}

// Stores a lane's share (channels 8 chunk .. 8 chunk + 7) of step row `row`'s keys (which = 0) or
// values (1) of `head` in the batch's new rows (kv_cache_view.h): codes u8 [rows][2][H][D], pairs
// [rows][2][H] (from chunk 0).
__device__ __forceinline__ void store_new_row_share(const KvCacheView& cache,
                                                    const KvBatchView& batch, int64_t row,
                                                    int which, int head, int chunk,
                                                    const Int8RowShare& share) {
  const int64_t index = (row * 2 + which) * cache.n_head + head;
  *reinterpret_cast<uint2*>(batch.new_codes + index * cache.head_dim + 8 * chunk) = share.codes;
  if (chunk == 0) batch.new_params[index] = share.pair;
}

}  // namespace kvserve::cuda
