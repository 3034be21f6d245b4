// The one-pass KIVI decode attention kernels: "online" (fp32 FMAs on codes masked in place) and
// "tensor" (2-bit keys and values staged in shared memory for mma.m16n8k16).
//
// Each warp walks its pages once with its own running softmax (max, sum) and the values summed
// as it goes, so there is no block-wide score buffer and no barrier before the end: a warp
// loads a whole page (keys, values and their scales) one page ahead, and the block ids of all
// its pages up front, so the only memory latency it waits for is that of the page it computes
// next. Keys are scored 4 channels x 16 tokens per lane (lane l: channels 4 (l % 16) .., tokens
// 16 (l / 16) ..), which a 16-lane reduce-scatter turns into token l's score in lane l, and
// values take ValueLanes; or both by tensor cores (tensor_key_score, add_tensor_values). The
// window (fp16, or an int8 residual dequantized) always takes ValueLanes. (scale, zero) pairs are
// read as fp16 pairs or, with fp8 parameters, turned into fp16 pairs as they are loaded (exact).
// Codes are turned into floats without a shift: a code at bit offset b * pos is masked in place
// under the exponent of 2^23 (code * 2^(b pos) exactly), and the power of two is taken out once
// per token (keys) or per channel at the end (values).
#include <cmath>
#include <type_traits>

#include "kernels/cuda_check.h"
#include "kernels/decode_attention_common.cuh"
#include "kernels/kv_cache_device.cuh"
#include "kernels/mma.cuh"
#include "kernels/warp_reduce.cuh"

