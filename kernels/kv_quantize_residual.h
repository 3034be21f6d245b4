// KV write path, part 0 (KIVI with an int8 residual): the step's new keys and values enter the
// window quantized to int8 per token and head (engine/cpu_kv_cache.cc does the same), into the
// batch's new rows, before any other kernel of the step reads the window.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/kv_cache_view.h"

namespace kvserve::cuda {

// qkv: fp16 [rows][3C] (row stride qkv_stride elements): q | k | v, the step's rows (every
// item's, consecutive). Writes batch.new_codes (u8 [rows][2][H][D]) and batch.new_params (fp16
// (scale, zero) [rows][2][H]) of each row: scale = fp16((max - min) / 255), zero = fp16(min), codes
// rint((x - zero) / scale) clamped to [0, 255], as engine/kv_quant.cc's quantize_group. A no-op
// unless the view has an int8 residual. Throws std::invalid_argument / std::runtime_error.
void kv_quantize_residual(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                          int qkv_stride, int rows, cudaStream_t stream);

}  // namespace kvserve::cuda
