// Model geometries the KV-cache tests share (only the shape matters to the cache).
#pragma once

#include "engine/model_config.h"

namespace kvserve::testing {

inline ModelConfig gpt2_geometry(int n_layer, int n_head, int n_embd) {
  ModelConfig m;
  m.n_layer = n_layer;
  m.n_head = n_head;
  m.n_embd = n_embd;
  m.n_inner = 4 * n_embd;
  m.n_positions = 1024;
  m.vocab_size = 50257;
  return m;
}
inline ModelConfig gpt2_small() {
  return gpt2_geometry(12, 12, 768);
}
inline ModelConfig gpt2_medium() {
  return gpt2_geometry(24, 16, 1024);
}
inline ModelConfig gpt2_large() {
  return gpt2_geometry(36, 20, 1280);
}

}  // namespace kvserve::testing
