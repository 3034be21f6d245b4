// The scheduler alone (plans driven by hand, tokens made up) and the engine over a stub backend
// that checks what every plan hands a backend: token budget, max_num_seqs, chunking, admission
// against the compressed pool, preemption order, cancellation, and that nothing can spin.
#include "engine/scheduler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/kv_cache_manager.h"
#include "tests/kv_test_models.h"

namespace kvserve {
namespace {

// The geometry of the test model ../shared/models/gpt2-tiny-docs (6 layers, 4 heads of 64).
ModelConfig tiny_model() {
  return testing::gpt2_geometry(6, 4, 256);
}

KvCacheConfig format(KvFormat f) {
  KvCacheConfig config;
  config.format = f;
  return config;
}

constexpr int32_t kToken = 7;  // what every step "samples": never end-of-text

GenerationRequest request(int prompt_tokens, int max_new_tokens) {
  GenerationRequest r;
  for (int i = 0; i < prompt_tokens; ++i) r.prompt.push_back(100 + i);
  r.max_new_tokens = max_new_tokens;
  r.ignore_eos = true;
  r.sampling.temperature = 0.0f;
  return r;
}

std::unique_ptr<Scheduler> make_scheduler(KvFormat f, int32_t blocks, SchedulerOptions options) {
  return std::make_unique<Scheduler>(
      tiny_model(), std::make_unique<KvCacheManager>(format(f), tiny_model(), blocks), options);
}

// Commits `plan` as if a backend had sampled kToken for every item that wants a token.
std::vector<StepEvent> commit(Scheduler& scheduler, const StepPlan& plan) {
  std::vector<StepEvent> events = plan.finished;
  std::vector<SampleResult> results(plan.items.size());
  for (SampleResult& r : results) r.token = {kToken, -1.0f};
  scheduler.update_from_output(plan, results, events);
  return events;
}

struct RunTotals {
  int steps = 0;
  int preemptions = 0;
  int recomputed_tokens = 0;
  size_t most_running = 0;
  std::map<RequestId, FinishReason> finish;
  std::map<RequestId, std::string> error;
  std::map<RequestId, int> tokens;
};

// Steps until no work is left; a step limit turns a livelock into a failure.
RunTotals run_to_end(Scheduler& scheduler, int step_limit = 20000) {
  RunTotals totals;
  while (scheduler.has_work()) {
    if (totals.steps++ >= step_limit) {
      ADD_FAILURE() << "still working after " << step_limit << " steps: the scheduler spins";
      break;
    }
    const StepPlan plan = scheduler.schedule();
    totals.preemptions += static_cast<int>(plan.preempted.size());
    totals.recomputed_tokens += plan.recomputed_tokens;
    totals.most_running = std::max(totals.most_running, scheduler.num_running());
    for (const StepEvent& e : commit(scheduler, plan)) {
      if (e.has_token) ++totals.tokens[e.request];
      if (e.finish != FinishReason::kNone) {
        totals.finish[e.request] = e.finish;
        totals.error[e.request] = e.error;
      }
    }
  }
  return totals;
}

// A backend that computes nothing and checks the plan's side of the contract: every item's block
// table covers its tokens, and no block is handed to two sequences in one step, except a page
// shared through the prefix cache, which lies wholly below the start of every item that holds it
// (read, never written).
class PlanCheckingBackend : public Backend {
 public:
  PlanCheckingBackend(int32_t num_blocks, const KvCacheConfig& config)
      : num_blocks_(num_blocks),
        config_(config),
        slots_per_block_(make_page_layout(config, tiny_model()).residual_tokens_per_block) {}
  std::string name() const override { return "plan-checking stub"; }
  void copy_blocks(const std::vector<BlockCopy>& copies) override {
    for (const BlockCopy& c : copies) {
      EXPECT_TRUE(c.src >= 0 && c.src < num_blocks_ && c.dst >= 0 && c.dst < num_blocks_);
      EXPECT_NE(c.src, c.dst);
    }
  }
  void forward(const std::vector<ForwardItem>&, std::vector<float>&) override {
    throw std::logic_error("the stub backend has no logits");
  }
  void forward_sample(const std::vector<ForwardItem>& items, const std::vector<SampleRequest>&,
                      std::vector<SampleResult>& results) override {
    std::set<int32_t> written, read, written_slots, residual_blocks;
    for (const ForwardItem& item : items) {
      EXPECT_GE(item.blocks.length, item.start + static_cast<int>(item.tokens.size()));
      const size_t read_only = paged_token_count(config_, item.start) / config_.page_tokens;
      for (size_t p = 0; p < item.blocks.pages.size; ++p) {
        const int32_t id = item.blocks.pages[p];
        EXPECT_TRUE(id >= 0 && id < num_blocks_) << id;
        if (p < read_only) {
          read.insert(id);
        } else {
          EXPECT_TRUE(written.insert(id).second) << "block " << id << " in two sequences";
        }
      }
      for (int32_t slot : item.blocks.residual_slots) {
        EXPECT_TRUE(slot >= 0 && slot / slots_per_block_ < num_blocks_) << slot;
        EXPECT_TRUE(written_slots.insert(slot).second) << "slot " << slot << " in two sequences";
        residual_blocks.insert(slot / slots_per_block_);
      }
    }
    for (int32_t id : written)
      EXPECT_EQ(read.count(id), 0u) << "block " << id << " read and written";
    for (int32_t id : residual_blocks) {
      EXPECT_EQ(read.count(id) + written.count(id), 0u) << "block " << id << " a page and residual";
    }
    results.assign(items.size(), SampleResult{});
    for (SampleResult& r : results) r.token = {kToken, -1.0f};
    ++steps_;
  }
  int steps() const { return steps_; }

