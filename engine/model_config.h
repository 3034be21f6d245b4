// GPT-2 architecture hyper-parameters, as read from a Hugging Face config.json or a dummy geometry.
#pragma once

#include <cstdint>
#include <string>

namespace kvserve {

enum class Activation { kGeluTanh, kGeluErf };

struct ModelConfig {
  int n_layer = 0;
  int n_head = 0;
  int n_embd = 0;
  int n_inner = 0;  // MLP width; 4 * n_embd unless the config says otherwise
  int n_positions = 0;
  int vocab_size = 0;
  float layer_norm_epsilon = 1e-5f;
  Activation activation = Activation::kGeluTanh;
  int eos_token_id = 50256;

  int head_dim() const { return n_embd / n_head; }
  int64_t parameter_count() const {
    const int64_t c = n_embd, f = n_inner;
    const int64_t per_layer = 4 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * f + f) + (f * c + c);
    return int64_t{vocab_size} * c + int64_t{n_positions} * c + n_layer * per_layer + 2 * c;
  }
};

}  // namespace kvserve