namespace kvserve::cuda::decode_detail {
namespace {

// One level of a warp reduce-scatter of v[0 .. 2 HALF): a lane keeps the half of the entries
// whose index bit HALF matches its lane bit, adding its partner's copy, in v[0 .. HALF). HALF is
// a template argument so the loop unrolls and v stays in registers (a runtime bound put v in
// local memory).
template <int HALF>
__device__ __forceinline__ void scatter_half(float* v, int lane) {
  const bool upper = lane & HALF;
#pragma unroll
  for (int i = 0; i < HALF; ++i) {
    const float low = v[i], high = v[i + HALF];
    v[i] = (upper ? high : low) + __shfl_xor_sync(0xffffffffu, upper ? low : high, HALF);
  }
}

// channels) and its (scale, zero) pairs, one per value group (at most 4; unused ones are 0).
struct TensorValueRow {
  uint4 codes;
  uint32_t params[4];
};

// What a lane reads of a page's keys for fp32 scoring.
template <int BITS>
struct OnlineKeys {
  static constexpr int kHalfWords = BITS / 2;  // words holding 16 tokens of a channel
  uint32_t words[4][kHalfWords];  // channels 4 (lane % 16) + i, tokens 16 (lane / 16) ..
  uint4 params;                   // their (scale, zero) pairs
};

// What a lane reads of a 2-bit page's keys for the tensor cores: channels 2 lane and 2 lane + 1
// (codes: tokens 0-15 and 16-31 of the first, then of the second) and their (scale, zero) pairs.
struct TensorKeys {
  uint4 codes;
  uint2 params;
};

// One page of one head as one lane of the online kernel reads it.
template <int BITS, bool kTensor>
struct KiviPage {
  std::conditional_t<kTensor, TensorKeys, OnlineKeys<BITS>> keys;
  std::conditional_t<kTensor, TensorValueRow, ValueFragment<KvKind::kKivi, BITS>> values;
};

// load_values of KIVI pages with fp8 pairs: the same words, the pairs turned into fp16 exactly.
template <int BITS>
__device__ __forceinline__ ValueFragment<KvKind::kKivi, BITS> load_fp8_values(const KvCacheView& c,
                                                                              const uint8_t* page,
                                                                              int head, int lane) {
  using L = ValueLanes<KvKind::kKivi, BITS>;
  constexpr int kWordsPerToken = kD * BITS / 32;
  const int group = lane % L::kGroups, sub = lane / L::kGroups;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(page + c.value_codes) +
                          static_cast<int64_t>(head) * kPage * kWordsPerToken;  // [P][D*b/32]
  const int groups_per_token = kD / c.value_group;
  const int64_t first_pair = static_cast<int64_t>(head) * kPage * groups_per_token;  // [P][D/GV]
  const int param = group * (32 / BITS) / c.value_group;
  ValueFragment<KvKind::kKivi, BITS> f;
#pragma unroll
  for (int i = 0; i < f.kCount; ++i) {
    const int t = sub + L::kTokens * i;
    f.words[i] = words[t * kWordsPerToken + group];
    f.params[i] =
        group_params_half2(page + c.value_params, first_pair + t * groups_per_token + param, true);
  }
  return f;
}

template <int BITS, bool kTensor>
__device__ __forceinline__ KiviPage<BITS, kTensor> load_kivi_page(const KvCacheView& c,
                                                                  const uint8_t* page, int head,
                                                                  int lane) {
  KiviPage<BITS, kTensor> f;
  if constexpr (kTensor) {
    // u32 [H][D][2] and fp16 pairs [H][D][1]: channels 2 lane, 2 lane + 1 are 16 and 8 bytes.
    const int64_t channel = static_cast<int64_t>(head) * kD + 2 * lane;
    f.keys.codes = *reinterpret_cast<const uint4*>(
        reinterpret_cast<const uint32_t*>(page + c.key_codes) + channel * 2);
    if (c.params_fp8) {  // the two channels' fp8 pairs are 4 aligned bytes
      const uint32_t both = *reinterpret_cast<const uint32_t*>(page + c.key_params + channel * 2);
      const __half2 first = fp8_pair_to_half2(both), second = fp8_pair_to_half2(both >> 16);
      f.keys.params = make_uint2(*reinterpret_cast<const uint32_t*>(&first),
                                 *reinterpret_cast<const uint32_t*>(&second));
    } else {
      f.keys.params = *reinterpret_cast<const uint2*>(
          reinterpret_cast<const __half*>(page + c.key_params) + channel * 2);
    }
  } else {
    const int quad = lane % 16, half = lane / 16;
    // u32 [H][D][P*b/32]: a channel has BITS words, 16 tokens take BITS / 2 of them.
    const uint32_t* words = reinterpret_cast<const uint32_t*>(page + c.key_codes) +
                            (static_cast<int64_t>(head) * kD + 4 * quad) * BITS +
                            half * OnlineKeys<BITS>::kHalfWords;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (BITS == 2) {
        f.keys.words[i][0] = words[i * BITS];
      } else {
        const uint2 two = *reinterpret_cast<const uint2*>(words + i * BITS);
        f.keys.words[i][0] = two.x;
        f.keys.words[i][1] = two.y;
      }
    }
    // Pairs [H][D][1]: the quad's 4 channels are 16 contiguous bytes (fp16) or 8 (fp8, turned
    // into fp16 pairs exactly).
    const int64_t channel = static_cast<int64_t>(head) * kD + 4 * quad;
    if (c.params_fp8) {  // 8 aligned bytes
      const uint2 raw = *reinterpret_cast<const uint2*>(page + c.key_params + channel * 2);
      uint32_t pairs[4];
      const uint32_t halves[4] = {raw.x, raw.x >> 16, raw.y, raw.y >> 16};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const __half2 pair = fp8_pair_to_half2(halves[i]);
        pairs[i] = *reinterpret_cast<const uint32_t*>(&pair);
      }
      f.keys.params = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
    } else {
      f.keys.params = *reinterpret_cast<const uint4*>(
          reinterpret_cast<const __half*>(page + c.key_params) + channel * 2);
    }
  }
  if constexpr (kTensor) {
    static_assert(BITS == 2, "a 2-bit token row is one 16-byte ldmatrix row");
    // u32 [H][P][D*b/32] and fp16 pairs [H][P][D/GV]: token `lane`'s row of each.
    const int groups = kD / c.value_group;
    const int64_t token = static_cast<int64_t>(head) * kPage + lane;
    f.values.codes = reinterpret_cast<const uint4*>(page + c.value_codes)[token];
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const __half2 pair =
          g < groups ? group_params_half2(page + c.value_params, token * groups + g, c.params_fp8)
                     : __float2half2_rn(0.0f);
      f.values.params[g] = *reinterpret_cast<const uint32_t*>(&pair);
    }
  } else if (c.params_fp8) {
    f.values = load_fp8_values<BITS>(c, page, head, lane);
  } else {
    f.values = load_values<KvKind::kKivi, BITS>(c, page, head, lane);
  }
  return f;
}

