// Device-side helpers shared by the KV cache kernels: the residual rule, block addressing, the
// fp16 window and the quantizer. Bit-exact with engine/kv_quant.{h,cc} and engine/cpu_kv_cache.cc.
#pragma once

#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda_check.h"
#include "kernels/e4m3_rounding.h"
#include "kernels/kv_cache_view.h"
#include "kernels/rint_quotient.h"

namespace kvserve::cuda {

// Tokens of an n-token sequence that live in pages (engine/kv_format.cc paged_token_count).
__device__ __forceinline__ int paged_count(const KvCacheView& c, int n) {
  if (c.kind != KvKind::kKivi) return n;
  if (n < c.residual + c.key_group) return 0;
  return c.key_group * ((n - c.residual) / c.key_group);
}

// Blocks of a write-path kernel that walks a decode step's flushing items
// (KvBatchView::flushing), each block taking units blockIdx.x, blockIdx.x + gridDim.x, ...:
// as many as the device holds at once at blocks_per_multiprocessor, or max_units (every item
// flushing) where fewer. It depends on the batch's size alone, so a captured decode graph stays
// right whatever flushes at a replayed step.
inline int flushing_grid(int max_units, int blocks_per_multiprocessor) {
  int device = 0, multiprocessors = 0;
  KVSERVE_CUDA_CHECK(cudaGetDevice(&device));
  KVSERVE_CUDA_CHECK(
      cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  return std::max(1, std::min(max_units, multiprocessors * blocks_per_multiprocessor));
}

// The units of a flushing_grid block: per_item units for each item batch.flushing lists, this
// block's being blockIdx.x, blockIdx.x + gridDim.x, ...; unit(item, u) with u in [0, per_item).
// A barrier between two units: they reuse the block's shared memory.
template <typename Unit>
__device__ __forceinline__ void for_each_flushing_unit(const KvBatchView& batch, int per_item,
                                                       Unit unit) {
  const int units = batch.flushing[0] * per_item;
  for (int u = blockIdx.x; u < units; u += gridDim.x) {
    if (u != blockIdx.x) __syncthreads();
    unit(batch.flushing[1 + u / per_item], u % per_item);
  }
}

// Copies elements [0, total) with the block's threads, store(e, load(e)), each thread issuing
// kInFlight loads before it stores any: where each load waited for the one before, a thread's
// share of a copy cost as many memory latencies as it had elements.
template <int kInFlight, typename Load, typename Store>
__device__ __forceinline__ void copy_loads_in_flight(int total, Load load, Store store) {
  for (int base = threadIdx.x; base < total; base += kInFlight * blockDim.x) {
    decltype(load(0)) loaded[kInFlight];
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      const int e = base + k * blockDim.x;
      if (e < total) loaded[k] = load(e);
    }
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      const int e = base + k * blockDim.x;
      if (e < total) store(e, loaded[k]);
    }
  }
}

__device__ __forceinline__ uint8_t* block_ptr(const KvCacheView& c, int32_t id) {
  return c.blocks + static_cast<int64_t>(id) * c.block_bytes;
}

// The slot of entry `slot` of the item's list (before the step, window position `slot`: 0 = oldest
// residual token; a step's new rows go to the entries kernels/residual_order.h gives them), keys
// (which = 0) or values (1): residual_slots is the item's [keys 0, values 0, keys 1, ...] of slot
// ids (block * c + index, engine/residual_slots.h); a slot is fp16 [H][D], or u8 [H][D] then fp16
// pairs [H].
__device__ __forceinline__ uint8_t* residual_slot(const KvCacheView& c,
                                                  const int32_t* residual_slots, int slot,
                                                  int which) {
  const int32_t id = residual_slots[2 * slot + which];
  const int32_t block = id / c.residual_tokens_per_block;
  return block_ptr(c, block) + (id - block * c.residual_tokens_per_block) * c.residual_slot_bytes;
}

// fp16 [D] row of one head in the slot of list entry `slot` (fp16 residual).
__device__ __forceinline__ __half* residual_row(const KvCacheView& c, const int32_t* residual_slots,
                                                int head, int slot, int which) {
  return reinterpret_cast<__half*>(residual_slot(c, residual_slots, slot, which)) +
         static_cast<int64_t>(head) * c.head_dim;
}

