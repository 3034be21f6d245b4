// Decode attention, one block of 4 warps per (split, head, item). KIVI has two kernels, picked
// by KVSERVE_DECODE_ATTENTION_VARIANT: "online" (the default, described further down, before
// its kernel) and "two_phase", which fp16 always uses. Two-phase: the block's chunk of keys is
// scored into shared memory (warps take whole pages), soft-maxed there, and the values are
// summed with lane-owned output channels, so a lane keeps its accumulators in registers for the
// whole chunk and the lanes are reduced once at the end. Codes are read a 32-bit word or 16 bytes
// at a time and dequantized in registers:
//   fp16 keys/values: 8 lanes per token, 16 bytes (8 channels) each.
//   KIVI keys (per channel, packed along tokens): lane l reads the words of channels 2l and 2l+1
//     for the page's 32 tokens (one 16-byte load for 2 bits), scores all 32 tokens for its two
//     channels, then a reduce-scatter across the warp leaves token t's score in lane t.
//   KIVI values (per token, packed along channels): lane l owns one code word (32/b channels) of
//     tokens l / (2b) + 16/b * i.
// With splits > 1 a second kernel merges the splits' (output, max, sum) into the output.
#include "kernels/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/cuda_check.h"
#include "kernels/kv_cache_device.cuh"

namespace kvserve::cuda {
namespace {

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

// ---- CUDA kernels

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide max or sum of v; every thread gets the result.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, other) : v + other;
  }
  __syncthreads();  // scratch is free (a previous reduction has been read)
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < kWarps; ++w) v = kMax ? fmaxf(v, scratch[w]) : v + scratch[w];
  return v;
}

// A code (< 2^23) as a float without an integer conversion, which runs at a quarter of the FMA
// rate and bounded the KIVI kernel: the code's bits under the exponent of 2^23, minus 2^23.
__device__ __forceinline__ float code_to_float(uint32_t code) {
  return __int_as_float(0x4B000000u | code) - 8388608.0f;
}

__device__ __forceinline__ void unpack8(const uint4& raw, float* out) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// What one lane reads of one page (one head) for the scores and for the values, in registers.
// Loading is split from the arithmetic so that a warp has the next page's loads in flight while
// it computes the current page: a KIVI page is only 16 bytes per lane, too little to hide the
// memory latency otherwise.
template <KvKind KIND, int BITS>
struct KeyFragment {
  uint4 raw[8];  // fp16: tokens lane / 8 + 4 i, channels 8 (lane % 8) ..
};
template <int BITS>
struct KeyFragment<KvKind::kKivi, BITS> {
  uint4 words[BITS / 2];  // the codes of channels 2 lane and 2 lane + 1, all 32 tokens
  uint2 params;           // their (scale, zero) pairs
};
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

template <KvKind KIND, int BITS>
__device__ __forceinline__ KeyFragment<KIND, BITS> load_keys(const KvCacheView& c,
                                                             const uint8_t* page, int head,
                                                             int lane) {
  KeyFragment<KIND, BITS> f;
  if constexpr (KIND == KvKind::kFp16) {
    const __half* keys = reinterpret_cast<const __half*>(page + c.key_codes) +
                         static_cast<int64_t>(head) * kPage * kD;  // [P][D]
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      f.raw[i] = *reinterpret_cast<const uint4*>(keys + (lane / 8 + 4 * i) * kD + 8 * (lane % 8));
    }
  } else {
    constexpr int kWordsPerChannel = kPage * BITS / 32;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(page + c.key_codes) +
                            (static_cast<int64_t>(head) * kD + 2 * lane) * kWordsPerChannel;
#pragma unroll
    for (int i = 0; i < BITS / 2; ++i) f.words[i] = reinterpret_cast<const uint4*>(words)[i];
    // One (scale, zero) pair per channel per page (key_group == page_tokens).
    f.params =
        *reinterpret_cast<const uint2*>(reinterpret_cast<const __half*>(page + c.key_params) +
                                        (static_cast<int64_t>(head) * kD + 2 * lane) * 2);
  }
  return f;
}