// The running softmax of one warp: max m, the lanes' shares of the sum, and the value sums of
// the lane's channels: channel j's sum scaled by 2^code_offset(j) (the codes' power of two; the
// fp16 window's values are scaled to match), and the zero part, the same for every channel.
//   With tensor-core values (kTensor) the pages' values are in `tensor` (see
//   add_tensor_values) with their zero parts per group in group_zero, and `values` holds the
//   window's alone, unscaled.
template <int BITS, bool kTensor>
struct OnlineState {
  static constexpr int kChannels = ValueLanes<KvKind::kKivi, BITS>::kChannels;
  float m = -INFINITY;
  float sum = 0.0f;
  float zero = 0.0f;
  float values[kChannels] = {};
  float tensor[kTensor ? 4 : 1][4] = {};
  float group_zero[kTensor ? 4 : 1] = {};

  // Makes m at least new_max (warp-uniform), rescaling what was summed so far.
  __device__ __forceinline__ void raise_max(float new_max) {
    if (new_max <= m) return;
    const float scale = expf(m - new_max);  // 0 while m is -inf
    m = new_max;
    sum *= scale;
    zero *= scale;
#pragma unroll
    for (int j = 0; j < kChannels; ++j) values[j] *= scale;
    if constexpr (kTensor) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        group_zero[i] *= scale;
#pragma unroll
        for (int j = 0; j < 4; ++j) tensor[i][j] *= scale;
      }
    }
  }
};

// The bit offset tensor-core values read code c (< 8) of a 16-bit half at: codes 0 .. 4 in place
// (under 1024 in fp16, 4^4 * 3 < 1024), codes 5 .. 7 after a shift right by 10.
__host__ __device__ constexpr int half_code_offset(int c) {
  return 2 * (c < 5 ? c : c - 5);
}

// A warp's shared staging of one page for the tensor-core values.
struct TensorStage {
  uint4 codes[kPage];        // u32 [P][4]: the page's 2-bit code rows, the ldmatrix rows
  __half weights[8][kPage];  // fp16 [2 group + (0 high, 1 low part)][P]: p * scale in two halves
  // Keys: half2 [token octet][channel pair] of codes (8 tokens of each channel per half; 4 words
  // of padding keep the octets' rows on different banks), half2 [high, low][channel pair] of
  // q * scale, and the page's scores.
  uint32_t key_codes[4][kD / 2 + 4];
  uint32_t key_weights[2][kD / 2 + 4];
  float scores[kPage];
};