// int8 residual: one head's row in the slot of list entry `slot`, its codes u8 [D] and its
// fp16 (scale, zero) pair (the slot's pairs follow its codes, at residual_params).
struct Int8ResidualRow {
  uint8_t* codes;
  uint32_t* pair;
};
__device__ __forceinline__ Int8ResidualRow int8_residual_row(const KvCacheView& c,
                                                             const int32_t* residual_slots,
                                                             int head, int slot, int which) {
  uint8_t* base = residual_slot(c, residual_slots, slot, which);
  return {base + static_cast<int64_t>(head) * c.head_dim,
          reinterpret_cast<uint32_t*>(base + c.residual_params) + head};
}

// 8 fp16 values (one 16-byte load) as floats.
__device__ __forceinline__ void unpack8(const uint4& raw, float* out) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// A code (< 2^23) as a float: 2^23 + code by its bits, less 2^23, both exact. Plain integer and
// float operations where a conversion instruction runs at a quarter of the float rate.
__device__ __forceinline__ float code_to_float(uint32_t code) {
  return __fsub_rn(__uint_as_float(0x4b000000u | code), 0x1p23f);
}

// code * scale + zero without FMA contraction, so dequantized values equal the CPU's bit for bit.
__device__ __forceinline__ float dequantize(uint32_t code, float scale, float zero) {
  return __fadd_rn(__fmul_rn(code_to_float(code), scale), zero);
}

// The code of offset = x - zero: rint(offset / scale) clamped to [0, max_code] (0 for a constant
// group's scale 0, and for NaN), as the CPU's write_codes, kept as a float (an integer value): the
// dequantization and packing that follow then need no conversion instruction, which runs at a
// quarter of the float rate.
__device__ __forceinline__ float quantized_code(float offset, float scale, float inverse,
                                                float max_code) {
  const float q = scale > 0.0f ? rint_quotient(offset, scale, inverse) : 0.0f;
  return fminf(fmaxf(q, 0.0f), max_code);  // fmaxf takes 0 over NaN
}

// The integer of a code from quantized_code (in [0, 255]): 2^23 + code is exact, and its low
// mantissa bits are the code.
__device__ __forceinline__ uint32_t code_integer(float code) {
  return __float_as_uint(__fadd_rn(code, 0x1p23f)) - 0x4b000000u;
}

// dequantize of a code from quantized_code: the same value, float(uint(code)) being code, but for
// the sign of a zero (rintf(-0.5) is -0), which only the fp8 search's error term can see, squared.
__device__ __forceinline__ float dequantize_code(float code, float scale, float zero) {
  return __fadd_rn(__fmul_rn(code, scale), zero);
}

// ---- fp8 e4m3 (engine/kv_quant.cc): bias 7, no infinities, 0x7f / 0xff are NaN (read as 448).
__device__ __forceinline__ float e4m3_to_float(uint32_t bits) {
  const uint32_t magnitude = min(bits & 0x7fu, 0x7eu);
  const uint32_t exponent = magnitude >> 3, mantissa = magnitude & 7u;
  // Exact: a subnormal is mantissa * 2^-9; a normal (8 + mantissa) * 2^(exponent - 10).
  const float value = exponent == 0 ? code_to_float(mantissa) * 0x1p-9f
                                    : __int_as_float(((exponent + 120u) << 23) | (mantissa << 20));
  return (bits & 0x80u) ? -value : value;
}

// An fp8 (scale, zero) pair held in the low 16 bits of `bits` (scale first), as an fp16 pair
// (exact: every e4m3 value is an fp16), equal to e4m3_to_float's values, signed zeros and the NaN
// codes (read as 448) included. Without float conversions: an e4m3 magnitude (4 exponent bits, 3
// mantissa bits) shifted left by 7 into an fp16 reads as its value times 2^-8 (exponent biases 15
// and 7), subnormals included (0.mmm 2^-14 against 0.mmm 2^-6), so one exact multiplication by
// 2^8 finishes it.
__device__ __forceinline__ __half2 fp8_pair_to_half2(uint32_t bits) {
  const uint32_t sign = ((bits & 0x80u) << 8) | ((bits & 0x8000u) << 16);
  const uint32_t magnitude = __vminu2((bits & 0x7fu) | ((bits & 0x7f00u) << 8), 0x007e007eu);
  const uint32_t shifted = sign | (magnitude << 7);
  return __hmul2(*reinterpret_cast<const __half2*>(&shifted), __float2half2_rn(256.0f));
}

