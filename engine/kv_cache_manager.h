// Which blocks each sequence's KV cache occupies, and what every byte of the pool is used for.
//
// Bookkeeping only: the backends own the memory (host arrays or device memory) and write the data.
// A step first grows every sequence it feeds (grow), then runs the forward, then calls
// finish_step(). Residual slots that a flush frees stay reserved until finish_step(), so the
// forward can still read the old residual while it writes the new one, and no other sequence can
// be handed a slot that is being read in the same step. KIVI residual tokens take single slots of
// residual blocks that sequences share (engine/residual_slots.h); no residual row ever moves:
// finish_step reorders each grown sequence's slot list as kernels/residual_order.h says.
//
// Prefix caching (set_prefix_cache): a full page whose contents are final is content-addressed by
// a hash chained over every token id up to its end and the cache configuration
// (prefix_cache_seed), as vLLM's automatic prefix caching. A new sequence starts on the longest
// chain of cached pages that its tokens match (match_prefix, add_sequence) and reads them through
// its block table: no copy. Pages are reference counted; a cached page that no sequence holds stays
// in the pool, evictable least-recently-used first, and is evicted only when a grow needs its
// block.
//
// KIVI caches: a sequence that resumes after k cached pages also needs the fp16 residual window
// of the R tokens after them at every layer, which no page holds and no shorter computation
// reproduces bit for bit (docs/design.md, "Prefix caching"). The scheduler ends one prefill chunk
// of each prompt at its snapshot point n* = kP + R (snapshot_point; paged(n*) = kP), and
// snapshot_residual then copies the sequence's residual slots into blocks owned by the cache
// entry of page k-1: the snapshot, tagged with tokens kP .. n*-1. A sequence matches only a chain
// that ends in a page with a matching snapshot (the deepest one), starts at n* and gets its own
// residual slots filled from the snapshot. The copies are queued (take_block_copies) and run
// before the next step's forward. A snapshot is evictable least-recently-used like a page (its
// page's eviction takes it along), but never while a sequence of the step being planned copies
// from it (pinned until finish_step).
#pragma once

#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

#include "engine/backend.h"
#include "engine/block_pool.h"
#include "engine/block_table.h"
#include "engine/kv_format.h"
#include "engine/model_config.h"
#include "engine/residual_slots.h"

namespace kvserve {

struct SequenceCache {
  int length = 0;              // tokens whose keys and values are held
  std::vector<int32_t> pages;  // logical page i -> block id
  // kivi: the residual's slots (ResidualSlots ids), [keys 0, values 0, keys 1, values 1, ...]
  std::vector<int32_t> residual_slots;
  int32_t hit_pages = 0;              // pages 0 .. hit_pages-1 came from the prefix cache
  std::vector<uint64_t> page_hashes;  // chained hash of each full page hashed so far
  int32_t pinned_snapshot = -1;  // the page whose snapshot this step's copies read (kivi), or -1
  int step_start = -1;           // the length before this step's first grow, or -1 (not grown)
};

// The longest run of cached pages that starts a token sequence (KvCacheManager::match_prefix).
struct PrefixMatch {
  std::vector<int32_t> pages;    // block ids of logical pages 0 .. pages.size()-1
  std::vector<uint64_t> hashes;  // their chained hashes
  int tokens = 0;                // pages.size() * page_tokens
  int32_t evictable = 0;         // of the pages, those no sequence holds now
  int32_t newly_shared = 0;      // of the pages, those no sequence holds as a hit now
  // KIVI: the residual snapshot of the last page (tokens = pages * P + R), which stops being
  // evictable while the sequence copies it: its blocks, and how many of them are evictable now.
  std::vector<int32_t> snapshot;
  int32_t snapshot_evictable = 0;
  int chain_tokens = 0;  // tokens of the matching pages before KIVI kept those up to a snapshot
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
  // Prefix cache: pages with a hash (held or not), and of those the ones no sequence holds
  // (counted free: not in blocks_used); tokens looked up and tokens found, since the start.
  int64_t cached_pages = 0;
  int64_t evictable_pages = 0;
  int64_t snapshot_blocks = 0;  // kivi: blocks holding residual snapshots (evictable but pinned)
  int64_t prefix_cache_queries = 0;
  int64_t prefix_cache_hits = 0;
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
  // Neither copied nor moved: residual_ refers to pool_.
  KvCacheManager(const KvCacheManager&) = delete;
  KvCacheManager& operator=(const KvCacheManager&) = delete;

  // How many blocks a pool of `bytes` holds for this format and model.
  static int32_t blocks_in_budget(int64_t bytes, const KvCacheConfig& config,
                                  const ModelConfig& model);

  const KvCacheConfig& config() const { return config_; }
  const KvPageLayout& layout() const { return layout_; }
  int64_t bytes_per_block() const { return bytes_per_block_; }  // all layers
  int32_t num_blocks() const { return pool_.num_blocks(); }
  // Blocks a grow can take: free ones, cached pages that no sequence holds and residual snapshots
  // that no step copies (evicted on demand).
  int32_t num_free_blocks() const { return pool_.num_free() + evictable_blocks_; }

