#include "engine/engine.h"

#include <exception>
#include <stdexcept>
#include <string>

namespace kvserve {
namespace {

SchedulerOptions scheduler_options(const EngineOptions& options, const Backend* backend) {
  if (backend == nullptr) throw std::invalid_argument("engine: no backend");
  if (options.max_batch_tokens < 0) {
    throw std::invalid_argument("engine: max_batch_tokens must be >= 1 (0: the backend's)");
  }
  SchedulerOptions s;
  s.max_num_seqs = options.max_num_seqs;
  s.max_batch_tokens =
      options.max_batch_tokens > 0 ? options.max_batch_tokens : backend->preferred_batch_tokens();
  s.admission = options.admission;
  if (const absl::Status problem = validate_kv_error_sample_rate(options.kv_error_sample_rate);
      !problem.ok()) {
    throw std::invalid_argument("engine: " + std::string(problem.message()));
  }
  s.prefix_cache = options.prefix_cache;
  return s;
}

}  // namespace

Engine::Engine(const ModelConfig& model, std::unique_ptr<KvCacheManager> cache,
               std::unique_ptr<Backend> backend, EngineOptions options)
    : model_(model),
      backend_(std::move(backend)),
      scheduler_(model, std::move(cache), scheduler_options(options, backend_.get())) {
  backend_->set_kv_error_sample_rate(options.kv_error_sample_rate);
}

absl::Status Engine::validate(const GenerationRequest& r) const {
  if (r.prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  for (size_t i = 0; i < r.prompt.size(); ++i) {
    if (r.prompt[i] < 0 || r.prompt[i] >= model_.vocab_size) {
      return absl::InvalidArgumentError(
          "prompt token id " + std::to_string(r.prompt[i]) + " at position " + std::to_string(i) +
          " is outside the vocabulary [0, " + std::to_string(model_.vocab_size) + ")");
    }
  }
  for (int32_t id : r.stop_token_ids) {
    if (id < 0 || id >= model_.vocab_size) {
      return absl::InvalidArgumentError("stop token id " + std::to_string(id) +
                                        " is outside the vocabulary");
    }
  }
  if (r.max_new_tokens < 1) return absl::InvalidArgumentError("max_new_tokens must be at least 1");
  const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens;
  if (total > model_.n_positions) {
    return absl::InvalidArgumentError(
        "prompt (" + std::to_string(r.prompt.size()) + " tokens) + max_new_tokens (" +
        std::to_string(r.max_new_tokens) + ") exceeds the model's context of " +
        std::to_string(model_.n_positions) + " tokens");
  }
  if (absl::Status sampling = kvserve::validate(r.sampling); !sampling.ok()) return sampling;
  // What the pool really holds on the way to the final length (the KIVI residual peaks before a
  // flush), not only at it: a request that passes can always finish once it runs alone.
  const int32_t blocks = cache().peak_blocks(max_cached_tokens(r));
  if (blocks > cache().num_blocks()) {
    return absl::InvalidArgumentError("prompt + max_new_tokens (" + std::to_string(total) +
                                      " tokens) needs up to " + std::to_string(blocks) +
                                      " KV blocks but the whole pool has " +
                                      std::to_string(cache().num_blocks()) +
                                      ": use a larger --kv-pool-mb or fewer max_new_tokens");
  }
  return absl::OkStatus();
}

RequestId Engine::add_request(GenerationRequest request) {
  if (!device_lost_.empty()) throw DeviceLostError(device_lost_);
  if (const absl::Status problem = validate(request); !problem.ok()) {
    throw std::invalid_argument(std::string(problem.message()));
  }
  return scheduler_.add_request(std::move(request));
}

StepStats Engine::step(std::vector<StepEvent>& events) {
  const StepPlan plan = scheduler_.schedule();
  events.insert(events.end(), plan.finished.begin(), plan.finished.end());
  StepStats stats;
  stats.decode_tokens = plan.decode_tokens;
  stats.prefill_tokens = plan.prefill_tokens;
  stats.preemptions = static_cast<int>(plan.preempted.size());
  stats.recomputed_tokens = plan.recomputed_tokens;
  stats.prefix_cache_queries = plan.prefix_cache_queries;
  stats.prefix_cache_hits = plan.prefix_cache_hits;
  stats.admitted = plan.admitted;
  try {
    if (!plan.block_copies.empty()) backend_->copy_blocks(plan.block_copies);
    if (!plan.items.empty()) backend_->forward_sample(plan.items, plan.samples, samples_);
  } catch (const DeviceLostError& e) {
    device_lost_ = *e.what() != '\0' ? e.what() : "the backend lost its device";  // never ""
    // Every later step would fail too: end all requests now, the step's and the others.
    scheduler_.fail_all("device lost: " + device_lost_, events);
    return stats;
  } catch (const std::exception& e) {
    scheduler_.fail_step(plan, e.what(), events);
    return stats;
  }
  if (plan.items.empty()) {
    scheduler_.update_from_output(plan, {}, events);
    return stats;
  }
  backend_->take_kv_errors(stats.kv_errors);
  scheduler_.update_from_output(plan, samples_, events);
  return stats;
}

}  // namespace kvserve
