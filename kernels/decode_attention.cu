// Decode attention, one block of 4 warps per (split, head, item); with splits > 1 a second
// kernel merges the splits' (output, max, sum) into the output.
//
// fp16 (two phases): the block's chunk of keys is scored into shared memory (warps take whole
// pages, 8 lanes per token, 16 bytes = 8 channels each), soft-maxed there, and the values are
// summed with lane-owned output channels, so a lane keeps its accumulators in registers for the
// whole chunk and the lanes are reduced once at the end.
//
// KIVI (one pass, described before its kernel below): KVSERVE_DECODE_ATTENTION_VARIANT picks
// "online" (default; fp32 FMAs, KIVI values lanes: lane l owns one code word, 32/b channels,
// of tokens l / (2b) + 16/b * i) or "tensor" (2-bit keys and values by mma.m16n8k16).
#include "kernels/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

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

__device__ __forceinline__ void unpack8(const uint4& raw, float* out) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// What one lane reads of one page (one head) for the scores and for the values, in registers
// (fp16 keys and values; the KIVI values lanes of the online kernel). Loading is split from the
// arithmetic so that a warp has the next page's loads in flight while it computes the current
// page.
template <KvKind KIND, int BITS>
struct KeyFragment {
  static_assert(KIND == KvKind::kFp16, "KIVI pages are read by load_kivi_page");
  uint4 raw[8];  // fp16: tokens lane / 8 + 4 i, channels 8 (lane % 8) ..
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
  const __half* keys = reinterpret_cast<const __half*>(page + c.key_codes) +
                       static_cast<int64_t>(head) * kPage * kD;  // [P][D]
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    f.raw[i] = *reinterpret_cast<const uint4*>(keys + (lane / 8 + 4 * i) * kD + 8 * (lane % 8));
  }
  return f;
}

// Scores q . k of the first n tokens of the page into score[0 .. n).
//   q: fp32 [kD] in shared memory, pre-scaled by 1/sqrt(kD)
template <KvKind KIND, int BITS>
__device__ __forceinline__ void score_keys(const KeyFragment<KIND, BITS>& f, const float* q, int n,
                                           float* score, int lane) {
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

// acc += sum over the first n tokens of the page of p[t] * value[t][the lane's channels] (fp16;
// KIVI values are added by add_kivi_page).
template <KvKind KIND, int BITS>
__device__ __forceinline__ void add_values(const ValueFragment<KIND, BITS>& f, const float* p,
                                           int n, int lane, float* acc) {
  static_assert(KIND == KvKind::kFp16, "KIVI values are added by add_kivi_page");
  using L = ValueLanes<KIND, BITS>;
  const int sub = lane / L::kGroups;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int t = sub + L::kTokens * i;
    if (t >= n) break;
    float v[8];
    unpack8(f.raw[i], v);
    const float pt = p[t];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] += pt * v[j];
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
  const int paged_end = c1;  // fp16 pages hold every token

  // Scores: whole pages per warp.
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

  float acc[L::kChannels] = {};
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
      add_values<KIND, BITS>(page, score_s + (p0 - c0), min(kPage, paged_end - p0), lane, acc);
      page = ahead;
    }
  }
  {
    const int group = lane % L::kGroups, sub = lane / L::kGroups;
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
// 16 (l / 16) ..), which a 16-lane reduce-scatter turns into token l's score in lane l, and
// values take ValueLanes; or both by tensor cores (tensor_key_score, add_tensor_values). The
// fp16 window always takes ValueLanes.
// Codes are turned into floats without a shift: a code at bit offset b * pos is masked in place
// under the exponent of 2^23 (code * 2^(b pos) exactly), and the power of two is taken out once
// per token (keys) or per channel at the end (values).

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

// What a lane reads of a 2-bit page's values for the tensor cores: token lane's code row (64
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
    f.keys.params = *reinterpret_cast<const uint2*>(
        reinterpret_cast<const __half*>(page + c.key_params) + channel * 2);
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
    // fp16 pairs [H][D][1]: the quad's 4 channels are 16 contiguous bytes.
    f.keys.params =
        *reinterpret_cast<const uint4*>(reinterpret_cast<const __half*>(page + c.key_params) +
                                        (static_cast<int64_t>(head) * kD + 4 * quad) * 2);
  }
  if constexpr (kTensor) {
    static_assert(BITS == 2, "a 2-bit token row is one 16-byte ldmatrix row");
    // u32 [H][P][D*b/32] and fp16 pairs [H][P][D/GV]: token `lane`'s row of each.
    const int groups = kD / c.value_group;
    const int64_t token = static_cast<int64_t>(head) * kPage + lane;
    f.values.codes = reinterpret_cast<const uint4*>(page + c.value_codes)[token];
    const uint32_t* params =
        reinterpret_cast<const uint32_t*>(page + c.value_params) + token * groups;
#pragma unroll
    for (int g = 0; g < 4; ++g) f.values.params[g] = g < groups ? params[g] : 0u;
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

// d += A * B for one m16n8k16 tile: fp16 A (4 registers of half2) and B (2), fp32 d (PTX
// fragment layouts). Tensor-core paths need sm_80; builds for older GPUs trap if they run them.
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// Four 8x8 b16 matrices from shared memory, transposed: lanes 8 i .. 8 i + 7 give the row
// addresses of matrix i, and lane (g, t) = lane / 4, lane % 4 gets rows 2 t and 2 t + 1 of
// column g of matrix i in r[i] (row 2 t in the low half).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#if __CUDA_ARCH__ >= 800
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
#else
  __trap();
#endif
}

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

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
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
                                   int out_stride, float* partial) {
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
    q_s[threadIdx.x] = __half2float(qkv[row * qkv_stride + head * kD + threadIdx.x]) * 0.125f;
  }
  __syncthreads();
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
        const float scaled_p =
            kTensor ? p : p * static_cast<float>(1 << code_offset<BITS>(8 * j + e));
        state.values[8 * j + e] += scaled_p * f[e];
      }
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

