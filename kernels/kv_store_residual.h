// KV write path, part 2 (KIVI formats): stores each item's new residual rows, the keys and values
// (fp16 rows, or int8 rows with their pairs) of the step's positions that stay in the window
// ([max(start, paged(end)), end)), into the entries of its residual slot list that
// kernels/residual_order.h gives them. No row moves.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/kv_cache_view.h"

namespace kvserve::cuda {

// qkv: fp16 [rows][3C] (row stride qkv_stride elements, 16-byte aligned rows): q | k | v; with an
// int8 residual the rows come from the batch's new rows (kv_quantize_residual) instead. A new row
// may take the slot of a flushed old row, so this runs after every reader of the old residual
// (kv_quantize_pages, the error sampler, attention). Every item of the batch, whatever
// batch.flushing lists: a decode step whose decode_attention stores the new rows (DecodeNewRows)
// does not launch it. A no-op for the fp16 and int8 page formats (no residual). Throws
// std::invalid_argument / std::runtime_error.
void kv_store_residual(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                       int qkv_stride, cudaStream_t stream);

}  // namespace kvserve::cuda
