#include "engine/cuda/cuda_backend.h"

#include <spdlog/spdlog.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "engine/fp16.h"
#include "kernels/bias_activation.h"
#include "kernels/cuda_check.h"
#include "kernels/embedding.h"
#include "kernels/gemm.h"
#include "kernels/layer_norm.h"
#include "kernels/sample_token.h"
#include "kernels/trap.h"

namespace kvserve {

namespace {

// cuBLAS's recommended workspace on Hopper; also ample for earlier GPUs.
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;
// Decode graphs kept at once (one per item count and decode split seen recently); each holds the
// ~100-130 kernel nodes of one step (GPT-2 small, by format).
constexpr size_t kMaxDecodeGraphs = 128;

}  // namespace

CudaBackend::CudaBackend(const ModelWeights& weights, const KvCacheConfig& kv, int32_t num_blocks,
                         CudaBackendOptions options)
    : config_(weights.config),
      cache_(kv, num_blocks, weights.config, options.decode_attention, options.prefill_attention),
      use_graphs_(options.cuda_graphs),
      trap_at_forward_(options.trap_at_forward) {
  const ModelConfig& cfg = config_;
  if (cfg.n_embd % 2 != 0 || cfg.n_inner % 2 != 0) {
    throw std::invalid_argument("CUDA backend: n_embd and n_inner must be even");
  }
  // Every tensor in one host fp16 array, in upload order; the offsets become device pointers.
  std::vector<uint16_t> host;
  std::vector<size_t> offsets;
  auto add = [&](const std::vector<float>& t) {
    offsets.push_back(host.size());
    for (float v : t) host.push_back(float_to_half(v));
    host.resize((host.size() + 7) / 8 * 8);  // 16-byte aligned tensors
  };
  add(weights.token_embedding);
  add(weights.position_embedding);
  add(weights.ln_f_weight);
  add(weights.ln_f_bias);
  for (const LayerWeights& l : weights.layers) {
    for (const auto* t : {&l.ln_1_weight, &l.ln_1_bias, &l.attn_qkv_weight, &l.attn_qkv_bias,
                          &l.attn_proj_weight, &l.attn_proj_bias, &l.ln_2_weight, &l.ln_2_bias,
                          &l.mlp_fc_weight, &l.mlp_fc_bias, &l.mlp_proj_weight, &l.mlp_proj_bias}) {
      add(*t);
    }
  }
  __half* device = weights_.reserve(host.size());
  KVSERVE_CUDA_CHECK(
      cudaMemcpy(device, host.data(), host.size() * sizeof(uint16_t), cudaMemcpyHostToDevice));
  // From pageable memory cudaMemcpy may return before the weights land, and stream_ is
  // non-blocking: nothing else would order the first step's kernels after the copy.
  KVSERVE_CUDA_CHECK(cudaDeviceSynchronize());
  size_t next = 0;
  auto ptr = [&]() { return device + offsets[next++]; };
  wte_ = ptr();
  wpe_ = ptr();
  ln_f_weight_ = ptr();
  ln_f_bias_ = ptr();
  for (size_t i = 0; i < weights.layers.size(); ++i) {
    Layer l;
    l.ln_1_weight = ptr();
    l.ln_1_bias = ptr();
    l.qkv_weight = ptr();
    l.qkv_bias = ptr();
    l.proj_weight = ptr();
    l.proj_bias = ptr();
    l.ln_2_weight = ptr();
    l.ln_2_bias = ptr();
    l.fc_weight = ptr();
    l.fc_bias = ptr();
    l.fc_proj_weight = ptr();
    l.fc_proj_bias = ptr();
    layers_.push_back(l);
  }
  KVSERVE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  KVSERVE_CUBLAS_CHECK(cublasCreate(&cublas_));
  // The workspace after the stream: cublasSetStream resets it (cuda::gemm keeps the stream).
  KVSERVE_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
  void* workspace = cublas_workspace_.reserve(kCublasWorkspaceBytes);
  KVSERVE_CUBLAS_CHECK(cublasSetWorkspace(cublas_, workspace, kCublasWorkspaceBytes));
  // cuBLASLt shares the workspace: every GEMM runs on stream_, one after another.
  bias_gemm_ = std::make_unique<cuda::BiasGemm>(workspace, kCublasWorkspaceBytes);
}

CudaBackend::~CudaBackend() {
  decode_graphs_.clear();
  bias_gemm_.reset();
  if (cublas_) cublasDestroy(cublas_);
  if (stream_) cudaStreamDestroy(stream_);
}

uint64_t CudaBackend::buffer_moves() const {
  return cache_.buffer_moves() + x_.moves() + h_.moves() + qkv_.moves() + att_.moves() +
         fc_.moves() + logits_.moves();
}

const float* CudaBackend::run(const std::vector<ForwardItem>& items) {
  const ModelConfig& cfg = config_;
  const int C = cfg.n_embd, F = cfg.n_inner, V = cfg.vocab_size;
  // Host side: tokens, positions and the rows whose logits are wanted, checked as the CPU
  // backend checks them.
  std::vector<int32_t> tokens, positions, logit_rows;
  for (const ForwardItem& item : items) {
    if (item.tokens.empty()) throw std::invalid_argument("forward: an item has no tokens");
    const int first = static_cast<int>(tokens.size()), count = static_cast<int>(item.tokens.size());
    for (int t = 0; t < count; ++t) {
      const int token = item.tokens[t], pos = item.start + t;
      if (token < 0 || token >= V) {
        throw std::out_of_range("token id " + std::to_string(token) + " outside the vocabulary");
      }
      if (pos >= cfg.n_positions) {
        throw std::out_of_range("position " + std::to_string(pos) + " beyond the context of " +
                                std::to_string(cfg.n_positions));
      }
      tokens.push_back(token);
      positions.push_back(pos);
    }
    for (int t = item.all_logits ? 0 : count - 1; t < count; ++t) logit_rows.push_back(first + t);
  }
  const int T = static_cast<int>(tokens.size()), R = static_cast<int>(logit_rows.size());

  indices_ = std::move(tokens);
  indices_.insert(indices_.end(), positions.begin(), positions.end());
  indices_.insert(indices_.end(), logit_rows.begin(), logit_rows.end());
  const int32_t* index = cache_.prepare(items, stream_, indices_);
  x_.reserve(static_cast<size_t>(T) * C);
  h_.reserve(static_cast<size_t>(T) * C);
  qkv_.reserve(static_cast<size_t>(T) * 3 * C);
  att_.reserve(static_cast<size_t>(T) * C);
  fc_.reserve(static_cast<size_t>(T) * F);
  logits_.reserve(static_cast<size_t>(R) * V);
  if (use_graphs_ && cache_.decode_step() && !cache_.measures_errors()) {
    replay_decode(T, index);
  } else {
    enqueue_model(T, R, index);
  }
  return logits_.get();
}

void CudaBackend::enqueue_model(int T, int R, const int32_t* index) {
  const ModelConfig& cfg = config_;
  const int C = cfg.n_embd, F = cfg.n_inner, V = cfg.vocab_size;
  float* x = x_.get();
  __half* h = h_.get();
  __half* qkv = qkv_.get();
  __half* att = att_.get();
  __half* fc = fc_.get();
  float* logits_device = logits_.get();

  cuda::embedding_forward(x, index, index + T, wte_, wpe_, T, C, stream_);
  // Each projection GEMM accumulates into x without its bias; the next layer norm adds it.
  const __half* pending_bias = nullptr;
  for (int layer = 0; layer < cfg.n_layer; ++layer) {
    const Layer& w = layers_[layer];
    cuda::layer_norm_forward(h, x, nullptr, pending_bias, w.ln_1_weight, w.ln_1_bias, T, C,
                             cfg.layer_norm_epsilon, stream_);
    bias_gemm_->run(stream_, h, w.qkv_weight, w.qkv_bias, qkv, T, 3 * C, C,
                    cuda::GemmEpilogue::kBias);
    cache_.append_and_attend(layer, qkv, att, stream_);
    cuda::gemm(cublas_, stream_, att, w.proj_weight, false, x, cuda::GemmOutput::kFloat, T, C, C,
               1.0f);
    cuda::layer_norm_forward(h, x, nullptr, w.proj_bias, w.ln_2_weight, w.ln_2_bias, T, C,
                             cfg.layer_norm_epsilon, stream_);
    if (cfg.activation == Activation::kGeluTanh) {
      bias_gemm_->run(stream_, h, w.fc_weight, w.fc_bias, fc, T, F, C,
                      cuda::GemmEpilogue::kBiasGeluTanh);
    } else {  // cuBLASLt's GELU is the tanh form only
      cuda::gemm(cublas_, stream_, h, w.fc_weight, false, fc, cuda::GemmOutput::kHalf, T, F, C,
                 0.0f);
      cuda::bias_activation_forward(fc, w.fc_bias, T, F, cuda::BiasActivation::kGeluErf, stream_);
    }
    cuda::gemm(cublas_, stream_, fc, w.fc_proj_weight, false, x, cuda::GemmOutput::kFloat, T, C, F,
               1.0f);
    pending_bias = w.fc_proj_bias;
  }
  // Final layer norm of the wanted rows only, then the tied LM head.
  cuda::layer_norm_forward(h, x, index + 2 * T, pending_bias, ln_f_weight_, ln_f_bias_, R, C,
                           cfg.layer_norm_epsilon, stream_);
  cuda::gemm(cublas_, stream_, h, wte_, true, logits_device, cuda::GemmOutput::kFloat, R, V, C,
             0.0f);
}

void CudaBackend::replay_decode(int items, const int32_t* index) {
  // A graph holds the addresses of every buffer of its step: once one has moved, none is valid.
  if (buffer_moves() != graphs_buffer_moves_) {
    decode_graphs_.clear();
    graphs_buffer_moves_ = buffer_moves();
  }
  const cuda::DecodeSplit split = cache_.decode_split();
  const cuda::DecodeNewRows new_rows = cache_.decode_new_rows();
  const DecodeGraphKey key{items,
                           split.chunk,
                           split.splits,
                           static_cast<int>(cache_.decode_attention_variant()),
                           new_rows.quantize,
                           new_rows.store,
                           cache_.flushing_items() > 0};
  if (auto it = decode_graphs_.find(key); it != decode_graphs_.end()) {
    it->second.last_used = ++graph_clock_;
    KVSERVE_CUDA_CHECK(cudaGraphLaunch(it->second.exec.get(), stream_));
    ++graph_counters_.replayed;
    return;
  }
  // A new key: the step runs eagerly, which also loads every kernel it needs (lazy module
  // loading) and settles cuBLAS's choices for these shapes, and is then captured (not run) for
  // the steps to come.
  enqueue_model(items, items, index);
  if (decode_graphs_.size() >= kMaxDecodeGraphs) {
    auto oldest = decode_graphs_.begin();
    for (auto g = decode_graphs_.begin(); g != decode_graphs_.end(); ++g) {
      if (g->second.last_used < oldest->second.last_used) oldest = g;
    }
    decode_graphs_.erase(oldest);
  }
  // Thread-local capture: other threads' CUDA calls (another backend, a test) stay legal; in
  // this thread, nothing in enqueue_model allocates or synchronises.
  KVSERVE_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  cudaGraph_t graph = nullptr;
  try {
    enqueue_model(items, items, index);
    KVSERVE_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    cudaGraphExec_t exec = nullptr;
    const cudaError_t instantiated = cudaGraphInstantiate(&exec, graph, 0);
    KVSERVE_CUDA_CHECK(cudaGraphDestroy(graph));
    KVSERVE_CUDA_CHECK(instantiated);
    GraphExec owned(exec);
    decode_graphs_.emplace(key, DecodeGraph{std::move(owned), ++graph_clock_});
    ++graph_counters_.captured;
  } catch (const std::exception& e) {
    // The step itself ran eagerly and is complete: end the broken capture (if still open) so
    // that the stream works again, and run every later step eagerly too.
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream_, &status) == cudaSuccess &&
        status != cudaStreamCaptureStatusNone) {
      graph = nullptr;
      if (cudaStreamEndCapture(stream_, &graph) == cudaSuccess && graph) cudaGraphDestroy(graph);
    }
    cudaGetLastError();  // capture errors are not sticky: clear the one reported
    spdlog::warn("CUDA graph capture failed, decode steps run without graphs from now on: {}",
                 e.what());
    decode_graphs_.clear();
    use_graphs_ = false;
  }
}