// Scores q . k of the first n tokens of the page into score[0 .. n).
//   q: fp32 [kD] in shared memory, pre-scaled by 1/sqrt(kD)
template <KvKind KIND, int BITS>
__device__ __forceinline__ void score_keys(const KeyFragment<KIND, BITS>& f, const float* q, int n,
                                           float* score, int lane) {
  if constexpr (KIND == KvKind::kFp16) {
    const int group = lane % 8, sub = lane / 8;
    float qf[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) qf[i] = q[8 * group + i];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int t = sub + 4 * i;
      float k[8];
      unpack8(f.raw[i], k);
      float dot = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) dot += qf[j] * k[j];
      dot += __shfl_xor_sync(0xffffffffu, dot, 1);
      dot += __shfl_xor_sync(0xffffffffu, dot, 2);
      dot += __shfl_xor_sync(0xffffffffu, dot, 4);
      if (group == 0 && t < n) score[t] = dot;
    }
  } else {
    constexpr int kPerWord = 32 / BITS, kWordsPerChannel = kPage / kPerWord;
    constexpr uint32_t kMask = (1u << BITS) - 1u;
    const uint32_t* w = reinterpret_cast<const uint32_t*>(f.words);
    const __half2* params = reinterpret_cast<const __half2*>(&f.params);
    const float2 p0 = __half22float2(params[0]), p1 = __half22float2(params[1]);
    const float q0 = q[2 * lane], q1 = q[2 * lane + 1];
    const float qs0 = q0 * p0.x, qs1 = q1 * p1.x;
    // q . (code * scale + zero) = sum q * scale * code + sum q * zero.
    const float qz = warp_sum(q0 * p0.y + q1 * p1.y);
    static_assert(kPage == 32, "one token per lane after the reduce-scatter");
    float v[kPage];
#pragma unroll
    for (int t = 0; t < kPage; ++t) {
      const int word = t / kPerWord, shift = BITS * (t % kPerWord);
      v[t] = qs0 * code_to_float((w[word] >> shift) & kMask) +
             qs1 * code_to_float((w[kWordsPerChannel + word] >> shift) & kMask);
    }
    // Reduce-scatter: lane t ends with token t's sum over all lanes.
    scatter_half<16>(v, lane);
    scatter_half<8>(v, lane);
    scatter_half<4>(v, lane);
    scatter_half<2>(v, lane);
    scatter_half<1>(v, lane);
    if (lane < n) score[lane] = v[0] + qz;
  }
}

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

// acc += sum over the first n tokens of the page of p[t] * value[t][the lane's channels]. KIVI
// values are code * scale + zero with one (scale, zero) for all of a lane's channels, so the
// zero part, the same for each channel, goes to `zero` once per token instead.
template <KvKind KIND, int BITS>
__device__ __forceinline__ void add_values(const ValueFragment<KIND, BITS>& f, const float* p,
                                           int n, int lane, float* acc, float& zero) {
  using L = ValueLanes<KIND, BITS>;
  const int sub = lane / L::kGroups;
  if constexpr (KIND == KvKind::kFp16) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int t = sub + 4 * i;
      if (t >= n) break;
      float v[8];
      unpack8(f.raw[i], v);
      const float pt = p[t];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] += pt * v[j];
    }
  } else {
    constexpr int kPerWord = 32 / BITS;
    constexpr uint32_t kMask = (1u << BITS) - 1u;
#pragma unroll
    for (int i = 0; i < f.kCount; ++i) {  // KIVI pages are always full
      const int t = sub + L::kTokens * i;
      const float2 sz = __half22float2(f.params[i]);
      const float ps = p[t] * sz.x;
      zero += p[t] * sz.y;
#pragma unroll
      for (int j = 0; j < kPerWord; ++j)
        acc[j] += ps * code_to_float((f.words[i] >> (BITS * j)) & kMask);
    }
  }
}

