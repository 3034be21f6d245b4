// Prefix caching (issue 20): the cache manager's content-addressed pages (hash chain, reference
// counts, LRU eviction), the scheduler over a stub backend (hits, partial hits, admission counting
// shared pages once, references released by cancellation, preemption and a lost device), and the
// CPU engine, whose tokens and log-probabilities must be the same bit for bit with and without a
// hit.
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "engine/cpu_backend.h"
#include "engine/engine.h"
#include "engine/kv_cache_manager.h"
#include "engine/scheduler.h"
#include "tests/kv_test_models.h"
#include "tests/reference_fixture.h"

namespace kvserve {
namespace {

using testing::fixture_format;
using testing::ids_of;
using testing::shared_weights;

constexpr int kPage = 32;      // the default page_tokens
constexpr int32_t kToken = 7;  // what the stub "samples"

ModelConfig tiny_model() {
  return testing::gpt2_geometry(6, 4, 256);
}

KvCacheConfig format(KvFormat f) {
  KvCacheConfig config;
  config.format = f;
  return config;
}

// The (source, destination) slot pairs of residual copies, in order: each copy is a run of whole
// slots.
std::vector<std::pair<int32_t, int32_t>> copied_slots(const KvCacheManager& m,
                                                      const std::vector<BlockCopy>& copies) {
  const int32_t c = m.residual_slots_per_block();
  const int32_t slot_bytes = static_cast<int32_t>(m.layout().residual_slot_bytes);
  std::vector<std::pair<int32_t, int32_t>> slots;
  for (const BlockCopy& copy : copies) {
    EXPECT_EQ(copy.src_offset % slot_bytes, 0);
    EXPECT_EQ(copy.dst_offset % slot_bytes, 0);
    EXPECT_EQ(copy.bytes % slot_bytes, 0);
    for (int32_t k = 0; k < copy.bytes / slot_bytes; ++k) {
      slots.emplace_back(copy.src * c + copy.src_offset / slot_bytes + k,
                         copy.dst * c + copy.dst_offset / slot_bytes + k);
    }
  }
  return slots;
}

// Token ids first, first+1, ...: two ranges with the same `first` share a prefix.
std::vector<int32_t> ids(int count, int first = 100) {
  std::vector<int32_t> out;
  for (int i = 0; i < count; ++i) out.push_back(first + i);
  return out;
}

std::vector<int32_t> concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// A sequence of the manager grown to tokens.size() in one step, its full pages hashed.
void add_computed(KvCacheManager& m, int64_t id, const std::vector<int32_t>& tokens,
                  const PrefixMatch& match = {}) {
  m.add_sequence(id, match);
  ASSERT_TRUE(m.grow(id, static_cast<int>(tokens.size())));
  m.finish_step();
  m.cache_full_pages(id, tokens);
}

TEST(PrefixCacheManager, MatchesTheLongestChainOfFullPagesLeavingOneTokenToCompute) {
  KvCacheManager m(format(KvFormat::kFp16), tiny_model(), 64);
  m.set_prefix_cache(true);
  ASSERT_TRUE(m.prefix_cache());
  const std::vector<int32_t> a = ids(100);  // 3 full pages + 4 tokens
  add_computed(m, 1, a);
  EXPECT_EQ(m.usage().cached_pages, 3);

  const PrefixMatch same = m.match_prefix(a);
  ASSERT_EQ(same.pages.size(), 3u);
  EXPECT_EQ(same.tokens, 3 * kPage);
  for (int p = 0; p < 3; ++p) EXPECT_EQ(same.pages[p], m.sequence(1).pages[p]);
  EXPECT_EQ(same.evictable, 0) << "sequence 1 holds them";
  EXPECT_EQ(same.newly_shared, 3);

  // A page boundary: 96 tokens match 3 pages, but one token must be left to compute.
  EXPECT_EQ(m.match_prefix(ids(96)).pages.size(), 2u);
  EXPECT_EQ(m.match_prefix(ids(97)).pages.size(), 3u);
  // A difference inside page 1 stops the chain there; one in page 0 finds nothing.
  std::vector<int32_t> differs = a;
  differs[40] = 5;
  EXPECT_EQ(m.match_prefix(differs).pages.size(), 1u);
  differs[0] = 5;
  EXPECT_TRUE(m.match_prefix(differs).pages.empty());
  // The same page contents after another first page: the chain, not the page, is addressed.
  EXPECT_TRUE(m.match_prefix(concat(ids(32, 900), ids(68, 132))).pages.empty());
  EXPECT_TRUE(m.match_prefix({}).pages.empty());
}

TEST(PrefixCacheManager, TheSeedCoversEveryConfigurationField) {
  const ModelConfig model = tiny_model();
  const KvCacheConfig base = format(KvFormat::kKivi2);
  std::set<uint64_t> seeds{KvCacheManager::prefix_cache_seed(base, model)};
  auto differs = [&](KvCacheConfig c, ModelConfig m) {
    EXPECT_TRUE(seeds.insert(KvCacheManager::prefix_cache_seed(c, m)).second);
  };
  KvCacheConfig c = base;
  c.format = KvFormat::kKivi4;
  differs(c, model);
  c = base;
  c.key_group = 64;
  differs(c, model);
  c = base;
  c.value_group = 64;
  differs(c, model);
  c = base;
  c.residual = 64;
  differs(c, model);
  c = base;
  c.page_tokens = 64;
  differs(c, model);
  c = base;
  c.params = KvParamFormat::kFp8;
  differs(c, model);
  c = base;
  c.residual_format = KvResidualFormat::kInt8;
  differs(c, model);
  c = base;
  c.per_token_keys = true;
  differs(c, model);
  differs(base, testing::gpt2_geometry(12, 4, 256));
  differs(base, testing::gpt2_geometry(6, 8, 256));
}

TEST(PrefixCacheManager, ReferenceCountsKeepPagesAndReleasedPagesStayCachedUntilEvicted) {
  KvCacheManager m(format(KvFormat::kFp16), tiny_model(), 16);
  m.set_prefix_cache(true);
  const std::vector<int32_t> a = ids(100);
  add_computed(m, 1, a);
  const std::vector<int32_t> b = concat(ids(96), ids(20, 5000));
  const PrefixMatch match = m.match_prefix(b);
  ASSERT_EQ(match.pages.size(), 3u);
  add_computed(m, 2, b, match);
  EXPECT_EQ(m.sequence(2).hit_pages, 3);
  EXPECT_EQ(m.hit_pages_in_use(), 3);
  // Two sequences, 3 shared pages: 4 + 1 own pages, each shared page counted once.
  EXPECT_EQ(m.usage().blocks_used, 3 + 1 + 1);
  EXPECT_EQ(m.usage().tokens, 100 + (116 - 96));

  m.remove_sequence(1);  // sequence 2 still holds the shared pages
  EXPECT_EQ(m.usage().evictable_pages, 0);
  EXPECT_EQ(m.hit_pages_in_use(), 3);
  m.remove_sequence(2);
  EXPECT_EQ(m.hit_pages_in_use(), 0);
  EXPECT_EQ(m.usage().blocks_used, 0);
  EXPECT_EQ(m.usage().evictable_pages, 3);
  EXPECT_EQ(m.usage().cached_pages, 3);
  EXPECT_EQ(m.num_free_blocks(), 16) << "evictable pages count free";
  EXPECT_EQ(m.match_prefix(a).evictable, 3);
}

TEST(PrefixCacheManager, EvictsLeastRecentlyUsedFirstAndNeverAPageInUse) {
  KvCacheManager m(format(KvFormat::kFp16), tiny_model(), 8);
  m.set_prefix_cache(true);
  const std::vector<int32_t> a = ids(65, 100), b = ids(65, 1000), c = ids(65, 2000);
  add_computed(m, 1, a);  // 3 blocks, 2 cached pages
  add_computed(m, 2, b);
  m.remove_sequence(1);  // a's pages released first: least recently used
  m.remove_sequence(2);
  EXPECT_EQ(m.usage().evictable_pages, 4);
  // c's 3 blocks come from the 4 free ones: nothing is evicted while a block is free.
  add_computed(m, 3, c);
  EXPECT_EQ(m.usage().cached_pages, 6);
  // 3 more pages with 1 free: the 2 least recently used cached pages (a's) are evicted.
  ASSERT_TRUE(m.grow(3, 65 + 96));
  m.finish_step();
  EXPECT_EQ(m.match_prefix(a).pages.size(), 0u) << "a's pages went first";
  EXPECT_EQ(m.match_prefix(b).pages.size(), 2u);
  // Sequence 4 starts on b's pages: they are in use, so the pool is full and nothing evictable.
  const PrefixMatch on_b = m.match_prefix(b);
  m.add_sequence(4, on_b);
  EXPECT_EQ(m.num_free_blocks(), 0);
  EXPECT_FALSE(m.grow(4, 65)) << "a page in use is never evicted";
  EXPECT_EQ(m.match_prefix(b).pages.size(), 2u);
  m.remove_sequence(3);
  m.remove_sequence(4);
  EXPECT_EQ(m.num_free_blocks(), 8);
  m.clear_prefix_cache();
  EXPECT_EQ(m.usage().cached_pages, 0);
}

// KIVI (P = G = R = 32): the snapshot point of a prompt is the largest kP + R below its length
// with k >= 1; fp16 and int8 need none.
TEST(PrefixCacheManager, KiviSnapshotPointsLeaveATokenToCompute) {
  KvCacheManager m(format(KvFormat::kKivi2), tiny_model(), 64);
  m.set_prefix_cache(true);
  EXPECT_EQ(m.snapshot_point(64), 0) << "k = 1 would leave no token";
  EXPECT_EQ(m.snapshot_point(65), 64);
  EXPECT_EQ(m.snapshot_point(96), 64);
  EXPECT_EQ(m.snapshot_point(97), 96);
  EXPECT_EQ(m.snapshot_point(150), 128);
  KvCacheManager fp16(format(KvFormat::kFp16), tiny_model(), 64);
  fp16.set_prefix_cache(true);
  EXPECT_EQ(fp16.snapshot_point(150), 0);
  m.set_prefix_cache(false);
  EXPECT_EQ(m.snapshot_point(150), 0);
}

// A KIVI sequence at its snapshot point: its residual blocks are copied into the snapshot of its
// last full page, and a later sequence that matches the pages and the snapshot's R tokens starts
// there, its own residual blocks filled from the snapshot. The snapshot is pinned while a step
// copies from it and evicted least-recently-used otherwise.
TEST(PrefixCacheManager, KiviSnapshotsAreCopiedMatchedPinnedAndEvicted) {
  KvCacheManager m(format(KvFormat::kKivi2), tiny_model(), 64);
  m.set_prefix_cache(true);
  const std::vector<int32_t> a = ids(150);
  add_computed(m, 1, ids(128));
  EXPECT_TRUE(m.match_prefix(a).pages.empty()) << "pages without a snapshot are not a hit";
  m.snapshot_residual(1, a);
  const std::vector<int32_t> residual = m.sequence(1).residual_slots;
  ASSERT_EQ(residual.size(), 64u) << "R = 32 tokens' keys and values";
  const auto fill = copied_slots(m, m.take_block_copies());
  ASSERT_EQ(fill.size(), residual.size());
  // Into the snapshot's own blocks, slot after slot.
  const int32_t c = m.residual_slots_per_block();
  std::vector<int32_t> snapshot_slots, snapshot;
  for (size_t i = 0; i < fill.size(); ++i) {
    EXPECT_EQ(fill[i].first, residual[i]);
    snapshot_slots.push_back(fill[i].second);
    if (i % c == 0) snapshot.push_back(fill[i].second / c);
    EXPECT_EQ(fill[i].second, snapshot.back() * c + static_cast<int32_t>(i % c));
  }
  EXPECT_EQ(m.usage().snapshot_blocks, static_cast<int64_t>(snapshot.size()));
  m.finish_step();  // the step that ran the copies
  EXPECT_TRUE(m.take_block_copies().empty());

  const PrefixMatch hit = m.match_prefix(a);
  ASSERT_EQ(hit.pages.size(), 3u);
  EXPECT_EQ(hit.tokens, 128);
  EXPECT_EQ(hit.snapshot, snapshot);
  EXPECT_EQ(hit.snapshot_evictable, static_cast<int32_t>(snapshot.size()));
  // The snapshot's R tokens must match too, and a token must be left to compute.
  EXPECT_TRUE(m.match_prefix(concat(ids(100), ids(50, 5000))).pages.empty());
  EXPECT_TRUE(m.match_prefix(ids(128)).pages.empty());
  EXPECT_EQ(m.match_prefix(ids(129)).tokens, 128);

  const int32_t free_before = m.num_free_blocks();
  m.add_sequence(2, hit);
  EXPECT_EQ(m.sequence(2).length, 128);
  const auto copy = copied_slots(m, m.take_block_copies());
  ASSERT_EQ(copy.size(), snapshot_slots.size());
  for (size_t i = 0; i < copy.size(); ++i) {
    EXPECT_EQ(copy[i].first, snapshot_slots[i]);
    EXPECT_EQ(copy[i].second, m.sequence(2).residual_slots[i]);
  }
  // 12 slots a block: sequence 1's 64 slots leave 8 free, so 56 more take 5 blocks.
  EXPECT_EQ(c, 12);
  EXPECT_EQ(m.num_free_blocks(), free_before - 5 - static_cast<int32_t>(snapshot.size()))
      << "its residual slots, and the pinned snapshot";
  EXPECT_EQ(m.match_prefix(a).snapshot_evictable, 0);

  // Pressure while pinned: a grow takes every other block but not the snapshot.
  m.remove_sequence(1);
  m.add_sequence(3);
  int length = 0;
  while (m.grow(3, length + 32)) length += 32;
  EXPECT_EQ(m.usage().snapshot_blocks, static_cast<int64_t>(snapshot.size()));
  m.finish_step();  // unpinned: now evictable
  m.remove_sequence(2);
  EXPECT_EQ(m.num_free_blocks() + m.usage().blocks_used, 64);
  while (m.grow(3, length + 32)) length += 32;
  EXPECT_EQ(m.usage().snapshot_blocks, 0);
  EXPECT_EQ(m.usage().cached_pages, 0);
  m.finish_step();
  m.remove_sequence(3);
  EXPECT_EQ(m.num_free_blocks(), 64);
  EXPECT_EQ(m.usage().blocks_used, 0);
}

// Two sequences start on one snapshot; one is removed before the step that fills it (an
// admission that did not fit): only the copies into its own slots are dropped, the other's stay.
TEST(PrefixCacheManager, RemovingASequenceDropsOnlyTheFillsOfItsOwnSlots) {
  KvCacheManager m(format(KvFormat::kKivi2), tiny_model(), 64);
  m.set_prefix_cache(true);
  const std::vector<int32_t> a = ids(150);
  add_computed(m, 1, ids(128));
  m.snapshot_residual(1, a);
  m.take_block_copies();
  m.finish_step();
  const PrefixMatch hit = m.match_prefix(a);
  ASSERT_FALSE(hit.snapshot.empty());
  m.add_sequence(2, hit);
  m.add_sequence(3, hit);
  const std::vector<int32_t> kept = m.sequence(3).residual_slots;
  m.remove_sequence(2);
  const auto fills = copied_slots(m, m.take_block_copies());
  ASSERT_EQ(fills.size(), kept.size());
  for (size_t i = 0; i < fills.size(); ++i) EXPECT_EQ(fills[i].second, kept[i]);
  m.finish_step();
  m.remove_sequence(3);
  m.remove_sequence(1);
}

// A failed step may not have run its copies: the snapshots it was to fill are dropped, and so is
// a snapshot that is evicted before its fill was handed to a step (the fill is not run).
TEST(PrefixCacheManager, KiviSnapshotsOfAFailedStepOrEvictedBeforeTheirFillAreDropped) {
  KvCacheManager m(format(KvFormat::kKivi2), tiny_model(), 64);
  m.set_prefix_cache(true);
  const std::vector<int32_t> a = ids(150);
  add_computed(m, 1, ids(128));
  m.snapshot_residual(1, a);
  EXPECT_FALSE(m.take_block_copies().empty());
  m.finish_step(/*ran=*/false);
  EXPECT_EQ(m.usage().snapshot_blocks, 0);
  EXPECT_TRUE(m.match_prefix(a).pages.empty());

  m.snapshot_residual(1, a);
  m.remove_sequence(1);
  m.add_sequence(2);
  int length = 0;
  while (m.grow(2, length + 32)) length += 32;  // evicts everything, the snapshot too
  EXPECT_EQ(m.usage().snapshot_blocks, 0);
  EXPECT_TRUE(m.take_block_copies().empty()) << "no fill into blocks that are free again";
  m.finish_step();
  m.remove_sequence(2);
  EXPECT_EQ(m.num_free_blocks(), 64);
}

TEST(PrefixCacheManager, TurningItOffDropsCachedPages) {
  KvCacheManager m(format(KvFormat::kFp16), tiny_model(), 16);
  m.set_prefix_cache(true);
  add_computed(m, 1, ids(100));
  add_computed(m, 2, ids(100, 5000));
  m.remove_sequence(2);
  m.set_prefix_cache(false);
  EXPECT_EQ(m.usage().evictable_pages, 0);
  EXPECT_TRUE(m.match_prefix(ids(100)).pages.empty());
  m.remove_sequence(1);  // its pages were cached while on: freed now
  EXPECT_EQ(m.usage().cached_pages, 0);
  EXPECT_EQ(m.num_free_blocks(), 16);
}

// ---- The scheduler over a stub backend --------------------------------------------------------

// Checks what a plan hands a backend when pages are shared: a block that an item may write (a
// residual block, or a page not wholly below the item's start) is in no other item, and every
// shared page lies wholly below the start of each item that holds it.
class SharingCheckingBackend : public Backend {
 public:
  SharingCheckingBackend(const KvCacheConfig& config, int32_t num_blocks)
      : config_(config),
        num_blocks_(num_blocks),
        slots_per_block_(make_page_layout(config, tiny_model()).residual_tokens_per_block) {}
  std::string name() const override { return "sharing-checking stub"; }
  void copy_blocks(const std::vector<BlockCopy>& copies) override {
    for (const BlockCopy& c : copies) {
      EXPECT_TRUE(c.src >= 0 && c.src < num_blocks_ && c.dst >= 0 && c.dst < num_blocks_);
      EXPECT_NE(c.src, c.dst);
    }
    block_copies_ += static_cast<int>(copies.size());
  }
  void forward(const std::vector<ForwardItem>&, std::vector<float>&) override {
    throw std::logic_error("the stub backend has no logits");
  }
  void forward_sample(const std::vector<ForwardItem>& items, const std::vector<SampleRequest>&,
                      std::vector<SampleResult>& results) override {
    if (lose_device_) throw DeviceLostError("stub: device lost");
    std::map<int32_t, int> written, read, written_slots;
    std::set<int32_t> residual_blocks;  // shared by items, slot by slot
    for (const ForwardItem& item : items) {
      EXPECT_GE(item.blocks.length, item.start + static_cast<int>(item.tokens.size()));
      const size_t read_only = paged_token_count(config_, item.start) / config_.page_tokens;
      for (size_t p = 0; p < item.blocks.pages.size; ++p) {
        const int32_t id = item.blocks.pages[p];
        EXPECT_TRUE(id >= 0 && id < num_blocks_) << id;
        ++(p < read_only ? read : written)[id];
      }
      for (int32_t slot : item.blocks.residual_slots) {
        ++written_slots[slot];
        residual_blocks.insert(slot / slots_per_block_);
      }
    }
    for (const auto& [slot, count] : written_slots) {
      EXPECT_EQ(count, 1) << "residual slot " << slot << " written by two items";
    }
    for (int32_t id : residual_blocks) {
      EXPECT_TRUE(id >= 0 && id < num_blocks_) << id;
      EXPECT_EQ(written.count(id) + read.count(id), 0u) << "block " << id << " a page and residual";
    }
    for (const auto& [id, count] : written) {
      EXPECT_EQ(count, 1) << "block " << id << " written by two items";
      EXPECT_EQ(read.count(id), 0u) << "block " << id << " written while another item reads it";
    }
    for (const auto& [id, count] : read) shared_reads_ += count - 1;
    results.assign(items.size(), SampleResult{});
    for (SampleResult& r : results) r.token = {kToken, -1.0f};
  }
  int shared_reads() const { return shared_reads_; }
  int block_copies() const { return block_copies_; }
  void lose_device() { lose_device_ = true; }