// Adds the values of a 2-bit page with mma.m16n8k16 (fp16 in, fp32 accumulate):
//   D[channel][2 group + part] += sum over tokens t of code[t][channel] * weight[part][group][t]
// where weight = p_t * scale[t][group] split into a high and a low fp16 half (their sum holds it
// to 2^-22) and a channel takes the column of its own group. A: the codes, exact in fp16 as
// 4^s * code + 1024 - 1024 (masked in place, s the code's position after an optional shift), read
// transposed from the staged rows by ldmatrix: register j of lane (g, t) = lane / 4, lane % 4
// holds tokens 8 j + 2 t and + 1 of channels 8 g .. 8 g + 7. M-tile mt is the channels 8 g + 2 mt
// (rows g) and 8 g + 2 mt + 1 (rows g + 8); k-tile kt the tokens 16 kt ..; so lane (g, t) ends
// with the columns 2 t and 2 t + 1 (group t) of channels 8 g + s, s = 0 .. 7. The zero part,
// p_t * zero[t][group], is summed per lane (token) and group.
//   row: token lane's codes and pairs; p: token lane's weight; groups: 64 / value_group
template <int BITS, bool kTensor>
__device__ __forceinline__ void add_tensor_values(const TensorValueRow& row, float p, int lane,
                                                  int groups, TensorStage& stage,
                                                  OnlineState<BITS, kTensor>& s) {
  __syncwarp();  // every lane is done with the previous page's stage
  stage.codes[lane] = row.codes;
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    if (g < groups) {
      const float2 sz = __half22float2(*reinterpret_cast<const __half2*>(&row.params[g]));
      const float w = p * sz.x;
      const __half high = __float2half_rn(w);
      stage.weights[2 * g][lane] = high;
      stage.weights[2 * g + 1][lane] = __float2half_rn(w - __half2float(high));
      s.group_zero[g] += p * sz.y;
    }
  }
  __syncwarp();
  uint32_t r[4];
  ldmatrix_x4_trans(r, &stage.codes[lane]);
  const int gid = lane / 4, tig = lane % 4;
  // Column gid of the weights: tokens 16 kt + 2 tig, + 1 and 16 kt + 8 + 2 tig, + 1.
  const uint32_t* weights = reinterpret_cast<const uint32_t*>(stage.weights[gid]);
  uint32_t b[2][2];
#pragma unroll
  for (int kt = 0; kt < 2; ++kt) {
    b[kt][0] = weights[8 * kt + tig];
    b[kt][1] = weights[8 * kt + 4 + tig];
  }
  // a[j][s]: register j's code pairs of channel 8 gid + s; codes 5 .. 7 from bit 10 on.
  uint32_t a[4][8];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t high = r[j] >> 10;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const uint32_t bits =
          ((c < 5 ? r[j] : high) & (0x00030003u << half_code_offset(c))) | 0x64006400u;
      const __half2 code =
          __hsub2(*reinterpret_cast<const __half2*>(&bits), __float2half2_rn(1024.0f));
      a[j][c] = *reinterpret_cast<const uint32_t*>(&code);
    }
  }
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int kt = 0; kt < 2; ++kt) {
      mma_m16n8k16(s.tensor[mt], a[2 * kt][2 * mt], a[2 * kt][2 * mt + 1], a[2 * kt + 1][2 * mt],
                   a[2 * kt + 1][2 * mt + 1], b[kt][0], b[kt][1]);
    }
  }
}

// q . k of the page's token lane, from 4 channels x 16 tokens per lane.
//   qk: the lane's 4 key channels of q (4 (lane % 16) + i), pre-scaled by 1/sqrt(kD)
template <int BITS>
__device__ __forceinline__ float online_key_score(const OnlineKeys<BITS>& keys, const float* qk,
                                                  int lane) {
  constexpr int kPerWord = 32 / BITS, kHalfWords = OnlineKeys<BITS>::kHalfWords;
  static_assert(kPerWord * kHalfWords == 16, "16 tokens per lane");
  // q . (code * scale + zero) = sum q * scale * code + sum q * zero, per channel.
  const __half2* params = reinterpret_cast<const __half2*>(&keys.params);
  float weight[4], qz = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 sz = __half22float2(params[i]);
    weight[i] = qk[i] * sz.x;
    qz += qk[i] * sz.y;
  }
  qz += __shfl_xor_sync(0xffffffffu, qz, 1);
  qz += __shfl_xor_sync(0xffffffffu, qz, 2);
  qz += __shfl_xor_sync(0xffffffffu, qz, 4);
  qz += __shfl_xor_sync(0xffffffffu, qz, 8);
  float v[16] = {};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int k = 0; k < kHalfWords; ++k) {
      const uint32_t low = keys.words[i][k], high = low >> (BITS * kDirectCodes<BITS>);
#pragma unroll
      for (int pos = 0; pos < kPerWord; ++pos) {
        const uint32_t w = pos < kDirectCodes<BITS> ? low : high;
        v[k * kPerWord + pos] += weight[i] * masked_code<BITS>(w, code_offset<BITS>(pos));
      }
    }
  }
  // Lanes of one token half differ in bits 0-3: afterwards lane l holds slot l % 16, token l.
  scatter_half<8>(v, lane);
  scatter_half<4>(v, lane);
  scatter_half<2>(v, lane);
  scatter_half<1>(v, lane);
  return v[0] * power_of_two_inverse(code_offset<BITS>((lane % 16) % kPerWord)) + qz;
}

