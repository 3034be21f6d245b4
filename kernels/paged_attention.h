// Causal attention of a step's queries over the paged, quantized KV cache of one layer.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/kv_cache_view.h"

namespace kvserve::cuda {

// Queries handled by one thread block; a step's items are cut into tiles of at most this many.
constexpr int kAttentionQueryTile = 16;

// Query at position t of an item reads key/value j <= t through its quantized page form when
// j < paged(t + 1), else through its fp16 form (old residual or this step's k/v in qkv), as
// engine/cpu_kv_cache.cc does; pages are dequantized in registers, never copied out.
//   qkv:   fp16 [rows][3C] (row stride qkv_stride): q | k | v, C = n_head * head_dim
//   out:   fp16 [rows][C]  (row stride out_stride)
//   tiles: int32 [num_tiles][2] device memory: (item, first query index inside the item)
// Runs after kv_quantize_pages and before kv_store_residual. head_dim 64 only (GPT-2).
void paged_attention(const KvCacheView& cache, const KvBatchView& batch, const int32_t* tiles,
                     int num_tiles, const __half* qkv, int qkv_stride, __half* out, int out_stride,
                     cudaStream_t stream);

}  // namespace kvserve::cuda
