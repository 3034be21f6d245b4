// The batched generation engine: a Scheduler (requests, queues, KV cache bookkeeping) and a
// Backend (the model on a device).
//
// Single-threaded by contract: one thread (the engine thread) calls every method. Each step() is
// one iteration of continuous batching: the scheduler plans it (scheduler.h: cancellations,
// decodes, prompt chunks under a token budget, admission, preemption), the backend runs the plan's
// items and samples their tokens, and the scheduler commits them.
//
// Backend failures: an exception from the backend fails the requests of that step (kError with
// the exception's message) and the engine goes on. A DeviceLostError ends the engine instead: that
// step fails every request the engine holds (in the step, running or waiting) with kError and
// "device lost: <what>", frees their blocks, and from then on device_lost() returns <what>,
// has_work() is false and add_request() throws DeviceLostError. The process must restart.
#pragma once

#include <absl/status/status.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/kv_cache_manager.h"
#include "engine/model_config.h"
#include "engine/sampler.h"
#include "engine/scheduler.h"

namespace kvserve {

struct EngineOptions {
  int max_num_seqs = 256;  // running sequences per step
  // Tokens per step (decodes + prefill chunks); 0: the backend's preferred_batch_tokens().
  int max_batch_tokens = 0;
  AdmissionPolicy admission = AdmissionPolicy::kReserveFinalLength;
  // Share of the groups flushed into KV pages whose quantization error the backend measures
  // (engine/kv_quantization_error.h), in [0, 1]; 0 measures nothing. `kvserve serve` defaults to
  // kDefaultKvErrorSampleRate.
  double kv_error_sample_rate = 0.0;
  bool prefix_cache = true;  // SchedulerOptions::prefix_cache
};

struct StepStats {
  int decode_tokens = 0;
  int prefill_tokens = 0;
  int preemptions = 0;
  int recomputed_tokens = 0;     // prefill tokens that recompute what a preemption threw away
  int prefix_cache_queries = 0;  // StepPlan::prefix_cache_queries
  int prefix_cache_hits = 0;     // StepPlan::prefix_cache_hits
  // Requests that entered the batch in this step (after preemption too): the server's queue time
  // ends at a request's first admission.
  std::vector<RequestId> admitted;
  // Relative errors of the sampled groups flushed into pages since the previous step that reported
  // (normally this step's own; none while kv_error_sample_rate is 0).
  KvQuantizationErrors kv_errors;
};

class Engine {
 public:
  // `cache` and `backend` describe the same pool: the backend was built for cache->config() and
  // cache->num_blocks() (make_backend does that); the cache's tables say which blocks are whose.
  Engine(const ModelConfig& model, std::unique_ptr<KvCacheManager> cache,
         std::unique_ptr<Backend> backend, EngineOptions options);

  // OK if the request is acceptable, else INVALID_ARGUMENT saying why.
  absl::Status validate(const GenerationRequest& request) const;
  // Queues a validated request; throws std::invalid_argument if validate() would complain, and
  // DeviceLostError once the device is lost.
  RequestId add_request(GenerationRequest request);
  // Marks a request cancelled; it leaves the batch (blocks freed) at the next step.
  void cancel(RequestId id) { scheduler_.cancel(id); }

  bool has_work() const { return scheduler_.has_work(); }
  size_t num_waiting() const { return scheduler_.num_waiting(); }
  size_t num_running() const { return scheduler_.num_running(); }

  // Runs one iteration. Appends this step's events to `events`.
  StepStats step(std::vector<StepEvent>& events);
  // Why the device was lost (the backend's DeviceLostError), or "" while it works.
  const std::string& device_lost() const { return device_lost_; }

  const KvCacheManager& cache() const { return scheduler_.cache(); }
  const ModelConfig& model() const { return model_; }
  Backend& backend() { return *backend_; }
  // The options in force, max_batch_tokens resolved.
  const SchedulerOptions& options() const { return scheduler_.options(); }

 private:
  ModelConfig model_;
  std::unique_ptr<Backend> backend_;
  Scheduler scheduler_;
  std::vector<SampleResult> samples_;  // [items] of the step
  std::string device_lost_;
};

}  // namespace kvserve
