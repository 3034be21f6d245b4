// Which blocks each sequence's KV cache occupies, and what every byte of the pool is used for.
//
// Bookkeeping only: the backends own the memory (host arrays or device memory) and write the data.
// A step first grows every sequence it feeds (grow), then runs the forward, then calls
// finish_step(). Residual blocks that a flush frees stay reserved until finish_step(), so the
// forward can still read the old residual while it writes the new one, and no other sequence can
// be handed a block that is being read in the same step.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "engine/block_pool.h"
#include "engine/block_table.h"
#include "engine/kv_format.h"
#include "engine/model_config.h"

namespace kvserve {

struct SequenceCache {
  int length = 0;                        // tokens whose keys and values are held
  std::vector<int32_t> pages;            // logical page i -> block id
  std::vector<int32_t> residual_blocks;  // kivi: [keys 0, values 0, keys 1, values 1, ...]
};

// A snapshot of the pool; used = code + param + residual + slack, to the byte.
struct CacheUsage {
  int32_t blocks_total = 0;
  int32_t blocks_used = 0;
  int64_t capacity_bytes = 0;
  int64_t used_bytes = 0;
  int64_t tokens = 0;
  int64_t sequences = 0;
  int64_t fp16_equivalent_bytes = 0;  // tokens * 2 (K, V) * n_layer * n_embd * 2 bytes
  int64_t code_bytes = 0;             // packed codes (fp16 data for the fp16 format) of held tokens
  int64_t param_bytes = 0;            // scales and zero points of held tokens
  int64_t residual_bytes = 0;  // keys and values of residual tokens (fp16, or int8 + scale/zero)
  int64_t slack_bytes = 0;     // reserved but not holding a token: unfilled page/residual slots
  double compression_ratio() const {
    return used_bytes > 0 ? static_cast<double>(fp16_equivalent_bytes) / used_bytes : 0.0;
  }
  double usage_ratio() const {
    return capacity_bytes > 0 ? static_cast<double>(used_bytes) / capacity_bytes : 0.0;
  }
};

class KvCacheManager {
 public:
  KvCacheManager(const KvCacheConfig& config, const ModelConfig& model, int32_t num_blocks);

  // How many blocks a pool of `bytes` holds for this format and model.
  static int32_t blocks_in_budget(int64_t bytes, const KvCacheConfig& config,
                                  const ModelConfig& model);

  const KvCacheConfig& config() const { return config_; }
  const KvPageLayout& layout() const { return layout_; }
  int64_t bytes_per_block() const { return bytes_per_block_; }  // all layers
  int32_t num_blocks() const { return pool_.num_blocks(); }
  int32_t num_free_blocks() const { return pool_.num_free(); }

  // Blocks a sequence of `tokens` tokens holds once its step is finished.
  int32_t blocks_needed(int tokens) const;
  // The most blocks a sequence holds at once on its way to `tokens` tokens, whatever its steps:
  // for KIVI more than blocks_needed(tokens), as the residual peaks at R + G - 1 tokens just before
  // a flush and a step holds its old residual blocks while it writes the new ones. A sequence that
  // decodes its way to `tokens` cached tokens holds exactly this many at its last flush, so it can
  // run alone in the pool exactly when this fits in num_blocks() (validation and admission count
  // it, for max_cached_tokens of the request).
  int32_t peak_blocks(int tokens) const;
  // Whether a new sequence that will reach `tokens` tokens in its first step fits now.
  bool can_admit(int tokens) const { return blocks_needed(tokens) <= pool_.num_free(); }

  void add_sequence(int64_t id);
  bool has_sequence(int64_t id) const { return sequences_.count(id) != 0; }
  // Reserves the blocks for the sequence to grow to `new_length` tokens this step. Returns false,
  // changing nothing, when the pool has too few free blocks.
  bool grow(int64_t id, int new_length);
  // Ends a step: releases residual blocks that the grown sequences no longer need.
  void finish_step();
  // Frees every block of the sequence (finished, cancelled or preempted).
  void remove_sequence(int64_t id);
  const SequenceCache& sequence(int64_t id) const;
  // The sequence's blocks as a backend reads them; valid until that sequence next changes.
  BlockTableView block_table(int64_t id) const;

  CacheUsage usage() const;

 private:
  int32_t pages_for(int tokens) const;
  int32_t residual_blocks_for(int tokens) const;

  KvCacheConfig config_;
  ModelConfig model_;
  KvPageLayout layout_;
  int64_t bytes_per_block_;
  BlockPool pool_;
  std::unordered_map<int64_t, SequenceCache> sequences_;
  std::vector<int64_t> grown_this_step_;
};

}  // namespace kvserve
