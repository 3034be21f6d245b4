// KV write path, part 1: quantize and pack the positions that enter the pages at this step.
//
// One block per (item, head, chunk of the item's paged positions, and with KIVI keys or values):
// a prefill step's hundreds of positions per item spread over the whole GPU instead of one block
// per (item, head), and a decode step's flush runs its keys and values side by side. A decode
// step that lists its flushing items (KvBatchView::flushing: about one in G at mixed lengths)
// runs blocks for them alone, where a grid over every item left thousands of blocks with nothing
// to do but read their item's lengths and return, and cost more than the flush. Chunks start
// at multiples of the chunk size from the item's first paged position, itself a multiple of G
// (kivi), and the chunk size is a multiple of G, so every quantization group lies in one chunk.
// Every group is owned by one thread, or by 2 or 4 lanes of a warp where a chunk has fewer groups
// than a block has threads (GroupLanes: a decode step's flush), which write whole 32-bit words,
// each its own, and one of them the group's parameter pair, so no two threads, of one block or
// two, touch the same word. Groups never mix sequences: a unit of work sees one item only. KIVI
// blocks first stage their chunk of the window in shared memory (StagedRows), from which every
// group reads its values.
#include "kernels/kv_quantize_pages.h"

#include <algorithm>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "kernels/cuda_check.h"
#include "kernels/device_info.h"
#include "kernels/kv_cache_device.cuh"

namespace kvserve::cuda {
namespace {

constexpr int kThreads = 128;
// Resident blocks per SM the registers must allow (64 registers a thread): a prefill step's grid
// of thousands of blocks runs in fewer waves, and each thread's long serial group work (the fp8
// pair search: 4 candidates per element) has more warps beside it to hide its latency. At 73
// registers 6 blocks fitted. (Shared memory then bounds kivi2c's blocks: its 128-token chunks
// staged as floats take 34 KiB, 6 blocks an SM; its prompt steps measured no slower for it,
// H100, docs/gpu.md "Thirteenth session".)
constexpr int kBlocksPerMultiprocessor = 8;
// The same for the kernel of a decode step's flushing items, whose few units (about 8 items a
// step at B = 256) leave most of the GPU idle: latency, not occupancy, bounds it, and 128
// registers let its loops keep several elements in flight without spilling.
constexpr int kListedBlocksPerMultiprocessor = 4;
// Positions per block before rounding up to a multiple of G: for GPT-2's head_dim 64 and groups
// of 32, one key group and one value group per thread, so a block's threads all have work. KIVI
// chunks grow until their value groups, quantized after the keys', give every thread one (value
// groups of 64 over head_dim 64: 128 tokens).
constexpr int kChunkTokens = 64;

// A chunk's window positions, keys or values, staged in shared memory as the floats attention
// reads (KvWindow::element: an fp16 value, or an int8 residual code dequantized with its row's
// pair): every group then reads its values out of shared memory with one load each, where a
// value group's thread read a row element by element from global memory, and where a staged int8
// row was dequantized again each of the three times a group reads it (min and max, the fp8 pair
// search, the codes). Keys and values are staged by blocks of their own. Rows are
// [chunk_tokens][row_floats], row_floats odd so that threads reading one element of consecutive
// rows hit distinct banks.
struct StagedRows {
  const float* values;  // [chunk_tokens][row_floats]: f32 [D], then padding
  int row_floats;

