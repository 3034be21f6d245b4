// The "packed" KIVI decode attention kernel (2-bit pages): one pass with a running softmax per
// warp, like "online", but built so that the integer work per code is about one logic operation
// per two codes and every global load is 16 bytes (or a whole token's parameters), warp-contiguous.
//
// A warp takes its pages two at a time (pages A and B). Per pair it
//   1. has the pair copied into shared memory as the pool holds it (cp.async, warp-contiguous
//      16-byte pieces of the codes and the whole scale rows; issued one pair ahead into a second
//      buffer, so the copies hold no registers while they are in flight);
//   2. reads them back with ldmatrix.trans, which hands every lane the registers of an mma
//      operand in which a 16-bit half holds 8 codes (8 tokens of one key channel, or 8 channels of
//      one value token), so that one AND with a constant mask turns a register into two fp16
//      numbers, code * 4^j * 2^-24 (fp16 subnormals: exact, no OR and no subtraction);
//   3. multiplies them on tensor cores (fp16 in, fp32 accumulate) with the scales folded into the
//      other operand, split into fp16 high and low halves so the products keep fp32 precision:
//        scores  s_t = sum_c (q_c scale_c) code_ct + sum_c q_c zero_c
//        values  o_c = sum_t (p_t scale_tg) code_tc + sum_t p_t zero_tg    (g: c's value group)
//      so the zero points never meet a code: one warp sum per page (keys) and one per group at
//      the end (values).
// Scores are kept in log2 units (exp2). The window (KIVI's newest tokens: fp16 rows, or int8 rows
// dequantized as the CPU reads them) is summed in fp32 as in the online kernel, and the warps of
// a block are merged as there.
//
// Every 2-bit layout with key groups of 32 runs here: value groups of 16, 32 or 64 (kGroups 4, 2,
// 1 per token) and (scale, zero) pairs of fp16 or fp8 e4m3 (kFp8). fp8 pairs reach shared memory
// as the pool holds them (half the bytes) and become fp16 pairs where the warp reads a page's
// parameters (fp8_pair_to_half2, exact), once per page and lane, outside the mma loops: from
// there on the arithmetic is that of fp16 pairs of the same values.
#include <cmath>

#include "kernels/cuda_check.h"
#include "kernels/decode_attention_common.cuh"
#include "kernels/kv_cache_device.cuh"
#include "kernels/mma.cuh"
#include "kernels/warp_reduce.cuh"

