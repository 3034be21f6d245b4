// KV write path, part 1: quantize and pack the positions that enter the pages at this step.
//
// One block per (item, head, chunk of the item's paged positions): a prefill step's hundreds of
// positions per item spread over the whole GPU instead of one block per (item, head). Chunks start
// at multiples of the chunk size from the item's first paged position, itself a multiple of G
// (kivi), and the chunk size is a multiple of G, so every quantization group lies in one chunk.
// Every group is owned by one thread, which writes whole 32-bit words (and its own parameter
// pair), so no two threads, of one block or two, touch the same word. Groups never mix sequences:
// a block sees one item only.
#include "kernels/kv_quantize_pages.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "kernels/cuda_check.h"
#include "kernels/kv_cache_device.cuh"

namespace kvserve::cuda {
namespace {

constexpr int kThreads = 128;
// Positions per block before rounding up to a multiple of G: for GPT-2's head_dim 64 and groups
// of 32, one key group and one value group per thread, so a block's threads all have work.
constexpr int kChunkTokens = 64;

// ---- CUDA kernels

__global__ void kv_quantize_pages_kernel(const KvCacheView cache, const KvBatchView batch,
                                         const __half* qkv, int qkv_stride, int chunk_tokens) {
  const int item = blockIdx.x, head = blockIdx.y;
  const int start = batch.start[item], end = start + batch.count[item];
  const int item_first = paged_count(cache, start);
  // This block's positions: chunk blockIdx.z of [paged(start), paged(end)).
  const int first = item_first + blockIdx.z * chunk_tokens;
  const int last = min(paged_count(cache, end), first + chunk_tokens);
  if (first >= last) return;
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
  // kivi keys (D / GV groups of GV channels). Work item: (token, which, group), which = 1 only
  // where keys go per channel below (so no thread draws a skipped item).
  const bool keys_per_token = cache.kind == KvKind::kInt8 || cache.per_token_keys;
  const int group = cache.kind == KvKind::kInt8 ? D : cache.value_group;
  const int groups = D / group;
  const int kinds = keys_per_token ? 2 : 1;  // keys and values, or values alone
  for (int e = threadIdx.x; e < tokens * kinds * groups; e += blockDim.x) {
    const int pos = first + e / (kinds * groups), g = e % groups;
    const int which = keys_per_token ? (e / groups) % 2 : 1;
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

int kv_quantize_pages_chunk_tokens(const KvCacheView& cache) {
  if (cache.kind != KvKind::kKivi) return kChunkTokens;
  if (cache.key_group <= 0) throw std::invalid_argument("kv_quantize_pages: key group must be > 0");
  return (kChunkTokens + cache.key_group - 1) / cache.key_group * cache.key_group;
}

void kv_quantize_pages(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                       int qkv_stride, int max_paged_tokens, int chunk_tokens,
                       cudaStream_t stream) {
  check_kv_launch("kv_quantize_pages", cache, batch, qkv, qkv_stride);
  if (batch.items == 0) return;
  if (max_paged_tokens < 0) throw std::invalid_argument("kv_quantize_pages: negative token count");
  if (chunk_tokens <= 0 || (cache.kind == KvKind::kKivi && chunk_tokens % cache.key_group != 0)) {
    throw std::invalid_argument("kv_quantize_pages: chunk of " + std::to_string(chunk_tokens) +
                                " tokens is not a positive multiple of the key group");
  }
  // At least one chunk: a decode step's grid, which a CUDA graph replays, must not depend on
  // whether some item flushes a group at the captured step.
  const int chunks = std::max(1, (max_paged_tokens + chunk_tokens - 1) / chunk_tokens);
  if (chunks > 65535) throw std::invalid_argument("kv_quantize_pages: too many token chunks");
  kv_quantize_pages_kernel<<<dim3(batch.items, cache.n_head, chunks), kThreads, 0, stream>>>(
      cache, batch, qkv, qkv_stride, chunk_tokens);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
