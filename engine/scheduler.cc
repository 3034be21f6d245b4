#include "engine/scheduler.h"

#include <algorithm>
#include <stdexcept>

namespace kvserve {

std::string to_string(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kError:
      return "error";
  }
  return "unknown";
}

int max_cached_tokens(const GenerationRequest& request) {
  return static_cast<int>(request.prompt.size()) + request.max_new_tokens - 1;
}

std::string to_string(AdmissionPolicy policy) {
  switch (policy) {
    case AdmissionPolicy::kReserveFinalLength:
      return "final-length";
    case AdmissionPolicy::kPrompt:
      return "prompt";
  }
  return "unknown";
}

AdmissionPolicy parse_admission_policy(const std::string& name) {
  for (AdmissionPolicy p : {AdmissionPolicy::kReserveFinalLength, AdmissionPolicy::kPrompt}) {
    if (to_string(p) == name) return p;
  }
  throw std::invalid_argument("unknown admission policy '" + name +
                              "' (use final-length or prompt)");
}

Scheduler::Scheduler(const ModelConfig& model, std::unique_ptr<KvCacheManager> cache,
                     SchedulerOptions options)
    : model_(model), cache_(std::move(cache)), options_(options) {
  if (!cache_) throw std::invalid_argument("scheduler: no KV cache manager");
  cache_->set_prefix_cache(options_.prefix_cache);
  if (options_.max_num_seqs < 1 || options_.max_batch_tokens < 1) {
    throw std::invalid_argument("scheduler: max_num_seqs and max_batch_tokens must be >= 1");
  }
}

RequestId Scheduler::add_request(GenerationRequest request) {
  const RequestId id = next_id_++;
  Sequence seq;
  seq.id = id;
  seq.tokens = request.prompt;
  seq.peak_pages = cache_->peak_pages(max_cached_tokens(request));
  seq.peak_residual_slots = cache_->peak_residual_slots(max_cached_tokens(request));
  seq.request = std::move(request);
  sequences_.emplace(id, std::move(seq));
  waiting_.push_back(id);
  return id;
}

void Scheduler::cancel(RequestId id) {
  auto it = sequences_.find(id);
  if (it != sequences_.end()) it->second.cancelled = true;
}

void Scheduler::finish(Sequence& seq, FinishReason reason, std::vector<StepEvent>& events,
                       const std::string& error) {
  if (seq.in_cache) {
    cache_->remove_sequence(seq.id);
    release_reservation(seq);
  }
  running_.erase(std::remove(running_.begin(), running_.end(), seq.id), running_.end());
  waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), seq.id), waiting_.end());
  if (!events.empty() && events.back().request == seq.id && events.back().has_token) {
    events.back().finish = reason;
  } else {
    StepEvent event;
    event.request = seq.id;
    event.finish = reason;
    events.push_back(event);
  }
  events.back().error = error;
  sequences_.erase(seq.id);
}

void Scheduler::preempt(Sequence& seq, StepPlan& plan) {
  cache_->remove_sequence(seq.id);
  release_reservation(seq);
  seq.hit_pages = 0;
  seq.in_cache = false;
  seq.computed_before_preemption = std::max(seq.computed_before_preemption, seq.computed);
  seq.computed = 0;
  running_.erase(std::find(running_.begin(), running_.end(), seq.id));
  waiting_.push_front(seq.id);
  plan.preempted.push_back(seq.id);
}

bool Scheduler::grow_or_preempt(Sequence& seq, int length, StepPlan& plan) {
  while (!cache_->grow(seq.id, length)) {
    // The newest running sequence without an item in the plan; `seq` itself qualifies.
    Sequence* victim = nullptr;
    for (auto it = running_.rbegin(); it != running_.rend() && victim == nullptr; ++it) {
      Sequence& candidate = sequences_.at(*it);
      if (!candidate.planned) victim = &candidate;
    }
    if (victim == nullptr) throw std::logic_error("scheduler: grow of a sequence not running");
    if (victim == &seq && running_.size() == 1) {
      // Nothing else holds a block: waiting would change nothing, ever.
      finish(seq, FinishReason::kError, plan.finished,
             "the KV pool (" + std::to_string(cache_->num_blocks()) + " blocks) cannot hold " +
                 std::to_string(length) + " tokens of this request even alone");
      return false;
    }
    preempt(*victim, plan);
    if (victim == &seq) return false;
  }
  return true;
}

int64_t Scheduler::reserved_blocks(int64_t more_pages, int64_t more_residual_slots) const {
  return reserved_pages_ + more_pages + cache_->hit_pages_in_use() +
         cache_->residual_blocks_reserved(reserved_residual_slots_ + more_residual_slots);
}

