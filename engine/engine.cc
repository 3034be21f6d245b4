#include "engine/engine.h"

#include <algorithm>
#include <exception>
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

Engine::Engine(const ModelConfig& model, std::unique_ptr<KvCacheManager> cache,
               std::unique_ptr<Backend> backend, EngineOptions options)
    : model_(model), cache_(std::move(cache)), backend_(std::move(backend)), options_(options) {
  if (options_.max_num_seqs < 1 || options_.max_batch_tokens < 1) {
    throw std::invalid_argument("engine: max_num_seqs and max_batch_tokens must be >= 1");
  }
}

std::string Engine::validate(const GenerationRequest& r) const {
  if (r.prompt.empty()) return "the prompt is empty";
  for (size_t i = 0; i < r.prompt.size(); ++i) {
    if (r.prompt[i] < 0 || r.prompt[i] >= model_.vocab_size) {
      return "prompt token id " + std::to_string(r.prompt[i]) + " at position " +
             std::to_string(i) + " is outside the vocabulary [0, " +
             std::to_string(model_.vocab_size) + ")";
    }
  }
  for (int32_t id : r.stop_token_ids) {
    if (id < 0 || id >= model_.vocab_size) {
      return "stop token id " + std::to_string(id) + " is outside the vocabulary";
    }
  }
  if (r.max_new_tokens < 1) return "max_new_tokens must be at least 1";
  const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens;
  if (total > model_.n_positions) {
    return "prompt (" + std::to_string(r.prompt.size()) + " tokens) + max_new_tokens (" +
           std::to_string(r.max_new_tokens) + ") exceeds the model's context of " +
           std::to_string(model_.n_positions) + " tokens";
  }
  const std::string sampling = kvserve::validate(r.sampling);
  if (!sampling.empty()) return sampling;
  const int32_t blocks = cache_->blocks_needed(static_cast<int>(total));
  if (blocks > cache_->num_blocks()) {
    return "the request needs " + std::to_string(blocks) + " KV blocks but the whole pool has " +
           std::to_string(cache_->num_blocks()) + ": use a larger --kv-pool-mb";
  }
  return "";
}

RequestId Engine::add_request(GenerationRequest request) {
  if (!device_lost_.empty()) throw DeviceLostError(device_lost_);
  const std::string problem = validate(request);
  if (!problem.empty()) throw std::invalid_argument(problem);
  const RequestId id = next_id_++;
  Sequence seq;
  seq.id = id;
  seq.tokens = request.prompt;
  seq.request = std::move(request);
  sequences_.emplace(id, std::move(seq));
  waiting_.push_back(id);
  return id;
}

void Engine::cancel(RequestId id) {
  auto it = sequences_.find(id);
  if (it != sequences_.end()) it->second.cancelled = true;
}