template <KvKind KIND, int BITS>
__global__ void __launch_bounds__(kThreads)
    decode_attention_kernel(const KvCacheView cache, const KvBatchView batch, int chunk, int splits,
                            const __half* qkv, int qkv_stride, __half* out, int out_stride,
                            float* partial) {
  using L = ValueLanes<KIND, BITS>;
  extern __shared__ float score_s[];  // [chunk]: scores, then exp(score - max)
  __shared__ float q_s[kD];
  __shared__ float acc_s[kWarps][kD];
  __shared__ float reduce_s[kWarps];
  const int split = blockIdx.x, head = blockIdx.y, item = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
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
  if (threadIdx.x < kD) {
    q_s[threadIdx.x] = __half2float(qkv[row * qkv_stride + head * kD + threadIdx.x]) * 0.125f;
  }
  __syncthreads();
  const int32_t* pages = batch.pages + batch.page_offset[item];
  const int paged = paged_count(cache, len), paged_end = min(c1, paged);
  const KvWindow window{
      &cache,
      KIND == KvKind::kKivi ? batch.residual_blocks + batch.residual_offset[item] : nullptr,
      qkv + row * qkv_stride,
      qkv_stride,
      head,
      pos,
      paged_count(cache, pos)};

  // Scores: whole pages per warp, then the fp16 window (KIVI) a token per warp.
  constexpr int kStride = kPage * kWarps;
  if (c0 + kPage * warp < paged_end) {
    int p0 = c0 + kPage * warp;
    KeyFragment<KIND, BITS> page =
        load_keys<KIND, BITS>(cache, block_ptr(cache, pages[p0 / kPage]), head, lane);
    for (; p0 < paged_end; p0 += kStride) {
      KeyFragment<KIND, BITS> ahead{};
      if (p0 + kStride < paged_end) {
        ahead = load_keys<KIND, BITS>(cache, block_ptr(cache, pages[(p0 + kStride) / kPage]), head,
                                      lane);
      }
      score_keys<KIND, BITS>(page, q_s, min(kPage, paged_end - p0), score_s + (p0 - c0), lane);
      page = ahead;
    }
  }
  // fp16 window tokens, 4 per warp pass: 8 lanes of 8 channels (16 bytes) each.
  for (int t0 = max(c0, paged) + 4 * warp; t0 < c1; t0 += 4 * kWarps) {
    const int t = t0 + lane / 8, group = lane % 8;
    float dot = 0.0f;
    if (t < c1) {
      float k[8];
      unpack8(*reinterpret_cast<const uint4*>(window.row(t, 0) + 8 * group), k);
#pragma unroll
      for (int j = 0; j < 8; ++j) dot += q_s[8 * group + j] * k[j];
    }
    dot += __shfl_xor_sync(0xffffffffu, dot, 1);
    dot += __shfl_xor_sync(0xffffffffu, dot, 2);
    dot += __shfl_xor_sync(0xffffffffu, dot, 4);
    if (group == 0 && t < c1) score_s[t - c0] = dot;
  }
  __syncthreads();

  float max_score = -INFINITY;
  for (int i = threadIdx.x; i < c1 - c0; i += kThreads) max_score = fmaxf(max_score, score_s[i]);
  max_score = block_reduce<true>(max_score, reduce_s);
  float sum = 0.0f;
  for (int i = threadIdx.x; i < c1 - c0; i += kThreads) {
    const float e = expf(score_s[i] - max_score);
    score_s[i] = e;
    sum += e;
  }
  sum = block_reduce<false>(sum, reduce_s);  // its barriers also publish score_s

  float acc[L::kChannels] = {}, zero = 0.0f;
  if (c0 + kPage * warp < paged_end) {
    int p0 = c0 + kPage * warp;
    ValueFragment<KIND, BITS> page =
        load_values<KIND, BITS>(cache, block_ptr(cache, pages[p0 / kPage]), head, lane);
    for (; p0 < paged_end; p0 += kStride) {
      ValueFragment<KIND, BITS> ahead{};
      if (p0 + kStride < paged_end) {
        ahead = load_values<KIND, BITS>(cache, block_ptr(cache, pages[(p0 + kStride) / kPage]),
                                        head, lane);
      }
      add_values<KIND, BITS>(page, score_s + (p0 - c0), min(kPage, paged_end - p0), lane, acc,
                             zero);
      page = ahead;
    }
  }
  {
    const int group = lane % L::kGroups, sub = lane / L::kGroups;
    for (int t = max(c0, paged) + sub + L::kTokens * warp; t < c1; t += L::kTokens * kWarps) {
      const float pt = score_s[t - c0];
      const __half* v = window.row(t, 1) + L::kChannels * group;
#pragma unroll
      for (int j = 0; j < L::kChannels; j += 8) {
        float f[8];
        unpack8(*reinterpret_cast<const uint4*>(v + j), f);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[j + i] += pt * f[i];
      }
    }
#pragma unroll
    for (int j = 0; j < L::kChannels; ++j) acc[j] += zero;
      // Lanes of one channel group differ in the bits above the group index.
#pragma unroll
    for (int o = L::kGroups; o < 32; o *= 2) {
#pragma unroll
      for (int j = 0; j < L::kChannels; ++j) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], o);
    }
    if (sub == 0) {
#pragma unroll
      for (int j = 0; j < L::kChannels; ++j) acc_s[warp][L::kChannels * group + j] = acc[j];
    }
  }
  __syncthreads();
  if (threadIdx.x < kD) {
    float o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += acc_s[w][threadIdx.x];
    if (part != nullptr) {
      part[threadIdx.x] = o;
      if (threadIdx.x == 0) {
        part[kD] = max_score;
        part[kD + 1] = sum;
      }
    } else {
      out[row * out_stride + head * kD + threadIdx.x] = __float2half_rn(o / sum);
    }
  }
}

