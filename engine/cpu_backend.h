// The CPU reference backend: GPT-2 in fp32 over the paged KV cache of cpu_kv_cache.h, its matrix
// products batch-invariant by construction (batch_invariant_gemm.h). It serves --device cpu, runs
// every CI test and is the CUDA backend's oracle.
#pragma once

#include <vector>

#include "engine/backend.h"
#include "engine/batch_invariant_gemm.h"
#include "engine/cpu_kv_cache.h"
#include "engine/kv_format.h"
#include "engine/model_weights.h"

namespace kvserve {

class CpuBackend : public Backend {
 public:
  // Allocates a pool of `num_blocks` blocks in `kv`'s format; each step's items say which blocks
  // their sequences hold.
  CpuBackend(ModelWeights weights, const KvCacheConfig& kv, int32_t num_blocks);

  std::string name() const override { return "cpu"; }
  void forward(const std::vector<ForwardItem>& items, std::vector<float>& logits) override;
  void copy_blocks(const std::vector<BlockCopy>& copies) override { cache_.copy_blocks(copies); }
  void set_kv_error_sample_rate(double rate) override { cache_.set_error_sample_rate(rate); }
  void take_kv_errors(KvQuantizationErrors& errors) override { cache_.take_errors(errors); }

 private:
  struct PackedLayer {
    PackedWeights attn_qkv, attn_proj, mlp_fc, mlp_proj;
  };

  ModelWeights weights_;  // the layer matrices are moved into packed_layers_
  std::vector<PackedLayer> packed_layers_;
  PackedWeights lm_head_;  // the token embedding, transposed
  CpuKvCache cache_;
  // Activations, reused across steps; T = tokens in the step.
  std::vector<float> x_;    // [T][C] residual stream
  std::vector<float> h_;    // [T][C] layer-norm output
  std::vector<float> qkv_;  // [T][3C]
  std::vector<float> att_;  // [T][C]
  std::vector<float> fc_;   // [T][F]
};

}  // namespace kvserve
