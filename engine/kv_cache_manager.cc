#include "engine/kv_cache_manager.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>

#include "kernels/residual_order.h"

namespace kvserve {
namespace {

int32_t ceil_div(int64_t a, int64_t b) {
  return static_cast<int32_t>((a + b - 1) / b);
}

// splitmix64's finaliser: every input bit reaches every output bit.
uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint64_t combine(uint64_t hash, uint64_t value) {
  return mix64(hash ^ mix64(value));
}

// The chained hash of a page: its parent's hash and its own token ids.
uint64_t page_hash(uint64_t parent, const int32_t* tokens, int count) {
  uint64_t h = combine(parent, static_cast<uint64_t>(count));
  for (int i = 0; i < count; ++i) h = combine(h, static_cast<uint32_t>(tokens[i]));
  return h;
}

}  // namespace

KvCacheManager::KvCacheManager(const KvCacheConfig& config, const ModelConfig& model,
                               int32_t num_blocks)
    : config_(config),
      model_(model),
      layout_(make_page_layout(config, model)),
      bytes_per_block_(static_cast<int64_t>(layout_.block_bytes) * model.n_layer),
      pool_(num_blocks),
      residual_(pool_, is_kivi(config.format) ? layout_.residual_tokens_per_block : 0),
      seed_hash_(prefix_cache_seed(config, model)),
      page_refs_(pool_.num_blocks(), 0),
      hit_refs_(pool_.num_blocks(), 0) {
  if (const absl::Status problem = validate(config, model); !problem.ok()) {
    throw std::invalid_argument(std::string(problem.message()));
  }
}

uint64_t KvCacheManager::prefix_cache_seed(const KvCacheConfig& config, const ModelConfig& model) {
  const uint64_t fields[] = {
      static_cast<uint64_t>(config.format),      static_cast<uint64_t>(config.key_group),
      static_cast<uint64_t>(config.value_group), static_cast<uint64_t>(config.residual),
      static_cast<uint64_t>(config.page_tokens), static_cast<uint64_t>(config.per_token_keys),
      static_cast<uint64_t>(config.params),      static_cast<uint64_t>(config.residual_format),
      static_cast<uint64_t>(model.n_layer),      static_cast<uint64_t>(model.n_head),
      static_cast<uint64_t>(model.n_embd),       static_cast<uint64_t>(model.n_inner),
      static_cast<uint64_t>(model.n_positions),  static_cast<uint64_t>(model.vocab_size)};
  uint64_t h = 0;
  for (uint64_t field : fields) h = combine(h, field);
  return h;
}

void KvCacheManager::set_prefix_cache(bool on) {
  prefix_cache_ = on;
  if (!prefix_cache_) clear_prefix_cache();
}

int KvCacheManager::snapshot_point(int tokens) const {
  if (!prefix_cache_ || !is_kivi(config_.format)) return 0;
  const int P = config_.page_tokens, R = config_.residual;
  const int pages = (tokens - 1 - R) / P;  // the largest k with kP + R < tokens
  return tokens - 1 - R >= P ? pages * P + R : 0;
}

PrefixMatch KvCacheManager::match_prefix(const std::vector<int32_t>& tokens) const {
  PrefixMatch match;
  if (!prefix_cache_ || tokens.empty()) return match;
  const int P = config_.page_tokens;
  const int max_pages = (static_cast<int>(tokens.size()) - 1) / P;  // one token left to compute
  uint64_t parent = seed_hash_;
  for (int page = 0; page < max_pages; ++page) {
    const int32_t* first = tokens.data() + static_cast<size_t>(page) * P;
    const uint64_t hash = page_hash(parent, first, P);
    const auto hit = by_hash_.find(hash);
    if (hit == by_hash_.end()) break;
    const CachedPage& cached = cached_.at(hit->second);
    // A 64-bit hash may collide: the page's own tokens and its parent's hash must match too.
    if (cached.parent_hash != parent || !std::equal(first, first + P, cached.tokens.begin())) break;
    match.pages.push_back(hit->second);
    match.hashes.push_back(hash);
    parent = hash;
  }
  match.chain_tokens = static_cast<int>(match.pages.size()) * P;
  if (is_kivi(config_.format)) {
    // The deepest page whose snapshot's R tokens match too, leaving a token to compute.
    const int R = config_.residual;
    size_t usable = 0;
    for (size_t page = match.pages.size(); page > 0 && usable == 0; --page) {
      const CachedPage& cached = cached_.at(match.pages[page - 1]);
      const size_t first = page * P;
      if (!cached.snapshot.empty() && first + R < tokens.size() &&
          std::equal(cached.snapshot_tokens.begin(), cached.snapshot_tokens.end(),
                     tokens.begin() + first)) {
        usable = page;
      }
    }
    match.pages.resize(usable);
    match.hashes.resize(usable);
    if (usable > 0) {
      const CachedPage& cached = cached_.at(match.pages.back());
      match.snapshot = cached.snapshot;
      if (cached.snapshot_pins == 0) {
        match.snapshot_evictable = static_cast<int32_t>(cached.snapshot.size());
      }
    }
  }
  for (int32_t block : match.pages) {
    if (page_refs_[block] == 0) ++match.evictable;
    if (hit_refs_[block] == 0) ++match.newly_shared;
  }
  match.tokens = static_cast<int>(match.pages.size()) * P;
  if (!match.snapshot.empty()) match.tokens += config_.residual;
  return match;
}

void KvCacheManager::record_prefix_query(int queried, int hit) {
  prefix_queries_ += queried;
  prefix_hits_ += hit;
}

void KvCacheManager::cache_full_pages(int64_t id, const std::vector<int32_t>& tokens) {
  if (!prefix_cache_) return;
  auto it = sequences_.find(id);
  if (it == sequences_.end()) {
    throw std::logic_error("KV cache: caching pages of unknown sequence " + std::to_string(id));
  }
  SequenceCache& seq = it->second;
  if (static_cast<int>(tokens.size()) < seq.length) {
    throw std::logic_error("KV cache: fewer token ids than cached tokens");
  }
  const int P = config_.page_tokens;
  const size_t full_pages = paged_token_count(config_, seq.length) / P;
  while (seq.page_hashes.size() < full_pages) {
    const size_t page = seq.page_hashes.size();
    const uint64_t parent = page == 0 ? seed_hash_ : seq.page_hashes.back();
    const int32_t* first = tokens.data() + page * P;
    const uint64_t hash = page_hash(parent, first, P);
    seq.page_hashes.push_back(hash);
    const int32_t block = seq.pages[page];
    // Another block may hold the same tokens already (two sequences computed them at once): the
    // first one stays the cached copy, this block is freed with its sequence.
    if (by_hash_.count(hash) != 0 || cached_.count(block) != 0) continue;
    by_hash_.emplace(hash, block);
    CachedPage& cached = cached_[block];
    cached.hash = hash;
    cached.parent_hash = parent;
    cached.tokens.assign(first, first + P);
  }
}

void KvCacheManager::snapshot_residual(int64_t id, const std::vector<int32_t>& tokens) {
  const SequenceCache& seq = sequence(id);
  const int P = config_.page_tokens, R = config_.residual;
  const int paged = paged_token_count(config_, seq.length);
  if (!prefix_cache_ || !is_kivi(config_.format) || paged == 0 || paged % P != 0 ||
      seq.length != paged + R || seq.page_hashes.size() != static_cast<size_t>(paged / P)) {
    throw std::logic_error("KV cache: sequence " + std::to_string(id) +
                           " is not at a snapshot point");
  }
  // The cached copy of the page: this sequence's block, or another one with the same tokens (a
  // sequence that computed them too), which the snapshot suits as well. Looked up after making
  // room, which may evict it.
  const int32_t count = residual_.blocks_for(static_cast<int64_t>(seq.residual_slots.size()));
  if (!make_free(count)) return;
  const auto entry = by_hash_.find(seq.page_hashes.back());
  if (entry == by_hash_.end()) return;
  const int32_t page_block = entry->second;
  CachedPage& page = cached_.at(page_block);
  if (!page.snapshot.empty()) return;
  pool_.allocate(count, page.snapshot);
  page.snapshot_tokens.assign(tokens.begin() + paged, tokens.begin() + paged + R);
  page.snapshot_lru = lru_.insert(lru_.end(), LruEntry{page_block, /*snapshot=*/true});
  evictable_blocks_ += count;
  snapshot_blocks_ += count;
  queue_slot_copies(seq.residual_slots, snapshot_slots(page.snapshot, seq.residual_slots.size()));
  fills_queued_.push_back(page_block);
}

std::vector<int> KvCacheManager::snapshot_points(int tokens, const PrefixMatch& match) const {
  std::vector<int> points;
  const int last = snapshot_point(tokens);
  if (last == 0) return points;
  const int P = config_.page_tokens, R = config_.residual;
  const int shared_pages = (match.chain_tokens - R) / P;
  const int shared = shared_pages * P + R;
  if (match.chain_tokens - R >= P && shared > match.tokens && shared < last) {
    points.push_back(shared);
  }
  // The last point only for a prompt whose first page another prompt has brought into the cache:
  // a snapshot splits the prompt's prefill into two chunks and copies the residual, which a
  // prompt that shares nothing pays for in vain (kivi2 served 10% fewer tokens/s on unique
  // prompts, docs/gpu.md). A prefix is kept from its second prompt on.
  if (last > match.tokens && match.chain_tokens >= config_.page_tokens) points.push_back(last);
  return points;
}

std::vector<BlockCopy> KvCacheManager::take_block_copies() {
  filling_.insert(filling_.end(), fills_queued_.begin(), fills_queued_.end());
  fills_queued_.clear();
  return std::exchange(block_copies_, {});
}

void KvCacheManager::clear_prefix_cache() {
  while (!lru_.empty()) evict_front();
}

void KvCacheManager::evict_front() {
  const LruEntry entry = lru_.front();
  if (entry.snapshot) {
    drop_snapshot(entry.block);
  } else {
    evict_page(entry.block);
  }
}

void KvCacheManager::evict_page(int32_t block) {
  const auto it = cached_.find(block);
  if (!it->second.snapshot.empty()) drop_snapshot(block);
  lru_.erase(it->second.lru);
  --evictable_blocks_;
  by_hash_.erase(it->second.hash);
  cached_.erase(it);
  pool_.release({block});
}

template <typename Predicate>
void KvCacheManager::drop_copies_if(Predicate overwrites) {
  block_copies_.erase(std::remove_if(block_copies_.begin(), block_copies_.end(), overwrites),
                      block_copies_.end());
}

bool KvCacheManager::overwrites_slot(const BlockCopy& copy, int32_t slot) const {
  const int64_t slot_bytes = layout_.residual_slot_bytes;
  const int64_t offset = residual_.index_of(slot) * slot_bytes;
  return copy.dst == residual_.block_of(slot) && offset < copy.dst_offset + copy.bytes &&
         copy.dst_offset < offset + slot_bytes;
}

void KvCacheManager::drop_snapshot(int32_t page_block) {
  CachedPage& page = cached_.at(page_block);
  if (page.snapshot_pins > 0) {
    throw std::logic_error("KV cache: dropping a snapshot that a step copies");
  }
  const int32_t count = static_cast<int32_t>(page.snapshot.size());
  lru_.erase(page.snapshot_lru);
  evictable_blocks_ -= count;
  snapshot_blocks_ -= count;
  // A fill not yet handed to a step must not write into blocks that are free again.
  drop_copies_if([&page](const BlockCopy& copy) {
    return std::find(page.snapshot.begin(), page.snapshot.end(), copy.dst) != page.snapshot.end();
  });
  fills_queued_.erase(std::remove(fills_queued_.begin(), fills_queued_.end(), page_block),
                      fills_queued_.end());
  filling_.erase(std::remove(filling_.begin(), filling_.end(), page_block), filling_.end());
  pool_.release(page.snapshot);
  page.snapshot.clear();
  page.snapshot_tokens.clear();
}

void KvCacheManager::unpin_snapshot(int32_t page_block) {
  CachedPage& page = cached_.at(page_block);
  if (--page.snapshot_pins == 0) {
    page.snapshot_lru = lru_.insert(lru_.end(), LruEntry{page_block, /*snapshot=*/true});
    evictable_blocks_ += static_cast<int32_t>(page.snapshot.size());
  }
}

bool KvCacheManager::make_free(int32_t count) {
  if (count > num_free_blocks()) return false;
  while (pool_.num_free() < count) evict_front();
  return true;
}

void KvCacheManager::release_pages(const SequenceCache& seq) {
  // Tail first: a chain's last pages are the least shared, so they are evicted first (vLLM).
  std::vector<int32_t> freed;
  for (size_t i = seq.pages.size(); i-- > 0;) {
    const int32_t block = seq.pages[i];
    if (static_cast<int32_t>(i) < seq.hit_pages && --hit_refs_[block] == 0) --hit_pages_in_use_;
    if (--page_refs_[block] > 0) continue;
    const auto cached = cached_.find(block);
    if (cached != cached_.end() && prefix_cache_) {
      cached->second.lru = lru_.insert(lru_.end(), LruEntry{block, /*snapshot=*/false});
      ++evictable_blocks_;
      continue;
    }
    if (cached != cached_.end()) {  // cached before prefix caching was turned off
      if (!cached->second.snapshot.empty()) drop_snapshot(block);
      by_hash_.erase(cached->second.hash);
      cached_.erase(cached);
    }
    freed.push_back(block);
  }
  pool_.release(freed);
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

int32_t KvCacheManager::residual_slots_for(int tokens) const {
  if (!is_kivi(config_.format)) return 0;
  return 2 * (tokens - paged_token_count(config_, tokens));
}

int32_t KvCacheManager::blocks_needed(int tokens) const {
  return pages_for(tokens) + residual_.blocks_for(residual_slots_for(tokens));
}

int32_t KvCacheManager::peak_residual_slots(int tokens) const {
  // The residual slots of any step of the way are at most those of the longest residual the
  // sequence ever has: all its tokens while it is shorter than R + G, else R + G - 1 (the step
  // that flushes the last group holds exactly pages_for(tokens) pages and those).
  if (!is_kivi(config_.format)) return 0;
  return 2 * std::min(tokens, config_.residual + config_.key_group - 1);
}

int32_t KvCacheManager::residual_blocks_reserved(int64_t reserved_slots) const {
  return std::max(residual_.blocks_for(reserved_slots), residual_.blocks_in_use());
}

bool KvCacheManager::can_admit(int tokens, const PrefixMatch& match) const {
  const int32_t blocks = pages_for(tokens) - static_cast<int32_t>(match.pages.size()) +
                         residual_.blocks_to_take(residual_slots_for(tokens));
  return blocks <= num_free_blocks() - match.evictable - match.snapshot_evictable;
}

std::vector<int32_t> KvCacheManager::snapshot_slots(const std::vector<int32_t>& blocks,
                                                    size_t count) const {
  const int32_t c = residual_.slots_per_block();
  std::vector<int32_t> slots(count);
  for (size_t i = 0; i < count; ++i) {
    slots[i] = blocks[i / c] * c + static_cast<int32_t>(i % c);
  }
  return slots;
}

void KvCacheManager::queue_slot_copies(const std::vector<int32_t>& src,
                                       const std::vector<int32_t>& dst) {
  const int32_t slot_bytes = static_cast<int32_t>(layout_.residual_slot_bytes);
  for (size_t i = 0; i < src.size(); ++i) {
    const int32_t src_block = residual_.block_of(src[i]), dst_block = residual_.block_of(dst[i]);
    const int32_t src_offset = residual_.index_of(src[i]) * slot_bytes;
    const int32_t dst_offset = residual_.index_of(dst[i]) * slot_bytes;
    if (i > 0) {
      BlockCopy& last = block_copies_.back();
      if (last.src == src_block && last.dst == dst_block &&
          last.src_offset + last.bytes == src_offset &&
          last.dst_offset + last.bytes == dst_offset) {
        last.bytes += slot_bytes;
        continue;
      }
    }
    block_copies_.push_back({src_block, dst_block, src_offset, dst_offset, slot_bytes});
  }
}

void KvCacheManager::add_sequence(int64_t id, const PrefixMatch& match) {
  const auto [it, added] = sequences_.emplace(id, SequenceCache{});
  if (!added) {
    throw std::logic_error("KV cache: sequence " + std::to_string(id) + " already exists");
  }
  SequenceCache& seq = it->second;
  for (int32_t block : match.pages) {
    const auto cached = cached_.find(block);
    if (cached == cached_.end()) {
      sequences_.erase(it);
      throw std::logic_error("KV cache: a prefix match names block " + std::to_string(block) +
                             " that is not cached");
    }
    if (page_refs_[block]++ == 0) {
      lru_.erase(cached->second.lru);
      --evictable_blocks_;
    }
    if (hit_refs_[block]++ == 0) ++hit_pages_in_use_;
  }
  seq.pages = match.pages;
  seq.page_hashes = match.hashes;
  seq.hit_pages = static_cast<int32_t>(match.pages.size());
  seq.length = match.tokens;
  if (!match.snapshot.empty()) {
    const int32_t page_block = match.pages.back();
    CachedPage& page = cached_.at(page_block);
    if (page.snapshot_pins++ == 0) {
      lru_.erase(page.snapshot_lru);
      evictable_blocks_ -= static_cast<int32_t>(page.snapshot.size());
    }
    seq.pinned_snapshot = page_block;
    pinned_.push_back(page_block);
    const int32_t count = residual_slots_for(match.tokens);
    if (!make_free(residual_.blocks_to_take(count))) {
      throw std::logic_error("KV cache: no room for the residual of an admitted sequence");
    }
    residual_.allocate(count, seq.residual_slots);
    queue_slot_copies(snapshot_slots(page.snapshot, seq.residual_slots.size()), seq.residual_slots);
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
          {seq.residual_slots.data(), seq.residual_slots.size()}};
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
  const int32_t new_slots =
      std::max(0, residual_slots_for(new_length) - int32_t(seq.residual_slots.size()));
  if (!make_free(new_pages + residual_.blocks_to_take(new_slots))) return false;
  const size_t first_new_page = seq.pages.size();
  pool_.allocate(new_pages, seq.pages);
  for (size_t i = first_new_page; i < seq.pages.size(); ++i) page_refs_[seq.pages[i]] = 1;
  residual_.allocate(new_slots, seq.residual_slots);
  if (seq.step_start < 0) {
    seq.step_start = seq.length;
    grown_this_step_.push_back(id);
  }
  seq.length = new_length;
  return true;
}

void KvCacheManager::reorder_residual(SequenceCache& seq) {
  if (!is_kivi(config_.format)) return;
  const int start = seq.step_start, end = seq.length;
  const ResidualStep step = ResidualStep::of(start, end, paged_token_count(config_, start),
                                             paged_token_count(config_, end));
  if (step.flushed_old_rows() == 0) {  // most decode steps: the new rows follow the old ones
    const size_t keep = 2 * static_cast<size_t>(step.old_rows + step.new_rows);
    if (seq.residual_slots.size() > keep) {
      residual_.release(seq.residual_slots.data() + keep, seq.residual_slots.size() - keep);
      seq.residual_slots.resize(keep);
    }
    return;
  }
  const std::vector<int32_t> held = std::move(seq.residual_slots);
  std::vector<bool> taken(held.size() / 2, false);
  seq.residual_slots.clear();
  auto take = [&](int entry) {
    if (entry < 0 || static_cast<size_t>(entry) >= taken.size()) {
      throw std::logic_error("KV cache: a residual entry beyond the slots grow reserved");
    }
    seq.residual_slots.push_back(held[2 * entry]);
    seq.residual_slots.push_back(held[2 * entry + 1]);
    taken[entry] = true;
  };
  for (int e = step.flushed_old_rows(); e < step.old_rows; ++e) take(e);
  for (int k = 0; k < step.new_rows; ++k) take(step.new_row_entry(k));
  for (size_t e = 0; e < taken.size(); ++e) {
    if (!taken[e]) residual_.release(&held[2 * e], 2);
  }
}

void KvCacheManager::finish_step(bool ran) {
  for (int32_t page_block : pinned_) unpin_snapshot(page_block);
  pinned_.clear();
  for (auto& [id, seq] : sequences_) seq.pinned_snapshot = -1;
  // A failed step may not have run its copies: what they were to fill is not a snapshot.
  const std::vector<int32_t> filled = std::exchange(filling_, {});
  if (!ran) {
    for (int32_t page_block : filled) drop_snapshot(page_block);
  }
  for (int64_t id : grown_this_step_) {
    auto it = sequences_.find(id);
    if (it == sequences_.end()) continue;  // removed during the step
    SequenceCache& seq = it->second;
    if (seq.step_start < 0) continue;  // removed and added again during the step
    reorder_residual(seq);
    seq.step_start = -1;
  }
  grown_this_step_.clear();
}

void KvCacheManager::remove_sequence(int64_t id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) {
    throw std::logic_error("KV cache: removal of unknown sequence " + std::to_string(id));
  }
  SequenceCache& seq = it->second;
  if (seq.pinned_snapshot >= 0) {
    // Removed in the step that was to fill its residual (an admission that did not fit): its
    // queued copies go, and so does its pin.
    drop_copies_if([this, &seq](const BlockCopy& copy) {
      return std::any_of(seq.residual_slots.begin(), seq.residual_slots.end(),
                         [&](int32_t slot) { return overwrites_slot(copy, slot); });
    });
    pinned_.erase(std::find(pinned_.begin(), pinned_.end(), seq.pinned_snapshot));
    unpin_snapshot(seq.pinned_snapshot);
  }
  release_pages(seq);
  residual_.release(seq.residual_slots);
  sequences_.erase(it);
}

CacheUsage KvCacheManager::usage() const {
  CacheUsage u;
  u.blocks_total = pool_.num_blocks();
  // Unheld cached pages are free for a grow, as in vLLM's usage: not counted used.
  u.blocks_used = pool_.num_used() - evictable_blocks_;
  u.capacity_bytes = int64_t{u.blocks_total} * bytes_per_block_;
  u.used_bytes = int64_t{u.blocks_used} * bytes_per_block_;
  u.sequences = static_cast<int64_t>(sequences_.size());
  u.cached_pages = static_cast<int64_t>(cached_.size());
  u.evictable_pages = static_cast<int64_t>(
      std::count_if(lru_.begin(), lru_.end(), [](const LruEntry& e) { return !e.snapshot; }));
  u.snapshot_blocks = snapshot_blocks_;
  u.prefix_cache_queries = prefix_queries_;
  u.prefix_cache_hits = prefix_hits_;
  const int64_t layers = model_.n_layer;
  const int64_t fp16_token_bytes = int64_t{2} * model_.n_embd * 2;  // keys and values, one layer
  const int P = config_.page_tokens;
  std::vector<bool> counted(pool_.num_blocks(), false);  // a shared page's tokens count once
  int64_t paged_tokens = 0;
  for (const auto& [id, seq] : sequences_) {
    const int paged = paged_token_count(config_, seq.length);
    for (int page = 0; page * P < paged; ++page) {
      const int32_t block = seq.pages[page];
      if (counted[block]) continue;
      counted[block] = true;
      paged_tokens += std::min(P, paged - page * P);
    }
    if (is_kivi(config_.format)) {
      u.residual_bytes += int64_t{seq.length - paged} * 2 *
                          static_cast<int64_t>(layout_.residual_token_bytes) * layers;
      u.tokens += seq.length - paged;
    }
  }
  u.tokens += paged_tokens;
  u.code_bytes = paged_tokens * layout_.code_bytes_per_page / P * layers;
  u.param_bytes = paged_tokens * layout_.param_bytes_per_page / P * layers;
  u.fp16_equivalent_bytes = u.tokens * fp16_token_bytes * layers;
  u.slack_bytes = u.used_bytes - u.code_bytes - u.param_bytes - u.residual_bytes;
  return u;
}

}  // namespace kvserve