// ---- The one-pass KIVI kernel ("online")
//
// Each warp walks its pages once with its own running softmax (max, sum) and the values summed
// as it goes, so there is no block-wide score buffer and no barrier before the end: a warp
// loads a whole page (keys, values and their scales) one page ahead, and the block ids of all
// its pages up front, so the only memory latency it waits for is that of the page it computes
// next. Keys are scored 4 channels x 16 tokens per lane (lane l: channels 4 (l % 16) .., tokens
// 16 (l / 16) ..), which a 16-lane reduce-scatter turns into token l's score in lane l; values
// keep the two-phase kernel's lanes. Codes are turned into floats without a shift: a code at bit
// offset b * pos is masked in place under the exponent of 2^23 (code * 2^(b pos) exactly), and
// the power of two is taken out once per token (keys) or per channel at the end (values).

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

// One page of one head as one lane of the online kernel reads it.
template <int BITS>
struct KiviPage {
  static constexpr int kHalfWords = BITS / 2;  // words holding 16 tokens of a channel
  uint32_t keys[4][kHalfWords];  // channels 4 (lane % 16) + i, tokens 16 (lane / 16) ..
  uint4 key_params;              // their (scale, zero) pairs
  ValueFragment<KvKind::kKivi, BITS> values;
};

template <int BITS>
__device__ __forceinline__ KiviPage<BITS> load_kivi_page(const KvCacheView& c, const uint8_t* page,
                                                         int head, int lane) {
  KiviPage<BITS> f;
  const int quad = lane % 16, half = lane / 16;
  // u32 [H][D][P*b/32]: a channel has BITS words, 16 tokens take BITS / 2 of them.
  const uint32_t* words = reinterpret_cast<const uint32_t*>(page + c.key_codes) +
                          (static_cast<int64_t>(head) * kD + 4 * quad) * BITS +
                          half * KiviPage<BITS>::kHalfWords;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (BITS == 2) {
      f.keys[i][0] = words[i * BITS];
    } else {
      const uint2 two = *reinterpret_cast<const uint2*>(words + i * BITS);
      f.keys[i][0] = two.x;
      f.keys[i][1] = two.y;
    }
  }
  // fp16 pairs [H][D][1]: the quad's 4 channels are 16 contiguous bytes.
  f.key_params =
      *reinterpret_cast<const uint4*>(reinterpret_cast<const __half*>(page + c.key_params) +
                                      (static_cast<int64_t>(head) * kD + 4 * quad) * 2);
  f.values = load_values<KvKind::kKivi, BITS>(c, page, head, lane);
  return f;
}

// The running softmax of one warp: max m, the lanes' shares of the sum, and the value sums of
// the lane's channels: channel j's sum scaled by 2^code_offset(j) (the codes' power of two; the
// fp16 window's values are scaled to match), and the zero part, the same for every channel.
template <int BITS>
struct OnlineState {
  static constexpr int kChannels = ValueLanes<KvKind::kKivi, BITS>::kChannels;
  float m = -INFINITY;
  float sum = 0.0f;
  float zero = 0.0f;
  float values[kChannels] = {};