  // Element d of chunk token t, as KvWindow::element reads it (the same value).
  __device__ __forceinline__ float element(int t, int d) const {
    return values[static_cast<int64_t>(t) * row_floats + d];
  }
};

// Floats of a staged row: head_dim rounded up to odd.
__host__ __device__ inline int staged_row_floats(int head_dim) {
  return head_dim | 1;
}

// Shared memory of one KIVI block: the rows' addresses and (int8) pairs (stage_rows), then the
// staged rows.
size_t staged_bytes(const KvCacheView& cache, int chunk_tokens) {
  const size_t rows = static_cast<size_t>(chunk_tokens);
  return rows * (sizeof(const uint32_t*) + (cache.residual_int8 ? sizeof(__half2) : 0)) +
         rows * staged_row_floats(cache.head_dim) * sizeof(float);
}

// Words a thread of stage_rows loads before it stores any (copy_loads_in_flight).
constexpr int kStagedWordsInFlight = 4;

// Copies the keys (which = 0) or values (1) of positions [first, first + tokens) of the window
// into shared memory as floats. A row's address takes dependent loads (its slot id, then the
// slot), so each row's is looked up once, by a thread of its own, with its int8 pair; the rows'
// 32-bit words (two fp16 values or four int8 codes) are then copied one a thread (a warp reads
// whole rows), kStagedWordsInFlight loads before their stores, which convert them. The caller
// synchronizes the block before it reads the rows.
__device__ __forceinline__ StagedRows stage_rows(const KvWindow& window, int which, int first,
                                                 int tokens, int chunk_tokens, uint32_t* shared) {
  const KvCacheView& cache = *window.cache;
  const bool int8 = cache.residual_int8;
  const int row_floats = staged_row_floats(cache.head_dim);
  const int data_words = cache.head_dim * (int8 ? 1 : 2) / 4;         // D a multiple of 8 for kivi
  const auto** sources = reinterpret_cast<const uint32_t**>(shared);  // [chunk_tokens]
  auto* pairs = reinterpret_cast<__half2*>(sources + chunk_tokens);   // int8: [chunk_tokens]
  float* values = reinterpret_cast<float*>(pairs + (int8 ? chunk_tokens : 0));
  for (int t = threadIdx.x; t < tokens; t += blockDim.x) {
    if (int8) {
      const uint8_t* codes;
      window.residual_int8_row(first + t, which, codes, pairs[t]);
      sources[t] = reinterpret_cast<const uint32_t*>(codes);
    } else {
      sources[t] = reinterpret_cast<const uint32_t*>(window.row(first + t, which));
    }
  }
  __syncthreads();
  copy_loads_in_flight<kStagedWordsInFlight>(
      tokens * data_words, [&](int e) { return sources[e / data_words][e % data_words]; },
      [&](int e, uint32_t word) {
        const int t = e / data_words, w = e % data_words;
        float* row = values + t * row_floats;
        if (int8) {
          const float2 p = __half22float2(pairs[t]);
#pragma unroll
          for (int k = 0; k < 4; ++k)
            row[4 * w + k] = dequantize((word >> (8 * k)) & 0xffu, p.x, p.y);
        } else {
          const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&word));
          row[2 * w] = v.x;
          row[2 * w + 1] = v.y;
        }
      });
  return StagedRows{values, row_floats};
}

// Per-token groups of positions [first, first + tokens), keys and values for which in
// [which_begin, which_end): int8 keys and values (one group of D channels), kivi values and
// per-token kivi keys (D / GV groups of GV channels). x(pos, d, which) reads the window; kStaged:
// it reads shared memory, so each thread need not copy its group out first (quantize_to_words), and
// kLanes lanes share a group (GroupLanes; unstaged groups take one). Work item: (token, which,
// group, lane).
template <bool kStaged, int kLanes, typename Element>
__device__ __forceinline__ void quantize_token_groups(const KvCacheView& cache,
                                                      const int32_t* pages, int head, int first,
                                                      int tokens, int which_begin, int which_end,
                                                      Element x) {
  static_assert(kStaged || kLanes == 1, "unstaged groups take one lane");
  const int D = cache.head_dim, P = cache.page_tokens;
  const int group = cache.kind == KvKind::kInt8 ? D : cache.value_group;
  const int groups = D / group;
  const int kinds = which_end - which_begin;
  const bool fp8 = cache.kind == KvKind::kKivi && cache.params_fp8;  // int8 pages: fp16 pairs
  for (int e = threadIdx.x; e < tokens * kinds * groups * kLanes; e += blockDim.x) {
    const GroupLanes<kLanes> lanes(e);
    const int item = e / kLanes;
    const int pos = first + item / (kinds * groups), g = item % groups;
    const int which = which_begin + (item / groups) % kinds;
    const int slot = pos % P;
    uint8_t* page = block_ptr(cache, pages[pos / P]);
    const int64_t codes_offset = which == 0 ? cache.key_codes : cache.value_codes;
    const int64_t params_offset = which == 0 ? cache.key_params : cache.value_params;
    const int64_t token = static_cast<int64_t>(head) * P + slot;
    auto* words = reinterpret_cast<uint32_t*>(page + codes_offset) + token * (D * cache.bits / 32) +
                  g * (group * cache.bits / 32);
    const auto group_element = [&x, pos, which, g, group](int i) {
      return x(pos, g * group + i, which);
    };
    if constexpr (kStaged) {
      quantize_fetched_to_words(group_element, group, cache.bits, fp8, words, page + params_offset,
                                token * groups + g, lanes);
    } else {
      quantize_to_words(group_element, group, cache.bits, fp8, words, page + params_offset,
                        token * groups + g);
    }
  }
}

