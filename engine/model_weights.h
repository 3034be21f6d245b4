// Host-side GPT-2 weights in fp32, laid out as GPT-2 checkpoints store them (Conv1D: [in, out]).
#pragma once

#include <string>
#include <vector>

#include "engine/model_config.h"

namespace kvserve {

struct LayerWeights {
  std::vector<float> ln_1_weight, ln_1_bias;  // [C]
  std::vector<float> attn_qkv_weight;         // [C, 3C]  (h.N.attn.c_attn.weight)
  std::vector<float> attn_qkv_bias;           // [3C]
  std::vector<float> attn_proj_weight;        // [C, C]   (h.N.attn.c_proj.weight)
  std::vector<float> attn_proj_bias;          // [C]
  std::vector<float> ln_2_weight, ln_2_bias;  // [C]
  std::vector<float> mlp_fc_weight;           // [C, F]   (h.N.mlp.c_fc.weight), F = n_inner
  std::vector<float> mlp_fc_bias;             // [F]
  std::vector<float> mlp_proj_weight;         // [F, C]   (h.N.mlp.c_proj.weight)
  std::vector<float> mlp_proj_bias;           // [C]
};

struct ModelWeights {
  ModelConfig config;
  std::string source;                         // the model directory, or "dummy:NAME"
  std::vector<float> token_embedding;         // [V, C]  wte; the LM head is tied to it
  std::vector<float> position_embedding;      // [P, C]  wpe
  std::vector<LayerWeights> layers;           // [n_layer]
  std::vector<float> ln_f_weight, ln_f_bias;  // [C]
};

}  // namespace kvserve