  // Makes m at least new_max (warp-uniform), rescaling what was summed so far.
  __device__ __forceinline__ void raise_max(float new_max) {
    if (new_max <= m) return;
    const float scale = expf(m - new_max);  // 0 while m is -inf
    m = new_max;
    sum *= scale;
    zero *= scale;
#pragma unroll
    for (int j = 0; j < kChannels; ++j) values[j] *= scale;
  }
};

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Scores a page (token l in lane l), folds the scores into the softmax and adds the values.
//   qk: the lane's 4 key channels of q, pre-scaled by 1/sqrt(kD)
template <int BITS>
__device__ __forceinline__ void add_kivi_page(const KiviPage<BITS>& f, const float* qk, int lane,
                                              OnlineState<BITS>& s) {
  constexpr int kPerWord = 32 / BITS, kHalfWords = KiviPage<BITS>::kHalfWords;
  static_assert(kPerWord * kHalfWords == 16, "16 tokens per lane");
  // q . (code * scale + zero) = sum q * scale * code + sum q * zero, per channel.
  const __half2* params = reinterpret_cast<const __half2*>(&f.key_params);
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
      const uint32_t low = f.keys[i][k], high = low >> (BITS * kDirectCodes<BITS>);
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
  const float score = v[0] * power_of_two_inverse(code_offset<BITS>((lane % 16) % kPerWord)) + qz;

  s.raise_max(warp_max(score));
  const float p = expf(score - s.m);
  s.sum += p;

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

// 2-bit pages fit 5 blocks per SM without spilling (4-bit ones would spill).
template <int BITS>
__global__ void __launch_bounds__(kThreads, BITS == 2 ? 5 : 4)
    decode_attention_online_kernel(const KvCacheView cache, const KvBatchView batch, int chunk,
                                   int splits, const __half* qkv, int qkv_stride, __half* out,
                                   int out_stride, float* partial) {
  using L = ValueLanes<KvKind::kKivi, BITS>;
  constexpr int kMaxWarpPages = kMaxChunk / kPage / kWarps;
  static_assert(kMaxWarpPages <= 32, "a warp's block ids fit one per lane");
  __shared__ float q_s[kD];
  __shared__ float acc_s[kWarps][kD];
  __shared__ float max_s[kWarps], sum_s[kWarps];
  const int split = blockIdx.x, head = blockIdx.y, item = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
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
    q_s[threadIdx.x] = __half2float(qkv[row * qkv_stride + head * kD + threadIdx.x]) * 0.125f;
  }
  __syncthreads();
  float qk[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) qk[i] = q_s[4 * (lane % 16) + i];

  OnlineState<BITS> state;
  if (warp_pages > 0) {
    KiviPage<BITS> page = load_kivi_page<BITS>(
        cache, block_ptr(cache, __shfl_sync(0xffffffffu, block_id, 0)), head, lane);
    for (int i = 0; i < warp_pages; ++i) {
      KiviPage<BITS> ahead{};
      const int32_t next = __shfl_sync(0xffffffffu, block_id, min(i + 1, warp_pages - 1));
      if (i + 1 < warp_pages) {
        ahead = load_kivi_page<BITS>(cache, block_ptr(cache, next), head, lane);
      }
      add_kivi_page<BITS>(page, qk, lane, state);
      page = ahead;
    }
  }

  // fp16 window tokens, L::kTokens per warp pass: L::kGroups lanes of L::kChannels channels each.
  const KvWindow window{&cache,
                        batch.residual_blocks + batch.residual_offset[item],
                        qkv + row * qkv_stride,
                        qkv_stride,
                        head,
                        pos,
                        paged_count(cache, pos)};
  const int group = lane % L::kGroups, sub = lane / L::kGroups;
  for (int t0 = max(c0, paged) + L::kTokens * warp; t0 < c1; t0 += L::kTokens * kWarps) {
    const int t = t0 + sub;
    const bool valid = t < c1;
    uint4 k[L::kChannels / 8] = {}, v[L::kChannels / 8] = {};
    if (valid) {
      const uint4* keys = reinterpret_cast<const uint4*>(window.row(t, 0) + L::kChannels * group);
      const uint4* values = reinterpret_cast<const uint4*>(window.row(t, 1) + L::kChannels * group);
#pragma unroll
      for (int j = 0; j < L::kChannels / 8; ++j) {
        k[j] = keys[j];
        v[j] = values[j];
      }
    }
    float dot = 0.0f;
#pragma unroll
    for (int j = 0; j < L::kChannels / 8; ++j) {
      float f[8];
      unpack8(k[j], f);
#pragma unroll
      for (int e = 0; e < 8; ++e) dot += q_s[L::kChannels * group + 8 * j + e] * f[e];
    }
#pragma unroll
    for (int o = 1; o < L::kGroups; o *= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    const float score = valid ? dot : -INFINITY;
    state.raise_max(warp_max(score));
    const float p = valid ? expf(score - state.m) : 0.0f;
    if (group == 0) state.sum += p;
#pragma unroll
    for (int j = 0; j < L::kChannels / 8; ++j) {
      float f[8];
      unpack8(v[j], f);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float scaled_p = p * static_cast<float>(1 << code_offset<BITS>(8 * j + e));
        state.values[8 * j + e] += scaled_p * f[e];
      }
    }
  }

  // The warp's output channels, then the block's merge of its warps.
  float o[L::kChannels];
#pragma unroll
  for (int j = 0; j < L::kChannels; ++j) {
    o[j] = state.values[j] * power_of_two_inverse(code_offset<BITS>(j)) + state.zero;
  }
  // Lanes of one channel group differ in the bits above the group index.
#pragma unroll
  for (int step = L::kGroups; step < 32; step *= 2) {
#pragma unroll
    for (int j = 0; j < L::kChannels; ++j) o[j] += __shfl_xor_sync(0xffffffffu, o[j], step);
  }
  if (sub == 0) {
#pragma unroll
    for (int j = 0; j < L::kChannels; ++j) acc_s[warp][L::kChannels * group + j] = o[j];
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

// Merges the splits of one (item, head): o = sum_s o_s e^(m_s - m) / sum_s l_s e^(m_s - m).
__global__ void __launch_bounds__(kD)
    decode_attention_merge_kernel(const KvBatchView batch, int n_head, int splits,
                                  const float* partial, __half* out, int out_stride) {
  const int head = blockIdx.x, item = blockIdx.y, d = threadIdx.x;
  const float* part = partial + (static_cast<int64_t>(item) * n_head + head) * splits * (kD + 2);
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, part[s * (kD + 2) + kD]);
  float o = 0.0f, l = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float* ps = part + s * (kD + 2);
    if (ps[kD] == -INFINITY) continue;  // an empty split: its output was never written
    const float scale = expf(ps[kD] - m);
    o += ps[d] * scale;
    l += ps[kD + 1] * scale;
  }
  out[static_cast<int64_t>(batch.row[item]) * out_stride + head * kD + d] = __float2half_rn(o / l);
}

