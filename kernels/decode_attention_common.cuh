// Shared by the decode attention kernels (decode_attention_*.cu): the geometry they handle, how
// lanes share a page's value rows, fp16 unpacking, the KIVI code arithmetic, and the launchers
// decode_attention.cu dispatches to. Internal to kernels/.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/decode_attention.h"
#include "kernels/kv_cache_device.cuh"
#include "kernels/kv_cache_view.h"
#include "kernels/kv_quantize_residual.cuh"
#include "kernels/residual_order.h"

namespace kvserve::cuda::decode_detail {

constexpr int kD = 64;     // head_dim
constexpr int kPage = 32;  // tokens per page
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxChunk = 2048;  // shared scores: 8 KB

// How a warp's lanes share one page's value rows: kChannels consecutive channels per lane,
// kGroups lanes per token, kTokens tokens per pass.
template <KvKind KIND, int BITS>
struct ValueLanes {
  static constexpr int kChannels = KIND == KvKind::kFp16 ? 8 : 32 / BITS;
  static constexpr int kGroups = kD / kChannels;
  static constexpr int kTokens = 32 / kGroups;
};

// 1/sqrt(head_dim), the scale of every query: exact in fp16 and fp32 for head_dim 64.
inline constexpr float kQueryScale = 0.125f;
static_assert(kQueryScale * kQueryScale * kD == 1.0f, "kQueryScale is 1/sqrt(kD)");

// What one lane reads of one page (one head) for the values, in registers (fp16 values; the KIVI
// values lanes of the online kernel). Loading is split from the arithmetic so that a warp has the
// next page's loads in flight while it computes the current page.
template <KvKind KIND, int BITS>
struct ValueFragment {
  uint4 raw[8];  // fp16: tokens lane / 8 + 4 i, channels 8 (lane % 8) ..
};
template <int BITS>
struct ValueFragment<KvKind::kKivi, BITS> {
  static constexpr int kCount = kPage / ValueLanes<KvKind::kKivi, BITS>::kTokens;
  uint32_t words[kCount];  // code word lane % (2 b) of tokens lane / (2 b) + 16 / b * i
  __half2 params[kCount];  // its (scale, zero)
};

template <KvKind KIND, int BITS>
__device__ __forceinline__ ValueFragment<KIND, BITS> load_values(const KvCacheView& c,
                                                                 const uint8_t* page, int head,
                                                                 int lane) {
  using L = ValueLanes<KIND, BITS>;
  const int group = lane % L::kGroups, sub = lane / L::kGroups;
  ValueFragment<KIND, BITS> f;
  if constexpr (KIND == KvKind::kFp16) {
    const __half* values = reinterpret_cast<const __half*>(page + c.value_codes) +
                           static_cast<int64_t>(head) * kPage * kD;  // [P][D]
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      f.raw[i] = *reinterpret_cast<const uint4*>(values + (sub + 4 * i) * kD + 8 * group);
    }
  } else {
    constexpr int kWordsPerToken = kD * BITS / 32;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(page + c.value_codes) +
                            static_cast<int64_t>(head) * kPage * kWordsPerToken;  // [P][D*b/32]
    const int groups_per_token = kD / c.value_group;
    const __half2* params = reinterpret_cast<const __half2*>(page + c.value_params) +
                            static_cast<int64_t>(head) * kPage * groups_per_token;  // [P][D/GV]
    const int param = group * (32 / BITS) / c.value_group;
#pragma unroll
    for (int i = 0; i < f.kCount; ++i) {
      const int t = sub + L::kTokens * i;
      f.words[i] = words[t * kWordsPerToken + group];
      f.params[i] = params[t * groups_per_token + param];
    }
  }
  return f;
}

// ---- KIVI codes
// Code positions whose masked value still fits the 23 mantissa bits; the codes above are read
// from the word shifted right past them.
template <int BITS>
constexpr int kDirectCodes = BITS == 2 ? 11 : 5;

// The bit offset a code at `pos` of its word is read at (see kDirectCodes).
template <int BITS>
__host__ __device__ constexpr int code_offset(int pos) {
  return BITS * (pos < kDirectCodes<BITS> ? pos : pos - kDirectCodes<BITS>);
}