enum class KiviVariant { kOnline, kTensor };

// KVSERVE_DECODE_ATTENTION_VARIANT picks the KIVI kernel: "online" (default) or "tensor" (the
// same with 2-bit keys and values by tensor cores; 4-bit pages run "online"); read at every
// launch so that a benchmark can time both in one process.
KiviVariant kivi_variant() {
  const char* name = std::getenv("KVSERVE_DECODE_ATTENTION_VARIANT");
  if (name == nullptr || *name == '\0' || std::strcmp(name, "online") == 0) {
    return KiviVariant::kOnline;
  }
  if (std::strcmp(name, "tensor") == 0) return KiviVariant::kTensor;
  throw std::invalid_argument(std::string("KVSERVE_DECODE_ATTENTION_VARIANT: unknown variant '") +
                              name + "' (use online or tensor)");
}

template <KvKind KIND, int BITS>
void launch(const KvCacheView& cache, const KvBatchView& batch, DecodeSplit split,
            const __half* qkv, int qkv_stride, __half* out, int out_stride, float* partial,
            cudaStream_t stream) {
  const dim3 grid(split.splits, cache.n_head, batch.items);
  float* split_partial = split.splits > 1 ? partial : nullptr;
  if constexpr (KIND == KvKind::kKivi) {
    const bool tensor = kivi_variant() == KiviVariant::kTensor;
    if (BITS == 2 && tensor) {
      decode_attention_online_kernel<BITS, BITS == 2><<<grid, kThreads, 0, stream>>>(
          cache, batch, split.chunk, split.splits, qkv, qkv_stride, out, out_stride, split_partial);
    } else {
      decode_attention_online_kernel<BITS, false><<<grid, kThreads, 0, stream>>>(
          cache, batch, split.chunk, split.splits, qkv, qkv_stride, out, out_stride, split_partial);
    }
  } else {
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
  // Round up to powers of two without changing a bit of the result, so that the launch, and a
  // CUDA graph that captured it, stay the same while the context grows (not a new split every 32
  // tokens): one split reads the whole context whatever its chunk (which only sizes the shared
  // scores); with several, a split past an item's context leaves an empty partial (max -inf)
  // that the merge skips, so extra splits leave the sums and their order as they were.
  if (splits == 1) {
    int whole = kPage;
    while (whole < chunk) whole *= 2;
    chunk = whole;
  } else {
    int rounded = 2;
    while (rounded < splits) rounded *= 2;
    splits = rounded;
  }
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