void Scheduler::release_reservation(const Sequence& seq) {
  reserved_pages_ -= seq.peak_pages - seq.hit_pages;
  reserved_residual_slots_ -= seq.peak_residual_slots;
}

bool Scheduler::can_admit(const Sequence& seq, const PrefixMatch& match) const {
  // Its own pages, the shared pages that no running sequence holds as a hit yet, and its residual
  // slots together with everyone else's (slots share blocks).
  const int64_t own_pages = seq.peak_pages - static_cast<int64_t>(match.pages.size());
  const int64_t reserved = reserved_blocks(own_pages + match.newly_shared, seq.peak_residual_slots);
  if (options_.admission == AdmissionPolicy::kReserveFinalLength &&
      reserved > cache_->num_blocks()) {
    return false;
  }
  return cache_->can_admit(static_cast<int>(seq.tokens.size()), match);
}

void Scheduler::add_item(Sequence& seq, int count, StepPlan& plan) {
  ForwardItem item;
  item.sequence_id = seq.id;
  item.start = seq.computed;
  item.tokens.assign(seq.tokens.begin() + seq.computed, seq.tokens.begin() + seq.computed + count);
  plan.items.push_back(std::move(item));
  seq.planned = true;
}

bool Scheduler::plan_chunk(Sequence& seq, bool admitting, int& budget, StepPlan& plan) {
  int chunk = std::min<int>(budget, static_cast<int>(seq.tokens.size()) - seq.computed);
  if (chunk <= 0) return false;
  // KIVI: a chunk ends at each snapshot point, so that the residual is the snapshot's there.
  for (int point : seq.snapshot_points) {
    if (seq.computed < point && seq.computed + chunk > point) chunk = point - seq.computed;
  }
  const int end = seq.computed + chunk;
  // A running sequence may preempt others for its chunk; an admission only takes free blocks.
  if (!(admitting ? cache_->grow(seq.id, end) : grow_or_preempt(seq, end, plan))) return false;
  plan.recomputed_tokens +=
      std::max(0, std::min(end, seq.computed_before_preemption) - seq.computed);
  plan.prefill_tokens += chunk;
  budget -= chunk;
  add_item(seq, chunk, plan);
  return true;
}

StepPlan Scheduler::schedule() {
  StepPlan plan;
  std::vector<RequestId> cancelled;
  for (const auto& [id, seq] : sequences_) {
    if (seq.cancelled) cancelled.push_back(id);
  }
  std::sort(cancelled.begin(), cancelled.end());  // arrival order
  for (RequestId id : cancelled) finish(sequences_.at(id), FinishReason::kCancelled, plan.finished);

  // Decodes first: every running sequence whose prompt is in the cache feeds its newest token.
  // Victims of preemption come from the back of running_, which this loop has not reached.
  for (size_t i = 0; i < running_.size(); ++i) {
    Sequence& seq = sequences_.at(running_[i]);
    if (static_cast<int>(seq.tokens.size()) - seq.computed != 1) continue;
    // When `seq` could not grow, it and everything after it have left running_.
    if (!grow_or_preempt(seq, seq.computed + 1, plan)) break;
    add_item(seq, 1, plan);
  }
  plan.decode_tokens = static_cast<int>(plan.items.size());
  int budget = options_.max_batch_tokens - plan.decode_tokens;

  // Then prompt chunks: sequences already prefilling, then admissions in arrival order.
  const std::vector<RequestId> prefilling = running_;
  for (RequestId id : prefilling) {
    if (budget <= 0) break;
    auto it = sequences_.find(id);
    if (it == sequences_.end() || !it->second.in_cache || it->second.planned) continue;
    if (static_cast<int>(it->second.tokens.size()) - it->second.computed > 1) {
      plan_chunk(it->second, /*admitting=*/false, budget, plan);
    }
  }
  // No admissions in a step that had to preempt: the pool is already too full.
  while (budget > 0 && plan.preempted.empty() && !waiting_.empty() &&
         static_cast<int>(running_.size()) < options_.max_num_seqs) {
    Sequence& seq = sequences_.at(waiting_.front());
    const PrefixMatch match = cache_->match_prefix(seq.tokens);
    if (!can_admit(seq, match)) {
      if (!running_.empty()) break;  // blocks come back as running sequences end
      // Nothing holds a block, and still it does not fit: it never will.
      const int32_t needed = options_.admission == AdmissionPolicy::kReserveFinalLength
                                 ? cache_->peak_blocks(max_cached_tokens(seq.request))
                                 : cache_->blocks_needed(static_cast<int>(seq.tokens.size()));
      finish(seq, FinishReason::kError, plan.finished,
             "the KV pool (" + std::to_string(cache_->num_blocks()) +
                 " blocks) can never hold this request: it needs " + std::to_string(needed) +
                 " blocks");
      continue;
    }
    cache_->add_sequence(seq.id, match);
    seq.in_cache = true;
    seq.computed = match.tokens;
    seq.hit_pages = static_cast<int32_t>(match.pages.size());
    seq.snapshot_points = cache_->snapshot_points(static_cast<int>(seq.tokens.size()), match);
    if (!plan_chunk(seq, /*admitting=*/true, budget, plan)) {
      cache_->remove_sequence(seq.id);
      seq.in_cache = false;
      seq.computed = 0;
      seq.hit_pages = 0;
      break;
    }
    if (cache_->prefix_cache()) {
      cache_->record_prefix_query(static_cast<int>(seq.tokens.size()), match.tokens);
      plan.prefix_cache_queries += static_cast<int>(seq.tokens.size());
      plan.prefix_cache_hits += match.tokens;
    }
    waiting_.pop_front();
    running_.push_back(seq.id);
    reserved_pages_ += seq.peak_pages - seq.hit_pages;
    reserved_residual_slots_ += seq.peak_residual_slots;
    plan.admitted.push_back(seq.id);
  }

  // Copies of residual snapshots, queued since the last step, run before this step's forward.
  plan.block_copies = cache_->take_block_copies();
  // Every grow of the step is done: the block tables stay put until update_from_output.
  plan.samples.resize(plan.items.size());
  for (size_t row = 0; row < plan.items.size(); ++row) {
    ForwardItem& item = plan.items[row];
    Sequence& seq = sequences_.at(item.sequence_id);
    seq.planned = false;
    item.blocks = cache_->block_table(seq.id);
    // Only items whose prompt is complete after this step want a token.
    if (static_cast<size_t>(item.start) + item.tokens.size() == seq.tokens.size()) {
      plan.samples[row] = {&seq.request.sampling, &seq.tokens,
                           static_cast<uint64_t>(seq.generated)};
    }
  }
  return plan;
}