 private:
  int32_t num_blocks_;
  KvCacheConfig config_;
  int32_t slots_per_block_;
  int steps_ = 0;
};

TEST(Scheduler, TokenBudgetChunksPromptsAndDecodesComeFirst) {
  SchedulerOptions options;
  options.max_batch_tokens = 100;
  auto s = make_scheduler(KvFormat::kKivi2, 1000, options);
  const RequestId a = s->add_request(request(60, 4));
  const RequestId b = s->add_request(request(60, 4));
  const RequestId c = s->add_request(request(60, 4));

  StepPlan first = s->schedule();
  ASSERT_EQ(first.items.size(), 2u);
  EXPECT_EQ(first.admitted, (std::vector<RequestId>{a, b}));
  EXPECT_EQ(first.items[0].sequence_id, a);
  EXPECT_EQ(first.items[0].tokens.size(), 60u);
  EXPECT_EQ(first.items[1].sequence_id, b);
  EXPECT_EQ(first.items[1].start, 0);
  EXPECT_EQ(first.items[1].tokens.size(), 40u) << "b's prompt is cut at the budget";
  EXPECT_EQ(first.prefill_tokens, 100);
  EXPECT_NE(first.samples[0].params, nullptr) << "a's prompt is complete: it samples";
  EXPECT_EQ(first.samples[1].params, nullptr) << "b's chunk does not end its prompt";
  commit(*s, first);

  StepPlan second = s->schedule();
  ASSERT_EQ(second.items.size(), 3u);
  EXPECT_EQ(second.decode_tokens, 1);
  EXPECT_EQ(second.items[0].sequence_id, a);
  EXPECT_EQ(second.items[0].start, 60);
  EXPECT_EQ(second.items[0].tokens, std::vector<int32_t>{kToken});
  EXPECT_EQ(second.items[1].sequence_id, b);
  EXPECT_EQ(second.items[1].start, 40);
  EXPECT_EQ(second.items[1].tokens.size(), 20u);
  EXPECT_EQ(second.items[2].sequence_id, c);
  EXPECT_EQ(second.items[2].tokens.size(), 60u);
  EXPECT_EQ(second.prefill_tokens, 80);
  int tokens = 0;
  for (const ForwardItem& item : second.items) tokens += static_cast<int>(item.tokens.size());
  EXPECT_LE(tokens, options.max_batch_tokens);
}

TEST(Scheduler, PlanCarriesPositionsAndTheCacheBlockTables) {
  SchedulerOptions options;
  options.max_batch_tokens = 50;
  auto s = make_scheduler(KvFormat::kKivi2, 1000, options);
  s->add_request(request(130, 3));
  for (int start : {0, 50, 100}) {
    const StepPlan plan = s->schedule();
    ASSERT_EQ(plan.items.size(), 1u);
    const ForwardItem& item = plan.items[0];
    EXPECT_EQ(item.start, start);
    EXPECT_EQ(item.tokens.front(), 100 + start) << "the prompt's own ids, from `start` on";
    const SequenceCache& held = s->cache().sequence(item.sequence_id);
    EXPECT_EQ(item.blocks.length, start + static_cast<int>(item.tokens.size()));
    EXPECT_EQ(std::vector<int32_t>(item.blocks.pages.begin(), item.blocks.pages.end()), held.pages);
    EXPECT_EQ(
        std::vector<int32_t>(item.blocks.residual_slots.begin(), item.blocks.residual_slots.end()),
        held.residual_slots);
    commit(*s, plan);
  }
}

TEST(Scheduler, MaxNumSeqsBoundsTheRunningSet) {
  SchedulerOptions options;
  options.max_num_seqs = 2;
  auto s = make_scheduler(KvFormat::kKivi2, 1000, options);
  std::vector<RequestId> ids;
  for (int i = 0; i < 3; ++i) ids.push_back(s->add_request(request(10, 2)));
  StepPlan plan = s->schedule();
  EXPECT_EQ(plan.admitted, (std::vector<RequestId>{ids[0], ids[1]}));
  EXPECT_EQ(s->num_running(), 2u);
  EXPECT_EQ(s->num_waiting(), 1u);
  commit(*s, plan);
  plan = s->schedule();  // both decode their second (last) token
  EXPECT_TRUE(plan.admitted.empty());
  commit(*s, plan);
  plan = s->schedule();
  EXPECT_EQ(plan.admitted, std::vector<RequestId>{ids[2]});
  const RunTotals rest = run_to_end(*s);
  EXPECT_LE(rest.most_running, 2u);
}

// The pool is counted in compressed blocks: the same bytes admit as many final-length sequences
// as their peak blocks allow in each format (more for kivi2 than for fp16), and never more.
TEST(Scheduler, AdmitsWhatTheCompressedPoolHoldsAtFinalLength) {
  const int prompt = 200, new_tokens = 300;
  std::map<KvFormat, size_t> admitted;
  for (KvFormat f : {KvFormat::kFp16, KvFormat::kKivi2}) {
    SCOPED_TRACE(to_string(f));
    const int32_t blocks =
        KvCacheManager::blocks_in_budget(int64_t{8} << 20, format(f), tiny_model());
    SchedulerOptions options;
    options.max_batch_tokens = 100000;
    // The prompts are identical: with the prefix cache more fp16 sequences would fit
    // (tests/prefix_cache_test.cc counts that); this counts the pool alone.
    options.prefix_cache = false;
    auto s = make_scheduler(f, blocks, options);
    // Each sequence's peak pages, and the residual blocks that all their peak residual slots
    // fill together (slots share blocks).
    const KvCacheManager& cache = s->cache();
    const int64_t pages = cache.peak_pages(prompt + new_tokens - 1);
    const int64_t slots = cache.peak_residual_slots(prompt + new_tokens - 1);
    const int64_t c = std::max(1, cache.residual_slots_per_block());
    auto reserve = [&](int64_t n) { return n * pages + (n * slots + c - 1) / c; };
    size_t fits = 0;
    while (reserve(fits + 1) <= blocks) ++fits;
    ASSERT_GE(fits, 2u);
    for (size_t i = 0; i < fits + 3; ++i) s->add_request(request(prompt, new_tokens));
    const StepPlan first = s->schedule();
    EXPECT_EQ(first.admitted.size(), fits) << blocks << " blocks";
    EXPECT_EQ(s->reserved_blocks(), reserve(fits));
    admitted[f] = first.admitted.size();
    commit(*s, first);
    const RunTotals totals = run_to_end(*s);
    EXPECT_EQ(totals.preemptions, 0);
    EXPECT_LE(totals.most_running, fits);
    EXPECT_EQ(totals.finish.size(), fits + 3);
    for (const auto& [id, reason] : totals.finish) EXPECT_EQ(reason, FinishReason::kLength) << id;
    EXPECT_EQ(s->cache().num_free_blocks(), blocks);
    EXPECT_EQ(s->reserved_blocks(), 0);
  }
  EXPECT_GE(admitted[KvFormat::kKivi2], 3 * admitted[KvFormat::kFp16]);
}

// kPrompt admits on the prompt alone, so growth must preempt: the newest running sequence goes
// first, back to the front of the queue in arrival order; no admission in that step; every request
// still gets all its tokens.
TEST(Scheduler, PromptAdmissionPreemptsTheNewestFirst) {
  SchedulerOptions options;
  options.admission = AdmissionPolicy::kPrompt;
  auto s = make_scheduler(KvFormat::kFp16, 10, options);  // pages of 32 tokens
  std::vector<RequestId> ids;
  for (int i = 0; i < 6; ++i) ids.push_back(s->add_request(request(64, 100)));
  std::map<RequestId, int> tokens;
  auto count = [&](const std::vector<StepEvent>& events) {
    for (const StepEvent& e : events) tokens[e.request] += e.has_token;
  };
  StepPlan plan = s->schedule();
  ASSERT_EQ(plan.admitted.size(), 5u) << "five prompts of 2 pages fill the 10 blocks";
  count(commit(*s, plan));
  // At 65 tokens every sequence needs a third page and none is free: the first preempts the
  // newest (2 pages back), which serve it and the second; the third preempts the next newest.
  plan = s->schedule();
  EXPECT_EQ(plan.preempted, (std::vector<RequestId>{ids[4], ids[3]})) << "newest first";
  EXPECT_TRUE(plan.admitted.empty()) << "no admission in a step that preempted";
  ASSERT_EQ(plan.items.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(plan.items[i].sequence_id, ids[i]);
  count(commit(*s, plan));
  EXPECT_EQ(s->num_waiting(), 3u);
  // Once the pool is free again the victims come back first, in arrival order, before ids[5].
  for (size_t i = 0; i < 3; ++i) s->cancel(ids[i]);
  plan = s->schedule();
  EXPECT_EQ(plan.finished.size(), 3u);
  EXPECT_EQ(plan.admitted, (std::vector<RequestId>{ids[3], ids[4], ids[5]}));
  count(commit(*s, plan));
  const RunTotals totals = run_to_end(*s);
  EXPECT_GT(totals.preemptions, 0) << "three sequences of 6 pages share 10 blocks";
  for (const auto& [id, n] : totals.tokens) tokens[id] += n;
  for (size_t i = 3; i < ids.size(); ++i) {
    EXPECT_EQ(totals.finish.at(ids[i]), FinishReason::kLength) << "request " << ids[i];
    EXPECT_EQ(tokens[ids[i]], 100) << "request " << ids[i];
  }
  EXPECT_EQ(s->cache().num_free_blocks(), 10);
}

// What a preemption throws away is counted when it is computed again.
TEST(Scheduler, CountsRecomputedTokens) {
  SchedulerOptions options;
  options.admission = AdmissionPolicy::kPrompt;
  options.prefix_cache = false;  // with it, b's recomputation would start on its cached pages
  auto s = make_scheduler(KvFormat::kFp16, 4, options);
  s->add_request(request(64, 40));
  const RequestId b = s->add_request(request(64, 40));
  commit(*s, s->schedule());      // both prompts: 4 blocks
  StepPlan plan = s->schedule();  // the first needs a third page: b goes
  ASSERT_EQ(plan.preempted, std::vector<RequestId>{b});
  EXPECT_EQ(plan.recomputed_tokens, 0);
  commit(*s, plan);
  int recomputed = 0;
  while (s->has_work()) {
    plan = s->schedule();
    if (!plan.admitted.empty()) {
      EXPECT_EQ(plan.admitted, std::vector<RequestId>{b});
      EXPECT_EQ(plan.items.back().tokens.size(), 65u) << "prompt + its one generated token";
    }
    recomputed += plan.recomputed_tokens;
    commit(*s, plan);
  }
  EXPECT_EQ(recomputed, 64) << "b's 64 prompt tokens were in the cache when it was preempted";
}

TEST(Scheduler, CancellationFreesBlocksAtTheNextStep) {
  auto s = make_scheduler(KvFormat::kKivi2, 1000, SchedulerOptions{});
  const RequestId running = s->add_request(request(100, 50));
  commit(*s, s->schedule());
  const RequestId waiting = s->add_request(request(10, 5));
  EXPECT_GT(s->cache().num_free_blocks(), 0);
  const int32_t free_before = s->cache().num_free_blocks();
  s->cancel(running);
  s->cancel(waiting);
  EXPECT_EQ(s->cache().num_free_blocks(), free_before) << "nothing moves before the step";
  const StepPlan plan = s->schedule();
  ASSERT_EQ(plan.finished.size(), 2u);
  EXPECT_EQ(plan.finished[0].request, running);
  EXPECT_EQ(plan.finished[0].finish, FinishReason::kCancelled);
  EXPECT_EQ(plan.finished[1].request, waiting);
  EXPECT_TRUE(plan.items.empty());
  EXPECT_EQ(s->cache().num_free_blocks(), 1000);
  EXPECT_EQ(s->reserved_blocks(), 0);
  commit(*s, plan);
  EXPECT_FALSE(s->has_work());
}

// Issue 13, item 2: a request that can never fit must end with an error, not spin. Validation is
// bypassed here (the scheduler alone); both policies end it.
TEST(Scheduler, ARequestThatCanNeverFitEndsWithAnErrorUnderEitherPolicy) {
  for (AdmissionPolicy policy : {AdmissionPolicy::kReserveFinalLength, AdmissionPolicy::kPrompt}) {
    SCOPED_TRACE(to_string(policy));
    SchedulerOptions options;
    options.admission = policy;
    auto s = make_scheduler(KvFormat::kKivi2, 28, options);
    const RequestId id = s->add_request(request(1, 739));
    const RunTotals totals = run_to_end(*s, 2000);
    ASSERT_EQ(totals.finish.count(id), 1u);
    EXPECT_EQ(totals.finish.at(id), FinishReason::kError);
    EXPECT_NE(totals.error.at(id).find("KV pool (28 blocks)"), std::string::npos)
        << totals.error.at(id);
    EXPECT_EQ(s->cache().num_free_blocks(), 28);
  }
}

// Residual slots share blocks across sequences (engine/residual_slots.h), and admission reserves
// the blocks that the running sequences' peak slots fill together: with requests of many lengths
// arriving while others end, no sequence is ever preempted and every request ends at its length.
TEST(Scheduler, SharedResidualSlotsNeverPreemptUnderReservedAdmission) {
  SchedulerOptions options;
  options.prefix_cache = false;
  options.max_batch_tokens = 256;
  const int32_t blocks = 120;
  auto s = make_scheduler(KvFormat::kKivi2, blocks, options);
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> prompt(1, 300), fresh(1, 200);
  const int requests = 300;
  int added = 0, ended = 0, steps = 0;
  while (added < requests || s->has_work()) {
    ASSERT_LT(steps++, 50000) << "the scheduler spins";
    if (added < requests && rng() % 3 == 0) {
      s->add_request(request(prompt(rng), fresh(rng)));
      ++added;
    }
    const StepPlan plan = s->schedule();
    ASSERT_TRUE(plan.preempted.empty()) << "step " << steps;
    ASSERT_LE(s->reserved_blocks(), blocks);
    ASSERT_LE(s->cache().usage().blocks_used, blocks);
    for (const StepEvent& e : commit(*s, plan)) {
      if (e.finish == FinishReason::kNone) continue;
      EXPECT_EQ(e.finish, FinishReason::kLength) << e.error;
      ++ended;
    }
  }
  EXPECT_EQ(ended, requests);
  EXPECT_EQ(s->cache().residual_blocks_in_use(), 0);
  EXPECT_EQ(s->cache().num_free_blocks(), blocks);
}

std::unique_ptr<Engine> stub_engine(KvFormat f, int32_t blocks, EngineOptions options = {}) {
  return std::make_unique<Engine>(
      tiny_model(), std::make_unique<KvCacheManager>(format(f), tiny_model(), blocks),
      std::make_unique<PlanCheckingBackend>(blocks, format(f)), options);
}

// Issue 13, item 2, as reported: --kv-pool-mb 1 (28 kivi2 blocks of the test model) accepted
// prompt [464] + 739 new tokens (blocks_needed(740) = 28), then could not grow past 604 tokens
// (17 pages + the 61-token residual's 12 blocks = 29) and preempted itself forever. Its cache
// holds up to 739 tokens, 34 blocks at the last flush.
TEST(EngineValidation, RejectsARequestWhoseResidualPeakExceedsThePool) {
  const int32_t blocks =
      KvCacheManager::blocks_in_budget(int64_t{1} << 20, format(KvFormat::kKivi2), tiny_model());
  ASSERT_EQ(blocks, 28);
  auto engine = stub_engine(KvFormat::kKivi2, blocks);
  GenerationRequest r = request(1, 739);
  r.prompt = {464};
  const absl::Status status = engine->validate(r);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  const std::string problem(status.message());
  EXPECT_NE(problem.find("--kv-pool-mb"), std::string::npos) << problem;
  EXPECT_THROW(engine->add_request(r), std::invalid_argument);
}

// Validation uses the pool's own arithmetic, exactly: whatever the most tokens a request caches
// (prompt 1 + `cached` new tokens: the last one sampled is never cached), a request that passes
// finishes alone without preemption, and one block less makes the same request fail.
TEST(EngineValidation, AcceptsExactlyWhatCanFinishAlone) {
  for (KvFormat f : {KvFormat::kFp16, KvFormat::kInt8, KvFormat::kKivi4, KvFormat::kKivi2}) {
    for (int cached :
         {1, 12, 13, 31, 32, 33, 63, 64, 65, 66, 75, 76, 96, 97, 128, 605, 739, 1023}) {
      SCOPED_TRACE(to_string(f) + ", " + std::to_string(cached) + " tokens cached");
      const KvCacheManager probe(format(f), tiny_model(), 1);
      const int32_t peak = probe.peak_blocks(cached);
      const GenerationRequest r = request(1, cached);
      ASSERT_EQ(max_cached_tokens(r), cached);
      const int final_length = cached + 1;

      auto engine = stub_engine(f, peak);
      ASSERT_TRUE(engine->validate(r).ok()) << engine->validate(r);
      engine->add_request(r);
      std::vector<StepEvent> events;
      int preemptions = 0, tokens = 0;
      FinishReason finish = FinishReason::kNone;
      for (int step = 0; engine->has_work() && step < 2 * final_length; ++step) {
        events.clear();
        preemptions += engine->step(events).preemptions;
        for (const StepEvent& e : events) {
          tokens += e.has_token;
          if (e.finish != FinishReason::kNone) finish = e.finish;
        }
      }
      EXPECT_EQ(finish, FinishReason::kLength);
      EXPECT_EQ(tokens, final_length - 1);
      EXPECT_EQ(preemptions, 0);

      EXPECT_FALSE(stub_engine(f, peak - 1)->validate(r).ok());
      // Past validation (the scheduler alone), one block less cannot finish it: peak is tight.
      SchedulerOptions options;
      options.admission = AdmissionPolicy::kPrompt;
      auto short_pool = make_scheduler(f, peak - 1, options);
      const RequestId id = short_pool->add_request(r);
      const RunTotals totals = run_to_end(*short_pool, 4 * final_length);
      EXPECT_EQ(totals.finish.at(id), FinishReason::kError);
    }
  }
}

// The engine over the stub: many requests through a pool that holds a few at final length; the
// plans hand out disjoint, sufficient block tables (checked by the backend), nothing is
// preempted and every request completes.
TEST(EngineWithStubBackend, FinalLengthAdmissionServesALoadWithoutPreemption) {
  const int32_t blocks = 64;
  EngineOptions options;
  options.max_batch_tokens = 256;
  auto engine = stub_engine(KvFormat::kKivi2, blocks, options);
  EXPECT_EQ(engine->options().max_batch_tokens, 256);
  std::map<RequestId, int> tokens;
  for (int i = 0; i < 40; ++i) tokens[engine->add_request(request(20 + 13 * (i % 7), 40 + i))] = 0;
  std::vector<StepEvent> events;
  int preemptions = 0, finished = 0;
  size_t most_running = 0;
  for (int step = 0; engine->has_work() && step < 10000; ++step) {
    events.clear();
    const StepStats stats = engine->step(events);
    preemptions += stats.preemptions;
    EXPECT_LE(stats.decode_tokens + stats.prefill_tokens, 256);
    EXPECT_LE(engine->cache().usage().blocks_used, blocks);
    most_running = std::max(most_running, engine->num_running());
    for (const StepEvent& e : events) {
      tokens[e.request] += e.has_token;
      if (e.finish != FinishReason::kNone) {
        EXPECT_EQ(e.finish, FinishReason::kLength) << e.error;
        ++finished;
      }
    }
  }
  EXPECT_FALSE(engine->has_work());
  EXPECT_EQ(finished, 40);
  EXPECT_EQ(preemptions, 0);
  EXPECT_GT(most_running, 1u);
  int i = 0;
  for (const auto& [id, count] : tokens) EXPECT_EQ(count, 40 + i++) << "request " << id;
  EXPECT_EQ(engine->cache().num_free_blocks(), blocks);
}

TEST(EngineWithStubBackend, TokenBudgetDefaultsToTheBackendsPreference) {
  auto engine = stub_engine(KvFormat::kKivi2, 100);
  EXPECT_EQ(engine->options().max_batch_tokens, Backend::kDefaultBatchTokens);
  EngineOptions options;
  options.max_batch_tokens = -1;
  EXPECT_THROW(stub_engine(KvFormat::kKivi2, 100, options), std::invalid_argument);
}

TEST(AdmissionPolicy, NamesRoundTrip) {
  for (AdmissionPolicy p : {AdmissionPolicy::kReserveFinalLength, AdmissionPolicy::kPrompt}) {
    EXPECT_EQ(parse_admission_policy(to_string(p)), p);
  }
  EXPECT_THROW(parse_admission_policy("greedy"), std::invalid_argument);
}

}  // namespace
}  // namespace kvserve
