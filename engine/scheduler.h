// Continuous batching, without the model: which sequences run in a step and with which tokens.
//
// The engine's step is schedule() -> the backend runs the plan -> update_from_output() (vLLM's
// schedule() -> SchedulerOutput -> update_from_output). The scheduler owns the requests, their
// queues and the KV cache bookkeeping (KvCacheManager); a StepPlan hands the backend each item's
// tokens, positions and block table, so no backend ever sees the allocator.
//
// One step (schedule()):
//   1. cancelled requests leave, their blocks return to the pool;
//   2. every running sequence whose prompt is in the cache decodes one token;
//   3. prompt chunks fill the rest of the token budget: sequences already prefilling first, then
//      waiting requests in arrival order, while admission allows (no admission in a step that
//      had to preempt).
// A running sequence that cannot grow preempts the newest running sequence without an item in the
// plan (it may be itself): its blocks are freed and its tokens recomputed later. A sequence that
// cannot grow while it is the only one running can never grow: it ends with kError, and the
// scheduler never spins.
//
// Admission (SchedulerOptions::admission):
//   kReserveFinalLength (default): a request is admitted only while the peak pages of every
//     running sequence at its final length (max_cached_tokens, KvCacheManager::peak_pages) and
//     the blocks their peak residual slots fill together (residual_blocks_reserved: slots share
//     blocks) fit in the pool with its own. Admitted sequences then always grow: no preemption.
//   kPrompt: admitted while the free blocks hold the prompt (vLLM's rule); growth preempts.
// Both count a page shared through the prefix cache once: a sequence that starts on cached pages
// (KvCacheManager::match_prefix) reserves only the blocks it allocates itself, and the distinct
// pages that running sequences hold as hits are reserved once, whoever allocated them.
//
// Prefix caching (SchedulerOptions::prefix_cache): an admitted sequence starts on the longest
// chain of cached full pages its tokens match, and its first chunk computes only the rest. A
// sequence's full pages get their hash when the step that completed them is committed; a
// preempted sequence's cached pages stay cached, so its recomputation starts on them. KIVI: each
// prompt's prefill ends chunks at its snapshot points (KvCacheManager::snapshot_points), and once
// such a step is committed the sequence's residual is copied into a snapshot that later sequences
// start from; the plan carries the copies (StepPlan::block_copies).
//
// Single-threaded, like the engine that owns it.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/backend.h"
#include "engine/kv_cache_manager.h"
#include "engine/model_config.h"
#include "engine/sampler.h"

namespace kvserve {

using RequestId = int64_t;

struct GenerationRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int max_new_tokens = 16;
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids;
};

// The most tokens whose keys and values a request ever has in the cache: prompt + max_new_tokens
// - 1, as the last token it samples is never fed back. Validation and admission count this.
int max_cached_tokens(const GenerationRequest& request);

enum class FinishReason { kNone, kLength, kEos, kStop, kCancelled, kError };
std::string to_string(FinishReason reason);

// One event of a step for one request: a new token, and/or the end of the request.
struct StepEvent {
  RequestId request = 0;
  bool has_token = false;
  int32_t token = 0;
  float logprob = 0.0f;
  FinishReason finish = FinishReason::kNone;
  std::string error;  // for kError: what went wrong
};

enum class AdmissionPolicy { kReserveFinalLength, kPrompt };
std::string to_string(AdmissionPolicy policy);
// "final-length" or "prompt"; throws std::invalid_argument otherwise.
AdmissionPolicy parse_admission_policy(const std::string& name);

struct SchedulerOptions {
  int max_num_seqs = 256;       // running sequences at most
  int max_batch_tokens = 2048;  // tokens per step (decodes + prefill chunks), >= 1
  AdmissionPolicy admission = AdmissionPolicy::kReserveFinalLength;
  // Share full pages between sequences with the same prefix (KIVI: with residual snapshots).
  bool prefix_cache = true;
};

// What one step runs, and what scheduling it changed.
struct StepPlan {
  // Decodes first (admission order), then prompt chunks. Each item's blocks view the cache
  // manager's tables as grown for this step.
  std::vector<ForwardItem> items;
  // One per item: where the prompt is complete after this step, how to pick its next token
  // (pointers into the scheduler's sequences, valid until update_from_output); else params null.
  std::vector<SampleRequest> samples;
  // Requests that entered the batch in this step (after preemption too): the server's queue time
  // ends at a request's first admission.
  std::vector<RequestId> admitted;
  std::vector<RequestId> preempted;  // in the order they were preempted
  // Requests that ended before the forward (cancelled, or unable to grow): their final events.
  std::vector<StepEvent> finished;
  int decode_tokens = 0;
  int prefill_tokens = 0;
  int recomputed_tokens = 0;  // prefill tokens that a preemption had thrown away
  // Prefix cache lookups of the step's admissions (vLLM's prefix_cache_queries/hits): tokens
  // looked up, and of those the tokens found in cached pages (not computed).
  int prefix_cache_queries = 0;
  int prefix_cache_hits = 0;
  // Copies inside the pool that run, in order, before the forward (KIVI residual snapshots:
  // KvCacheManager::take_block_copies). A plan without items may carry some.
  std::vector<BlockCopy> block_copies;
};