namespace kvserve::cuda::decode_detail {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// A 16-bit half of a code register holds 8 two-bit codes, code j at bit 2 j. Codes 0 .. 4 are
// masked in place; codes 5 .. 7 from the register shifted right by 10 (bits 10 .. 15 of each half
// would reach the fp16 exponent). Either way the masked half is a subnormal fp16 number, code *
// 4^j' * 2^-24 with j' the code's bit position / 2 after the shift.
__host__ __device__ constexpr int code_position(int j) {
  return j < 5 ? j : j - 5;
}

// Codes j of both halves of `word` (shifted: word >> 10) as an fp16 pair.
__device__ __forceinline__ uint32_t code_pair(uint32_t word, uint32_t shifted, int j) {
  return (j < 5 ? word : shifted) & (0x00030003u << (2 * code_position(j)));
}

// What turns a product with code_pair(.., j) back into one with the code: 2^24 / 4^j'.
__host__ __device__ constexpr float code_pair_scale(int j) {
  return static_cast<float>(1 << 24) / static_cast<float>(1 << (2 * code_position(j)));
}

// Shared-memory word strides of the staged weights, padded so that the lanes reading a fragment
// hit distinct banks.
constexpr int kKeyWeightsLane = 24;      // per lane % 4 (16 words used)
constexpr int kKeyWeightsPage = 100;     // per page (4 * 24 + 4)
constexpr int kValueWeightsColumn = 36;  // per mma column (32 words used)

// One warp's staging of a page pair: what the pool holds (two buffers, filled by asynchronous
// copies one pair ahead) and what the warp computes from it.
template <int kGroups>
struct PackedStage {
  // [buffer] row c: channel c's codes of page A (tokens 0-15, 16-31: 2 words), then of page B.
  // As ldmatrix rows, b16 element e = tokens 8 (e % 4) .. + 7 of page e / 4.
  uint4 key_rows[2][kD];
  // [buffer] row t: the codes of token t (64 channels, 4 words) of page A, rows 32 + t page B's.
  uint4 value_rows[2][2 * kPage];
  // [buffer][page][lane]: the (scale, zero) pairs of key channels 2 lane, 2 lane + 1 (fp16
  // pairs; fp8: the two pairs' 4 bytes in .x).
  uint2 key_params[2][2][kPage];
  // [buffer][page][token * kGroups + group]: the tokens' (scale, zero) pair per value group (fp16
  // pairs; fp8: the pool's 2-byte pairs, in the first half of the row).
  uint32_t value_params[2][2][kPage * kGroups];
  // q_c scale_c as fp16 (high, low) pairs of channels (2 p, 2 p + 1), in the order the A
  // fragments read them: [page A, page B, zeros][p % 4][p / 8][(p / 4) % 2][high, low].
  uint32_t key_weights[3 * kKeyWeightsPage];
  // p_t scale_tg as fp16 halves, the mma's B columns 2 g (high) and 2 g + 1 (low) of value group
  // g; in a column, token t (page A: 0-31, B: 32-63) is at half value_weight_slot(t).
  uint32_t value_weights[8 * kValueWeightsColumn];
  float scores[2 * kPage];  // the pair's scores (log2 units), page A's tokens then B's
};

// Where token t's value weight goes in its column, so that lane (g, t4) finds the 8 words of its
// B fragments (tokens 16 kt + 8 h + 2 t4, + 1 for the K-tiles kt and halves h) contiguous.
__device__ __forceinline__ int value_weight_slot(int t) {
  const int kt = t / 16, h = (t / 8) % 2, t4 = (t % 8) / 2;
  return 2 * (8 * t4 + 2 * kt + h) + t % 2;
}

// Copies kBytes (4, 8 or 16) from global to shared memory without passing through registers.
template <int kBytes>
__device__ __forceinline__ void copy_async(void* shared, const void* global) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(address), "l"(global),
               "n"(kBytes)
               : "memory");
}
__device__ __forceinline__ void commit_async() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's committed groups of copies are still in flight.
template <int N>
__device__ __forceinline__ void wait_async() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Starts the copies of a page pair into buffer `buffer` of the stage: for each page, the codes
// of key channels 2 lane and 2 lane + 1 (u32 [H][D][2]: 16 contiguous bytes) and their (scale,
// zero) pairs, token lane's value codes (u32 [H][P][4]) and its (scale, zero) pair per value
// group. Every load is warp-contiguous. fp8 pairs: the key pairs [H][D] are 4 bytes per lane;
// the head's value pairs [H][P][kGroups] (64 kGroups bytes) are copied in 4-byte pieces by the
// first 16 kGroups lanes (8-byte pieces by every lane for kGroups 4), since a copy is at least 4.
template <int kGroups, bool kFp8>
__device__ __forceinline__ void copy_pair(const KvCacheView& c, const uint8_t* page_a,
                                          const uint8_t* page_b, int head, int lane,
                                          PackedStage<kGroups>& stage, int buffer) {
  constexpr int kFp8ValueBytes = 2 * kGroups * kPage;  // one head's value pairs of a page
  constexpr int kFp8ValuePiece = kGroups == 4 ? 8 : 4;
  const int64_t slot = static_cast<int64_t>(head) * kPage + lane;  // 16-byte units per head: 32
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint8_t* page = i == 0 ? page_a : page_b;
    const uint2* codes = reinterpret_cast<const uint2*>(page + c.key_codes) + 2 * slot;
    uint2* rows = reinterpret_cast<uint2*>(&stage.key_rows[buffer][2 * lane]);  // 4 halves
    copy_async<8>(rows + i, codes);          // channel 2 lane: row 2 lane, half i
    copy_async<8>(rows + 2 + i, codes + 1);  // channel 2 lane + 1
    copy_async<16>(&stage.value_rows[buffer][kPage * i + lane],
                   reinterpret_cast<const uint4*>(page + c.value_codes) + slot);
    if constexpr (kFp8) {
      copy_async<4>(&stage.key_params[buffer][i][lane].x,
                    reinterpret_cast<const uint32_t*>(page + c.key_params) + slot);
      if (lane * kFp8ValuePiece < kFp8ValueBytes) {
        const int64_t offset = static_cast<int64_t>(head) * kFp8ValueBytes + lane * kFp8ValuePiece;
        copy_async<kFp8ValuePiece>(
            reinterpret_cast<uint8_t*>(stage.value_params[buffer][i]) + lane * kFp8ValuePiece,
            page + c.value_params + offset);
      }
    } else {
      copy_async<8>(&stage.key_params[buffer][i][lane],
                    reinterpret_cast<const uint2*>(page + c.key_params) + slot);
      copy_async<4 * kGroups>(
          &stage.value_params[buffer][i][kGroups * lane],
          reinterpret_cast<const uint32_t*>(page + c.value_params) + slot * kGroups);
    }
  }
}