  // Blocks a sequence of `tokens` tokens holds once its step is finished, alone in the pool.
  int32_t blocks_needed(int tokens) const;
  // The most blocks a sequence holds at once on its way to `tokens` tokens, whatever its steps,
  // alone in the pool: for KIVI more than blocks_needed(tokens), as the residual peaks at R + G - 1
  // tokens just before a flush and a step holds its old residual slots while it writes the new
  // ones. A sequence that decodes its way to `tokens` cached tokens holds exactly this many at its
  // last flush, so it can run alone in the pool exactly when this fits in num_blocks()
  // (validation counts it, for max_cached_tokens of the request).
  int32_t peak_blocks(int tokens) const {
    return peak_pages(tokens) + residual_.blocks_for(peak_residual_slots(tokens));
  }
  // The two parts of peak_blocks: pages, and residual slots (KIVI; 0 otherwise).
  int32_t peak_pages(int tokens) const { return pages_for(tokens); }
  int32_t peak_residual_slots(int tokens) const;
  // The residual blocks that sequences reserving `reserved_slots` slots in all may hold at once:
  // ceil(reserved_slots / c), or those in use now when more (blocks that sequences which have
  // ended shared with running ones; engine/residual_slots.h says why no more are ever taken).
  int32_t residual_blocks_reserved(int64_t reserved_slots) const;
  int32_t residual_slots_per_block() const { return residual_.slots_per_block(); }
  int32_t residual_blocks_in_use() const { return residual_.blocks_in_use(); }
  // Whether a new sequence that will reach `tokens` tokens in its first step fits now, starting
  // on `match` (its cached pages are not allocated again, and stop being evictable).
  bool can_admit(int tokens, const PrefixMatch& match = {}) const;

  // The hash every chain starts from: the cache configuration and the model geometry, so that
  // pages of one configuration never match another. New format fields join here.
  static uint64_t prefix_cache_seed(const KvCacheConfig& config, const ModelConfig& model);
  // Turns prefix caching on or off (off drops every cached page that no sequence holds).
  void set_prefix_cache(bool on);
  bool prefix_cache() const { return prefix_cache_; }
  // KIVI with prefix caching on: the last point where a sequence of `tokens` tokens (the prompt
  // while it is prefilled) ends a chunk for a residual snapshot, the largest n* = kP + R < tokens
  // with k >= 1; 0 when there is none (or for fp16 and int8, which need no snapshot).
  int snapshot_point(int tokens) const;
  // Every snapshot point of a sequence of `tokens` admitted on `match`, ascending, all beyond
  // match.tokens: the deepest kP + R within the pages its tokens share with cached ones
  // (match.chain_tokens), where another prompt has been seen to share them, and the last one when
  // they share at least one page. A prompt that shares no page takes no snapshot.
  std::vector<int> snapshot_points(int tokens, const PrefixMatch& match) const;
  // Called when the step that brought the sequence to snapshot_point has been committed (after
  // cache_full_pages): gives its last full page a snapshot of its residual blocks, unless that
  // page has one, is not the cached copy, or the pool has no room (then there is none).
  void snapshot_residual(int64_t id, const std::vector<int32_t>& tokens);
  // The block copies queued since the last call (snapshot fills, then fills of new sequences'
  // residual blocks from snapshots), in order; the step's plan carries them.
  std::vector<BlockCopy> take_block_copies();
  // The cached pages a sequence of `tokens` can start on: the longest chain of full pages whose
  // tokens match, leaving at least one token to compute (its logits pick the next token); for
  // KIVI the longest such chain whose last page has a snapshot that matches too. Empty when
  // prefix caching is off.
  PrefixMatch match_prefix(const std::vector<int32_t>& tokens) const;
  // Counts a lookup of `queried` tokens of which `hit` were found (reported by usage()).
  void record_prefix_query(int queried, int hit);
  // Distinct pages that running sequences hold as hits (admission counts each once).
  int32_t hit_pages_in_use() const { return hit_pages_in_use_; }
  // Gives the sequence's full pages up to its length a hash, so later sequences can match them.
  // `tokens` holds at least its length tokens. Call after the step that wrote them (finish_step).
  void cache_full_pages(int64_t id, const std::vector<int32_t>& tokens);
  // Drops every cached page that no sequence holds, and every snapshot (the device lost its
  // memory).
  void clear_prefix_cache();