std::string CudaBackend::context_error() const {
  // Clear a non-sticky error that the failed step may have left as the thread's last error
  // (KVSERVE_CUDA_CHECK clears those it reports, a cuBLAS failure may not), so that only an error
  // of the context itself can fail the probe. A sticky error is not cleared by this.
  cudaGetLastError();
  const char* call = "cudaStreamSynchronize";
  cudaError_t status = cudaStreamSynchronize(stream_);
  if (status == cudaSuccess) {
    call = "cudaDeviceSynchronize";
    status = cudaDeviceSynchronize();
  }
  if (status == cudaSuccess) return "";
  return std::string(call) + " after the failed step: " + cudaGetErrorName(status) + ": " +
         cudaGetErrorString(status);
}

void CudaBackend::throw_if_device_lost(const std::exception& step_error) const {
  const std::string probe = context_error();
  if (probe.empty()) return;
  throw DeviceLostError(std::string(step_error.what()) + "; the CUDA context is unusable (" +
                        probe + ")");
}

void CudaBackend::inject_fault() {
  if (++forward_calls_ == trap_at_forward_) cuda::trap(stream_);
}

void CudaBackend::forward(const std::vector<ForwardItem>& items, std::vector<float>& logits) {
  try {
    inject_fault();
    forward_on_device(items, logits);
  } catch (const std::exception& e) {
    throw_if_device_lost(e);
    throw;
  }
}