void Engine::finish(Sequence& seq, FinishReason reason, std::vector<StepEvent>& events,
                    const std::string& error) {
  if (seq.in_cache) cache_->remove_sequence(seq.id);
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

bool Engine::preempt_newest(RequestId keep) {
  const RequestId victim = running_.back();
  Sequence& seq = sequences_.at(victim);
  cache_->remove_sequence(victim);
  seq.in_cache = false;
  seq.computed = 0;
  running_.pop_back();
  waiting_.push_front(victim);
  return victim == keep;
}

FinishReason Engine::stop_reason(const Sequence& seq, int32_t token) const {
  const GenerationRequest& r = seq.request;
  if (!r.ignore_eos && token == model_.eos_token_id) return FinishReason::kEos;
  if (std::find(r.stop_token_ids.begin(), r.stop_token_ids.end(), token) !=
      r.stop_token_ids.end()) {
    return FinishReason::kStop;
  }
  if (seq.generated >= r.max_new_tokens) return FinishReason::kLength;
  return FinishReason::kNone;
}

StepStats Engine::step(std::vector<StepEvent>& events) {
  StepStats stats;
  std::vector<RequestId> cancelled;
  for (const auto& [id, seq] : sequences_) {
    if (seq.cancelled) cancelled.push_back(id);
  }
  for (RequestId id : cancelled) finish(sequences_.at(id), FinishReason::kCancelled, events);

  std::vector<ForwardItem> items;
  // Decodes first: every running sequence whose prompt is in the cache feeds its newest token.
  for (size_t i = 0; i < running_.size(); ++i) {
    Sequence& seq = sequences_.at(running_[i]);
    if (static_cast<int>(seq.tokens.size()) - seq.computed != 1) continue;
    bool preempted_self = false;
    while (!cache_->grow(seq.id, seq.computed + 1)) {
      ++stats.preemptions;
      if (preempt_newest(seq.id)) {
        preempted_self = true;
        break;
      }
    }
    if (preempted_self) break;  // everything after it in running_ has been preempted too
    items.push_back({seq.id, seq.computed, {seq.tokens.back()}, false});
  }
  stats.decode_tokens = static_cast<int>(items.size());
  int budget = options_.max_batch_tokens - stats.decode_tokens;

  // Then prompt chunks: sequences already prefilling, then admissions in arrival order.
  auto add_chunk = [&](Sequence& seq) {
    const int chunk = std::min<int>(budget, static_cast<int>(seq.tokens.size()) - seq.computed);
    if (chunk <= 0 || !cache_->grow(seq.id, seq.computed + chunk)) return false;
    items.push_back({seq.id, seq.computed,
                     std::vector<int32_t>(seq.tokens.begin() + seq.computed,
                                          seq.tokens.begin() + seq.computed + chunk),
                     false});
    budget -= chunk;
    stats.prefill_tokens += chunk;
    return true;
  };
  for (RequestId id : running_) {
    Sequence& seq = sequences_.at(id);
    if (static_cast<int>(seq.tokens.size()) - seq.computed > 1 && budget > 0) add_chunk(seq);
  }
  // No admissions in a step that had to preempt: the pool is already too full.
  while (budget > 0 && stats.preemptions == 0 && !waiting_.empty() &&
         static_cast<int>(running_.size()) < options_.max_num_seqs) {
    Sequence& seq = sequences_.at(waiting_.front());
    if (!cache_->can_admit(static_cast<int>(seq.tokens.size()))) break;
    cache_->add_sequence(seq.id);
    seq.in_cache = true;
    if (!add_chunk(seq)) {
      cache_->remove_sequence(seq.id);
      seq.in_cache = false;
      break;
    }
    waiting_.pop_front();
    running_.push_back(seq.id);
    stats.admitted.push_back(seq.id);
  }
  if (items.empty()) {
    cache_->finish_step();
    return stats;
  }

  // Only items whose prompt is complete after this step want a token.
  std::vector<SampleRequest> requests(items.size());
  for (size_t row = 0; row < items.size(); ++row) {
    const Sequence& seq = sequences_.at(items[row].sequence_id);
    if (static_cast<size_t>(seq.computed) + items[row].tokens.size() != seq.tokens.size()) continue;
    requests[row] = {&seq.request.sampling, &seq.tokens, static_cast<uint64_t>(seq.generated)};
  }
  try {
    backend_->forward_sample(items, requests, samples_);
  } catch (const DeviceLostError& e) {
    cache_->finish_step();
    device_lost_ = *e.what() != '\0' ? e.what() : "the backend lost its device";  // never ""
    // Every later step would fail too: end all requests now, the step's and the others.
    std::vector<RequestId> held;
    for (const auto& [id, seq] : sequences_) held.push_back(id);
    std::sort(held.begin(), held.end());  // arrival order
    for (RequestId id : held) {
      finish(sequences_.at(id), FinishReason::kError, events, "device lost: " + device_lost_);
    }
    return stats;
  } catch (const std::exception& e) {
    cache_->finish_step();
    for (const ForwardItem& item : items) {
      finish(sequences_.at(item.sequence_id), FinishReason::kError, events, e.what());
    }
    return stats;
  }
  cache_->finish_step();

  for (size_t row = 0; row < items.size(); ++row) {
    Sequence& seq = sequences_.at(items[row].sequence_id);
    seq.computed += static_cast<int>(items[row].tokens.size());
    if (requests[row].params == nullptr) continue;  // prompt not done yet
    if (!samples_[row].error.empty()) {  // non-finite logits: fail this request, not the batch
      finish(seq, FinishReason::kError, events, "sampling failed: " + samples_[row].error);
      continue;
    }
    const SampledToken next = samples_[row].token;
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
  return stats;
}

}  // namespace kvserve
