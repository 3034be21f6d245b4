// KV write path, part 2 (KIVI formats): writes the residual of each item after the step, the keys
// and values (fp16 rows, or int8 rows with their pairs) of positions [paged(end), end), compacted
// at slot 0 of its residual slots.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/kv_cache_view.h"

namespace kvserve::cuda {

// qkv: fp16 [rows][3C] (row stride qkv_stride elements): q | k | v. The old residual is read and
// overwritten in place, so this runs after every reader of it (kv_quantize_pages, attention).
// Where batch.flushing lists the items that flush a group (a decode step), only those items'
// residuals are written, the others' new rows being stored by decode_attention (DecodeNewRows).
// A no-op for fp16 and int8. Throws std::invalid_argument / std::runtime_error.
void kv_compact_residual(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                         int qkv_stride, cudaStream_t stream);

// Checks, for a cache about to be used, that a block's staged rows (every row of a residual of R +
// G tokens, keys and values) fit the device's shared memory a block, and opts the kernel in to
// it, so that a residual too long for the device fails when the cache is built, not at its first
// step. A no-op for fp16 and int8. Throws std::invalid_argument naming the sizes.
void kv_compact_residual_prepare(const KvCacheView& cache);

}  // namespace kvserve::cuda