__device__ __forceinline__ uint32_t half2_bits(__half2 h) {
  return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ __forceinline__ __half2 bits_half2(uint32_t u) {
  return *reinterpret_cast<const __half2*>(&u);
}
__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The staged (scale, zero) pairs of key channels 2 lane, 2 lane + 1 of page i, as fp16 pairs.
template <int kGroups, bool kFp8>
__device__ __forceinline__ uint2 staged_key_params(const PackedStage<kGroups>& stage, int buffer,
                                                   int i, int lane) {
  const uint2 staged = stage.key_params[buffer][i][lane];
  if constexpr (kFp8) {
    return make_uint2(half2_bits(fp8_pair_to_half2(staged.x)),
                      half2_bits(fp8_pair_to_half2(staged.x >> 16)));
  }
  return staged;
}

// The staged (scale, zero) pair of value group `group` of token lane of page i, as floats.
template <int kGroups, bool kFp8>
__device__ __forceinline__ float2 staged_value_params(const PackedStage<kGroups>& stage, int buffer,
                                                      int i, int lane, int group) {
  const int index = kGroups * lane + group;
  if constexpr (kFp8) {
    const auto* pairs = reinterpret_cast<const uint16_t*>(stage.value_params[buffer][i]);
    return __half22float2(fp8_pair_to_half2(pairs[index]));
  }
  return __half22float2(bits_half2(stage.value_params[buffer][i][index]));
}

// The running softmax of one warp (log2 units): max m, the lane's share of the sum, the pages'
// value sums as mma accumulators (values[mt]: lane (g, t4) holds channels 8 g + 2 mt (d0, d1) and
// 8 g + 2 mt + 1 (d2, d3) against value group t4's high and low weights, each to be multiplied
// by code_pair_scale) and the lane's tokens' zero parts per value group. The fp16 window's values
// are summed after the pages, in registers of their own.
template <int kGroups>
struct PackedState {
  float m = -INFINITY;
  float sum = 0.0f;
  float values[4][4] = {};
  float zero[4] = {};  // the first kGroups

  // Makes m at least new_max (warp-uniform), rescaling what was summed so far (and the n values
  // of `more`). Returns the scale.
  template <int N = 0>
  __device__ __forceinline__ void raise_max(float new_max, float* more = nullptr) {
    if (new_max <= m) return;
    const float scale = exp2f(m - new_max);  // 0 while m is -inf
    m = new_max;
    sum *= scale;
#pragma unroll
    for (int i = 0; i < kGroups; ++i) zero[i] *= scale;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) values[i][j] *= scale;
    }
#pragma unroll
    for (int j = 0; j < N; ++j) more[j] *= scale;
  }
};