// q . k of a 2-bit page's token lane with mma.m16n8k16 (fp16 in, fp32 accumulate):
//   D[token][part] = sum over channels c of code[c][token] * weight[part][c]
// with weight = q_c * scale_c split into a high and a low fp16 half (columns 0 and 1; the other
// columns repeat them and are not read). The lanes stage their channels' codes by token octet
// (a half holds 8 tokens of one channel), so that lane (g, t) = lane / 4, lane % 4 reads the
// channel pair 4 sigma + t (channels 8 sigma + 2 t, + 1: the k-pair t of k-tile sigma / 2, or
// t + 4 for odd sigma) of octet g % 4, shifted right by 8 (g / 4) so that its low 8 bits of
// each half are tokens 8 (g % 4) + 4 (g / 4) + s', s' = 0 .. 3, masked in place as 4^s' * code
// (exact in fp16, see add_tensor_values). M-tile mt takes s' = 2 mt (rows g) and 2 mt + 1 (rows
// g + 8), so lane (g, 0) ends with the scores of those four tokens; they go through shared
// memory to token lane's lane.
//   qk: q of channels 2 lane and 2 lane + 1, pre-scaled by 1/sqrt(kD)
__device__ __forceinline__ float tensor_key_score(const TensorKeys& keys, const float* qk, int lane,
                                                  TensorStage& stage) {
  __syncwarp();  // every lane is done with the previous page's stage
  const uint4 w = keys.codes;
  stage.key_codes[0][lane] = __byte_perm(w.x, w.z, 0x5410);
  stage.key_codes[1][lane] = __byte_perm(w.x, w.z, 0x7632);
  stage.key_codes[2][lane] = __byte_perm(w.y, w.w, 0x5410);
  stage.key_codes[3][lane] = __byte_perm(w.y, w.w, 0x7632);
  const uint32_t scale_bits = __byte_perm(keys.params.x, keys.params.y, 0x5410);
  const uint32_t zero_bits = __byte_perm(keys.params.x, keys.params.y, 0x7632);
  const __half2 scale = *reinterpret_cast<const __half2*>(&scale_bits);
  const __half2 q = __floats2half2_rn(qk[0], qk[1]);
  const __half2 high = __hmul2(q, scale);
  const __half2 low = __hfma2(q, scale, __hneg2(high));  // q * scale - high, rounded once
  stage.key_weights[0][lane] = *reinterpret_cast<const uint32_t*>(&high);
  stage.key_weights[1][lane] = *reinterpret_cast<const uint32_t*>(&low);
  const float2 zero = __half22float2(*reinterpret_cast<const __half2*>(&zero_bits));
  const float qz = warp_sum(qk[0] * zero.x + qk[1] * zero.y);
  __syncwarp();
  const int gid = lane / 4, tig = lane % 4;
  const int shift = 8 * (gid / 4);
  uint32_t a[8][4];  // [sigma][s']
#pragma unroll
  for (int sigma = 0; sigma < 8; ++sigma) {
    const uint32_t word = stage.key_codes[gid % 4][4 * sigma + tig] >> shift;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const uint32_t bits = (word & (0x00030003u << (2 * t))) | 0x64006400u;
      const __half2 code =
          __hsub2(*reinterpret_cast<const __half2*>(&bits), __float2half2_rn(1024.0f));
      a[sigma][t] = *reinterpret_cast<const uint32_t*>(&code);
    }
  }
  const uint32_t* weights = stage.key_weights[gid % 2];
  float d[2][4] = {};
