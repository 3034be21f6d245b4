// Device-side helpers shared by the KV cache kernels: the residual rule, block addressing, the
// fp16 window and the quantizer. Bit-exact with engine/kv_quant.{h,cc} and engine/cpu_kv_cache.cc.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/kv_cache_view.h"

namespace kvserve::cuda {

// Tokens of an n-token sequence that live in pages (engine/kv_format.cc paged_token_count).
__device__ __forceinline__ int paged_count(const KvCacheView& c, int n) {
  if (c.kind != KvKind::kKivi) return n;
  if (n < c.residual + c.key_group) return 0;
  return c.key_group * ((n - c.residual) / c.key_group);
}

__device__ __forceinline__ uint8_t* block_ptr(const KvCacheView& c, int32_t id) {
  return c.blocks + static_cast<int64_t>(id) * c.block_bytes;
}

// fp16 [D] row of residual slot `slot` of one head; which = 0 keys, 1 values.
// residual_blocks: the item's [keys 0, values 0, keys 1, ...].
__device__ __forceinline__ __half* residual_row(const KvCacheView& c,
                                                const int32_t* residual_blocks, int head, int slot,
                                                int which) {
  const int per_block = c.residual_tokens_per_block;
  const int32_t id = residual_blocks[2 * (slot / per_block) + which];
  return reinterpret_cast<__half*>(block_ptr(c, id)) +
         (static_cast<int64_t>(head) * per_block + slot % per_block) * c.head_dim;
}

// The fp16 window of one item and head at a step: positions [paged(start), start) are the old
// residual (valid until kv_compact_residual runs), positions [start, end) the step's new keys and
// values in qkv ([rows][3C]: q | k | v).
struct KvWindow {
  const KvCacheView* cache;
  const int32_t* residual_blocks;
  const __half* qkv;  // the item's first row
  int64_t qkv_stride;
  int head, start, window_start;

  __device__ __forceinline__ const __half* row(int pos, int which) const {
    if (pos < start) return residual_row(*cache, residual_blocks, head, pos - window_start, which);
    const int channels = cache->n_head * cache->head_dim;
    return qkv + (pos - start) * qkv_stride + (1 + which) * channels + head * cache->head_dim;
  }
};

// code * scale + zero without FMA contraction, so dequantized values equal the CPU's bit for bit.
__device__ __forceinline__ float dequantize(uint32_t code, float scale, float zero) {
  return __fadd_rn(__fmul_rn(static_cast<float>(code), scale), zero);
}

// Element d of the key (which = 0) or value (1) in slot `slot` of one head of `page`, as the cache
// holds it for attention: dequantized with its group's (scale, zero), or the stored fp16. Bit-exact
// with engine/cpu_kv_cache.cc's dequantize_page; a new page format extends this reader with it.
// KIND and BITS as the view's kind and bits, D its head_dim (compile-time where kernels know them).
template <KvKind KIND, int BITS>
__device__ __forceinline__ float page_element(const KvCacheView& c, const uint8_t* page, int head,
                                              int slot, int d, int which, int D) {
  const int P = c.page_tokens;
  const int64_t codes = which == 0 ? c.key_codes : c.value_codes;
  const int64_t params = which == 0 ? c.key_params : c.value_params;
  const int64_t token = static_cast<int64_t>(head) * P + slot;
  if constexpr (KIND == KvKind::kFp16) {
    return __half2float(reinterpret_cast<const __half*>(page + codes)[token * D + d]);
  } else if constexpr (KIND == KvKind::kInt8) {
    const __half* p = reinterpret_cast<const __half*>(page + params) + 2 * token;
    return dequantize(page[codes + token * D + d], __half2float(p[0]), __half2float(p[1]));
  } else {
    constexpr int kPerWord = 32 / BITS;
    constexpr uint32_t kMask = (1u << BITS) - 1u;
    const auto* words = reinterpret_cast<const uint32_t*>(page + codes);
    if (which == 0 && !c.per_token_keys) {  // kivi keys: per channel, packed along tokens
      const int G = c.key_group;
      const int64_t channel = static_cast<int64_t>(head) * D + d;
      const uint32_t word = words[channel * (P / kPerWord) + slot / kPerWord];
      const __half* p =
          reinterpret_cast<const __half*>(page + params) + 2 * (channel * (P / G) + slot / G);
      return dequantize((word >> (BITS * (slot % kPerWord))) & kMask, __half2float(p[0]),
                        __half2float(p[1]));
    }
    const int GV = c.value_group;  // per token, packed along channels
    const uint32_t word = words[token * (D / kPerWord) + d / kPerWord];
    const __half* p =
        reinterpret_cast<const __half*>(page + params) + 2 * (token * (D / GV) + d / GV);
    return dequantize((word >> (BITS * (d % kPerWord))) & kMask, __half2float(p[0]),
                      __half2float(p[1]));
  }
}

// The same element at position pos of one item (pages: the item's logical page -> block id).
template <int D, KvKind KIND, int BITS>
__device__ __forceinline__ float paged_element(const KvCacheView& c, const int32_t* pages, int head,
                                               int pos, int d, int which) {
  const int P = c.page_tokens;
  return page_element<KIND, BITS>(c, block_ptr(c, pages[pos / P]), head, pos % P, d, which, D);
}

// page_element with the format read from the view at run time, for kernels that are not
// specialised on it (the sampled quantization error).
__device__ __forceinline__ float page_element(const KvCacheView& c, const uint8_t* page, int head,
                                              int slot, int d, int which) {
  const int D = c.head_dim;
  if (c.kind == KvKind::kFp16)
    return page_element<KvKind::kFp16, 16>(c, page, head, slot, d, which, D);
  if (c.kind == KvKind::kInt8)
    return page_element<KvKind::kInt8, 8>(c, page, head, slot, d, which, D);
  if (c.bits == 4) return page_element<KvKind::kKivi, 4>(c, page, head, slot, d, which, D);
  return page_element<KvKind::kKivi, 2>(c, page, head, slot, d, which, D);
}

// Quantizes x(0) .. x(n-1) (fp16 values) with `bits`-bit codes into whole 32-bit words (n is a
// multiple of 32 / bits), LSB first, and stores (scale, zero) as an fp16 pair at params.
template <typename Fetch>
__device__ __forceinline__ void quantize_to_words(Fetch x, int n, int bits, uint32_t* words,
                                                  __half* params) {
  float lo = x(0), hi = lo;
  for (int i = 1; i < n; ++i) {
    const float v = x(i);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  const float max_code = static_cast<float>((1 << bits) - 1);
  const __half scale_h = __float2half_rn((hi - lo) / max_code);
  const __half zero_h = __float2half_rn(lo);
  params[0] = scale_h;
  params[1] = zero_h;
  const float scale = __half2float(scale_h), zero = __half2float(zero_h);
  const int per_word = 32 / bits;
  for (int w = 0; w < n / per_word; ++w) {
    uint32_t word = 0;
    for (int k = 0; k < per_word; ++k) {
      const float q = scale > 0.0f ? rintf((x(w * per_word + k) - zero) / scale) : 0.0f;
      word |= static_cast<uint32_t>(fminf(fmaxf(q, 0.0f), max_code)) << (bits * k);
    }
    words[w] = word;
  }
}

}  // namespace kvserve::cuda
