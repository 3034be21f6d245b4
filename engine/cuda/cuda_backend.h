// The CUDA backend: GPT-2 with fp16 weights and activations, fp32 accumulation (cuBLAS) and an
// fp32 residual stream, over the paged KV cache of cuda_kv_cache.h. Logits come back to the host
// in fp32 for forward(); forward_sample picks tokens on the GPU.
#pragma once

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <memory>
#include <vector>

#include "engine/backend.h"
#include "engine/cuda/cuda_kv_cache.h"
#include "engine/cuda/device_buffer.h"
#include "engine/kv_cache_manager.h"
#include "engine/model_weights.h"

namespace kvserve {

class CudaBackend : public Backend {
 public:
  // Uploads the weights (converted to fp16 once) and allocates the KV pool on the current device.
  // Reads block tables from `manager`, which must outlive the backend.
  CudaBackend(const ModelWeights& weights, const KvCacheManager& manager);
  ~CudaBackend() override;

  std::string name() const override { return "cuda"; }
  void forward(const std::vector<ForwardItem>& items, std::vector<float>& logits) override;
  // Every request picks its token on the GPU (kernels/sample_token.h), by sample_token's
  // contract and with its error messages; only ids, logprobs and statuses come back.
  void forward_sample(const std::vector<ForwardItem>& items,
                      const std::vector<SampleRequest>& requests,
                      std::vector<SampleResult>& results) override;

 private:
  // Runs the model; returns the device logits, fp32 [rows][V] (rows as forward's), valid until
  // the next call.
  const float* run(const std::vector<ForwardItem>& items);

  // Device pointers into weights_, GPT-2 layout (Conv1D weights [in][out]).
  struct Layer {
    const __half *ln_1_weight, *ln_1_bias;        // [C]
    const __half *qkv_weight, *qkv_bias;          // [C][3C], [3C]
    const __half *proj_weight, *proj_bias;        // [C][C], [C]
    const __half *ln_2_weight, *ln_2_bias;        // [C]
    const __half *fc_weight, *fc_bias;            // [C][F], [F]
    const __half *fc_proj_weight, *fc_proj_bias;  // [F][C], [C]
  };

  ModelConfig config_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  cuda::DeviceBuffer<__half> weights_;  // every weight, fp16, one allocation
  const __half* wte_ = nullptr;         // [V][C], also the tied LM head
  const __half* wpe_ = nullptr;         // [n_positions][C]
  const __half *ln_f_weight_ = nullptr, *ln_f_bias_ = nullptr;  // [C]
  std::vector<Layer> layers_;
  CudaKvCache cache_;
  // Activations, grown on demand; T = tokens in the step, R = rows whose logits are wanted.
  cuda::DeviceBuffer<float> x_;          // [T][C] residual stream, fp32
  cuda::DeviceBuffer<__half> h_;         // [T][C] layer-norm output
  cuda::DeviceBuffer<__half> qkv_;       // [T][3C]
  cuda::DeviceBuffer<__half> att_;       // [T][C]
  cuda::DeviceBuffer<__half> fc_;        // [T][F]
  cuda::DeviceBuffer<float> logits_;     // [R][V]
  cuda::DeviceBuffer<int32_t> indices_;  // tokens [T], positions [T], logit rows [R]
  cuda::PinnedBuffer<int32_t> indices_host_;
  cuda::PinnedBuffer<float> logits_host_;
  // forward_sample: SampleRowParams [rows] | penalised rows' history ids, uploaded in one copy.
  cuda::PinnedBuffer<unsigned char> sample_upload_host_;
  cuda::DeviceBuffer<unsigned char> sample_upload_;
  cuda::DeviceBuffer<unsigned char> sample_scratch_;  // sample_tokens' scratch
  cuda::DeviceBuffer<int32_t> picked_;  // sample_tokens' token | status | logprob, [3][rows]
  cuda::PinnedBuffer<int32_t> picked_host_;
};

}  // namespace kvserve