// KIVI keys of positions [first, first + tokens): per channel over G tokens, packed along tokens.
// Work item: (group, channel, lane), kLanes lanes a group (GroupLanes). Groups start at multiples
// of G and pages hold a multiple of G tokens, so a group never crosses a page.
template <int kLanes>
__device__ __forceinline__ void quantize_key_channel_groups(const KvCacheView& cache,
                                                            const int32_t* pages, int head,
                                                            int first, int tokens,
                                                            const StagedRows& keys) {
  const int D = cache.head_dim, P = cache.page_tokens, G = cache.key_group;
  const int words_per_channel = P * cache.bits / 32;
  for (int e = threadIdx.x; e < (tokens / G) * D * kLanes; e += blockDim.x) {
    const GroupLanes<kLanes> lanes(e);
    const int item = e / kLanes;
    const int group_start = first + (item / D) * G, d = item % D, slot = group_start % P;
    uint8_t* page = block_ptr(cache, pages[group_start / P]);
    const int64_t channel = static_cast<int64_t>(head) * D + d;
    auto* words = reinterpret_cast<uint32_t*>(page + cache.key_codes) +
                  channel * words_per_channel + slot * cache.bits / 32;
    const int t0 = group_start - first;
    quantize_fetched_to_words([&keys, t0, d](int i) { return keys.element(t0 + i, d); }, G,
                              cache.bits, cache.params_fp8, words, page + cache.key_params,
                              channel * (P / G) + slot / G, lanes);
  }
}

// Lanes a group takes when a chunk has `groups` of them: as many as keep every group in one pass
// of the block (1, 2 or 4).
__device__ __forceinline__ int lanes_per_group(int groups) {
  if (4 * groups <= static_cast<int>(blockDim.x)) return 4;
  return 2 * groups <= static_cast<int>(blockDim.x) ? 2 : 1;
}