// Scores a page pair, folds the scores into the softmax and adds the values (see the top).
//   qh, qf: q of channels 2 lane, 2 lane + 1 (scaled by 1/sqrt(kD)), as fp16 (exact) and fp32
//   has_b: whether page B exists (else it repeats page A and its scores count as -inf)
//   buffer: the stage buffer that holds the pair (its copies complete and published)
template <int kGroups, bool kFp8>
__device__ __forceinline__ void add_page_pair(int buffer, bool has_b, __half2 qh, float2 qf,
                                              int lane, PackedStage<kGroups>& stage,
                                              PackedState<kGroups>& s) {
  const int g = lane / 4, t4 = lane % 4;

  // Key weights of channels 2 lane, 2 lane + 1 (channel pair lane = 8 kt + 4 h + t4), and the
  // lane's share of each page's q . zero.
  float qz[2];
  const int key_slot = kKeyWeightsLane * t4 + 4 * (lane / 8) + 2 * ((lane / 4) % 2);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    // Channel 2 lane, then 2 lane + 1.
    const uint2 params = staged_key_params<kGroups, kFp8>(stage, buffer, i, lane);
    const __half2 scale = bits_half2(__byte_perm(params.x, params.y, 0x5410));
    const float2 zero = __half22float2(bits_half2(__byte_perm(params.x, params.y, 0x7632)));
    const __half2 high = __hmul2(qh, scale);
    const __half2 low = __hfma2(qh, scale, __hneg2(high));  // q * scale - high, rounded once
    *reinterpret_cast<uint2*>(&stage.key_weights[kKeyWeightsPage * i + key_slot]) =
        make_uint2(half2_bits(high), half2_bits(low));
    qz[i] = qf.x * zero.x + qf.y * zero.y;
  }
  // Lanes 0-15 end with page A's q . zero, lanes 16-31 with page B's.
  const bool upper = lane & 16;
  float qz_total =
      (upper ? qz[1] : qz[0]) + __shfl_xor_sync(0xffffffffu, upper ? qz[0] : qz[1], 16);
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) qz_total += __shfl_xor_sync(0xffffffffu, qz_total, o);
  // The lanes that end with page B's scores (g == 1) take its q . zero from lane + 16.
  const float qz_log2 = __shfl_sync(0xffffffffu, qz_total, g == 1 ? lane + 16 : lane) * kLog2e;
  __syncwarp();

  // Scores: D[row][column] = sum over channels of A[row][channel] B[channel][column], A's rows
  // 0 / 8 the high / low weights of page A, rows 1 / 9 those of page B, the rest 0; column
  // (page, octet) of n-tile k: token 8 octet + k. K-tile kt: channels 16 kt ..
  uint4 a[4];
  {
    const uint32_t* weights =
        stage.key_weights + kKeyWeightsPage * min(g, 2) + kKeyWeightsLane * t4;
#pragma unroll
    for (int kt = 0; kt < 4; ++kt) a[kt] = *reinterpret_cast<const uint4*>(weights + 4 * kt);
  }
  uint32_t rk[2][4];  // rk[j][i]: channels 32 j + 8 i .. + 7 = K-tile 2 j + i / 2, half i % 2
  ldmatrix_x4_trans(rk[0], &stage.key_rows[buffer][lane]);
  ldmatrix_x4_trans(rk[1], &stage.key_rows[buffer][32 + lane]);
  // Lane (g, t4) holds columns 2 t4, 2 t4 + 1 of rows g, g + 8: full scores where the column's
  // page is the row's: lanes 0, 1 (page A) and 6, 7 (page B), tokens base + k (column 2 t4) and
  // base + 8 + k (2 t4 + 1). Four n-tiles at a time.
  const bool scores_lane = (g == 0 && t4 < 2) || (g == 1 && t4 >= 2);
  float* scores = stage.scores + kPage * g + 16 * (t4 % 2);
