// Row-major GEMM on cuBLAS's column-major API: a row-major [m][n] matrix is a column-major
// [n][m] one, so c^T = op(b)^T a^T is computed with the operands swapped.
#include "kernels/gemm.h"

#include <stdexcept>

#include "kernels/cuda_check.h"

namespace kvserve::cuda {

void gemm(cublasHandle_t handle, cudaStream_t stream, const __half* a, const __half* b,
          bool b_transposed, void* c, GemmOutput c_type, int m, int n, int k, float beta) {
  if (m < 0 || n <= 0 || k <= 0) throw std::invalid_argument("gemm: bad shape");
  if (m == 0) return;
  if (!handle || !a || !b || !c) throw std::invalid_argument("gemm: null handle or pointer");
  const float alpha = 1.0f;
  // cublasSetStream also resets the handle's workspace to cuBLAS's own pool, which would undo a
  // workspace set with cublasSetWorkspace (needed for CUDA graph capture): set it only on change.
  cudaStream_t current = nullptr;
  KVSERVE_CUBLAS_CHECK(cublasGetStream(handle, &current));
  if (current != stream) KVSERVE_CUBLAS_CHECK(cublasSetStream(handle, stream));
  KVSERVE_CUBLAS_CHECK(cublasGemmEx(handle, b_transposed ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N,
                                    n, m, k, &alpha, b, CUDA_R_16F, b_transposed ? k : n, a,
                                    CUDA_R_16F, k, &beta, c,
                                    c_type == GemmOutput::kHalf ? CUDA_R_16F : CUDA_R_32F, n,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace kvserve::cuda
