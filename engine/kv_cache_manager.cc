#include "engine/kv_cache_manager.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace kvserve {
namespace {

int32_t ceil_div(int64_t a, int64_t b) {
  return static_cast<int32_t>((a + b - 1) / b);
}

}  // namespace

KvCacheManager::KvCacheManager(const KvCacheConfig& config, const ModelConfig& model,
                               int32_t num_blocks)
    : config_(config),
      model_(model),
      layout_(make_page_layout(config, model)),
      bytes_per_block_(static_cast<int64_t>(layout_.block_bytes) * model.n_layer),
      pool_(num_blocks) {
  if (const absl::Status problem = validate(config, model); !problem.ok()) {
    throw std::invalid_argument(std::string(problem.message()));
  }
}

int32_t KvCacheManager::blocks_in_budget(int64_t bytes, const KvCacheConfig& config,
                                         const ModelConfig& model) {
  const int64_t per_block =
      static_cast<int64_t>(make_page_layout(config, model).block_bytes) * model.n_layer;
  return static_cast<int32_t>(std::min<int64_t>(bytes / per_block, INT32_MAX));
}

int32_t KvCacheManager::pages_for(int tokens) const {
  return ceil_div(paged_token_count(config_, tokens), config_.page_tokens);
}

int32_t KvCacheManager::residual_blocks_for(int tokens) const {
  if (!is_kivi(config_.format)) return 0;
  const int residual = tokens - paged_token_count(config_, tokens);
  return 2 * ceil_div(residual, layout_.residual_tokens_per_block);
}

int32_t KvCacheManager::blocks_needed(int tokens) const {
  return pages_for(tokens) + residual_blocks_for(tokens);
}

int32_t KvCacheManager::peak_blocks(int tokens) const {
  // Pages only grow. The residual blocks of any step of the way are at most those of the longest
  // residual the sequence ever has: all its tokens while it is shorter than R + G, else R + G - 1
  // (the step that flushes the last group holds exactly pages_for(tokens) and those).
  if (!is_kivi(config_.format)) return pages_for(tokens);
  const int longest_residual = std::min(tokens, config_.residual + config_.key_group - 1);
  return pages_for(tokens) + 2 * ceil_div(longest_residual, layout_.residual_tokens_per_block);
}

void KvCacheManager::add_sequence(int64_t id) {
  if (!sequences_.emplace(id, SequenceCache{}).second) {
    throw std::logic_error("KV cache: sequence " + std::to_string(id) + " already exists");
  }
}

const SequenceCache& KvCacheManager::sequence(int64_t id) const {
  const auto it = sequences_.find(id);
  if (it == sequences_.end()) {
    throw std::logic_error("KV cache: unknown sequence " + std::to_string(id));
  }
  return it->second;
}

BlockTableView KvCacheManager::block_table(int64_t id) const {
  const SequenceCache& seq = sequence(id);
  return {seq.length,
          {seq.pages.data(), seq.pages.size()},
          {seq.residual_blocks.data(), seq.residual_blocks.size()}};
}

bool KvCacheManager::grow(int64_t id, int new_length) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) {
    throw std::logic_error("KV cache: grow of unknown sequence " + std::to_string(id));
  }
  SequenceCache& seq = it->second;
  if (new_length < seq.length) {
    throw std::logic_error("KV cache: sequence " + std::to_string(id) + " cannot shrink");
  }
  const int32_t new_pages = std::max(0, pages_for(new_length) - int32_t(seq.pages.size()));
  // The old residual stays readable during the step, so hold the larger of old and new.
  const int32_t new_residual =
      std::max(0, residual_blocks_for(new_length) - int32_t(seq.residual_blocks.size()));
  if (new_pages + new_residual > pool_.num_free()) return false;
  pool_.allocate(new_pages, seq.pages);
  pool_.allocate(new_residual, seq.residual_blocks);
  seq.length = new_length;
  grown_this_step_.push_back(id);
  return true;
}

void KvCacheManager::finish_step() {
  for (int64_t id : grown_this_step_) {
    auto it = sequences_.find(id);
    if (it == sequences_.end()) continue;  // removed during the step
    SequenceCache& seq = it->second;
    const size_t keep = residual_blocks_for(seq.length);
    if (seq.residual_blocks.size() > keep) {
      pool_.release(
          std::vector<int32_t>(seq.residual_blocks.begin() + keep, seq.residual_blocks.end()));
      seq.residual_blocks.resize(keep);
    }
  }
  grown_this_step_.clear();
}

void KvCacheManager::remove_sequence(int64_t id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) {
    throw std::logic_error("KV cache: removal of unknown sequence " + std::to_string(id));
  }
  pool_.release(it->second.pages);
  pool_.release(it->second.residual_blocks);
  sequences_.erase(it);
}

CacheUsage KvCacheManager::usage() const {
  CacheUsage u;
  u.blocks_total = pool_.num_blocks();
  u.blocks_used = pool_.num_used();
  u.capacity_bytes = int64_t{u.blocks_total} * bytes_per_block_;
  u.used_bytes = int64_t{u.blocks_used} * bytes_per_block_;
  u.sequences = static_cast<int64_t>(sequences_.size());
  const int64_t layers = model_.n_layer;
  const int64_t fp16_token_bytes = int64_t{2} * model_.n_embd * 2;  // keys and values, one layer
  for (const auto& [id, seq] : sequences_) {
    const int64_t paged = paged_token_count(config_, seq.length);
    u.tokens += seq.length;
    u.code_bytes += paged * layout_.code_bytes_per_page / config_.page_tokens * layers;
    u.param_bytes += paged * layout_.param_bytes_per_page / config_.page_tokens * layers;
    if (is_kivi(config_.format))
      u.residual_bytes +=
          (seq.length - paged) * 2 * static_cast<int64_t>(layout_.residual_token_bytes) * layers;
  }
  u.fp16_equivalent_bytes = u.tokens * fp16_token_bytes * layers;
  u.slack_bytes = u.used_bytes - u.code_bytes - u.param_bytes - u.residual_bytes;
  return u;
}

}  // namespace kvserve