#pragma unroll
  for (int k0 = 0; k0 < 8; k0 += 4) {
    float score_low[4], score_high[4];
#pragma unroll
    for (int k = k0; k < k0 + 4; ++k) {
      float d[4];
#pragma unroll
      for (int kt = 0; kt < 4; ++kt) {
        const uint32_t r0 = rk[kt / 2][2 * (kt % 2)], r1 = rk[kt / 2][2 * (kt % 2) + 1];
        const uint32_t b0 = code_pair(r0, r0 >> 10, k), b1 = code_pair(r1, r1 >> 10, k);
        if (kt == 0) {
          constexpr float kNone[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          mma_m16n8k16(d, a[kt].x, a[kt].y, a[kt].z, a[kt].w, b0, b1, kNone);
        } else {
          mma_m16n8k16(d, a[kt].x, a[kt].y, a[kt].z, a[kt].w, b0, b1);
        }
      }
      score_low[k - k0] = fmaf(d[0] + d[2], code_pair_scale(k) * kLog2e, qz_log2);
      score_high[k - k0] = fmaf(d[1] + d[3], code_pair_scale(k) * kLog2e, qz_log2);
    }
    if (scores_lane) {
      *reinterpret_cast<float4*>(scores + k0) =
          make_float4(score_low[0], score_low[1], score_low[2], score_low[3]);
      *reinterpret_cast<float4*>(scores + 8 + k0) =
          make_float4(score_high[0], score_high[1], score_high[2], score_high[3]);
    }
  }
  __syncwarp();
  const float score_a = stage.scores[lane];
  const float score_b = has_b ? stage.scores[kPage + lane] : -INFINITY;
  s.raise_max(warp_max(fmaxf(score_a, score_b)));
  const float p_a = exp2f(score_a - s.m), p_b = exp2f(score_b - s.m);
  s.sum += p_a + p_b;

  // Value weights of token lane of each page, and its zero parts.
  __half* columns = reinterpret_cast<__half*>(stage.value_weights);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float p = i == 0 ? p_a : p_b;
    const int slot = value_weight_slot(kPage * i + lane);
#pragma unroll
    for (int group = 0; group < kGroups; ++group) {
      const float2 sz = staged_value_params<kGroups, kFp8>(stage, buffer, i, lane, group);
      const float w = p * sz.x;
      const __half high = __float2half_rn(w);
      columns[2 * kValueWeightsColumn * (2 * group) + slot] = high;
      columns[2 * kValueWeightsColumn * (2 * group + 1) + slot] =
          __float2half_rn(w - __half2float(high));
      s.zero[group] += p * sz.y;
    }
  }
  __syncwarp();

  // Values: D[channel][column] += sum over tokens of A[channel][token] B[token][column], A the
  // codes (m-tile mt: rows g = channel 8 g + 2 mt, rows g + 8 = 8 g + 2 mt + 1), B column g the
  // weights of value group g / 2 (high, low). K-tile kt: tokens 16 kt .. (page kt / 2).
  uint32_t b[8];  // word 2 kt + h: tokens 16 kt + 8 h + 2 t4, + 1 of column g
  {
    const uint32_t* weights = stage.value_weights + kValueWeightsColumn * g + 8 * t4;
    const uint4 first = *reinterpret_cast<const uint4*>(weights);
    const uint4 second = *reinterpret_cast<const uint4*>(weights + 4);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      b[i] = word_of(first, i);
      b[4 + i] = word_of(second, i);
    }
  }
  uint32_t rv[2][4];  // rv[j][i]: tokens 32 j + 8 i .. + 7 = K-tile 2 j + i / 2, half i % 2
  ldmatrix_x4_trans(rv[0], &stage.value_rows[buffer][lane]);
  ldmatrix_x4_trans(rv[1], &stage.value_rows[buffer][32 + lane]);
