// Paged attention over the KIVI/int8/fp16 cache: one kernel family, specialised on head_dim and
// cache format, dispatched in one place (paged_attention below).
//
// A block takes up to 16 queries of one item and one head. It walks the keys in tiles of 32:
// the tile's keys and values are dequantized (or read as fp16) into shared memory once for all of
// its queries; each warp then runs an online softmax for its queries, one key per lane for the
// scores and two output channels per lane for the weighted sum. A key that some queries read
// quantized and others in fp16 (a flush inside a prefill chunk) is loaded in both forms.
#include "kernels/paged_attention.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/cuda_check.h"
#include "kernels/kv_cache_device.cuh"
#include "kernels/warp_reduce.cuh"

namespace kvserve::cuda {
namespace {

constexpr int kKeyTile = 32;  // one key per lane
constexpr int kWarps = 4;
constexpr int kQueriesPerWarp = kAttentionQueryTile / kWarps;

// ---- CUDA kernels

template <int D, KvKind KIND, int BITS>
__global__ void __launch_bounds__(kWarps * 32)
    paged_attention_kernel(const KvCacheView cache, const KvBatchView batch, const int32_t* tiles,
                           const __half* qkv, int qkv_stride, __half* out, int out_stride) {
  static_assert(D == 64, "two output channels per lane");
  __shared__ __align__(16) float q_s[kAttentionQueryTile][D];  // queries, pre-scaled by 1/sqrt(D)
  __shared__ __align__(
      16) float kq_s[kKeyTile][D + 1];               // keys from pages (+1: conflict-free by lane)
  __shared__ __align__(16) float vq_s[kKeyTile][D];  // values from pages
  __shared__ __align__(16) float kf_s[kKeyTile][D + 1];  // keys in fp16 form
  __shared__ __align__(16) float vf_s[kKeyTile][D];      // values in fp16 form

  const int item = tiles[2 * blockIdx.x], q0 = tiles[2 * blockIdx.x + 1];
  const int head = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int start = batch.start[item];
  const int queries = min(kAttentionQueryTile, batch.count[item] - q0);
  const int64_t row0 = static_cast<int64_t>(batch.row[item]) + q0;
  const int32_t* pages = batch.pages + batch.page_offset[item];
  const KvWindow window = item_window(cache, batch, qkv, qkv_stride, item, head);
  const int last_pos = start + q0 + queries - 1;
  // Keys below quantized_end are read quantized by some query, keys from fp16_begin on in fp16
  // by some query.
  const int fp16_begin = paged_count(cache, start + q0 + 1);
  const int quantized_end = paged_count(cache, last_pos + 1);

  const float inv_sqrt_d = 1.0f / sqrtf(static_cast<float>(D));
  for (int e = threadIdx.x; e < queries * D; e += blockDim.x) {
    q_s[e / D][e % D] =
        __half2float(qkv[(row0 + e / D) * qkv_stride + head * D + e % D]) * inv_sqrt_d;
  }

  float running_max[kQueriesPerWarp], running_sum[kQueriesPerWarp], acc[kQueriesPerWarp][2];
  int quantized_limit[kQueriesPerWarp];
#pragma unroll
  for (int s = 0; s < kQueriesPerWarp; ++s) {
    running_max[s] = -INFINITY;
    running_sum[s] = 0.0f;
    acc[s][0] = acc[s][1] = 0.0f;
    quantized_limit[s] = paged_count(cache, start + q0 + warp + kWarps * s + 1);
  }

  for (int k0 = 0; k0 <= last_pos; k0 += kKeyTile) {
    __syncthreads();  // the previous tile is consumed (and, the first time, q_s is written)
    for (int e = threadIdx.x; e < kKeyTile * D; e += blockDim.x) {
      const int j = e / D, d = e % D, pos = k0 + j;
      if (pos > last_pos) break;
      if (pos < quantized_end) {
        kq_s[j][d] = paged_element<D, KIND, BITS>(cache, pages, head, pos, d, 0);
        vq_s[j][d] = paged_element<D, KIND, BITS>(cache, pages, head, pos, d, 1);
      }
      if (pos >= fp16_begin) {
        kf_s[j][d] = window.element(pos, d, 0);
        vf_s[j][d] = window.element(pos, d, 1);
      }
    }
    __syncthreads();

#pragma unroll
    for (int s = 0; s < kQueriesPerWarp; ++s) {
      const int i = warp + kWarps * s;
      if (i >= queries) continue;
      const int pos_q = start + q0 + i, key = k0 + lane;
      if (k0 > pos_q) continue;
      float score = -INFINITY;
      if (key <= pos_q) {
        const float* k = key < quantized_limit[s] ? kq_s[lane] : kf_s[lane];
        score = 0.0f;
#pragma unroll 16
        for (int d = 0; d < D; ++d) score += q_s[i][d] * k[d];
      }
      const float new_max = fmaxf(running_max[s], warp_max(score));
      const float rescale = expf(running_max[s] - new_max);
      const float p = key <= pos_q ? expf(score - new_max) : 0.0f;
      running_sum[s] = running_sum[s] * rescale + warp_sum(p);
      acc[s][0] *= rescale;
      acc[s][1] *= rescale;
      const int valid = min(kKeyTile, pos_q - k0 + 1);
      for (int j = 0; j < valid; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
        const float* v = k0 + j < quantized_limit[s] ? vq_s[j] : vf_s[j];
        const float2 v2 = *reinterpret_cast<const float2*>(v + 2 * lane);
        acc[s][0] += pj * v2.x;
        acc[s][1] += pj * v2.y;
      }
      running_max[s] = new_max;
    }
  }

#pragma unroll
  for (int s = 0; s < kQueriesPerWarp; ++s) {
    const int i = warp + kWarps * s;
    if (i >= queries) continue;
    const float inv = 1.0f / running_sum[s];
    *reinterpret_cast<__half2*>(out + (row0 + i) * out_stride + head * D + 2 * lane) =
        __floats2half2_rn(acc[s][0] * inv, acc[s][1] * inv);
  }
}

template <int D, KvKind KIND, int BITS>
void launch(const KvCacheView& cache, const KvBatchView& batch, const int32_t* tiles, int num_tiles,
            const __half* qkv, int qkv_stride, __half* out, int out_stride, cudaStream_t stream) {
  paged_attention_kernel<D, KIND, BITS><<<dim3(num_tiles, cache.n_head), kWarps * 32, 0, stream>>>(
      cache, batch, tiles, qkv, qkv_stride, out, out_stride);
}

}  // namespace

// ---- kernel launchers

void paged_attention(const KvCacheView& cache, const KvBatchView& batch, const int32_t* tiles,
                     int num_tiles, const __half* qkv, int qkv_stride, __half* out, int out_stride,
                     cudaStream_t stream) {
  check_kv_launch("paged_attention", cache, batch, qkv, qkv_stride);
  if (num_tiles < 0 || (num_tiles > 0 && (tiles == nullptr || out == nullptr))) {
    throw std::invalid_argument("paged_attention: null tiles or output");
  }
  if (out_stride < cache.n_head * cache.head_dim || out_stride % 2 != 0) {
    throw std::invalid_argument("paged_attention: output row stride below n_head * head_dim");
  }
  if (batch.items == 0 || num_tiles == 0) return;
  // The one place that maps runtime geometry and format to a compiled specialisation.
  if (cache.head_dim != 64) {
    throw std::invalid_argument("paged_attention: head_dim " + std::to_string(cache.head_dim) +
                                " is not supported (64 only)");
  }
  constexpr int D = 64;
  switch (cache.kind) {
    case KvKind::kFp16:
      launch<D, KvKind::kFp16, 16>(cache, batch, tiles, num_tiles, qkv, qkv_stride, out, out_stride,
                                   stream);
      break;
    case KvKind::kInt8:
      launch<D, KvKind::kInt8, 8>(cache, batch, tiles, num_tiles, qkv, qkv_stride, out, out_stride,
                                  stream);
      break;
    case KvKind::kKivi:
      if (cache.bits == 4) {
        launch<D, KvKind::kKivi, 4>(cache, batch, tiles, num_tiles, qkv, qkv_stride, out,
                                    out_stride, stream);
      } else {
        launch<D, KvKind::kKivi, 2>(cache, batch, tiles, num_tiles, qkv, qkv_stride, out,
                                    out_stride, stream);
      }
      break;
  }
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
