// Row-major GEMMs on cuBLAS's column-major API: a row-major [m][n] matrix is a column-major
// [n][m] one, so c^T = op(b)^T a^T is computed with the operands swapped.
#include "kernels/gemm.h"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

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

// ---- BiasGemm

namespace {

// The least alignment of every operand the callers guarantee (weights are packed at 16 bytes);
// the heuristic only offers algorithms that work with it.
constexpr uint32_t kOperandAlignment = 16;
constexpr size_t kMaxPlans = 4096;

template <typename T>
void set_attribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute,
                   const T& value) {
  KVSERVE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)));
}

struct PreferenceDeleter {
  void operator()(cublasLtMatmulPreference_t preference) const {
    cublasLtMatmulPreferenceDestroy(preference);
  }
};

}  // namespace

// The descriptors of one shape and the algorithm chosen for it; only the bias pointer changes
// between calls (set on the descriptor before each, on the host).
struct BiasGemm::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t weight = nullptr, input = nullptr, output = nullptr;
  cublasLtMatmulAlgo_t algo{};

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (output) cublasLtMatrixLayoutDestroy(output);
    if (input) cublasLtMatrixLayoutDestroy(input);
    if (weight) cublasLtMatrixLayoutDestroy(weight);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

BiasGemm::BiasGemm(void* workspace, size_t workspace_bytes)
    : workspace_(workspace), workspace_bytes_(workspace_bytes) {
  if (!workspace || workspace_bytes == 0 || reinterpret_cast<uintptr_t>(workspace) % 256 != 0) {
    throw std::invalid_argument("BiasGemm: the workspace must be non-empty and 256-byte aligned");
  }
  KVSERVE_CUBLAS_CHECK(cublasLtCreate(&handle_));
}

BiasGemm::~BiasGemm() {
  plans_.clear();
  if (handle_) cublasLtDestroy(handle_);
}

BiasGemm::Plan& BiasGemm::plan(int m, int n, int k, GemmEpilogue epilogue) {
  const PlanKey key{m, n, k, static_cast<int>(epilogue)};
  if (auto it = plans_.find(key); it != plans_.end()) return *it->second;
  // Prefill steps bring many row counts; forgetting every plan now and then bounds the host memory
  // and changes no result: the heuristic gives a shape the same algorithm again.
  if (plans_.size() >= kMaxPlans) plans_.clear();
  auto p = std::make_unique<Plan>();
  // Column-major view: d[n][m] = weight[n][k] @ input[k][m] (+ bias[n], one per row of d; the
  // bias takes d's type, fp16, by default).
  KVSERVE_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set_attribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_N);
  set_attribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  set_attribute(
      p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE,
      epilogue == GemmEpilogue::kBias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_GELU_BIAS);
  KVSERVE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->weight, CUDA_R_16F, n, k, n));
  KVSERVE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->input, CUDA_R_16F, k, m, k));
  KVSERVE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->output, CUDA_R_16F, n, m, n));

  cublasLtMatmulPreference_t raw_preference = nullptr;
  KVSERVE_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&raw_preference));
  const std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, PreferenceDeleter> preference(
      raw_preference);
  for (const auto attribute :
       {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
    KVSERVE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        preference.get(), attribute, &kOperandAlignment, sizeof(kOperandAlignment)));
  }
  const uint64_t workspace_bytes = workspace_bytes_;
  KVSERVE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      preference.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes,
      sizeof(workspace_bytes)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  KVSERVE_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handle_, p->desc, p->weight, p->input,
                                                      p->output, p->output, preference.get(), 1,
                                                      &result, &found));
  if (found == 0) {
    throw std::runtime_error("BiasGemm: cuBLASLt offers no algorithm for m " + std::to_string(m) +
                             ", n " + std::to_string(n) + ", k " + std::to_string(k));
  }
  p->algo = result.algo;
  return *plans_.emplace(key, std::move(p)).first->second;
}

void BiasGemm::run(cudaStream_t stream, const __half* a, const __half* b, const __half* bias,
                   __half* c, int m, int n, int k, GemmEpilogue epilogue) {
  if (m < 0 || n <= 0 || k <= 0) throw std::invalid_argument("BiasGemm: bad shape");
  if (m == 0) return;
  if (!a || !b || !bias || !c) throw std::invalid_argument("BiasGemm: null pointer");
  for (const void* p : {static_cast<const void*>(a), static_cast<const void*>(b),
                        static_cast<const void*>(bias), static_cast<const void*>(c)}) {
    if (reinterpret_cast<uintptr_t>(p) % kOperandAlignment != 0) {
      throw std::invalid_argument("BiasGemm: operands must be 16-byte aligned");
    }
  }
  Plan& p = plan(m, n, k, epilogue);
  set_attribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, static_cast<const void*>(bias));
  const float alpha = 1.0f, beta = 0.0f;
  KVSERVE_CUBLAS_CHECK(cublasLtMatmul(handle_, p.desc, &alpha, b, p.weight, a, p.input, &beta, c,
                                      p.output, c, p.output, &p.algo, workspace_, workspace_bytes_,
                                      stream));
}

}  // namespace kvserve::cuda