// (scale, zero) pair `index` of a pair array in the view's format: fp16 pairs (4 bytes) or fp8
// e4m3 pairs (2 bytes, kivi with params_fp8), as an fp16 pair (exact: every e4m3 value is an
// fp16), for the decode kernels that keep pairs in fp16 registers.
__device__ __forceinline__ __half2 group_params_half2(const uint8_t* pairs, int64_t index,
                                                      bool fp8) {
  if (fp8) return fp8_pair_to_half2(reinterpret_cast<const uint16_t*>(pairs)[index]);
  return reinterpret_cast<const __half2*>(pairs)[index];
}

// The same pair as floats. An fp8 pair goes through fp8_pair_to_half2 (a few integer operations
// and one multiplication for both values, where e4m3_to_float takes a branch and a dozen
// operations for each): page readers call this for every element they dequantize.
__device__ __forceinline__ float2 group_params(const uint8_t* pairs, int64_t index, bool fp8) {
  return __half22float2(group_params_half2(pairs, index, fp8));
}

// The window of one item and head at a step: positions [paged(start), start) are the old residual
// (valid until kv_store_residual, or decode_attention, stores new rows in flushed rows' slots),
// positions [start, end) the step's new keys and values, in qkv ([rows][3C]: q | k | v) or, with
// an int8 residual, quantized in the batch's new rows. As the CPU attends them: fp16 values, or an
// int8 residual's dequantized values (new rows too).
struct KvWindow {
  const KvCacheView* cache;
  const int32_t* residual_slots;
  const __half* qkv;  // the item's first row
  int64_t qkv_stride;
  int head, start, window_start;
  const uint8_t* new_codes = nullptr;    // int8 residual: the item's first row of batch.new_codes
  const uint32_t* new_params = nullptr;  // and of batch.new_params

  // fp16 residual only: the fp16 [D] row of `pos`.
  __device__ __forceinline__ const __half* row(int pos, int which) const {
    if (pos < start) return residual_row(*cache, residual_slots, head, pos - window_start, which);
    const int channels = cache->n_head * cache->head_dim;
    return qkv + (pos - start) * qkv_stride + (1 + which) * channels + head * cache->head_dim;
  }

  // Element d of `pos` as attention reads it, for either residual format.
  __device__ __forceinline__ float element(int pos, int d, int which) const {
    if (!cache->residual_int8) return __half2float(row(pos, which)[d]);
    const uint8_t* codes;
    __half2 pair;
    residual_int8_row(pos, which, codes, pair);
    const float2 p = __half22float2(pair);
    return dequantize(codes[d], p.x, p.y);
  }

  // int8 residual: the codes [D] and fp16 (scale, zero) of `pos`.
  __device__ __forceinline__ void residual_int8_row(int pos, int which, const uint8_t*& codes,
                                                    __half2& pair) const {
    const int D = cache->head_dim;
    if (pos < start) {
      const Int8ResidualRow row =
          int8_residual_row(*cache, residual_slots, head, pos - window_start, which);
      codes = row.codes;
      pair = *reinterpret_cast<const __half2*>(row.pair);
      return;
    }
    const int64_t index = (static_cast<int64_t>(pos - start) * 2 + which) * cache->n_head + head;
    codes = new_codes + index * D;
    pair = *reinterpret_cast<const __half2*>(new_params + index);
  }
};

// The window of item `item` and head `head` of a step (window_start = paged(start)).
__device__ __forceinline__ KvWindow item_window(const KvCacheView& cache, const KvBatchView& batch,
                                                const __half* qkv, int64_t qkv_stride, int item,
                                                int head) {
  const int start = batch.start[item];
  const int64_t row = batch.row[item];
  const int64_t new_rows = row * 2 * cache.n_head;
  return KvWindow{
      &cache,
      batch.residual_slots + batch.residual_offset[item],
      qkv + row * qkv_stride,
      qkv_stride,
      head,
      start,
      paged_count(cache, start),
      batch.new_codes == nullptr ? nullptr : batch.new_codes + new_rows * cache.head_dim,
      batch.new_params == nullptr ? nullptr : batch.new_params + new_rows};
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
      const float2 p = group_params(page + params, channel * (P / G) + slot / G, c.params_fp8);
      return dequantize((word >> (BITS * (slot % kPerWord))) & kMask, p.x, p.y);
    }
    const int GV = c.value_group;  // per token, packed along channels
    const uint32_t word = words[token * (D / kPerWord) + d / kPerWord];
    const float2 p = group_params(page + params, token * (D / GV) + d / GV, c.params_fp8);
    return dequantize((word >> (BITS * (d % kPerWord))) & kMask, p.x, p.y);
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

