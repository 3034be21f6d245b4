// The CUDA backend: GPT-2 with fp16 weights and activations, fp32 accumulation (cuBLAS; cuBLASLt
// with the bias, or bias + GELU, in the GEMM's epilogue for QKV and FC) and an fp32 residual
// stream, over the paged KV cache of cuda_kv_cache.h. Logits come back to the host in fp32 for
// forward(); forward_sample picks tokens on the GPU (sample_token.cu).
//
// Decode steps (every item one token, run by decode_attention) replay a CUDA graph of the whole
// model, captured after the first (eager) step with its item count and decode split, so one step
// costs one graph launch instead of 100-odd kernel launches. The graph runs exactly the kernels,
// with exactly the arguments, that the eager path would launch: everything that changes between
// steps (tokens, positions, block tables) is read from device memory that prepare() refills at
// fixed addresses, so results are bit for bit those of the eager path.
#pragma once

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "engine/backend.h"
#include "engine/cuda/cuda_kv_cache.h"
#include "engine/cuda/device_buffer.h"
#include "engine/kv_format.h"
#include "engine/model_weights.h"
#include "kernels/gemm.h"

namespace kvserve {

struct CudaBackendOptions {
  bool cuda_graphs = true;  // replay decode steps from CUDA graphs; false: launch every kernel
  // Fault injection (tests of device loss): the Nth forward or forward_sample call (from 1)
  // launches a trapping kernel before its step (kernels/trap.h); 0: never.
  int64_t trap_at_forward = 0;
  // The kernel of KIVI decode attention (kernels/decode_attention_variant.h).
  cuda::DecodeAttentionVariant decode_attention = cuda::DecodeAttentionVariant::kPacked;
  // The kernel of prefill and mixed steps (kernels/prefill_attention_variant.h).
  cuda::PrefillAttentionVariant prefill_attention = cuda::PrefillAttentionVariant::kTensor;
};

class CudaBackend : public Backend {
 public:
  // Uploads the weights (converted to fp16 once) and allocates a KV pool of `num_blocks` blocks in
  // `kv`'s format on the current device; each step's items say which blocks their sequences hold.
  CudaBackend(const ModelWeights& weights, const KvCacheConfig& kv, int32_t num_blocks,
              CudaBackendOptions options = {});
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda"; }
  // Both throw DeviceLostError when a failed step has left the CUDA context unusable (a sticky
  // error: illegal address, kernel trap, uncorrectable ECC...), else what the step threw.
  void forward(const std::vector<ForwardItem>& items, std::vector<float>& logits) override;
  // Every request picks its token on the GPU (kernels/sample_token.h), by sample_token's
  // contract and with its error messages; only ids, logprobs and statuses come back.
  void forward_sample(const std::vector<ForwardItem>& items,
                      const std::vector<SampleRequest>& requests,
                      std::vector<SampleResult>& results) override;
  // Device-to-device copies on the backend's stream, ordered before the step's kernels (and any
  // decode graph replayed after them).
  void copy_blocks(const std::vector<BlockCopy>& copies) override;
  GraphCounters graph_counters() const override { return graph_counters_; }
  void set_kv_error_sample_rate(double rate) override { cache_.set_error_sample_rate(rate); }
  void take_kv_errors(KvQuantizationErrors& errors) override { cache_.take_errors(errors); }
  // GPU steps keep getting cheaper per token up to about this size (engine/README.md, "The token
  // budget": on an H100 a 2,048-token budget halves end-to-end throughput).
  int preferred_batch_tokens() const override { return 16384; }
  // The whole KV pool, [n_layer][num_blocks][block_bytes], for tests.
  std::vector<uint8_t> download_cache() const { return cache_.download(stream_); }

