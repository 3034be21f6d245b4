// KV write path, part 1: quantizes (or, for fp16, copies) every position that moves into the
// pages at this step, [paged(start), paged(end)) of each item, for one layer and the whole batch.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/kv_cache_view.h"

namespace kvserve::cuda {

// The default chunk_tokens of kv_quantize_pages for this view: a multiple of the key group (kivi).
int kv_quantize_pages_chunk_tokens(const KvCacheView& cache);

// Checks, for a cache about to be used, that the default chunk's staged rows (KIVI: a chunk of at
// least one key group of a head, as floats) fit the device's shared memory a block, and opts the
// kernels in to it, so that a format the device cannot write fails when the cache is built, not
// at its first step. Throws std::invalid_argument naming the sizes, std::runtime_error on a CUDA
// error.
void kv_quantize_pages_prepare(const KvCacheView& cache);

// qkv: fp16 [rows][3C] (row stride qkv_stride elements), C = n_head * head_dim: q | k | v.
// max_paged_tokens: the most positions any item pages at this step (paged(end) - paged(start),
// known on the host), which sizes the grid: each item's positions are split into chunks of
// chunk_tokens (a positive multiple of the key group for kivi), one block per (item, head, chunk,
// and for kivi keys or values), at least one chunk; blocks past an item's positions return at
// once. Where batch.flushing lists the items that page positions (a decode step: one chunk an item
// at most), blocks go to those alone, the grid sized by the batch (flushing_grid). Decode steps
// page at most one key group per item, so either way their grid does not depend on what they
// flush, and a captured decode graph stays right. Reads the old residual, so it runs before
// kv_store_residual and decode_attention (which may store a new row in a flushed row's slot).
// Throws std::invalid_argument on an inconsistent view, std::runtime_error on a CUDA error.
void kv_quantize_pages(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                       int qkv_stride, int max_paged_tokens, int chunk_tokens, cudaStream_t stream);

}  // namespace kvserve::cuda