#pragma unroll
  for (int kt = 0; kt < 4; ++kt) {
    const uint32_t b0 = weights[8 * kt + tig], b1 = weights[8 * kt + 4 + tig];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      mma_m16n8k16(d[mt], a[2 * kt][2 * mt], a[2 * kt][2 * mt + 1], a[2 * kt + 1][2 * mt],
                   a[2 * kt + 1][2 * mt + 1], b0, b1);
    }
  }
  if (tig == 0) {
    const int first = 8 * (gid % 4) + 4 * (gid / 4);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      stage.scores[first + 2 * mt] = (d[mt][0] + d[mt][1]) * power_of_two_inverse(4 * mt) + qz;
      stage.scores[first + 2 * mt + 1] =
          (d[mt][2] + d[mt][3]) * power_of_two_inverse(4 * mt + 2) + qz;
    }
  }
  __syncwarp();
  return stage.scores[lane];
}

// Scores a page (token l in lane l), folds the scores into the softmax and adds the values.
//   qk: see online_key_score and tensor_key_score
//   groups, stage: for tensor cores (add_tensor_values, tensor_key_score)
template <int BITS, bool kTensor>
__device__ __forceinline__ void add_kivi_page(const KiviPage<BITS, kTensor>& f, const float* qk,
                                              int lane, int groups, TensorStage& stage,
                                              OnlineState<BITS, kTensor>& s) {
  constexpr int kPerWord = 32 / BITS;
  float score;
  if constexpr (kTensor) {
    score = tensor_key_score(f.keys, qk, lane, stage);
  } else {
    score = online_key_score<BITS>(f.keys, qk, lane);
  }

  s.raise_max(warp_max(score));
  const float p = expf(score - s.m);
  s.sum += p;

  if constexpr (kTensor) {
    add_tensor_values<BITS, kTensor>(f.values, p, lane, groups, stage, s);
  } else {
    using L = ValueLanes<KvKind::kKivi, BITS>;
    const int sub = lane / L::kGroups;
    const auto& values = f.values;
#pragma unroll
    for (int i = 0; i < values.kCount; ++i) {
      const float pt = __shfl_sync(0xffffffffu, p, sub + L::kTokens * i);
      const float2 sz = __half22float2(values.params[i]);
      const float ps = pt * sz.x;
      s.zero += pt * sz.y;
      const uint32_t low = values.words[i], high = low >> (BITS * kDirectCodes<BITS>);
#pragma unroll
      for (int pos = 0; pos < kPerWord; ++pos) {
        const uint32_t w = pos < kDirectCodes<BITS> ? low : high;
        s.values[pos] += ps * masked_code<BITS>(w, code_offset<BITS>(pos));
      }
    }
  }
}

