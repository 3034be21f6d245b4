// Row-major GEMMs: plain ones through cuBLAS (fp16 inputs, fp32 accumulation on tensor cores, fp16
// or fp32 output), and ones with a bias (+ GELU) epilogue through cuBLASLt.
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <memory>
#include <tuple>

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

// What cuBLASLt applies to a GEMM's fp32 result before it is rounded to fp16. cuBLASLt's GELU is
// the tanh form (GPT-2's gelu_new); a model with the erf form keeps gemm + bias_activation_forward.
enum class GemmEpilogue { kBias, kBiasGeluTanh };

// GEMMs with a fused epilogue through cuBLASLt, with one fixed workspace and one plan per shape
// (descriptors and the algorithm the heuristic chose), so that a shape always runs the same
// kernel: CUDA graph replays are bit-identical to eager steps, and nothing is allocated on the
// device while a graph is captured. One instance per stream and thread.
class BiasGemm {
 public:
  // workspace: device memory of workspace_bytes, 256-byte aligned, kept for this object's life.
  // It may be shared with other work of the same stream (stream order keeps uses apart).
  BiasGemm(void* workspace, size_t workspace_bytes);
  ~BiasGemm();
  BiasGemm(const BiasGemm&) = delete;
  BiasGemm& operator=(const BiasGemm&) = delete;

  // c[m][n] = epilogue(a[m][k] @ b[k][n] + bias[n]), row-major, fp32 accumulation and epilogue
  // math, fp16 result:
  //   a: fp16 [m][k]   b: fp16 [k][n] (GPT-2's Conv1D weights)   bias: fp16 [n]   c: fp16 [m][n]
  // Every pointer 16-byte aligned (checked).
  void run(cudaStream_t stream, const __half* a, const __half* b, const __half* bias, __half* c,
           int m, int n, int k, GemmEpilogue epilogue);

  // Shapes planned so far.
  size_t plans() const { return plans_.size(); }

 private:
  struct Plan;
  using PlanKey = std::tuple<int, int, int, int>;  // m, n, k, epilogue

  Plan& plan(int m, int n, int k, GemmEpilogue epilogue);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_;
  size_t workspace_bytes_;
  std::map<PlanKey, std::unique_ptr<Plan>> plans_;
};

}  // namespace kvserve::cuda