// The kLanes consecutive lanes of a warp (1, 2 or 4) that share one group's work, this thread
// being lane `index` of them: the element ranges of min/max and the code words are split among
// them, and so are the fp8 pair search's candidates, each still summed over the whole group in its
// order, so the CPU's pair wins. Where a chunk has fewer groups than the block has threads (a
// decode step's flush: 32 tokens of an item), a group's serial chain is that much shorter.
template <int kLanes>
struct GroupLanes {
  static_assert(kLanes == 1 || kLanes == 2 || kLanes == 4, "1, 2 or 4 lanes a group");
  int index;      // this thread's lane among the group's lanes
  unsigned mask;  // the group's lanes in the warp

  // For a thread whose work item is e (items numbered group * kLanes + lane, blockDim.x a
  // multiple of 32).
  __device__ __forceinline__ explicit GroupLanes(int e)
      : index(e % kLanes), mask(((1u << kLanes) - 1u) << ((threadIdx.x % 32) & ~(kLanes - 1))) {}

  __device__ __forceinline__ float min(float v) const {
#pragma unroll
    for (int o = 1; o < kLanes; o *= 2) v = fminf(v, __shfl_xor_sync(mask, v, o));
    return v;
  }
  __device__ __forceinline__ float max(float v) const {
#pragma unroll
    for (int o = 1; o < kLanes; o *= 2) v = fmaxf(v, __shfl_xor_sync(mask, v, o));
    return v;
  }
};

// Codes of x(0) .. x(n-1) with (scale, zero), packed `bits` per code into whole 32-bit words (n
// a multiple of 32 / bits), LSB first: rint((x - zero) / scale) clamped, as the CPU's write_codes.
// Each of the group's lanes writes the words w = index mod kLanes.
template <int kLanes, typename Fetch>
__device__ __forceinline__ void write_code_words(Fetch x, int n, int bits, float scale, float zero,
                                                 uint32_t* words, const GroupLanes<kLanes>& lanes) {
  const float max_code = static_cast<float>((1 << bits) - 1);
  const float inverse = 1.0f / scale;
  const int per_word = 32 / bits;
  for (int w = lanes.index; w < n / per_word; w += kLanes) {
    uint32_t word = 0;
    for (int k = 0; k < per_word; ++k) {
      const float code = quantized_code(x(w * per_word + k) - zero, scale, inverse, max_code);
      word |= code_integer(code) << (bits * k);
    }
    words[w] = word;
  }
}