// kTensor: keys and values by tensor cores (2-bit only). 2-bit pages fit 5 blocks per SM
// without spilling (4-bit ones would spill).
template <int BITS, bool kTensor>
__global__ void __launch_bounds__(kThreads, BITS == 2 ? 5 : 4)
    decode_attention_online_kernel(const KvCacheView cache, const KvBatchView batch, int chunk,
                                   int splits, const __half* qkv, int qkv_stride, __half* out,
                                   int out_stride, float* partial, DecodeNewRows new_rows) {
  using L = ValueLanes<KvKind::kKivi, BITS>;
  constexpr int kMaxWarpPages = kMaxChunk / kPage / kWarps;
  static_assert(kMaxWarpPages <= 32, "a warp's block ids fit one per lane");
  __shared__ float q_s[kD];
  __shared__ float acc_s[kWarps][kD];
  __shared__ float max_s[kWarps], sum_s[kWarps];
  __shared__ TensorStage stage_s[kTensor ? kWarps : 1];
  const int split = blockIdx.x, head = blockIdx.y, item = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  TensorStage& stage = stage_s[kTensor ? warp : 0];
  const int groups = kD / cache.value_group;
  if constexpr (kTensor) {
    // Weight columns of groups the cache does not have stay 0 (mma columns nobody reads).
#pragma unroll
    for (int column = 0; column < 8; ++column) stage.weights[column][lane] = __float2half_rn(0.0f);
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
  float qk[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) qk[i] = kTensor ? q_s[2 * lane + i % 2] : q_s[4 * (lane % 16) + i];

  OnlineState<BITS, kTensor> state;
  if (warp_pages > 0) {
    KiviPage<BITS, kTensor> page = load_kivi_page<BITS, kTensor>(
        cache, block_ptr(cache, __shfl_sync(0xffffffffu, block_id, 0)), head, lane);
    for (int i = 0; i < warp_pages; ++i) {
      KiviPage<BITS, kTensor> ahead{};
      const int32_t next = __shfl_sync(0xffffffffu, block_id, min(i + 1, warp_pages - 1));
      if (i + 1 < warp_pages) {
        ahead = load_kivi_page<BITS, kTensor>(cache, block_ptr(cache, next), head, lane);
      }
      add_kivi_page<BITS, kTensor>(page, qk, lane, groups, stage, state);
      page = ahead;
    }
  }

  // fp16 window tokens, L::kTokens per warp pass: L::kGroups lanes of L::kChannels channels each.
  const KvWindow window = item_window(cache, batch, qkv, qkv_stride, item, head);
  const int group = lane % L::kGroups, sub = lane / L::kGroups;
  for (int t0 = max(c0, paged) + L::kTokens * warp; t0 < c1; t0 += L::kTokens * kWarps) {
    const int t = t0 + sub;
    const bool valid = t < c1;
    // The lane's channels of token t: fp16 rows read 16 bytes at a time, or an int8 residual's
    // rows, its L::kChannels codes in one load (16 or 8 aligned bytes, where byte loads took 16
    // instructions and their latency), dequantized as the CPU reads them.
    float kf[L::kChannels] = {}, vf[L::kChannels] = {};
    if (valid && cache.residual_int8) {
      static_assert(L::kChannels == 16 || L::kChannels == 8, "16 or 8 codes a lane");
#pragma unroll
      for (int which = 0; which < 2; ++which) {
        const uint8_t* codes;
        __half2 pair;
        window.residual_int8_row(t, which, codes, pair);
        uint32_t words[4] = {};
        if constexpr (L::kChannels == 16) {
          const uint4 raw = *reinterpret_cast<const uint4*>(codes + L::kChannels * group);
          words[0] = raw.x, words[1] = raw.y, words[2] = raw.z, words[3] = raw.w;
        } else {
          const uint2 raw = *reinterpret_cast<const uint2*>(codes + L::kChannels * group);
          words[0] = raw.x, words[1] = raw.y;
        }
        const float2 sz = __half22float2(pair);
        float* f = which == 0 ? kf : vf;
#pragma unroll
        for (int j = 0; j < L::kChannels; ++j) {
          f[j] = dequantize((words[j / 4] >> (8 * (j % 4))) & 0xffu, sz.x, sz.y);
        }
      }
    } else if (valid) {
      const uint4* keys = reinterpret_cast<const uint4*>(window.row(t, 0) + L::kChannels * group);
      const uint4* values = reinterpret_cast<const uint4*>(window.row(t, 1) + L::kChannels * group);
#pragma unroll
      for (int j = 0; j < L::kChannels / 8; ++j) {
        unpack8(keys[j], kf + 8 * j);
        unpack8(values[j], vf + 8 * j);
      }
    }
    float dot = 0.0f;
#pragma unroll
    for (int j = 0; j < L::kChannels; ++j) dot += q_s[L::kChannels * group + j] * kf[j];
#pragma unroll
    for (int o = 1; o < L::kGroups; o *= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    const float score = valid ? dot : -INFINITY;
    state.raise_max(warp_max(score));
    const float p = valid ? expf(score - state.m) : 0.0f;
    if (group == 0) state.sum += p;
#pragma unroll
    for (int j = 0; j < L::kChannels; ++j) {
      const float scaled_p = kTensor ? p : p * static_cast<float>(1 << code_offset<BITS>(j));
      state.values[j] += scaled_p * vf[j];
    }
  }

  // The warp's output channels, then the block's merge of its warps.
  if constexpr (kTensor) {
    // Lane (gid, tig) holds group tig's columns of channels 8 gid + c (add_tensor_values).
    float zero = 0.0f;
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const float group_total = warp_sum(state.group_zero[g]);
      if (g == lane % 4) zero = group_total;
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const int channel = 8 * (lane / 4) + c;
      const float* d = state.tensor[c / 2];
      if (channel / cache.value_group == lane % 4) {
        acc_s[warp][channel] =
            (d[2 * (c % 2)] + d[2 * (c % 2) + 1]) * power_of_two_inverse(half_code_offset(c)) +
            zero;
      }
    }
    __syncwarp();  // the window's share below adds to these
  }
  float o[L::kChannels];
#pragma unroll
  for (int j = 0; j < L::kChannels; ++j) {
    o[j] = kTensor ? state.values[j]
                   : state.values[j] * power_of_two_inverse(code_offset<BITS>(j)) + state.zero;
  }
  // Lanes of one channel group differ in the bits above the group index.
#pragma unroll
  for (int step = L::kGroups; step < 32; step *= 2) {
#pragma unroll
    for (int j = 0; j < L::kChannels; ++j) o[j] += __shfl_xor_sync(0xffffffffu, o[j], step);
  }
  if (sub == 0) {
#pragma unroll
    for (int j = 0; j < L::kChannels; ++j) {
      float& channel = acc_s[warp][L::kChannels * group + j];
      channel = kTensor ? channel + o[j] : o[j];
    }
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
      const float scale = expf(max_s[w] - m);
      acc += acc_s[w][threadIdx.x] * scale;
      sum += sum_s[w] * scale;
    }
    if (part != nullptr) {
      part[threadIdx.x] = acc;
      if (threadIdx.x == 0) {
        part[kD] = m;
        part[kD + 1] = sum;
      }
    } else {
      out[row * out_stride + head * kD + threadIdx.x] = __float2half_rn(acc / sum);
    }
  }
}

}  // namespace

void launch_kivi_online(bool tensor, KVSERVE_DECODE_LAUNCH_ARGS) {
  const dim3 grid(split.splits, cache.n_head, batch.items);
  if (cache.bits == 4) {
    decode_attention_online_kernel<4, false>
        <<<grid, kThreads, 0, stream>>>(cache, batch, split.chunk, split.splits, qkv, qkv_stride,
                                        out, out_stride, split_partial, new_rows);
  } else if (tensor) {
    decode_attention_online_kernel<2, true>
        <<<grid, kThreads, 0, stream>>>(cache, batch, split.chunk, split.splits, qkv, qkv_stride,
                                        out, out_stride, split_partial, new_rows);
  } else {
    decode_attention_online_kernel<2, false>
        <<<grid, kThreads, 0, stream>>>(cache, batch, split.chunk, split.splits, qkv, qkv_stride,
                                        out, out_stride, split_partial, new_rows);
  }
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda::decode_detail