class Scheduler {
 public:
  Scheduler(const ModelConfig& model, std::unique_ptr<KvCacheManager> cache,
            SchedulerOptions options);

  // Queues a request (the engine has validated it) in arrival order; returns its id.
  RequestId add_request(GenerationRequest request);
  // Marks a request cancelled; it leaves the batch (blocks freed) at the next schedule().
  void cancel(RequestId id);

  StepPlan schedule();
  // Commits a step the backend ran: tokens computed, `results` (one per plan item) sampled,
  // requests that ended (length, EOS, stop token, sampling error) freed. Appends the step's token
  // and final events to `events`. Also for a plan without items (results empty).
  void update_from_output(const StepPlan& plan, const std::vector<SampleResult>& results,
                          std::vector<StepEvent>& events);
  // The backend failed the step: its requests end with kError and `error`.
  void fail_step(const StepPlan& plan, const std::string& error, std::vector<StepEvent>& events);
  // Ends every request held (planned, running or waiting) with kError and `error`, in arrival
  // order; the cache is left empty.
  void fail_all(const std::string& error, std::vector<StepEvent>& events);

  bool has_work() const { return !waiting_.empty() || !running_.empty(); }
  size_t num_waiting() const { return waiting_.size(); }
  size_t num_running() const { return running_.size(); }
  const KvCacheManager& cache() const { return *cache_; }
  const SchedulerOptions& options() const { return options_; }
  // Blocks the running sequences may still need at most (kReserveFinalLength counts these): the
  // pages each allocates itself, the pages they share through the prefix cache, once, and the
  // residual blocks that their residual slots may fill together; with more_pages and
  // more_residual_slots, as if a sequence that needs those were running too.
  int64_t reserved_blocks(int64_t more_pages = 0, int64_t more_residual_slots = 0) const;

 private:
  struct Sequence {
    RequestId id = 0;
    GenerationRequest request;
    std::vector<int32_t> tokens;         // prompt followed by generated tokens
    int computed = 0;                    // tokens whose keys/values are in the cache
    int computed_before_preemption = 0;  // the most ever computed: recomputation below this
    int generated = 0;
    // KvCacheManager::peak_pages and peak_residual_slots of max_cached_tokens
    int32_t peak_pages = 0;
    int32_t peak_residual_slots = 0;
    int32_t hit_pages = 0;  // pages it started on from the prefix cache (not its to allocate)
    // KIVI: where its prefill ends chunks for residual snapshots (KvCacheManager::snapshot_points)
    std::vector<int> snapshot_points;
    bool cancelled = false;
    bool in_cache = false;
    bool planned = false;  // has an item in the plan being built
  };

  // Ends a request: frees its blocks, takes it out of the queues and records its final event
  // (merged into its token event of this step when there is one).
  void finish(Sequence& seq, FinishReason reason, std::vector<StepEvent>& events,
              const std::string& error = "");
  // Grows `seq` to `length` tokens for this step, preempting the newest unplanned running
  // sequences while the pool is short. False when `seq` itself was preempted or had to end.
  bool grow_or_preempt(Sequence& seq, int length, StepPlan& plan);
  void preempt(Sequence& seq, StepPlan& plan);
  bool can_admit(const Sequence& seq, const PrefixMatch& match) const;
  // Takes an admitted sequence's reservation back (it finished or was preempted).
  void release_reservation(const Sequence& seq);
  // Plans `seq`'s next prompt chunk within `budget`; false (nothing planned) when the pool cannot
  // hold it. A running sequence may preempt for it, one being admitted may not.
  bool plan_chunk(Sequence& seq, bool admitting, int& budget, StepPlan& plan);
  void add_item(Sequence& seq, int count, StepPlan& plan);
  FinishReason stop_reason(const Sequence& seq, int32_t token) const;

  ModelConfig model_;
  std::unique_ptr<KvCacheManager> cache_;
  SchedulerOptions options_;
  RequestId next_id_ = 1;
  std::unordered_map<RequestId, Sequence> sequences_;
  std::deque<RequestId> waiting_;   // FCFS; preempted sequences go back to the front
  std::vector<RequestId> running_;  // admission order: the newest is preempted first
  // Sums over running sequences of peak_pages - hit_pages (the pages each allocates itself) and
  // of peak_residual_slots.
  int64_t reserved_pages_ = 0;
  int64_t reserved_residual_slots_ = 0;
};

}  // namespace kvserve
