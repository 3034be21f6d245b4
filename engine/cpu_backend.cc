#include "engine/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <stdexcept>
#include <string>

namespace kvserve {
namespace {

// Below this many rows a parallel region costs more than it saves (decode steps of small
// batches): waking threads on a busy machine takes longer than the work.
constexpr int kParallelRows = 16;

// out[T][C] = layer_norm(in[T][C]) * weight + bias
void layer_norm(const float* in, float* out, int rows, int cols, const std::vector<float>& weight,
                const std::vector<float>& bias, float eps) {
#pragma omp parallel for if (rows >= kParallelRows)
  for (int r = 0; r < rows; ++r) {
    const float* x = in + static_cast<size_t>(r) * cols;
    float* y = out + static_cast<size_t>(r) * cols;
    double mean = 0.0, var = 0.0;
    for (int c = 0; c < cols; ++c) mean += x[c];
    mean /= cols;
    for (int c = 0; c < cols; ++c) var += (x[c] - mean) * (x[c] - mean);
    const float inv_std = static_cast<float>(1.0 / std::sqrt(var / cols + eps));
    for (int c = 0; c < cols; ++c) {
      y[c] = (x[c] - static_cast<float>(mean)) * inv_std * weight[c] + bias[c];
    }
  }
}

void gelu(float* x, size_t count, Activation activation) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
#pragma omp parallel for if (count >= kParallelRows * 1024)
  for (size_t i = 0; i < count; ++i) {
    const float v = x[i];
    x[i] = activation == Activation::kGeluTanh
               ? 0.5f * v * (1.0f + std::tanh(kSqrt2OverPi * (v + 0.044715f * v * v * v)))
               : 0.5f * v * (1.0f + std::erf(v * 0.7071067811865476f));
  }
}

}  // namespace

CpuBackend::CpuBackend(ModelWeights weights, const KvCacheConfig& kv, int32_t num_blocks)
    : weights_(std::move(weights)), cache_(kv, num_blocks, weights_.config) {
  const ModelConfig& cfg = weights_.config;
  const int C = cfg.n_embd, F = cfg.n_inner;
  // Each layer matrix is kept only in its packed form; the token embedding stays as it is for
  // the lookups and is packed (transposed) once more for the tied LM head.
  auto pack = [](std::vector<float>& matrix, int k, int n) {
    PackedWeights packed(matrix.data(), k, n, false);
    std::vector<float>().swap(matrix);
    return packed;
  };
  for (LayerWeights& w : weights_.layers) {
    packed_layers_.push_back({pack(w.attn_qkv_weight, C, 3 * C), pack(w.attn_proj_weight, C, C),
                              pack(w.mlp_fc_weight, C, F), pack(w.mlp_proj_weight, F, C)});
  }
  lm_head_ = PackedWeights(weights_.token_embedding.data(), C, cfg.vocab_size, true);
}

void CpuBackend::forward(const std::vector<ForwardItem>& items, std::vector<float>& logits) {
  const ModelConfig& cfg = weights_.config;
  const int C = cfg.n_embd, F = cfg.n_inner, V = cfg.vocab_size, H = cfg.n_head;
  std::vector<int> first_row(items.size());
  int rows = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    first_row[i] = rows;
    rows += static_cast<int>(items[i].tokens.size());
    if (items[i].tokens.empty()) throw std::invalid_argument("forward: an item has no tokens");
  }
  x_.resize(static_cast<size_t>(rows) * C);
  h_.resize(x_.size());
  att_.resize(x_.size());
  qkv_.resize(static_cast<size_t>(rows) * 3 * C);
  fc_.resize(static_cast<size_t>(rows) * F);

  for (size_t i = 0; i < items.size(); ++i) {
    for (size_t t = 0; t < items[i].tokens.size(); ++t) {
      const int token = items[i].tokens[t];
      const int pos = items[i].start + static_cast<int>(t);
      if (token < 0 || token >= V) {
        throw std::out_of_range("token id " + std::to_string(token) + " outside the vocabulary");
      }
      if (pos >= cfg.n_positions) {
        throw std::out_of_range("position " + std::to_string(pos) + " beyond the context of " +
                                std::to_string(cfg.n_positions));
      }
      float* x = &x_[static_cast<size_t>(first_row[i] + t) * C];
      const float* te = &weights_.token_embedding[static_cast<size_t>(token) * C];
      const float* pe = &weights_.position_embedding[static_cast<size_t>(pos) * C];
      for (int c = 0; c < C; ++c) x[c] = te[c] + pe[c];
    }
  }

  cache_.begin_step();
  const int tasks = static_cast<int>(items.size()) * H;
  for (int layer = 0; layer < cfg.n_layer; ++layer) {
    const LayerWeights& w = weights_.layers[layer];
    const PackedLayer& packed = packed_layers_[layer];
    layer_norm(x_.data(), h_.data(), rows, C, w.ln_1_weight, w.ln_1_bias, cfg.layer_norm_epsilon);
    batch_invariant_linear(h_.data(), rows, packed.attn_qkv, w.attn_qkv_bias.data(), qkv_.data(),
                           false);
    std::exception_ptr failure;
#pragma omp parallel for schedule(dynamic) if (rows >= kParallelRows)
    for (int task = 0; task < tasks; ++task) {
      const int i = task / H, head = task % H;
      try {
        cache_.append_and_attend(layer, head, items[i].blocks, items[i].start,
                                 static_cast<int>(items[i].tokens.size()),
                                 &qkv_[static_cast<size_t>(first_row[i]) * 3 * C], 3 * C,
                                 &att_[static_cast<size_t>(first_row[i]) * C], C);
      } catch (...) {
#pragma omp critical
        failure = std::current_exception();
      }
    }
    if (failure) std::rethrow_exception(failure);
    batch_invariant_linear(att_.data(), rows, packed.attn_proj, w.attn_proj_bias.data(), x_.data(),
                           true);
    layer_norm(x_.data(), h_.data(), rows, C, w.ln_2_weight, w.ln_2_bias, cfg.layer_norm_epsilon);
    batch_invariant_linear(h_.data(), rows, packed.mlp_fc, w.mlp_fc_bias.data(), fc_.data(), false);
    gelu(fc_.data(), fc_.size(), cfg.activation);
    batch_invariant_linear(fc_.data(), rows, packed.mlp_proj, w.mlp_proj_bias.data(), x_.data(),
                           true);
  }

  // Final layer norm and the tied LM head, only for the rows whose logits are wanted.
  std::vector<float> wanted;  // [R][C]
  for (size_t i = 0; i < items.size(); ++i) {
    const int count = static_cast<int>(items[i].tokens.size());
    const int from = items[i].all_logits ? 0 : count - 1;
    wanted.insert(wanted.end(), x_.begin() + static_cast<size_t>(first_row[i] + from) * C,
                  x_.begin() + static_cast<size_t>(first_row[i] + count) * C);
  }
  const int logit_rows = static_cast<int>(wanted.size() / C);
  layer_norm(wanted.data(), wanted.data(), logit_rows, C, weights_.ln_f_weight, weights_.ln_f_bias,
             cfg.layer_norm_epsilon);
  logits.resize(static_cast<size_t>(logit_rows) * V);
  batch_invariant_linear(wanted.data(), logit_rows, lm_head_, nullptr, logits.data(), false);
}

}  // namespace kvserve
