// KV write path, part 1: quantizes (or, for fp16, copies) every position that moves into the
// pages at this step, [paged(start), paged(end)) of each item, for one layer and the whole batch.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/kv_cache_view.h"

namespace kvserve::cuda {

// qkv: fp16 [rows][3C] (row stride qkv_stride elements), C = n_head * head_dim: q | k | v.
// Reads the old residual, so it runs before kv_compact_residual. Throws std::invalid_argument on
// an inconsistent view, std::runtime_error on a CUDA error.
void kv_quantize_pages(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                       int qkv_stride, cudaStream_t stream);

}  // namespace kvserve::cuda