enum class KiviVariant { kOnline, kTwoPhase };

// KVSERVE_DECODE_ATTENTION_VARIANT picks the KIVI kernel: "online" (default) or "two_phase";
// read at every launch so that a benchmark can time both in one process.
KiviVariant kivi_variant() {
  const char* name = std::getenv("KVSERVE_DECODE_ATTENTION_VARIANT");
  if (name == nullptr || *name == '\0' || std::strcmp(name, "online") == 0) {
    return KiviVariant::kOnline;
  }
  if (std::strcmp(name, "two_phase") == 0) return KiviVariant::kTwoPhase;
  throw std::invalid_argument(std::string("KVSERVE_DECODE_ATTENTION_VARIANT: unknown variant '") +
                              name + "' (use online or two_phase)");
}

template <KvKind KIND, int BITS>
void launch(const KvCacheView& cache, const KvBatchView& batch, DecodeSplit split,
            const __half* qkv, int qkv_stride, __half* out, int out_stride, float* partial,
            cudaStream_t stream) {
  const dim3 grid(split.splits, cache.n_head, batch.items);
  float* split_partial = split.splits > 1 ? partial : nullptr;
  bool online = false;
  if constexpr (KIND == KvKind::kKivi) {
    online = kivi_variant() == KiviVariant::kOnline;
    if (online) {
      decode_attention_online_kernel<BITS><<<grid, kThreads, 0, stream>>>(
          cache, batch, split.chunk, split.splits, qkv, qkv_stride, out, out_stride, split_partial);
    }
  }
  if (!online) {
    decode_attention_kernel<KIND, BITS><<<grid, kThreads, split.chunk * sizeof(float), stream>>>(
        cache, batch, split.chunk, split.splits, qkv, qkv_stride, out, out_stride, split_partial);
  }
  KVSERVE_CUDA_CHECK(cudaGetLastError());
  if (split.splits > 1) {
    decode_attention_merge_kernel<<<dim3(cache.n_head, batch.items), kD, 0, stream>>>(
        batch, cache.n_head, split.splits, partial, out, out_stride);
    KVSERVE_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace

// ---- kernel launchers

bool decode_attention_supported(const KvCacheView& c) {
  const bool aligned = c.block_bytes % 16 == 0 && c.key_codes % 16 == 0 && c.key_params % 16 == 0 &&
                       c.value_codes % 16 == 0 && c.value_params % 16 == 0;
  const bool format =
      c.kind == KvKind::kFp16 || (c.kind == KvKind::kKivi && !c.per_token_keys &&
                                  c.key_group == kPage && (c.bits == 2 || c.bits == 4));
  return aligned && format && c.head_dim == kD && c.page_tokens == kPage;
}

DecodeSplit decode_attention_split(int items, int n_head, int max_len, int sm_count) {
  if (items < 1 || n_head < 1 || max_len < 1 || sm_count < 1) {
    throw std::invalid_argument("decode_attention_split: bad geometry");
  }
  // About 8 blocks per SM; splits of fewer than 32 tokens cost more to merge than they save.
  const int64_t pairs = static_cast<int64_t>(items) * n_head;
  const int64_t wanted = (8LL * sm_count + pairs - 1) / pairs;
  const int most = (max_len + kPage - 1) / kPage;
  int splits = static_cast<int>(std::clamp<int64_t>(wanted, 1, most));
  int chunk = (max_len + splits - 1) / splits;
  chunk = std::min(kMaxChunk, (chunk + kPage - 1) / kPage * kPage);
  splits = (max_len + chunk - 1) / chunk;
  return {chunk, splits};
}

void decode_attention(const KvCacheView& cache, const KvBatchView& batch, DecodeSplit split,
                      const __half* qkv, int qkv_stride, __half* out, int out_stride,
                      float* partial, cudaStream_t stream) {
  check_kv_launch("decode_attention", cache, batch, qkv, qkv_stride);
  if (batch.items == 0) return;
  if (!decode_attention_supported(cache)) {
    throw std::invalid_argument("decode_attention: unsupported cache geometry");
  }
  if (out == nullptr || out_stride < cache.n_head * kD) {
    throw std::invalid_argument("decode_attention: null output or row stride below n_head * 64");
  }
  if (qkv_stride % 8 != 0 || reinterpret_cast<uintptr_t>(qkv) % 16 != 0) {
    throw std::invalid_argument("decode_attention: qkv rows must be 16-byte aligned");
  }
  if (split.splits < 1 || split.chunk < kPage || split.chunk % kPage != 0 ||
      split.chunk > kMaxChunk || (split.splits > 1 && partial == nullptr)) {
    throw std::invalid_argument("decode_attention: bad split (chunk a multiple of 32 up to 2048)");
  }
  switch (cache.kind) {
    case KvKind::kFp16:
      launch<KvKind::kFp16, 16>(cache, batch, split, qkv, qkv_stride, out, out_stride, partial,
                                stream);
      break;
    case KvKind::kKivi:
      if (cache.bits == 4) {
        launch<KvKind::kKivi, 4>(cache, batch, split, qkv, qkv_stride, out, out_stride, partial,
                                 stream);
      } else {
        launch<KvKind::kKivi, 2>(cache, batch, split, qkv, qkv_stride, out, out_stride, partial,
                                 stream);
      }
      break;
    case KvKind::kInt8:
      break;  // rejected by decode_attention_supported
  }
}

}  // namespace kvserve::cuda
