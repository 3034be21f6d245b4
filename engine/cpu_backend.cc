#include "engine/cpu_backend.h"

#include <cblas.h>

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

// OpenBLAS hands products of up to about 2^20 multiply-adds to a small-matrix kernel whose
// summation order differs from the blocked kernel's once K spans several blocks. A row's result
// would then depend on how many rows share the call, i.e. on the batch. Small products are padded
// with zero rows instead, so every row always takes the blocked kernel and a sequence's output
// does not depend on what it is batched with.
constexpr int64_t kSmallGemmWork = int64_t{1} << 20;

// out[T][N] = in[T][K] @ weight[K][N] + bias[N]; with accumulate, out += instead of out =.
void linear(const float* in, int rows, int k, const std::vector<float>& weight,
            const std::vector<float>& bias, int n, float* out, bool accumulate) {
  for (int r = 0; r < rows; ++r) {
    float* y = out + static_cast<size_t>(r) * n;
    for (int c = 0; c < n; ++c) y[c] = accumulate ? y[c] + bias[c] : bias[c];
  }
  if (int64_t{rows} * n * k > kSmallGemmWork) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, n, k, 1.0f, in, k,
                weight.data(), n, 1.0f, out, n);
    return;
  }
  const int padded = static_cast<int>(kSmallGemmWork / (int64_t{n} * k)) + 1;
  thread_local std::vector<float> padded_in, padded_out;  // [padded][K], [padded][N]
  padded_in.assign(static_cast<size_t>(padded) * k, 0.0f);
  padded_out.assign(static_cast<size_t>(padded) * n, 0.0f);
  std::copy(in, in + static_cast<size_t>(rows) * k, padded_in.begin());
  std::copy(out, out + static_cast<size_t>(rows) * n, padded_out.begin());
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, padded, n, k, 1.0f, padded_in.data(), k,
              weight.data(), n, 1.0f, padded_out.data(), n);
  std::copy(padded_out.begin(), padded_out.begin() + static_cast<size_t>(rows) * n, out);
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
    : weights_(std::move(weights)), cache_(kv, num_blocks, weights_.config) {}

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

  const int tasks = static_cast<int>(items.size()) * H;
  for (int layer = 0; layer < cfg.n_layer; ++layer) {
    const LayerWeights& w = weights_.layers[layer];
    layer_norm(x_.data(), h_.data(), rows, C, w.ln_1_weight, w.ln_1_bias, cfg.layer_norm_epsilon);
    linear(h_.data(), rows, C, w.attn_qkv_weight, w.attn_qkv_bias, 3 * C, qkv_.data(), false);
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
    linear(att_.data(), rows, C, w.attn_proj_weight, w.attn_proj_bias, C, x_.data(), true);
    layer_norm(x_.data(), h_.data(), rows, C, w.ln_2_weight, w.ln_2_bias, cfg.layer_norm_epsilon);
    linear(h_.data(), rows, C, w.mlp_fc_weight, w.mlp_fc_bias, F, fc_.data(), false);
    gelu(fc_.data(), fc_.size(), cfg.activation);
    linear(fc_.data(), rows, F, w.mlp_proj_weight, w.mlp_proj_bias, C, x_.data(), true);
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
  // The LM head is far above kSmallGemmWork (vocab * n_embd per row): no padding needed.
  logits.resize(static_cast<size_t>(logit_rows) * V);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, logit_rows, V, C, 1.0f, wanted.data(), C,
              weights_.token_embedding.data(), C, 0.0f, logits.data(), V);
}

}  // namespace kvserve