  // Adds a sequence that starts on `match`'s pages (from match_prefix, with nothing changed in
  // between): it holds match.tokens tokens; for KIVI its residual blocks are allocated and queued
  // to be filled from the snapshot.
  void add_sequence(int64_t id, const PrefixMatch& match = {});
  bool has_sequence(int64_t id) const { return sequences_.count(id) != 0; }
  // Reserves the blocks for the sequence to grow to `new_length` tokens this step. Returns false,
  // changing nothing, when the pool has too few free blocks.
  bool grow(int64_t id, int new_length);
  // Ends a step: puts each grown sequence's residual slots in window order again
  // (kernels/residual_order.h), releases those it no longer needs and unpins the snapshots the
  // step copied. `ran` false (the step failed): snapshots the step was to fill are
  // dropped, as their copy may not have run.
  void finish_step(bool ran = true);
  // Frees every block of the sequence (finished, cancelled or preempted); its cached pages stay
  // cached, evictable once no sequence holds them.
  void remove_sequence(int64_t id);
  const SequenceCache& sequence(int64_t id) const;
  // The sequence's blocks as a backend reads them; valid until that sequence next changes.
  BlockTableView block_table(int64_t id) const;

  CacheUsage usage() const;

 private:
  int32_t pages_for(int tokens) const;
  // Residual slots a sequence of `tokens` tokens holds once its step is finished (2 per token).
  int32_t residual_slots_for(int tokens) const;
  // The snapshot's slot ids: its blocks' slots in order.
  std::vector<int32_t> snapshot_slots(const std::vector<int32_t>& blocks, size_t count) const;
  // Queues copies of slot src[i] over slot dst[i] at every layer, one per run of slots that are
  // consecutive in both.
  void queue_slot_copies(const std::vector<int32_t>& src, const std::vector<int32_t>& dst);
  // Makes `count` blocks free, evicting the least recently used unheld cached pages; false,
  // changing nothing, when free and evictable blocks are fewer.
  bool make_free(int32_t count);
  void release_pages(const SequenceCache& seq);
  // Evicts the least recently used entry: a page (and its snapshot) or a snapshot alone.
  void evict_front();
  void evict_page(int32_t block);
  void drop_snapshot(int32_t page_block);
  // Removes the queued copies (not yet handed to a step) for which overwrites(copy) holds.
  template <typename Predicate>
  void drop_copies_if(Predicate overwrites);
  // Whether `copy` writes into residual slot `slot`.
  bool overwrites_slot(const BlockCopy& copy, int32_t slot) const;
  void unpin_snapshot(int32_t page_block);
  // At the end of a step that grew `seq` from seq.step_start to seq.length tokens: lists its
  // residual slots in window order and releases the others (kernels/residual_order.h).
  void reorder_residual(SequenceCache& seq);

  struct LruEntry {
    int32_t block = 0;      // the page's block
    bool snapshot = false;  // the page's snapshot rather than the page
  };
  using LruList = std::list<LruEntry>;
  struct CachedPage {
    uint64_t hash = 0;
    uint64_t parent_hash = 0;
    std::vector<int32_t> tokens;  // the page's own token ids (a hash match is verified)
    LruList::iterator lru;        // into lru_ while no sequence holds the page
    // KIVI residual snapshot at the page's end: R tokens' fp16 keys and values, every layer.
    std::vector<int32_t> snapshot;         // its blocks, empty when none
    std::vector<int32_t> snapshot_tokens;  // the R token ids after the page it depends on
    int32_t snapshot_pins = 0;             // sequences of the planned step copying it
    LruList::iterator snapshot_lru;        // into lru_ while unpinned
  };

  KvCacheConfig config_;
  ModelConfig model_;
  KvPageLayout layout_;
  int64_t bytes_per_block_;
  BlockPool pool_;
  ResidualSlots residual_;
  std::unordered_map<int64_t, SequenceCache> sequences_;
  std::vector<int64_t> grown_this_step_;

  bool prefix_cache_ = false;
  uint64_t seed_hash_ = 0;
  std::vector<int32_t> page_refs_;  // [num_blocks] sequences holding each page
  std::vector<int32_t> hit_refs_;   // [num_blocks] sequences holding each page as a hit
  int32_t hit_pages_in_use_ = 0;    // blocks with hit_refs_ > 0
  std::unordered_map<int32_t, CachedPage> cached_;  // block id -> its hash and tokens
  std::unordered_map<uint64_t, int32_t> by_hash_;   // chained hash -> block id
  LruList lru_;  // unheld cached pages and unpinned snapshots, least recently used first
  int32_t evictable_blocks_ = 0;         // blocks of the entries of lru_
  int64_t snapshot_blocks_ = 0;          // blocks of all snapshots
  std::vector<BlockCopy> block_copies_;  // queued for the next step (take_block_copies)
  std::vector<int32_t> fills_queued_;    // pages whose snapshot fill is in block_copies_
  std::vector<int32_t> filling_;         // pages whose snapshot fill the planned step copies
  std::vector<int32_t> pinned_;          // pages whose snapshot the planned step copies from
  int64_t prefix_queries_ = 0;
  int64_t prefix_hits_ = 0;
};

}  // namespace kvserve
