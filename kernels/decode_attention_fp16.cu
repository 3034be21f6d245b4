// Decode attention over fp16 pages, two phases, one block of 4 warps per (split, head, item):
// the block's chunk of keys is scored into shared memory (warps take whole pages, 8 lanes per
// token, 16 bytes = 8 channels each), soft-maxed there, and the values are summed with lane-owned
// output channels, so a lane keeps its accumulators in registers for the whole chunk and the
// lanes are reduced once at the end.
#include <cmath>

#include "kernels/cuda_check.h"
#include "kernels/decode_attention_common.cuh"
#include "kernels/kv_cache_device.cuh"

namespace kvserve::cuda::decode_detail {
namespace {

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

// What one lane reads of one page (one head) for the scores, in registers.
template <KvKind KIND, int BITS>
struct KeyFragment {
  static_assert(KIND == KvKind::kFp16, "KIVI pages are read by load_kivi_page");
  uint4 raw[8];  // fp16: tokens lane / 8 + 4 i, channels 8 (lane % 8) ..
};

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
    q_s[threadIdx.x] = __half2float(qkv[row * qkv_stride + head * kD + threadIdx.x]) * kQueryScale;
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

}  // namespace

void launch_fp16(KVSERVE_DECODE_LAUNCH_ARGS) {
  const dim3 grid(split.splits, cache.n_head, batch.items);
  decode_attention_kernel<KvKind::kFp16, 16>
      <<<grid, kThreads, split.chunk * sizeof(float), stream>>>(
          cache, batch, split.chunk, split.splits, qkv, qkv_stride, out, out_stride, split_partial);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda::decode_detail
