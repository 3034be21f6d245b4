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
//   c: fp16 or fp32 [m][c_stride] (c_stride 0: n), of which columns [0, n) are written; beta 1
//      accumulates (a projection into the fp32 residual stream). A c_stride that keeps rows
//      16-byte aligned lets cuBLAS pick vectorised kernels where n does not (the LM head's n is
//      GPT-2's odd vocabulary, 50257)
// Runs on `stream`; the handle keeps a workspace set with cublasSetWorkspace when its stream is
// already `stream`.
void gemm(cublasHandle_t handle, cudaStream_t stream, const __half* a, const __half* b,
          bool b_transposed, void* c, GemmOutput c_type, int m, int n, int k, float beta,
          int c_stride = 0);

}  // namespace kvserve::cuda
