// The sampled quantization error of the KV write path (engine/kv_quantization_error.h): after
// kv_quantize_pages, a sampled share of the groups that entered the pages at this step is read
// back and compared with the fp16 values they came from; the relative errors are counted into
// device histogram bins that the host reads once per step.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kv_cache_view.h"
#include "kernels/kv_error_sample.h"

namespace kvserve::cuda {

// Accumulated on the device; [2]: keys, values. Buckets of kv_error_bucket_bound, +Inf last.
struct KvErrorDeviceBins {
  unsigned long long counts[2][kKvErrorBuckets + 1];
  double sum[2];
};

// qkv: fp16 [rows][3C] (row stride qkv_stride elements), C = n_head * head_dim: q | k | v.
// Runs, on the steps kv_error_step_sampled picks, after kv_quantize_pages and before
// kv_store_residual (the source of the flushed positions is still in the residual).
// Adds the errors of every group the step flushed to `bins`. Throws std::invalid_argument on an
// inconsistent view or null bins, std::runtime_error on a CUDA error.
void kv_quantization_error(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                           int qkv_stride, KvErrorDeviceBins* bins, cudaStream_t stream);

}  // namespace kvserve::cuda
