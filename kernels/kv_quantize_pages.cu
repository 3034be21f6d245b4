// KV write path, part 1: quantize and pack the positions that enter the pages at this step.
//
// One block per (item, head). Every quantization group is owned by one thread, which writes
// whole 32-bit words, so no two threads touch the same word. Groups never mix sequences: a block
// sees one item only.
#include "kernels/kv_quantize_pages.h"

#include "kernels/cuda_check.h"
#include "kernels/kv_cache_device.cuh"

namespace kvserve::cuda {
namespace {

constexpr int kThreads = 128;

// ---- CUDA kernels

__global__ void kv_quantize_pages_kernel(const KvCacheView cache, const KvBatchView batch,
                                         const __half* qkv, int qkv_stride) {
  const int item = blockIdx.x, head = blockIdx.y;
  const int start = batch.start[item], end = start + batch.count[item];
  const int first = paged_count(cache, start), last = paged_count(cache, end);
  if (first == last) return;
  const int32_t* pages = batch.pages + batch.page_offset[item];
  // From the window as attention reads it: with an int8 residual, its dequantized values (the
  // CPU's flush does the same, so prefill and decode store the same codes).
  const KvWindow window = item_window(cache, batch, qkv, qkv_stride, item, head);
  const int D = cache.head_dim, P = cache.page_tokens;
  const int tokens = last - first;

  if (cache.kind == KvKind::kFp16) {
    for (int e = threadIdx.x; e < tokens * D; e += blockDim.x) {
      const int pos = first + e / D, d = e % D, slot = pos % P;
      uint8_t* page = block_ptr(cache, pages[pos / P]);
      const int64_t at = (static_cast<int64_t>(head) * P + slot) * D + d;
      reinterpret_cast<__half*>(page + cache.key_codes)[at] = window.row(pos, 0)[d];
      reinterpret_cast<__half*>(page + cache.value_codes)[at] = window.row(pos, 1)[d];
    }
    return;
  }

  // Per-token groups: int8 keys and values (one group of D channels), kivi values and per-token
  // kivi keys (D / GV groups of GV channels). Work item: (token, which, group).
  const bool keys_per_token = cache.kind == KvKind::kInt8 || cache.per_token_keys;
  const int group = cache.kind == KvKind::kInt8 ? D : cache.value_group;
  const int groups = D / group;
  for (int e = threadIdx.x; e < tokens * 2 * groups; e += blockDim.x) {
    const int pos = first + e / (2 * groups), which = (e / groups) % 2, g = e % groups;
    if (which == 0 && !keys_per_token) continue;
    const int slot = pos % P;
    uint8_t* page = block_ptr(cache, pages[pos / P]);
    const int64_t codes_offset = which == 0 ? cache.key_codes : cache.value_codes;
    const int64_t params_offset = which == 0 ? cache.key_params : cache.value_params;
    const int64_t token = static_cast<int64_t>(head) * P + slot;
    auto* words = reinterpret_cast<uint32_t*>(page + codes_offset) + token * (D * cache.bits / 32) +
                  g * (group * cache.bits / 32);
    // int8 pages keep fp16 pairs; kivi pairs follow the view's parameter format.
    quantize_to_words([&window, pos, which, g,
                       group](int i) { return window.element(pos, g * group + i, which); },
                      group, cache.bits, cache.kind == KvKind::kKivi && cache.params_fp8, words,
                      page + params_offset, token * groups + g);
  }
  if (keys_per_token) return;

  // KIVI keys: per channel over G tokens, packed along tokens. Work item: (group, channel).
  // Groups start at multiples of G and pages hold a multiple of G tokens, so a group never
  // crosses a page.
  const int G = cache.key_group;
  const int words_per_channel = P * cache.bits / 32;
  for (int e = threadIdx.x; e < (tokens / G) * D; e += blockDim.x) {
    const int group_start = first + (e / D) * G, d = e % D, slot = group_start % P;
    uint8_t* page = block_ptr(cache, pages[group_start / P]);
    const int64_t channel = static_cast<int64_t>(head) * D + d;
    auto* words = reinterpret_cast<uint32_t*>(page + cache.key_codes) +
                  channel * words_per_channel + slot * cache.bits / 32;
    quantize_to_words(
        [&window, group_start, d](int i) { return window.element(group_start + i, d, 0); }, G,
        cache.bits, cache.params_fp8, words, page + cache.key_params, channel * (P / G) + slot / G);
  }
}

}  // namespace

// ---- kernel launchers

void kv_quantize_pages(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                       int qkv_stride, cudaStream_t stream) {
  check_kv_launch("kv_quantize_pages", cache, batch, qkv, qkv_stride);
  if (batch.items == 0) return;
  kv_quantize_pages_kernel<<<dim3(batch.items, cache.n_head), kThreads, 0, stream>>>(
      cache, batch, qkv, qkv_stride);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