// Quantizes x(0) .. x(n-1) into whole 32-bit words (write_code_words) and stores (scale, zero) as
// pair `index` of `pairs`: an fp16 pair, or with fp8 the e4m3 pair engine/kv_quant.cc's
// quantize_group_fp8 picks (of zero in {down(min), up(min)} x scale in {up, down} of (max - zero)
// / max_code, the least squared error, summed in order without contraction; ties keep the first).
// The group's kLanes lanes call it together.
template <int kLanes, typename Fetch>
__device__ __forceinline__ void quantize_fetched_to_words(Fetch x, int n, int bits, bool fp8,
                                                          uint32_t* words, uint8_t* pairs,
                                                          int64_t index,
                                                          const GroupLanes<kLanes>& lanes) {
  float lo = x(lanes.index), hi = lo;
  for (int i = lanes.index + kLanes; i < n; i += kLanes) {
    const float v = x(i);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  lo = lanes.min(lo);
  hi = lanes.max(hi);
  const float max_code = static_cast<float>((1 << bits) - 1);
  if (!fp8) {
    const __half scale_h = __float2half_rn((hi - lo) / max_code);
    const __half zero_h = __float2half_rn(lo);
    if (lanes.index == 0)
      reinterpret_cast<__half2*>(pairs)[index] = __halves2half2(scale_h, zero_h);
    write_code_words(x, n, bits, __half2float(scale_h), __half2float(zero_h), words, lanes);
    return;
  }
  // A lane's candidates are scored in one pass over the group: independent sums, each in the
  // group's order as the CPU adds it, so the same pair wins; the group is read once a lane, and
  // the divisions of an element overlap. Candidate k is (zeros[k / 2], up (k even) or down of
  // (max - zero) / max_code); this lane's are kFirst .. kFirst + kPerLane - 1.
  constexpr int kPerLane = 4 / kLanes;
  const int first = lanes.index * kPerLane;
  const uint32_t zeros[2] = {e4m3_code_down(lo), e4m3_code_up(lo)};
  uint32_t candidate_scale[kPerLane], candidate_zero[kPerLane];
  float scale[kPerLane], zero[kPerLane], inverse[kPerLane], error[kPerLane];
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) {
    const int k = first + c;
    candidate_zero[c] = k < 2 ? zeros[0] : zeros[1];
    zero[c] = e4m3_to_float(candidate_zero[c]);
    // The spread of a zero is computed as before for each of its two scales: the same value.
    const float spread = fmaxf(0.0f, (hi - zero[c]) / max_code);
    candidate_scale[c] = k % 2 == 0 ? e4m3_code_up(spread) : e4m3_code_down(spread);
    scale[c] = e4m3_to_float(candidate_scale[c]);
    inverse[c] = 1.0f / scale[c];
    error[c] = 0.0f;
  }
  // Four elements a pass: their codes and errors overlap, the sums still add them in order.
#pragma unroll 4
  for (int i = 0; i < n; ++i) {
    const float v = x(i);
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      const float code = quantized_code(v - zero[c], scale[c], inverse[c], max_code);
      const float e = __fsub_rn(dequantize_code(code, scale[c], zero[c]), v);
      error[c] = __fadd_rn(error[c], __fmul_rn(e, e));
    }
  }
  // As the CPU: ties keep the first, and a group whose every error is infinite or NaN keeps (0, 0)
  // (candidate 4: none). Then the lanes' bests, the lower candidate winning a tie.
  uint32_t best = 4u << 16;  // candidate << 16 | zero bits << 8 | scale bits
  float best_error = INFINITY;
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) {
    if (error[c] < best_error) {
      best_error = error[c];
      best = static_cast<uint32_t>(first + c) << 16 | candidate_zero[c] << 8 | candidate_scale[c];
    }
  }
#pragma unroll
  for (int o = 1; o < kLanes; o *= 2) {
    const float other_error = __shfl_xor_sync(lanes.mask, best_error, o);
    const uint32_t other = __shfl_xor_sync(lanes.mask, best, o);
    if (other_error < best_error || (other_error == best_error && other < best)) {
      best_error = other_error;
      best = other;
    }
  }
  if ((best >> 16) == 4u) best = 0;  // no candidate: the pair (0, 0)
  const uint32_t best_scale = best & 0xffu, best_zero = (best >> 8) & 0xffu;
  if (lanes.index == 0) {
    reinterpret_cast<uchar2*>(pairs)[index] =
        make_uchar2(static_cast<unsigned char>(best_scale), static_cast<unsigned char>(best_zero));
  }
  write_code_words(x, n, bits, e4m3_to_float(best_scale), e4m3_to_float(best_zero), words, lanes);
}

// quantize_fetched_to_words over a group that each thread first copies out of x once: the fp8
// pair search reads the group three times, and a fetch is several dependent loads (a window element
// of an int8 residual: its block, codes and pair). Groups of up to kCachedGroup values (GPT-2's
// 32 and 64) are cached; larger ones, rare, fetch every time. The arithmetic, and so every
// stored byte, is the same either way.
constexpr int kCachedGroup = 64;
template <typename Fetch>
__device__ __forceinline__ void quantize_to_words(Fetch x, int n, int bits, bool fp8,
                                                  uint32_t* words, uint8_t* pairs, int64_t index) {
  const GroupLanes<1> one_lane(0);
  if (n > kCachedGroup) {
    quantize_fetched_to_words(x, n, bits, fp8, words, pairs, index, one_lane);
    return;
  }
  float group[kCachedGroup];
  for (int i = 0; i < n; ++i) group[i] = x(i);
  quantize_fetched_to_words([&group](int i) { return group[i]; }, n, bits, fp8, words, pairs, index,
                            one_lane);
}

}  // namespace kvserve::cuda
