// Causal attention of a prefill or mixed step's queries over the paged KV cache of one layer, on
// tensor cores (FlashAttention-2 style): the same contract as paged_attention, 64 queries a block.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kv_cache_view.h"

namespace kvserve::cuda {

// Queries handled by one thread block (16 per warp); a step's items are cut into tiles of at most
// this many.
constexpr int kPrefillQueryTile = 64;

// Pages that kv_dequantize_pages dequantized for this step (both null: none; fp16 ignores them).
struct DequantizedPages {
  const int32_t* first_page = nullptr;  // int32 [items] device memory: the item's logical page 0
                                        // in the scratch (its page p at first_page + p), or -1
                                        // where the kernel dequantizes the item's pages itself
  const __half* scratch = nullptr;      // kv_dequantize_pages' scratch (16-byte aligned)
};

// Whether prefill_attention handles this cache geometry on a device of this compute capability
// (major version): sm_80 or newer, head_dim 64, 16-byte aligned blocks, codes and parameters.
bool prefill_attention_supported(const KvCacheView& cache, int compute_capability_major);

// Query at position t of an item reads key/value j <= t through its page form when
// j < paged(t + 1), else through its fp16 form (old residual or this step's k/v in qkv), exactly
// as paged_attention and engine/cpu_kv_cache.cc do. Scores Q K^T and the weighted sum P V run on
// mma.m16n8k16 with fp16 inputs (q, k and v as stored or dequantized and rounded to fp16; the
// probabilities P rounded to fp16, and their sum taken over the rounded values) and fp32
// accumulation; the softmax is online, in fp32.
//   qkv:   fp16 [rows][3C] (row stride qkv_stride, a multiple of 8; 16-byte aligned): q | k | v,
//          C = n_head * head_dim
//   out:   fp16 [rows][C]  (row stride out_stride, even)
//   tiles: int32 [num_tiles][2] device memory: (item, first query index inside the item), the
//          query index a multiple of kPrefillQueryTile
//   dequantized: int8/KIVI items whose page-form keys and values are read from the scratch
//          (every page below the item's paged(start + count) must be there), the others' pages
//          are dequantized per block; the results are the same bit for bit.
// Runs after kv_quantize_pages (and kv_dequantize_pages) and before kv_store_residual.
void prefill_attention(const KvCacheView& cache, const KvBatchView& batch, const int32_t* tiles,
                       int num_tiles, const DequantizedPages& dequantized, const __half* qkv,
                       int qkv_stride, __half* out, int out_stride, cudaStream_t stream);

}  // namespace kvserve::cuda