FinishReason Scheduler::stop_reason(const Sequence& seq, int32_t token) const {
  const GenerationRequest& r = seq.request;
  if (!r.ignore_eos && token == model_.eos_token_id) return FinishReason::kEos;
  if (std::find(r.stop_token_ids.begin(), r.stop_token_ids.end(), token) !=
      r.stop_token_ids.end()) {
    return FinishReason::kStop;
  }
  if (seq.generated >= r.max_new_tokens) return FinishReason::kLength;
  return FinishReason::kNone;
}

void Scheduler::update_from_output(const StepPlan& plan, const std::vector<SampleResult>& results,
                                   std::vector<StepEvent>& events) {
  cache_->finish_step();
  if (results.size() != plan.items.size()) {
    throw std::logic_error("scheduler: one sample result per planned item");
  }
  for (size_t row = 0; row < plan.items.size(); ++row) {
    Sequence& seq = sequences_.at(plan.items[row].sequence_id);
    seq.computed += static_cast<int>(plan.items[row].tokens.size());
    cache_->cache_full_pages(seq.id, seq.tokens);
    const std::vector<int>& points = seq.snapshot_points;
    if (std::find(points.begin(), points.end(), seq.computed) != points.end()) {
      cache_->snapshot_residual(seq.id, seq.tokens);
    }
    if (plan.samples[row].params == nullptr) continue;  // prompt not done yet
    if (!results[row].error.empty()) {  // non-finite logits: fail this request, not the batch
      finish(seq, FinishReason::kError, events, "sampling failed: " + results[row].error);
      continue;
    }
    const SampledToken next = results[row].token;
    seq.tokens.push_back(next.id);
    ++seq.generated;
    StepEvent event;
    event.request = seq.id;
    event.has_token = true;
    event.token = next.id;
    event.logprob = next.logprob;
    events.push_back(event);
    const FinishReason reason = stop_reason(seq, next.id);
    if (reason != FinishReason::kNone) finish(seq, reason, events);
  }
}

void Scheduler::fail_step(const StepPlan& plan, const std::string& error,
                          std::vector<StepEvent>& events) {
  cache_->finish_step(/*ran=*/false);
  for (const ForwardItem& item : plan.items) {
    finish(sequences_.at(item.sequence_id), FinishReason::kError, events, error);
  }
}

void Scheduler::fail_all(const std::string& error, std::vector<StepEvent>& events) {
  cache_->finish_step(/*ran=*/false);
  std::vector<RequestId> held;
  for (const auto& [id, seq] : sequences_) held.push_back(id);
  std::sort(held.begin(), held.end());  // arrival order
  for (RequestId id : held) finish(sequences_.at(id), FinishReason::kError, events, error);
  cache_->clear_prefix_cache();  // what the pages held is lost with the device
}

}  // namespace kvserve