// code * 2^offset as a float, for the code of `bits`-wide mask at bit `offset` of w (offset +
// bits <= 23): the bits under the exponent of 2^23, minus 2^23.
template <int BITS>
__device__ __forceinline__ float masked_code(uint32_t w, int offset) {
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  return __int_as_float(0x4B000000u | (w & (kMask << offset))) - 8388608.0f;
}

// 2^-e exactly.
__device__ __forceinline__ float power_of_two_inverse(int e) {
  return __int_as_float((127 - e) << 23);
}

// decode_attention's DecodeNewRows in a KIVI kernel: the block of the split that holds the item's
// new token (position len - 1) quantizes it (an int8 residual) into the batch's new rows and, with
// new_rows.store, stores it into its residual slot (kernels/residual_order.h: the next entry of
// the window, or where the item flushes a group at this step, the entry of the newest flushed
// token, which kv_quantize_pages has read and attention reads from the page), before the barrier
// after which its warps read the window. Its last warp does it (lanes 0 .. 7 the keys, 8 .. 15 the
// values, 8 channels each), while warps 0 and 1 load q. row: the item's row in qkv.
__device__ __forceinline__ void write_item_new_row(const KvCacheView& cache,
                                                   const KvBatchView& batch, const __half* qkv,
                                                   int qkv_stride, int item, int64_t row, int head,
                                                   int split, int chunk, int len,
                                                   DecodeNewRows new_rows) {
  static_assert(kD / 8 == 8, "a row of a head is 8 lanes of 8 channels");
  if (!(new_rows.quantize || new_rows.store)) return;
  if (threadIdx.x / 32 != kWarps - 1 || split != (len - 1) / chunk) return;
  const int lane = threadIdx.x % 32, which = lane / 8 % 2, part = lane % 8;
  const bool active = lane < 16;
  const __half* x = qkv + row * qkv_stride + (1 + which) * cache.n_head * kD + head * kD + 8 * part;
  const int pos = len - 1;
  const ResidualStep step =
      ResidualStep::of(pos, len, paged_count(cache, pos), paged_count(cache, len));
  const int slot = step.new_row_entry(0);
  const bool store = new_rows.store && step.new_rows == 1;
  const int32_t* residual_slots = batch.residual_slots + batch.residual_offset[item];
  if (!cache.residual_int8) {  // an fp16 row: copied as it is
    if (active && store) {
      *reinterpret_cast<uint4*>(residual_row(cache, residual_slots, head, slot, which) + 8 * part) =
          *reinterpret_cast<const uint4*>(x);
    }
    return;
  }
  const Int8RowShare share = quantize_row_share(x, 8, active);
  if (!active) return;
  store_new_row_share(cache, batch, row, which, head, part, share);  // read by the window's warp
  if (store) {
    const Int8ResidualRow destination = int8_residual_row(cache, residual_slots, head, slot, which);
    reinterpret_cast<uint2*>(destination.codes)[part] = share.codes;
    if (part == 0) *destination.pair = share.pair;
  }
}

// The launchers decode_attention dispatches to. split_partial: null when split.splits == 1;
// new_rows as decode_attention's (the fp16 kernel ignores it: fp16 pages have no residual).
#define KVSERVE_DECODE_LAUNCH_ARGS                                                               \
  const KvCacheView &cache, const KvBatchView &batch, DecodeSplit split, const __half *qkv,      \
      int qkv_stride, __half *out, int out_stride, float *split_partial, DecodeNewRows new_rows, \
      cudaStream_t stream
// fp16 pages (decode_attention_fp16.cu).
void launch_fp16(KVSERVE_DECODE_LAUNCH_ARGS);
// KIVI pages of 2 or 4 bits, the "online" kernel or (2-bit only) "tensor"
// (decode_attention_kivi.cu).
void launch_kivi_online(bool tensor, KVSERVE_DECODE_LAUNCH_ARGS);
// 2-bit KIVI pages, the "packed" kernel (decode_attention_packed.cu).
void launch_kivi_packed(KVSERVE_DECODE_LAUNCH_ARGS);

}  // namespace kvserve::cuda::decode_detail