#pragma unroll
  for (int kt = 0; kt < 4; ++kt) {
    const uint32_t r0 = rv[kt / 2][2 * (kt % 2)], r1 = rv[kt / 2][2 * (kt % 2) + 1];
    const uint32_t shifted0 = r0 >> 10, shifted1 = r1 >> 10;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      mma_m16n8k16(s.values[mt], code_pair(r0, shifted0, 2 * mt),
                   code_pair(r0, shifted0, 2 * mt + 1), code_pair(r1, shifted1, 2 * mt),
                   code_pair(r1, shifted1, 2 * mt + 1), b[2 * kt], b[2 * kt + 1]);
    }
  }
}

// kGroups: value groups per token (64 / value_group); kFp8: fp8 e4m3 (scale, zero) pairs;
// kInt8Window: an int8 residual. kThreads threads, at most 80 registers each (6 blocks per SM).
template <int kGroups, bool kFp8, bool kInt8Window>
__global__ void __launch_bounds__(kThreads, 6)
    decode_attention_packed_kernel(const KvCacheView cache, const KvBatchView batch, int chunk,
                                   int splits, const __half* qkv, int qkv_stride, __half* out,
                                   int out_stride, float* partial, DecodeNewRows new_rows) {
  using L = ValueLanes<KvKind::kKivi, 2>;
  constexpr int kMaxWarpPages = kMaxChunk / kPage / kWarps;
  static_assert(kMaxWarpPages <= 32, "a warp's block ids fit one per lane");
  __shared__ float q_s[kD];
  __shared__ float acc_s[kWarps][kD];
  __shared__ float max_s[kWarps], sum_s[kWarps];
  __shared__ PackedStage<kGroups> stage_s[kWarps];
  const int split = blockIdx.x, head = blockIdx.y, item = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  PackedStage<kGroups>& stage = stage_s[warp];
  // The A rows of no page and the B columns of no value group stay 0.
  for (int i = lane; i < kKeyWeightsPage; i += 32) {
    stage.key_weights[2 * kKeyWeightsPage + i] = 0u;
  }
  for (int i = 2 * kGroups * kValueWeightsColumn + lane; i < 8 * kValueWeightsColumn; i += 32) {
    stage.value_weights[i] = 0u;
  }
  const int pos = batch.start[item], len = pos + 1;
  const int c0 = split * chunk, c1 = min(len, c0 + chunk);
  float* part =
      partial == nullptr
          ? nullptr
          : partial +
                ((static_cast<int64_t>(item) * cache.n_head + head) * splits + split) * (kD + 2);
  if (c0 >= len) {  // splits follow the longest item; this one is shorter
    if (threadIdx.x == 0) {
      part[kD] = -INFINITY;
      part[kD + 1] = 0.0f;
    }
    return;
  }
  const int64_t row = batch.row[item];
  const int32_t* pages = batch.pages + batch.page_offset[item];
  const int paged = paged_count(cache, len), paged_end = min(c1, paged);
  // This warp's pages: c0 / kPage + warp + kWarps i; lane i holds the block id of the i-th.
  const int first_page = c0 / kPage + warp;
  const int warp_pages =
      paged_end / kPage > first_page ? (paged_end / kPage - first_page + kWarps - 1) / kWarps : 0;
  const int32_t block_id = lane < warp_pages ? pages[first_page + kWarps * lane] : 0;
  if (threadIdx.x < kD) {
    q_s[threadIdx.x] = __half2float(qkv[row * qkv_stride + head * kD + threadIdx.x]) * kQueryScale;
  }
  write_item_new_row(cache, batch, qkv, qkv_stride, item, row, head, split, chunk, len, new_rows);
  __syncthreads();  // q_s, and an int8 new row's codes in global memory (read by the window's warp)
  const float2 qf = make_float2(q_s[2 * lane], q_s[2 * lane + 1]);
  const __half2 qh = __floats2half2_rn(qf.x, qf.y);  // exact: fp16 q times a power of two

  PackedState<kGroups> state;
  const int pairs = (warp_pages + 1) / 2;
  if (pairs > 0) {
    auto page_of = [&](int i) {
      return block_ptr(cache, __shfl_sync(0xffffffffu, block_id, min(i, warp_pages - 1)));
    };
    copy_pair<kGroups, kFp8>(cache, page_of(0), page_of(1), head, lane, stage, 0);
    commit_async();
    for (int u = 0; u < pairs; ++u) {
      __syncwarp();  // every lane is done with the stage of pair u - 1, whose buffer comes next
      if (u + 1 < pairs) {
        copy_pair<kGroups, kFp8>(cache, page_of(2 * u + 2), page_of(2 * u + 3), head, lane, stage,
                                 (u + 1) % 2);
      }
      commit_async();   // an empty group at the end keeps the count
      wait_async<1>();  // pair u's copies are done
      __syncwarp();     // and visible to the whole warp
      add_page_pair<kGroups, kFp8>(u % 2, 2 * u + 1 < warp_pages, qh, qf, lane, stage, state);
    }
  }

  // Window tokens, L::kTokens per warp pass: L::kGroups lanes of L::kChannels channels each.
  // An fp16 row's 16 channels are two 16-byte loads; an int8 row's are one, with the row's
  // (scale, zero), and are dequantized (dequantize: no contraction) as the CPU reads them.
  static_assert(L::kChannels == 16, "a lane's window channels: 2 x 16 bytes fp16, 16 bytes int8");
  const KvWindow window = item_window(cache, batch, qkv, qkv_stride, item, head);
  const int group = lane % L::kGroups, sub = lane / L::kGroups;
  float window_values[L::kChannels] = {};
  // Channels 8 j .. 8 j + 7 of a lane's row: fp16 raw[j], or int8 codes 8 j .. of raw[0].
  auto unpack = [](const uint4* raw, float2 pair, int j, float* f) {
    if constexpr (kInt8Window) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const uint32_t code = (word_of(raw[0], 2 * j + e / 4) >> (8 * (e % 4))) & 0xffu;
        f[e] = dequantize(code, pair.x, pair.y);
      }
    } else {
      unpack8(raw[j], f);
    }
  };
  for (int t0 = max(c0, paged) + L::kTokens * warp; t0 < c1; t0 += L::kTokens * kWarps) {
    const int t = t0 + sub;
    const bool valid = t < c1;
    uint4 k[2] = {}, v[2] = {};
    float2 key_pair = {}, value_pair = {};
    if (valid && kInt8Window) {
      const uint8_t* codes;
      __half2 pair;
      window.residual_int8_row(t, 0, codes, pair);
      k[0] = *reinterpret_cast<const uint4*>(codes + L::kChannels * group);
      key_pair = __half22float2(pair);
      window.residual_int8_row(t, 1, codes, pair);
      v[0] = *reinterpret_cast<const uint4*>(codes + L::kChannels * group);
      value_pair = __half22float2(pair);
    } else if (valid) {
      const uint4* keys = reinterpret_cast<const uint4*>(window.row(t, 0) + L::kChannels * group);
      const uint4* values = reinterpret_cast<const uint4*>(window.row(t, 1) + L::kChannels * group);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        k[j] = keys[j];
        v[j] = values[j];
      }
    }
    float dot = 0.0f;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float f[8];
      unpack(k, key_pair, j, f);