void CudaBackend::copy_blocks(const std::vector<BlockCopy>& copies) {
  try {
    cache_.copy_blocks(copies, stream_);
  } catch (const std::exception& e) {
    throw_if_device_lost(e);
    throw;
  }
}

void CudaBackend::forward_sample(const std::vector<ForwardItem>& items,
                                 const std::vector<SampleRequest>& requests,
                                 std::vector<SampleResult>& results) {
  try {
    inject_fault();
    forward_sample_on_device(items, requests, results);
  } catch (const std::exception& e) {
    throw_if_device_lost(e);
    throw;
  }
}

void CudaBackend::forward_on_device(const std::vector<ForwardItem>& items,
                                    std::vector<float>& logits) {
  const float* logits_device = run(items);
  size_t rows = 0;
  for (const ForwardItem& item : items) rows += item.all_logits ? item.tokens.size() : 1;
  const size_t count = rows * config_.vocab_size;
  float* host = logits_host_.reserve(count);
  KVSERVE_CUDA_CHECK(
      cudaMemcpyAsync(host, logits_device, count * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  KVSERVE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  logits.assign(host, host + count);
}

void CudaBackend::forward_sample_on_device(const std::vector<ForwardItem>& items,
                                           const std::vector<SampleRequest>& requests,
                                           std::vector<SampleResult>& results) {
  check_sample_batch(items, requests);
  results.assign(items.size(), SampleResult{});
  if (items.empty()) return;
  const int V = config_.vocab_size;
  const float* logits_device = run(items);
  const int rows = static_cast<int>(items.size());

  // While the GPU runs the model: each row's parameters and, where the penalty is on, its history,
  // packed for one copy: SampleRowParams [rows] | history ids. Rows that want no token, or whose
  // request fails the checks sample_token makes first, sample greedily and are discarded.
  size_t history_count = 0;
  for (int i = 0; i < rows; ++i) {
    const SampleRequest& r = requests[i];
    if (r.params == nullptr) continue;
    results[i].error = sample_input_error(*r.params, V, *r.history);
    if (results[i].error.empty() && r.params->repetition_penalty != 1.0f) {
      history_count += r.history->size();
    }
  }
  const size_t params_bytes = rows * sizeof(cuda::SampleRowParams);
  const size_t upload_bytes = params_bytes + history_count * sizeof(int32_t);
  unsigned char* upload_host = sample_upload_host_.reserve(upload_bytes);
  auto* row_params = reinterpret_cast<cuda::SampleRowParams*>(upload_host);
  auto* history = reinterpret_cast<int32_t*>(upload_host + params_bytes);
  int32_t history_end = 0;
  for (int i = 0; i < rows; ++i) {
    const SampleRequest& r = requests[i];
    cuda::SampleRowParams& row = row_params[i];
    row = {0.0, 0.0f, 1.0f, 1.0f, 0, history_end, history_end};
    if (r.params == nullptr || !results[i].error.empty()) continue;
    const SamplingParams& p = *r.params;
    row.uniform = sampling_uniform(p.seed, r.step);
    row.temperature = p.temperature;
    row.top_p = p.top_p;
    row.repetition_penalty = p.repetition_penalty;
    row.top_k = p.top_k;
    if (p.repetition_penalty != 1.0f) {
      std::memcpy(history + history_end, r.history->data(), r.history->size() * sizeof(int32_t));
      history_end += static_cast<int32_t>(r.history->size());
      row.history_end = history_end;
    }
  }
  unsigned char* upload = sample_upload_.reserve(upload_bytes);
  KVSERVE_CUDA_CHECK(
      cudaMemcpyAsync(upload, upload_host, upload_bytes, cudaMemcpyHostToDevice, stream_));

  const size_t scratch_bytes = cuda::sample_tokens_scratch_bytes(rows, V);
  void* scratch = sample_scratch_.reserve(scratch_bytes);
  // token [rows] | status [rows] | logprob bits [rows], one copy back.
  int32_t* picked = picked_.reserve(3 * static_cast<size_t>(rows));
  cuda::sample_tokens(
      logits_device, rows, V, reinterpret_cast<const cuda::SampleRowParams*>(upload), row_params,
      reinterpret_cast<const int32_t*>(upload + params_bytes), scratch, scratch_bytes, picked,
      reinterpret_cast<float*>(picked + 2 * rows), picked + rows, stream_);
  int32_t* host = picked_host_.reserve(3 * static_cast<size_t>(rows));
  KVSERVE_CUDA_CHECK(cudaMemcpyAsync(host, picked, 3 * static_cast<size_t>(rows) * sizeof(int32_t),
                                     cudaMemcpyDeviceToHost, stream_));
  KVSERVE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  for (int i = 0; i < rows; ++i) {
    if (requests[i].params == nullptr || !results[i].error.empty()) continue;
    const int32_t status = host[rows + i];
    if (status == cuda::kSampleLogitsInfOrNoFinite) {
      results[i].error = kLogitsInfOrNoFiniteError;
    } else if (status == cuda::kSampleLogitsNan) {
      results[i].error = kLogitsNanError;
    } else {
      float logprob;
      std::memcpy(&logprob, host + 2 * rows + i, sizeof(float));
      results[i].token = {host[i], logprob};
    }
  }
}

}  // namespace kvserve
