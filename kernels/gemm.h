// Row-major GEMMs through cuBLAS: fp16 inputs, fp32 accumulation (tensor cores), fp16 or fp32
// output.
#pragma once

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace kvserve::cuda {

enum class GemmOutput { kHalf, kFloat };

// c[m][n] = a[m][k] @ op(b) + beta * c, all row-major:
//   a: fp16 [m][k]
//   b: fp16 [k][n] (b_transposed = false: GPT-2's Conv1D weights) or [n][k] (true: the tied
//      LM head, wte)
//   c: fp16 or fp32 [m][n]; beta 1 accumulates (a projection into the fp32 residual stream)
// Runs on `stream`; the handle keeps a workspace set with cublasSetWorkspace when its stream is
// already `stream`.
void gemm(cublasHandle_t handle, cudaStream_t stream, const __half* a, const __half* b,
          bool b_transposed, void* c, GemmOutput c_type, int m, int n, int k, float beta);

}  // namespace kvserve::cuda