 private:
  // The steps themselves, which throw whatever failed.
  void forward_on_device(const std::vector<ForwardItem>& items, std::vector<float>& logits);
  void forward_sample_on_device(const std::vector<ForwardItem>& items,
                                const std::vector<SampleRequest>& requests,
                                std::vector<SampleResult>& results);
  // After a step threw: "" if the context still runs work (the step's error was not sticky, e.g.
  // an allocation that did not fit), else the error with which synchronising failed. A sticky
  // error poisons the context: every later call returns it, so the synchronisation does too.
  std::string context_error() const;
  // Counts a forward call and, at options.trap_at_forward, launches the trapping kernel.
  void inject_fault();
  // Throws DeviceLostError (with the step's error and the probe's) if context_error() says the
  // context is unusable; returns otherwise, and the caller rethrows the step's own error.
  void throw_if_device_lost(const std::exception& step_error) const;
  // Runs the model; returns the device logits, fp32 [rows][V] (rows as forward's), valid until
  // the next call.
  const float* run(const std::vector<ForwardItem>& items);
  // Enqueues the model's kernels for a prepared step of T token rows, R of them wanted as
  // logits, into the buffers reserved for it. index: device tokens [T] | positions [T] | logit
  // rows [R].
  void enqueue_model(int T, int R, const int32_t* index);
  // Runs a prepared decode step of `items` items: replays its graph, or runs it eagerly and
  // captures the graph for the next steps of the same key (should capture fail, it logs why and
  // turns graphs off: the step has run all the same).
  void replay_decode(int items, const int32_t* index);
  // How many times any buffer the graphs address has moved.
  uint64_t buffer_moves() const;

  struct GraphExecDeleter {
    void operator()(cudaGraphExec_t exec) const { cudaGraphExecDestroy(exec); }
  };
  using GraphExec = std::unique_ptr<std::remove_pointer_t<cudaGraphExec_t>, GraphExecDeleter>;
  struct DecodeGraph {
    GraphExec exec;
    uint64_t last_used = 0;
  };
  // What a decode graph bakes in besides buffer addresses: items (= T = R), the decode split
  // (chunk, splits), the decode attention variant (fixed for a backend today, but a graph
  // captured with one kernel must never replay for another), the cache's decode_new_rows()
  // flags and whether any item flushes (a step in which none does launches no write path; one in
  // which some do reads which from the step's metadata).
  using DecodeGraphKey = std::tuple<int, int, int, int, bool, bool, bool>;

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
  cuda::DeviceBuffer<float> x_;       // [T][C] residual stream, fp32
  cuda::DeviceBuffer<__half> h_;      // [T][C] layer-norm output
  cuda::DeviceBuffer<__half> qkv_;    // [T][3C]
  cuda::DeviceBuffer<__half> att_;    // [T][C]
  cuda::DeviceBuffer<__half> fc_;     // [T][F]
  cuda::DeviceBuffer<float> logits_;  // [R][V]
  std::vector<int32_t> indices_;      // host tokens [T] | positions [T] | logit rows [R]
  cuda::PinnedBuffer<float> logits_host_;
  // forward_sample: SampleRowParams [rows] | penalised rows' history ids, uploaded in one copy.
  cuda::PinnedBuffer<unsigned char> sample_upload_host_;
  cuda::DeviceBuffer<unsigned char> sample_upload_;
  cuda::DeviceBuffer<unsigned char> sample_scratch_;  // sample_tokens' scratch
  cuda::DeviceBuffer<int32_t> picked_;  // sample_tokens' token | status | logprob, [3][rows]
  cuda::PinnedBuffer<int32_t> picked_host_;
  // cuBLAS's workspace, set once, so that cuBLAS never allocates while a graph is captured and
  // picks the same kernels with and without graphs.
  cuda::DeviceBuffer<uint8_t> cublas_workspace_;
  // The GEMMs with a bias (+ GELU) epilogue (QKV, FC), on cuBLASLt with the same workspace.
  std::unique_ptr<cuda::BiasGemm> bias_gemm_;

  bool use_graphs_;
  int64_t trap_at_forward_;
  int64_t forward_calls_ = 0;  // forward and forward_sample calls, for trap_at_forward_
  std::map<DecodeGraphKey, DecodeGraph> decode_graphs_;
  uint64_t graphs_buffer_moves_ = 0;  // buffer_moves() when decode_graphs_ were captured
  uint64_t graph_clock_ = 0;          // counts replays, for least-recently-used eviction
  GraphCounters graph_counters_;
};

}  // namespace kvserve