// One block's work: chunk `chunk` of item `item`'s positions that enter the pages at this step,
// for head `head`, KIVI keys (which = 0) or values (1), fp16 and int8 both (which = 0). kKivi:
// the cache is KIVI (a decode step's flushing items), so the kernel carries no other path.
template <bool kKivi>
__device__ __forceinline__ void quantize_chunk(const KvCacheView& cache, const KvBatchView& batch,
                                               const __half* qkv, int qkv_stride, int chunk_tokens,
                                               int item, int head, int chunk, int which,
                                               uint32_t* shared_words) {
  const int start = batch.start[item], end = start + batch.count[item];
  // This block's positions: chunk `chunk` of [paged(start), paged(end)).
  const int first = paged_count(cache, start) + chunk * chunk_tokens;
  const int last = min(paged_count(cache, end), first + chunk_tokens);
  if (first >= last) return;
  const int32_t* pages = batch.pages + batch.page_offset[item];
  // From the window as attention reads it: with an int8 residual, its dequantized values (the
  // CPU's flush does the same, so prefill and decode store the same codes).
  const KvWindow window = item_window(cache, batch, qkv, qkv_stride, item, head);
  const int D = cache.head_dim, P = cache.page_tokens;
  const int tokens = last - first;

  if (!kKivi && cache.kind == KvKind::kFp16) {
    for (int e = threadIdx.x; e < tokens * D; e += blockDim.x) {
      const int pos = first + e / D, d = e % D, slot = pos % P;
      uint8_t* page = block_ptr(cache, pages[pos / P]);
      const int64_t at = (static_cast<int64_t>(head) * P + slot) * D + d;
      reinterpret_cast<__half*>(page + cache.key_codes)[at] = window.row(pos, 0)[d];
      reinterpret_cast<__half*>(page + cache.value_codes)[at] = window.row(pos, 1)[d];
    }
    return;
  }
  if (!kKivi && cache.kind == KvKind::kInt8) {
    quantize_token_groups<false, 1>(
        cache, pages, head, first, tokens, 0, 2,
        [&window](int pos, int d, int which) { return window.element(pos, d, which); });
    return;
  }

  const StagedRows rows = stage_rows(window, which, first, tokens, chunk_tokens, shared_words);
  __syncthreads();
  if (which == 0 && !cache.per_token_keys) {
    const int lanes = lanes_per_group(tokens / cache.key_group * D);
    if (lanes == 4) {
      quantize_key_channel_groups<4>(cache, pages, head, first, tokens, rows);
    } else if (lanes == 2) {
      quantize_key_channel_groups<2>(cache, pages, head, first, tokens, rows);
    } else {
      quantize_key_channel_groups<1>(cache, pages, head, first, tokens, rows);
    }
  } else {
    const auto staged = [&rows, first](int pos, int d, int) {
      return rows.element(pos - first, d);
    };
    const int lanes = lanes_per_group(tokens * (D / cache.value_group));
    if (lanes == 4) {
      quantize_token_groups<true, 4>(cache, pages, head, first, tokens, which, which + 1, staged);
    } else if (lanes == 2) {
      quantize_token_groups<true, 2>(cache, pages, head, first, tokens, which, which + 1, staged);
    } else {
      quantize_token_groups<true, 1>(cache, pages, head, first, tokens, which, which + 1, staged);
    }
  }
}

// Unit kinds a chunk is cut into: KIVI keys and values each in a block of their own, so that a
// decode step's flush (one chunk of an item) runs as two chains half as long; fp16 and int8: one.
__host__ __device__ inline int unit_kinds(const KvCacheView& cache) {
  return cache.kind == KvKind::kKivi ? 2 : 1;
}

// ---- CUDA kernels

// Every item (kListed false, batch.flushing null): block (item, head, chunk * kinds + which). A
// decode step's flushing items (kListed, batch.flushing = [count, item...]): each block takes
// units (list entry, head, which) from blockIdx.x on, gridDim.x apart. Two kernels, so that the
// loop's registers do not spill the grid kernel's.
template <bool kListed>
__global__ void __launch_bounds__(kThreads, kListed ? kListedBlocksPerMultiprocessor
                                                    : kBlocksPerMultiprocessor)
    kv_quantize_pages_kernel(const KvCacheView cache, const KvBatchView batch, const __half* qkv,
                             int qkv_stride, int chunk_tokens) {
  extern __shared__ __align__(16) uint32_t shared_words[];  // stage_rows: addresses first
  const int kinds = unit_kinds(cache);
  if constexpr (!kListed) {
    quantize_chunk<false>(cache, batch, qkv, qkv_stride, chunk_tokens, blockIdx.x, blockIdx.y,
                          blockIdx.z / kinds, blockIdx.z % kinds, shared_words);
    return;
  }
  for_each_flushing_unit(batch, cache.n_head * kinds, [&](int item, int unit) {
    quantize_chunk<true>(cache, batch, qkv, qkv_stride, chunk_tokens, item, unit / kinds, 0,
                         unit % kinds, shared_words);
  });
}

}  // namespace

