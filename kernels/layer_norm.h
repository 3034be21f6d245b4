// Layer norm of the fp32 residual stream into fp16, with the pending bias of the previous
// projection folded in.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kvserve::cuda {

constexpr int kLayerNormFewRows = 2048;

// For each output row r, with s = row_index ? row_index[r] : r:
//   if residual_bias: x[s][:] += residual_bias (written back: the residual add of the projection
//                     GEMM that accumulated into x without its bias)
//   out[r][:] = (x[s] - mean) / sqrt(var + eps) * weight + bias     (fp32 math)
//   x: fp32 [*][C]   residual_bias, weight, bias: fp16 [C]   out: fp16 [rows][C]
// C must be a multiple of 4 and at most 2048, every tensor 16-byte aligned (checked).
//   row_index: int32 [rows] or null
// One warp per row, rows_per_block (1..32) warps per block; 0 chooses: 1 for up to
// kLayerNormFewRows rows (a decode step's rows then spread over every SM), else 4 (full occupancy
// for a prefill step's thousands). The micro-benchmark GpuKernels.LayerNormThroughput times both.
void layer_norm_forward(__half* out, float* x, const int32_t* row_index,
                        const __half* residual_bias, const __half* weight, const __half* bias,
                        int rows, int channels, float eps, cudaStream_t stream,
                        int rows_per_block = 0);

}  // namespace kvserve::cuda
