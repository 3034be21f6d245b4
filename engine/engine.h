// The batched generation engine: owns the scheduler state, the KV cache bookkeeping and a backend.
//
// Single-threaded by contract: one thread (the engine thread) calls every method. Each step() is
// one iteration of continuous batching: every running sequence decodes one token, then waiting
// prompts are prefilled in chunks under a token budget. Admission checks that the pool can hold a
// prompt; a running sequence that cannot grow preempts the newest running sequence, whose blocks
// are freed and whose tokens are recomputed later, so generation never crashes or drops work.
//
// Backend failures: an exception from the backend fails the requests of that step (kError with
// the exception's message) and the engine goes on. A DeviceLostError ends the engine instead: that
// step fails every request the engine holds (in the step, running or waiting) with kError and
// "device lost: <what>", frees their blocks, and from then on device_lost() returns <what>,
// has_work() is false and add_request() throws DeviceLostError. The process must restart.
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

struct EngineOptions {
  int max_num_seqs = 256;       // running sequences per step
  int max_batch_tokens = 2048;  // tokens per step (decodes + prefill chunks)
};

struct StepStats {
  int decode_tokens = 0;
  int prefill_tokens = 0;
  int preemptions = 0;
  // Requests that entered the batch in this step (after preemption too): the server's queue time
  // ends at a request's first admission.
  std::vector<RequestId> admitted;
};

class Engine {
 public:
  // `make_backend` builds the backend once the cache manager exists (the backend reads its
  // block tables).
  Engine(const ModelConfig& model, std::unique_ptr<KvCacheManager> cache,
         std::unique_ptr<Backend> backend, EngineOptions options);

  // Returns "" if the request is acceptable, else why not (INVALID_ARGUMENT material).
  std::string validate(const GenerationRequest& request) const;
  // Queues a validated request; throws std::invalid_argument if validate() would complain, and
  // DeviceLostError once the device is lost.
  RequestId add_request(GenerationRequest request);
  // Marks a request cancelled; it leaves the batch (blocks freed) at the next step.
  void cancel(RequestId id);

  bool has_work() const { return !waiting_.empty() || !running_.empty(); }
  size_t num_waiting() const { return waiting_.size(); }
  size_t num_running() const { return running_.size(); }

  // Runs one iteration. Appends this step's events to `events`.
  StepStats step(std::vector<StepEvent>& events);
  // Why the device was lost (the backend's DeviceLostError), or "" while it works.
  const std::string& device_lost() const { return device_lost_; }

  const KvCacheManager& cache() const { return *cache_; }
  const ModelConfig& model() const { return model_; }
  Backend& backend() { return *backend_; }

 private:
  struct Sequence {
    RequestId id = 0;
    GenerationRequest request;
    std::vector<int32_t> tokens;  // prompt followed by generated tokens
    int computed = 0;             // tokens whose keys/values are in the cache
    int generated = 0;
    bool cancelled = false;
    bool in_cache = false;
  };

  void finish(Sequence& seq, FinishReason reason, std::vector<StepEvent>& events,
              const std::string& error = "");
  bool preempt_newest(RequestId keep);
  FinishReason stop_reason(const Sequence& seq, int32_t token) const;

  ModelConfig model_;
  std::unique_ptr<KvCacheManager> cache_;
  std::unique_ptr<Backend> backend_;
  EngineOptions options_;
  RequestId next_id_ = 1;
  std::unordered_map<RequestId, Sequence> sequences_;
  std::deque<RequestId> waiting_;      // FCFS; preempted sequences go back to the front
  std::vector<RequestId> running_;     // admission order: the newest is preempted first
  std::vector<SampleResult> samples_;  // [items] of the step
  std::string device_lost_;
};

}  // namespace kvserve