// ---- kernel launchers

int kv_quantize_pages_chunk_tokens(const KvCacheView& cache) {
  if (cache.kind != KvKind::kKivi) return kChunkTokens;
  if (cache.head_dim <= 0 || cache.key_group <= 0 || cache.value_group <= 0 ||
      cache.head_dim % cache.value_group != 0) {
    throw std::invalid_argument(
        "kv_quantize_pages: head_dim, key and value groups must be > 0, value groups dividing "
        "head_dim");
  }
  const int value_groups_per_token = cache.head_dim / cache.value_group;
  const int tokens =
      std::max(kChunkTokens, (kThreads + value_groups_per_token - 1) / value_groups_per_token);
  return (tokens + cache.key_group - 1) / cache.key_group * cache.key_group;
}

void kv_quantize_pages_prepare(const KvCacheView& cache) {
  if (cache.kind != KvKind::kKivi) return;
  const int chunk_tokens = kv_quantize_pages_chunk_tokens(cache);
  const size_t bytes = staged_bytes(cache, chunk_tokens);
  const std::string remedy = "a chunk of " + std::to_string(chunk_tokens) + " tokens of head_dim " +
                             std::to_string(cache.head_dim) +
                             " is staged as floats; use a smaller --kv-group or --kv-value-group";
  for (const void* kernel : {reinterpret_cast<const void*>(kv_quantize_pages_kernel<false>),
                             reinterpret_cast<const void*>(kv_quantize_pages_kernel<true>)}) {
    allow_dynamic_shared_memory("kv_quantize_pages", kernel, bytes, remedy);
  }
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
  const int kinds = unit_kinds(cache);
  // At least one chunk: a decode step's grid, which a CUDA graph replays, must not depend on
  // whether some item flushes a group at the captured step.
  const int chunks = std::max(1, (max_paged_tokens + chunk_tokens - 1) / chunk_tokens);
  if (chunks * kinds > 65535) {
    throw std::invalid_argument("kv_quantize_pages: too many token chunks");
  }
  if (batch.flushing != nullptr && (chunks > 1 || cache.kind != KvKind::kKivi)) {
    throw std::invalid_argument(
        "kv_quantize_pages: a step that lists its flushing items is a KIVI decode step, paging "
        "one chunk an item at most");
  }
  size_t shared_bytes = 0;
  if (cache.kind == KvKind::kKivi) {
    // The window's rows are read in 32-bit words: rows (and int8 pairs) must be 4-byte aligned.
    if (qkv_stride % 2 != 0 || cache.block_bytes % 4 != 0 || cache.residual_slot_bytes % 4 != 0)
      throw std::invalid_argument(
          "kv_quantize_pages: qkv stride, block or residual slot size not 4-byte aligned");
    shared_bytes = staged_bytes(cache, chunk_tokens);
    const void* kernel = batch.flushing != nullptr
                             ? reinterpret_cast<const void*>(kv_quantize_pages_kernel<true>)
                             : reinterpret_cast<const void*>(kv_quantize_pages_kernel<false>);
    allow_dynamic_shared_memory("kv_quantize_pages", kernel, shared_bytes);
  }
  if (batch.flushing != nullptr) {
    const int blocks =
        flushing_grid(batch.items * cache.n_head * kinds, kListedBlocksPerMultiprocessor);
    kv_quantize_pages_kernel<true>
        <<<blocks, kThreads, shared_bytes, stream>>>(cache, batch, qkv, qkv_stride, chunk_tokens);
  } else {
    kv_quantize_pages_kernel<false>
        <<<dim3(batch.items, cache.n_head, chunks * kinds), kThreads, shared_bytes, stream>>>(
            cache, batch, qkv, qkv_stride, chunk_tokens);
  }
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
