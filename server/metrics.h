// kvserve's Prometheus metrics (docs/design.md section 6): base units, `_total` counters, no
// per-request labels. Every method is thread-safe (prometheus-cpp metrics are atomic); the engine
// thread records the work it does, the gRPC handlers record requests they reject.
#pragma once

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <map>
#include <memory>
#include <string>

#include "engine/engine.h"
#include "engine/kv_cache_manager.h"
#include "engine/kv_quantization_error.h"

namespace kvserve {

struct BuildInfo {
  std::string version;
  std::string device;
  std::string kv_format;
  std::string model;
};

class Metrics {
 public:
  explicit Metrics(const BuildInfo& build);

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  void set_cache(const CacheUsage& usage);
  void set_requests(size_t running, size_t waiting);
  // Generate streams open (counted against --max-concurrent-streams), until gRPC's OnDone.
  void stream_opened() { streams_open_.Increment(); }
  void stream_closed() { streams_open_.Decrement(); }
  void set_tokens_per_second(double rate) { tokens_per_second_.Set(rate); }
  void add_prompt_tokens(int64_t n) { prompt_tokens_.Increment(static_cast<double>(n)); }
  void add_generation_tokens(int64_t n) { generation_tokens_.Increment(static_cast<double>(n)); }
  void add_preemptions(int64_t n) { preemptions_.Increment(static_cast<double>(n)); }
  // Prompt tokens looked up in the prefix cache and, of those, found there.
  void add_prefix_cache_lookup(int64_t queries, int64_t hits) {
    prefix_cache_queries_.Increment(static_cast<double>(queries));
    prefix_cache_hits_.Increment(static_cast<double>(hits));
  }
  void observe_batch_tokens(int tokens) { batch_tokens_.Observe(tokens); }
  void observe_queue(double seconds) { queue_seconds_.Observe(seconds); }
  void observe_ttft(double seconds) { ttft_seconds_.Observe(seconds); }
  void observe_inter_token(double seconds) { inter_token_seconds_.Observe(seconds); }
  void observe_e2e(double seconds) { e2e_seconds_.Observe(seconds); }
  // The relative errors of a step's sampled KV quantization groups
  // (engine/kv_quantization_error.h).
  void observe_kv_errors(const KvQuantizationErrors& errors);
  // A generation request that arrived through `api` ("grpc" or "http"), before any check.
  void count_request(const std::string& api) { requests_.Add({{"api", api}}).Increment(); }
  // A request that ended with a final message (finish reason length, eos, stop or cancelled).
  void count_success(FinishReason reason);
  // A request that ended with a non-OK status; `code` is the gRPC code name, e.g.
  // "INVALID_ARGUMENT".
  void count_failure(const std::string& code);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Gauge& capacity_bytes_;
  prometheus::Gauge& used_bytes_;
  prometheus::Gauge& usage_ratio_;
  prometheus::Gauge& fp16_equivalent_bytes_;
  prometheus::Gauge& compression_ratio_;
  prometheus::Gauge& cache_tokens_;
  prometheus::Gauge& blocks_used_;
  prometheus::Gauge& blocks_total_;
  prometheus::Gauge& requests_running_;
  prometheus::Gauge& requests_waiting_;
  prometheus::Gauge& streams_open_;
  prometheus::Gauge& tokens_per_second_;
  prometheus::Counter& prompt_tokens_;
  prometheus::Counter& generation_tokens_;
  prometheus::Counter& preemptions_;
  prometheus::Counter& prefix_cache_queries_;
  prometheus::Counter& prefix_cache_hits_;
  prometheus::Gauge& prefix_cache_pages_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Counter>& success_;
  prometheus::Family<prometheus::Counter>& failure_;
  prometheus::Histogram& ttft_seconds_;
  prometheus::Histogram& inter_token_seconds_;
  prometheus::Histogram& e2e_seconds_;
  prometheus::Histogram& queue_seconds_;
  prometheus::Histogram& batch_tokens_;
  prometheus::Family<prometheus::Histogram>& kv_error_family_;
  prometheus::Histogram& kv_key_error_;
  prometheus::Histogram& kv_value_error_;
};

}  // namespace kvserve
