// The sampled quantization error of the groups that entered the pages at this step.
//
// One block per (item, head), one thread per group that kv_quantize_pages wrote at this step. A
// group's fp16 source is read from the step's window (the residual, whose flushed slots the
// step's new rows have not yet taken, or qkv), its reconstruction through page_element; the error
// is computed in double in the order the CPU cache computes it, rounded to float, and counted into
// its bucket.
#include "kernels/kv_quantization_error.h"

#include <stdexcept>

#include "kernels/cuda_check.h"
#include "kernels/kv_cache_device.cuh"

namespace kvserve::cuda {
namespace {

constexpr int kThreads = 128;
constexpr double kEpsilon = 1e-6;  // engine/kv_quantization_error.h kRelativeErrorEpsilon

// ---- CUDA kernels

// ||x - y||_2 / max(||x||_2, eps) over i < n, x(i) the source and y(i) the page's value.
template <typename Source, typename Page>
__device__ float relative_error(Source x, Page y, int n) {
  double error = 0.0, norm = 0.0;
  for (int i = 0; i < n; ++i) {
    const double a = x(i), d = a - static_cast<double>(y(i));
    error += d * d;
    norm += a * a;
  }
  return static_cast<float>(sqrt(error) / fmax(sqrt(norm), kEpsilon));
}

__device__ void count(KvErrorDeviceBins* bins, int which, float error) {
  atomicAdd(&bins->counts[which][kv_error_bucket(error)], 1ull);
  atomicAdd(&bins->sum[which], static_cast<double>(error));
}

__global__ void kv_quantization_error_kernel(const KvCacheView cache, const KvBatchView batch,
                                             const __half* qkv, int qkv_stride,
                                             KvErrorDeviceBins* bins) {
  const int item = blockIdx.x, head = blockIdx.y;
  const int start = batch.start[item], end = start + batch.count[item];
  const int first = paged_count(cache, start), last = paged_count(cache, end);
  if (first == last || cache.kind == KvKind::kFp16) return;
  const int32_t* pages = batch.pages + batch.page_offset[item];
  const KvWindow window = item_window(cache, batch, qkv, qkv_stride, item, head);
  const int D = cache.head_dim, P = cache.page_tokens;
  const int tokens = last - first;

  // Per-token groups: int8 keys and values (D channels), kivi values and per-token kivi keys (GV
  // channels). Work item: (token, which, group).
  const bool keys_per_channel = cache.kind == KvKind::kKivi && !cache.per_token_keys;
  const int group = cache.kind == KvKind::kInt8 ? D : cache.value_group;
  const int groups = D / group;
  for (int e = threadIdx.x; e < tokens * 2 * groups; e += blockDim.x) {
    const int pos = first + e / (2 * groups), which = (e / groups) % 2, g = e % groups;
    if (which == 0 && keys_per_channel) continue;
    const int slot = pos % P;
    const int32_t id = pages[pos / P];
    const uint8_t* page = block_ptr(cache, id);
    count(bins, which,
          relative_error(
              [&](int i) { return window.element(pos, g * group + i, which); },
              [&](int i) { return page_element(cache, page, head, slot, g * group + i, which); },
              group));
  }
  if (!keys_per_channel) return;

  // KIVI keys: per channel over G tokens. Work item: (group, channel).
  const int G = cache.key_group;
  for (int e = threadIdx.x; e < (tokens / G) * D; e += blockDim.x) {
    const int group_start = first + (e / D) * G, d = e % D, slot = group_start % P;
    const int32_t id = pages[group_start / P];
    const uint8_t* page = block_ptr(cache, id);
    count(
        bins, 0,
        relative_error([&](int i) { return window.element(group_start + i, d, 0); },
                       [&](int i) { return page_element(cache, page, head, slot + i, d, 0); }, G));
  }
}

}  // namespace

// ---- kernel launchers

void kv_quantization_error(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                           int qkv_stride, KvErrorDeviceBins* bins, cudaStream_t stream) {
  check_kv_launch("kv_quantization_error", cache, batch, qkv, qkv_stride);
  if (bins == nullptr) throw std::invalid_argument("kv_quantization_error: null bins");
  if (batch.items == 0) return;
  kv_quantization_error_kernel<<<dim3(batch.items, cache.n_head), kThreads, 0, stream>>>(
      cache, batch, qkv, qkv_stride, bins);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