#pragma unroll
      for (int e = 0; e < 8; ++e) dot += q_s[L::kChannels * group + 8 * j + e] * f[e];
    }
#pragma unroll
    for (int o = 1; o < L::kGroups; o *= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    const float score = valid ? dot * kLog2e : -INFINITY;
    state.raise_max<L::kChannels>(warp_max(score), window_values);
    const float p = valid ? exp2f(score - state.m) : 0.0f;
    if (group == 0) state.sum += p;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float f[8];
      unpack(v, value_pair, j, f);
#pragma unroll
      for (int e = 0; e < 8; ++e) window_values[8 * j + e] += p * f[e];
    }
  }

  // The warp's output channels: the pages' (plus their zero parts), then the window's.
  {
    float zero_total[4];
#pragma unroll
    for (int g = 0; g < 4; ++g) zero_total[g] = g < kGroups ? warp_sum(state.zero[g]) : 0.0f;
    const int g = lane / 4, t4 = lane % 4;
    // Channels 8 g .. 8 g + 7 belong to one value group; the lane whose t4 is that group has them.
    if (t4 == g * kGroups / 8) {
      float zero = zero_total[0];
#pragma unroll
      for (int i = 1; i < 4; ++i) zero = t4 == i ? zero_total[i] : zero;
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const float* d = state.values[mt];
        acc_s[warp][8 * g + 2 * mt] = (d[0] + d[1]) * code_pair_scale(2 * mt) + zero;
        acc_s[warp][8 * g + 2 * mt + 1] = (d[2] + d[3]) * code_pair_scale(2 * mt + 1) + zero;
      }
    }
  }
  __syncwarp();
  // Lanes of one channel group differ in the bits above the group index.