 private:
  bool lose_device_ = false;
  KvCacheConfig config_;
  int32_t num_blocks_;
  int32_t slots_per_block_;
  int shared_reads_ = 0;
  int block_copies_ = 0;
};

struct StubEngine {
  std::unique_ptr<Engine> engine;
  SharingCheckingBackend* backend = nullptr;
};

StubEngine stub_engine(KvFormat f, int32_t blocks, EngineOptions options = {}) {
  auto backend = std::make_unique<SharingCheckingBackend>(format(f), blocks);
  StubEngine out;
  out.backend = backend.get();
  out.engine = std::make_unique<Engine>(
      tiny_model(), std::make_unique<KvCacheManager>(format(f), tiny_model(), blocks),
      std::move(backend), options);
  return out;
}

GenerationRequest request(std::vector<int32_t> prompt, int max_new_tokens) {
  GenerationRequest r;
  r.prompt = std::move(prompt);
  r.max_new_tokens = max_new_tokens;
  r.ignore_eos = true;
  r.sampling.temperature = 0.0f;
  return r;
}

struct Totals {
  int steps = 0, preemptions = 0, prefill_tokens = 0, queries = 0, hits = 0;
  size_t most_running = 0;
  std::map<RequestId, FinishReason> finish;
  std::map<RequestId, int> tokens;
};

Totals run_to_end(Engine& engine, int step_limit = 20000) {
  Totals t;
  std::vector<StepEvent> events;
  while (engine.has_work() && t.steps++ < step_limit) {
    events.clear();
    const StepStats stats = engine.step(events);
    t.preemptions += stats.preemptions;
    t.prefill_tokens += stats.prefill_tokens;
    t.queries += stats.prefix_cache_queries;
    t.hits += stats.prefix_cache_hits;
    t.most_running = std::max(t.most_running, engine.num_running());
    for (const StepEvent& e : events) {
      t.tokens[e.request] += e.has_token;
      if (e.finish != FinishReason::kNone) t.finish[e.request] = e.finish;
    }
  }
  EXPECT_FALSE(engine.has_work()) << "still working after " << step_limit << " steps";
  return t;
}

TEST(PrefixCacheScheduler, AHitComputesOnlyTheRestOfThePrompt) {
  StubEngine s = stub_engine(KvFormat::kFp16, 200);
  Engine& engine = *s.engine;
  engine.add_request(request(ids(150), 10));
  Totals first = run_to_end(engine);
  EXPECT_EQ(first.prefill_tokens, 150);
  EXPECT_EQ(first.hits, 0);
  EXPECT_EQ(first.queries, 150);
  // 150 prompt + 9 fed-back tokens: 4 full pages cached.
  EXPECT_EQ(engine.cache().usage().cached_pages, 4);

  // Partial hits: at a page boundary, inside a page, and the whole prompt (one token left).
  const struct {
    std::vector<int32_t> prompt;
    int hit;
  } cases[] = {{concat(ids(64), ids(10, 7000)), 64},
               {concat(ids(70), ids(10, 7000)), 64},
               {ids(150), 128},
               {ids(129), 128},
               {ids(128), 96},
               {ids(20), 0},
               {concat(ids(150), ids(40, 7000)), 128}};
  for (const auto& c : cases) {
    const RequestId id = engine.add_request(request(c.prompt, 4));
    const Totals t = run_to_end(engine);
    EXPECT_EQ(t.hits, c.hit) << c.prompt.size() << "-token prompt";
    EXPECT_EQ(t.queries, static_cast<int>(c.prompt.size()));
    EXPECT_EQ(t.prefill_tokens, static_cast<int>(c.prompt.size()) - c.hit);
    EXPECT_EQ(t.tokens.at(id), 4);
    EXPECT_EQ(t.finish.at(id), FinishReason::kLength);
  }
  EXPECT_EQ(engine.cache().usage().prefix_cache_hits, 64 + 64 + 128 + 128 + 96 + 128);
  EXPECT_EQ(engine.cache().usage().blocks_used, 0);
  EXPECT_EQ(engine.cache().num_free_blocks(), 200);
}

TEST(PrefixCacheScheduler, OffMeansNoHits) {
  EngineOptions off;
  off.prefix_cache = false;
  for (KvFormat f : {KvFormat::kFp16, KvFormat::kKivi2}) {
    StubEngine s = stub_engine(f, 400, off);
    s.engine->add_request(request(ids(150), 10));
    run_to_end(*s.engine);
    s.engine->add_request(request(ids(150), 10));
    const Totals t = run_to_end(*s.engine);
    EXPECT_EQ(t.hits, 0);
    EXPECT_EQ(t.queries, 0) << "no lookups counted when nothing can be shared";
    EXPECT_EQ(t.prefill_tokens, 150);
    EXPECT_EQ(s.engine->cache().usage().cached_pages, 0);
    EXPECT_EQ(s.backend->block_copies(), 0);
  }
}

// KIVI: the prompt's prefill ends a chunk at its snapshot point (128 of 150 tokens), the next
// step copies the residual into the snapshot before its forward, and a later prompt that shares
// the first 128 tokens starts at 128 on the 3 pages and a copy of the snapshot.
TEST(PrefixCacheScheduler, KiviChunkEndsAtTheSnapshotPointAndHitsResumeThere) {
  Scheduler s(tiny_model(),
              std::make_unique<KvCacheManager>(format(KvFormat::kKivi2), tiny_model(), 200),
              SchedulerOptions{});
  auto commit = [&](const StepPlan& plan, std::vector<StepEvent>& events) {
    std::vector<SampleResult> results(plan.items.size());
    for (SampleResult& r : results) r.token = {kToken, -1.0f};
    s.update_from_output(plan, results, events);
  };
  std::vector<StepEvent> events;
  // A prompt takes a snapshot only once another one has brought its first page into the cache.
  s.add_request(request(ids(70), 4));
  StepPlan plan = s.schedule();
  EXPECT_EQ(plan.items[0].tokens.size(), 70u) << "a prompt that shares nothing: one chunk";
  commit(plan, events);
  while (s.has_work()) commit(s.schedule(), events);
  EXPECT_EQ(s.cache().usage().snapshot_blocks, 0);

  const RequestId a = s.add_request(request(ids(150), 4));
  plan = s.schedule();
  ASSERT_EQ(plan.items.size(), 1u);
  EXPECT_EQ(plan.items[0].tokens.size(), 128u) << "the chunk ends at the snapshot point";
  EXPECT_TRUE(plan.block_copies.empty());
  commit(plan, events);
  const size_t residual = s.cache().sequence(a).residual_slots.size();
  plan = s.schedule();
  const auto fill = copied_slots(s.cache(), plan.block_copies);
  ASSERT_EQ(fill.size(), residual) << "the snapshot's fill, before the forward";
  EXPECT_EQ(plan.items[0].start, 128);
  for (size_t i = 0; i < residual; ++i) {
    EXPECT_EQ(fill[i].first, plan.items[0].blocks.residual_slots[i]);
  }
  commit(plan, events);
  while (s.has_work()) commit(s.schedule(), events);

  const RequestId b = s.add_request(request(concat(ids(128), ids(40, 5000)), 4));
  plan = s.schedule();
  EXPECT_EQ(plan.prefix_cache_hits, 128);
  ASSERT_EQ(plan.items.size(), 1u);
  EXPECT_EQ(plan.items[0].sequence_id, b);
  EXPECT_EQ(plan.items[0].start, 128);
  const auto into_b = copied_slots(s.cache(), plan.block_copies);
  ASSERT_EQ(into_b.size(), residual) << "the snapshot into b's residual slots";
  for (size_t i = 0; i < residual; ++i) {
    EXPECT_EQ(into_b[i].second, plan.items[0].blocks.residual_slots[i]);
  }
  commit(plan, events);
  while (s.has_work()) commit(s.schedule(), events);
  EXPECT_EQ(s.cache().hit_pages_in_use(), 0);
  EXPECT_EQ(s.cache().usage().blocks_used, 0);
  EXPECT_EQ(s.cache().num_free_blocks(), 200);
  EXPECT_EQ(s.reserved_blocks(), 0);
}

// Final-length admission counts a page that several running sequences share once: a pool that
// holds one request at its final length alone holds five that share a 10-page prefix.
TEST(PrefixCacheScheduler, AdmissionCountsSharedPagesOnce) {
  const std::vector<int32_t> prefix = ids(320);  // 10 pages
  // 320 + 32 unique + 32 new - 1 = 383 tokens at most: 12 pages each, 2 of them its own.
  StubEngine s = stub_engine(KvFormat::kFp16, 20);
  Engine& engine = *s.engine;
  engine.add_request(request(concat(prefix, ids(32, 5000)), 32));
  run_to_end(engine);
  for (int i = 0; i < 5; ++i)
    engine.add_request(request(concat(prefix, ids(32, 6000 + 100 * i)), 32));
  const Totals t = run_to_end(engine);
  EXPECT_EQ(t.most_running, 5u) << "10 shared + 5 x 2 own pages = the pool";
  EXPECT_EQ(t.preemptions, 0);
  EXPECT_EQ(t.hits, 5 * 320);
  EXPECT_GT(s.backend->shared_reads(), 0) << "steps read one page for several sequences";
  for (const auto& [id, reason] : t.finish) EXPECT_EQ(reason, FinishReason::kLength);
  EXPECT_EQ(engine.cache().num_free_blocks(), 20);

  // Without the cache, each runs alone.
  EngineOptions off;
  off.prefix_cache = false;
  StubEngine alone = stub_engine(KvFormat::kFp16, 20, off);
  for (int i = 0; i < 5; ++i)
    alone.engine->add_request(request(concat(prefix, ids(32, 6000 + 100 * i)), 32));
  EXPECT_EQ(run_to_end(*alone.engine).most_running, 1u);
}

// Prompt admission with a pool too small for the load: sequences that share a prefix are
// preempted and recomputed (starting on their cached pages), and at the end every reference is
// back: no page held, none shared, the pool free.
TEST(PrefixCacheScheduler, PreemptionAndCancellationReleaseReferences) {
  for (KvFormat f : {KvFormat::kFp16, KvFormat::kKivi2}) {
    SCOPED_TRACE(to_string(f));
    EngineOptions options;
    options.admission = AdmissionPolicy::kPrompt;
    options.max_batch_tokens = 96;
    StubEngine s = stub_engine(f, 24, options);
    Engine& engine = *s.engine;
    // Two earlier prompts with the same prefix: the first caches its pages, the second (KIVI)
    // takes the residual snapshots that the twelve below start on.
    for (int i = 0; i < 2; ++i) {
      engine.add_request(request(concat(ids(100), ids(8, 2000 + 50 * i)), 4));
      run_to_end(engine);
    }
    std::vector<RequestId> ids_added;
    for (int i = 0; i < 12; ++i)
      ids_added.push_back(
          engine.add_request(request(concat(ids(100), ids(8, 3000 + 50 * i)), 150)));
    // A few steps in, cancel two of them while they hold shared pages.
    std::vector<StepEvent> events;
    int64_t hits = 0;
    for (int step = 0; step < 8; ++step) hits += engine.step(events).prefix_cache_hits;
    EXPECT_GT(engine.cache().hit_pages_in_use(), 0);
    engine.cancel(ids_added[1]);
    engine.cancel(ids_added[5]);
    const Totals t = run_to_end(engine);
    EXPECT_GT(t.preemptions, 0) << "the pool is meant to be too small";
    EXPECT_GT(hits + t.hits, 0);
    int cancelled = 0;
    for (const StepEvent& e : events) cancelled += e.finish == FinishReason::kCancelled;
    for (const auto& [id, reason] : t.finish) {
      cancelled += reason == FinishReason::kCancelled;
      if (reason != FinishReason::kCancelled) {
        EXPECT_EQ(reason, FinishReason::kLength);
      }
    }
    EXPECT_EQ(cancelled, 2);
    EXPECT_EQ(engine.cache().hit_pages_in_use(), 0);
    EXPECT_EQ(engine.cache().usage().blocks_used, 0);
    EXPECT_EQ(engine.cache().num_free_blocks(), 24);
    if (f == KvFormat::kKivi2) {
      EXPECT_GT(s.backend->block_copies(), 0);
    }
  }
}

// The device-lost path (Scheduler::fail_all) ends every request and drops the cached pages: what
// they held is gone with the device.
TEST(PrefixCacheScheduler, FailAllReleasesEveryReferenceAndDropsTheCache) {
  auto scheduler = std::make_unique<Scheduler>(
      tiny_model(), std::make_unique<KvCacheManager>(format(KvFormat::kFp16), tiny_model(), 64),
      SchedulerOptions{});
  scheduler->add_request(request(ids(100), 50));
  std::vector<StepEvent> events;
  for (int step = 0; step < 3; ++step) {
    const StepPlan plan = scheduler->schedule();
    std::vector<SampleResult> results(plan.items.size());
    for (SampleResult& r : results) r.token = {kToken, -1.0f};
    scheduler->update_from_output(plan, results, events);
  }
  scheduler->add_request(request(ids(100), 50));
  const StepPlan plan = scheduler->schedule();
  EXPECT_EQ(plan.prefix_cache_hits, 96);
  EXPECT_EQ(scheduler->cache().hit_pages_in_use(), 3);
  scheduler->fail_all("device lost: test", events);
  EXPECT_FALSE(scheduler->has_work());
  EXPECT_EQ(scheduler->cache().hit_pages_in_use(), 0);
  EXPECT_EQ(scheduler->cache().usage().cached_pages, 0);
  EXPECT_EQ(scheduler->cache().num_free_blocks(), 64);
  EXPECT_EQ(scheduler->reserved_blocks(), 0);
}

// A preempted sequence's full pages stay cached: when it is admitted again it starts on those
// that were not evicted meanwhile, and only the rest is recomputed.
TEST(PrefixCacheScheduler, APreemptedSequenceRestartsOnItsOwnCachedPages) {
  SchedulerOptions options;
  options.admission = AdmissionPolicy::kPrompt;
  Scheduler s(tiny_model(),
              std::make_unique<KvCacheManager>(format(KvFormat::kFp16), tiny_model(), 6), options);
  s.add_request(request(ids(64), 60));  // 4 pages at its final 123 tokens
  const RequestId b = s.add_request(request(ids(64, 5000), 60));
  bool preempted = false, readmitted = false;
  std::vector<StepEvent> events;
  for (int step = 0; s.has_work() && step < 1000; ++step) {
    const StepPlan plan = s.schedule();
    if (!plan.preempted.empty()) {
      // At 96 tokens each, the first needs a 4th page: b goes, its 3 full pages stay cached, and
      // the first's new page evicts b's last one.
      EXPECT_EQ(plan.preempted, std::vector<RequestId>{b});
      preempted = true;
    }
    if (preempted && !plan.admitted.empty()) {
      EXPECT_EQ(plan.admitted, std::vector<RequestId>{b});
      EXPECT_EQ(plan.prefix_cache_hits, 64) << "pages 0 and 1 were still cached";
      EXPECT_EQ(plan.items.back().start, 64);
      EXPECT_EQ(plan.items.back().tokens.size(), 97u - 64u) << "64 prompt + 33 generated - hits";
      EXPECT_EQ(plan.recomputed_tokens, 96 - 64);
      readmitted = true;
    }
    std::vector<SampleResult> results(plan.items.size());
    for (SampleResult& r : results) r.token = {kToken, -1.0f};
    s.update_from_output(plan, results, events);
  }
  EXPECT_TRUE(preempted);
  EXPECT_TRUE(readmitted);
  int tokens_b = 0;
  for (const StepEvent& e : events) tokens_b += e.request == b && e.has_token;
  EXPECT_EQ(tokens_b, 60);
  EXPECT_EQ(s.cache().num_free_blocks(), 6);
}

// The engine's device-lost path: the failing step holds shared pages; every request ends with an
// error, every reference is released and the cached pages are dropped with the device.
TEST(PrefixCacheScheduler, ALostDeviceReleasesSharedPagesAndDropsTheCache) {
  StubEngine s = stub_engine(KvFormat::kFp16, 64);
  Engine& engine = *s.engine;
  engine.add_request(request(ids(100), 4));
  run_to_end(engine);
  ASSERT_EQ(engine.cache().usage().cached_pages, 3);
  engine.add_request(request(ids(100), 20));
  engine.add_request(request(concat(ids(64), ids(40, 5000)), 20));
  std::vector<StepEvent> events;
  const StepStats first = engine.step(events);
  EXPECT_EQ(first.prefix_cache_hits, 96 + 64);
  EXPECT_EQ(engine.cache().hit_pages_in_use(), 3);
  s.backend->lose_device();
  events.clear();
  engine.step(events);
  ASSERT_FALSE(engine.device_lost().empty());
  int errors = 0;
  for (const StepEvent& e : events) errors += e.finish == FinishReason::kError;
  EXPECT_EQ(errors, 2);
  EXPECT_FALSE(engine.has_work());
  EXPECT_EQ(engine.cache().hit_pages_in_use(), 0);
  EXPECT_EQ(engine.cache().usage().cached_pages, 0);
  EXPECT_EQ(engine.cache().usage().blocks_used, 0);
  EXPECT_EQ(engine.cache().num_free_blocks(), 64);
}

// KIVI and the shared-prefix shape (issue 20's benchmark): a prompt's last snapshot point lies in
// its own tokens, so the first request leaves no snapshot another can use; the second, whose pages
// match 16 cached ones, also ends a chunk at 512 = 15 pages + R, where the sharing ends; every
// later one starts there.
TEST(PrefixCacheScheduler, KiviASharedPrefixGetsASnapshotWhereTheSharingEnds) {
  StubEngine s = stub_engine(KvFormat::kKivi2, 600);
  Engine& engine = *s.engine;
  const int expected_hits[] = {0, 0, 512, 512};
  for (int i = 0; i < 4; ++i) {
    engine.add_request(request(concat(ids(512), ids(64, 5000 + 100 * i)), 4));
    const Totals t = run_to_end(engine);
    EXPECT_EQ(t.hits, expected_hits[i]) << "request " << i;
    EXPECT_EQ(t.prefill_tokens, 576 - expected_hits[i]) << "request " << i;
  }
  EXPECT_EQ(engine.cache().usage().blocks_used, 0);
  EXPECT_EQ(engine.cache().num_free_blocks(), 600);
}

// KIVI and a lost device: the failing step copies a snapshot into a new sequence's residual;
// every request ends with an error, every reference and pin is released, and the cached pages and
// snapshots are dropped with the device.
TEST(PrefixCacheScheduler, KiviALostDeviceReleasesSnapshotsAndDropsTheCache) {
  StubEngine s = stub_engine(KvFormat::kKivi2, 64);
  Engine& engine = *s.engine;
  engine.add_request(request(ids(70), 4));  // caches page 0: the next prompt takes a snapshot
  run_to_end(engine);
  engine.add_request(request(ids(100), 4));
  run_to_end(engine);
  ASSERT_EQ(engine.cache().usage().cached_pages, 2) << "paged(103) = 64";
  ASSERT_GT(engine.cache().usage().snapshot_blocks, 0) << "at 96: 2 pages + 32 tokens";
  engine.add_request(request(ids(100), 20));
  s.backend->lose_device();
  std::vector<StepEvent> events;
  const StepStats lost = engine.step(events);
  EXPECT_EQ(lost.prefix_cache_hits, 96);
  ASSERT_FALSE(engine.device_lost().empty());
  EXPECT_FALSE(engine.has_work());
  EXPECT_EQ(engine.cache().hit_pages_in_use(), 0);
  EXPECT_EQ(engine.cache().usage().cached_pages, 0);
  EXPECT_EQ(engine.cache().usage().snapshot_blocks, 0);
  EXPECT_EQ(engine.cache().usage().blocks_used, 0);
  EXPECT_EQ(engine.cache().num_free_blocks(), 64);
}

// ---- The CPU engine: the same tokens, bit for bit, with and without a hit ---------------------

struct Generated {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  bool operator==(const Generated& o) const { return tokens == o.tokens && logprobs == o.logprobs; }
};

std::unique_ptr<Engine> cpu_engine(const KvCacheConfig& config, EngineOptions options,
                                   int32_t blocks = 512) {
  const ModelConfig& model = shared_weights().config;
  auto cache = std::make_unique<KvCacheManager>(config, model, blocks);
  auto backend =
      std::make_unique<CpuBackend>(shared_weights(), cache->config(), cache->num_blocks());
  return std::make_unique<Engine>(model, std::move(cache), std::move(backend), options);
}

// Runs `requests` together on `engine`; returns each one's tokens and the step totals.
std::vector<Generated> run(Engine& engine, const std::vector<GenerationRequest>& requests,
                           int* hits = nullptr, int* preemptions = nullptr) {
  std::map<RequestId, size_t> index;
  for (size_t i = 0; i < requests.size(); ++i) index[engine.add_request(requests[i])] = i;
  std::vector<Generated> out(requests.size());
  std::vector<StepEvent> events;
  while (engine.has_work()) {
    events.clear();
    const StepStats stats = engine.step(events);
    if (hits != nullptr) *hits += stats.prefix_cache_hits;
    if (preemptions != nullptr) *preemptions += stats.preemptions;
    for (const StepEvent& e : events) {
      EXPECT_NE(e.finish, FinishReason::kError) << e.error;
      if (!e.has_token) continue;
      out[index[e.request]].tokens.push_back(e.token);
      out[index[e.request]].logprobs.push_back(e.logprob);
    }
  }
  return out;
}

TEST(PrefixCacheCpuEngine, HitsGiveTheSameTokensAndLogprobsBitForBit) {
  const nlohmann::json& prompts = testing::logits_fixture()["prompts"];
  const std::vector<int32_t> base = ids_of(prompts[4]["prompt_ids"]);  // 220 tokens
  ASSERT_GE(base.size(), 200u);
  auto prefix = [&](size_t n) { return std::vector<int32_t>(base.begin(), base.begin() + n); };
  const std::vector<int32_t> tail_a = ids_of(prompts[1]["prompt_ids"]);
  const std::vector<int32_t> tail_b = ids_of(prompts[3]["prompt_ids"]);
  // The request that fills the cache, then prompts that share 64, 70, 96, 129 and all 150 of its
  // tokens, and one that shares none.
  const std::vector<std::vector<int32_t>> later_prompts = {concat(prefix(64), tail_a),
                                                           concat(prefix(70), tail_b),
                                                           concat(prefix(96), tail_a),
                                                           prefix(129),
                                                           prefix(150),
                                                           concat(prefix(150), tail_b),
                                                           tail_a};
  std::vector<GenerationRequest> later;
  for (size_t i = 0; i < later_prompts.size(); ++i) {
    GenerationRequest r = request(later_prompts[i], 20);
    if (i % 2 == 1) r.sampling = SamplingParams{0.9f, 40, 0.95f, 1.0f, 100 + i};  // seeded
    later.push_back(r);
  }
  for (const std::string name : {"fp16", "int8", "kivi2", "kivi4"}) {
    SCOPED_TRACE(name);
    const KvCacheConfig config = fixture_format(name);
    EngineOptions off;
    off.prefix_cache = false;
    std::vector<Generated> alone;
    for (const GenerationRequest& r : later) alone.push_back(run(*cpu_engine(config, off), {r})[0]);

    EngineOptions on;
    on.max_batch_tokens = 48;  // chunked prefill: a hit's rest starts inside a chunk's budget
    auto engine = cpu_engine(config, on);
    run(*engine, {request(prefix(150), 24)});
    int hits = 0;
    // One at a time, each starting on the first request's pages...
    for (size_t i = 0; i < later.size(); ++i) {
      EXPECT_TRUE(run(*engine, {later[i]}, &hits)[0] == alone[i]) << "request " << i << " alone";
    }
    // ...then all together, on each other's pages too.
    const std::vector<Generated> together = run(*engine, later, &hits);
    for (size_t i = 0; i < later.size(); ++i) {
      EXPECT_TRUE(together[i] == alone[i]) << "request " << i << " in a batch";
    }
    if (is_kivi(config.format)) {
      // A hit needs a snapshot: the first request's at 128 (3 pages + 32 residual tokens), then
      // those the later prompts leave at 64 and 96 (docs/design.md, "Prefix caching").
      EXPECT_GE(hits, 2 * (64 + 64 + 128 + 128 + 128)) << "hits resume at snapshots";
    } else {
      EXPECT_GE(hits, 2 * (64 + 64 + 96 + 128 + 128 + 128)) << "every shared page was a hit";
    }
    EXPECT_EQ(engine->cache().usage().blocks_used, 0);
  }
}

// kivi2 in a pool too small for the batch (prompt admission): sequences are preempted while
// snapshots are being filled and copied, and recomputed from what of their pages and snapshots
// is still cached; every request still gets the tokens and log-probabilities it gets alone
// without the cache, bit for bit.
TEST(PrefixCacheCpuEngine, KiviHitsUnderPreemptionAndEvictionStayBitExact) {
  const nlohmann::json& prompts = testing::logits_fixture()["prompts"];
  const std::vector<int32_t> base = ids_of(prompts[4]["prompt_ids"]);
  const KvCacheConfig config = fixture_format("kivi2");
  std::vector<GenerationRequest> requests;
  for (size_t i = 0; i < 6; ++i) {
    std::vector<int32_t> prompt(base.begin(), base.begin() + 96 + 24 * (i % 3));
    const std::vector<int32_t> own = ids_of(prompts[i % 4]["prompt_ids"]);
    prompt.insert(prompt.end(), own.begin(), own.end());
    GenerationRequest r = request(prompt, 24);
    if (i % 2 == 1) r.sampling = SamplingParams{0.9f, 40, 0.95f, 1.0f, 7 + i};
    requests.push_back(r);
  }
  EngineOptions off;
  off.prefix_cache = false;
  std::vector<Generated> alone;
  for (const GenerationRequest& r : requests)
    alone.push_back(run(*cpu_engine(config, off), {r})[0]);

  EngineOptions on;
  on.admission = AdmissionPolicy::kPrompt;
  on.max_batch_tokens = 64;
  auto engine = cpu_engine(config, on, 30);
  int hits = 0, preemptions = 0;
  run(*engine, {request(std::vector<int32_t>(base.begin(), base.begin() + 160), 8)}, &hits);
  const std::vector<Generated> together = run(*engine, requests, &hits, &preemptions);
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_TRUE(together[i] == alone[i]) << "request " << i;
  }
  EXPECT_GT(preemptions, 0) << "the pool is meant to be too small";
  EXPECT_GT(hits, 0);
  EXPECT_EQ(engine->cache().usage().blocks_used, 0);
  EXPECT_EQ(engine->cache().num_free_blocks(), 30);
}

}  // namespace
}  // namespace kvserve
