// Layer norm of the fp32 residual stream into fp16, with the pending bias of the previous
// projection folded in.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kvserve::cuda {

// For each output row r, with s = row_index ? row_index[r] : r:
//   if residual_bias: x[s][:] += residual_bias (written back: the residual add of the projection
//                     GEMM that accumulated into x without its bias)
//   out[r][:] = (x[s] - mean) / sqrt(var + eps) * weight + bias     (fp32 math)
//   x: fp32 [*][C]   residual_bias, weight, bias: fp16 [C]   out: fp16 [rows][C]
// C must be a multiple of 4 and at most 2048, every tensor 16-byte aligned (checked).
//   row_index: int32 [rows] or null
void layer_norm_forward(__half* out, float* x, const int32_t* row_index,
                        const __half* residual_bias, const __half* weight, const __half* bias,
                        int rows, int channels, float eps, cudaStream_t stream);

}  // namespace kvserve::cuda