#pragma unroll
  for (int step = L::kGroups; step < 32; step *= 2) {
#pragma unroll
    for (int j = 0; j < L::kChannels; ++j) {
      window_values[j] += __shfl_xor_sync(0xffffffffu, window_values[j], step);
    }
  }
  if (sub == 0) {
#pragma unroll
    for (int j = 0; j < L::kChannels; ++j)
      acc_s[warp][L::kChannels * group + j] += window_values[j];
  }
  const float warp_total = warp_sum(state.sum);
  if (lane == 0) {
    max_s[warp] = state.m;
    sum_s[warp] = warp_total;
  }
  __syncthreads();
  if (threadIdx.x < kD) {
    float m = max_s[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) m = fmaxf(m, max_s[w]);
    float acc = 0.0f, sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (max_s[w] == -INFINITY) continue;  // a warp without tokens in this chunk
      const float scale = exp2f(max_s[w] - m);
      acc += acc_s[w][threadIdx.x] * scale;
      sum += sum_s[w] * scale;
    }
    if (part != nullptr) {
      part[threadIdx.x] = acc;
      if (threadIdx.x == 0) {
        part[kD] = m * kLn2;  // the merge works in natural-log units
        part[kD + 1] = sum;
      }
    } else {
      out[row * out_stride + head * kD + threadIdx.x] = __float2half_rn(acc / sum);
    }
  }
}

// The packed kernel of a layout: value groups of 16, 32 or 64 (decode_attention_supported).
template <bool kFp8, bool kInt8Window>
auto packed_kernel(int value_group) {
  return value_group == 16   ? decode_attention_packed_kernel<4, kFp8, kInt8Window>
         : value_group == 32 ? decode_attention_packed_kernel<2, kFp8, kInt8Window>
                             : decode_attention_packed_kernel<1, kFp8, kInt8Window>;
}

}  // namespace

void launch_kivi_packed(KVSERVE_DECODE_LAUNCH_ARGS) {
  const dim3 grid(split.splits, cache.n_head, batch.items);
  const int gv = cache.value_group;
  auto kernel = cache.params_fp8 ? (cache.residual_int8 ? packed_kernel<true, true>(gv)
                                                        : packed_kernel<true, false>(gv))
                                 : (cache.residual_int8 ? packed_kernel<false, true>(gv)
                                                        : packed_kernel<false, false>(gv));
  kernel<<<grid, kThreads, 0, stream>>>(cache, batch, split.chunk, split.splits, qkv, qkv_stride,
                                        out, out_stride, split_partial, new_rows);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda::decode_detail
