#include "server/metrics.h"

#include <cmath>
#include <vector>

namespace kvserve {
namespace {

prometheus::Gauge& gauge(prometheus::Registry& registry, const std::string& name,
                         const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(registry).Add({});
}

prometheus::Counter& counter(prometheus::Registry& registry, const std::string& name,
                             const std::string& help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(registry).Add({});
}

prometheus::Histogram& histogram(prometheus::Registry& registry, const std::string& name,
                                 const std::string& help,
                                 prometheus::Histogram::BucketBoundaries b) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(registry).Add({},
                                                                                   std::move(b));
}

// first, first*factor, ... (count bounds): latencies span milliseconds (a decode step on the GPU)
// to minutes (a long generation on the CPU backend).
prometheus::Histogram::BucketBoundaries exponential(double first, double factor, int count) {
  prometheus::Histogram::BucketBoundaries bounds;
  for (int i = 0; i < count; ++i) bounds.push_back(first * std::pow(factor, i));
  return bounds;
}

// The buckets both backends bin relative errors into (kernels/kv_error_sample.h).
prometheus::Histogram& kv_error_histogram(prometheus::Family<prometheus::Histogram>& family,
                                          const char* kind, const std::string& format) {
  prometheus::Histogram::BucketBoundaries bounds;
  for (int k = 0; k < kKvErrorBuckets; ++k) bounds.push_back(kv_error_bucket_bound(k));
  return family.Add({{"kind", kind}, {"format", format}}, bounds);
}

void observe(prometheus::Histogram& histogram, const std::vector<float>& errors,
             const KvErrorBins& bins) {
  for (float e : errors) histogram.Observe(e);
  if (bins.total() == 0) return;
  histogram.ObserveMultiple(std::vector<double>(bins.counts.begin(), bins.counts.end()), bins.sum);
}

}  // namespace

Metrics::Metrics(const BuildInfo& build)
    : registry_(std::make_shared<prometheus::Registry>()),
      capacity_bytes_(gauge(*registry_, "kvserve_kv_cache_capacity_bytes",
                            "Bytes of the KV cache pool, allocated at start")),
      used_bytes_(gauge(*registry_, "kvserve_kv_cache_used_bytes",
                        "Bytes of the KV pool held by sequences (codes, scales, residual, slack)")),
      usage_ratio_(gauge(*registry_, "kvserve_kv_cache_usage_ratio",
                         "kvserve_kv_cache_used_bytes / kvserve_kv_cache_capacity_bytes (0-1)")),
      fp16_equivalent_bytes_(gauge(*registry_, "kvserve_kv_cache_fp16_equivalent_bytes",
                                   "Bytes the cached tokens would take as an fp16 KV cache")),
      compression_ratio_(gauge(*registry_, "kvserve_kv_compression_ratio",
                               "fp16-equivalent bytes / bytes held for the cached tokens (0 when "
                               "the cache is empty)")),
      cache_tokens_(gauge(*registry_, "kvserve_kv_cache_tokens", "Tokens held in the KV cache")),
      blocks_used_(gauge(*registry_, "kvserve_kv_blocks_used", "KV blocks held by sequences")),
      blocks_total_(gauge(*registry_, "kvserve_kv_blocks_total", "KV blocks in the pool")),
      requests_running_(
          gauge(*registry_, "kvserve_requests_running", "Requests in the running batch")),
      requests_waiting_(gauge(*registry_, "kvserve_requests_waiting",
                              "Requests queued for admission (including preempted ones)")),
      streams_open_(gauge(*registry_, "kvserve_streams_open",
                          "Generate streams open, counted against --max-concurrent-streams")),
      tokens_per_second_(gauge(*registry_, "kvserve_generation_tokens_per_second",
                               "Generated tokens per second over the last 5 seconds")),
      prompt_tokens_(counter(
          *registry_, "kvserve_prompt_tokens_total",
          "Prompt tokens of admitted requests, each prompt counted once at its first admission")),
      generation_tokens_(
          counter(*registry_, "kvserve_generation_tokens_total", "Tokens generated and streamed")),
      preemptions_(counter(*registry_, "kvserve_preemptions_total",
                           "Sequences preempted because the KV pool was full")),
      prefix_cache_queries_(counter(*registry_, "kvserve_prefix_cache_queries_total",
                                    "Tokens of admitted requests looked up in the prefix cache")),
      prefix_cache_hits_(counter(*registry_, "kvserve_prefix_cache_hits_total",
                                 "Tokens of admitted requests found in the prefix cache (not "
                                 "computed)")),
      prefix_cache_pages_(gauge(*registry_, "kvserve_prefix_cache_pages",
                                "Full KV pages held in the prefix cache, in use or evictable")),
      requests_(
          prometheus::BuildCounter()
              .Name("kvserve_requests_total")
              .Help("Generation requests received, by API (grpc or http), rejected ones included")
              .Register(*registry_)),
      success_(prometheus::BuildCounter()
                   .Name("kvserve_request_success_total")
                   .Help("Requests that ended with a final message, by finish reason")
                   .Register(*registry_)),
      failure_(prometheus::BuildCounter()
                   .Name("kvserve_request_failure_total")
                   .Help("Requests that ended with a gRPC error status, by status code")
                   .Register(*registry_)),
      ttft_seconds_(histogram(*registry_, "kvserve_time_to_first_token_seconds",
                              "Arrival to first generated token", exponential(0.001, 2, 18))),
      inter_token_seconds_(histogram(*registry_, "kvserve_inter_token_latency_seconds",
                                     "Time between consecutive tokens of a request",
                                     exponential(0.0005, 2, 16))),
      e2e_seconds_(histogram(*registry_, "kvserve_e2e_request_latency_seconds",
                             "Arrival to the end of a request", exponential(0.01, 2, 17))),
      queue_seconds_(histogram(*registry_, "kvserve_request_queue_seconds",
                               "Arrival to first admission into the batch",
                               exponential(0.0005, 2, 20))),
      batch_tokens_(histogram(*registry_, "kvserve_batch_tokens",
                              "Tokens per engine step (decodes plus prompt chunks)",
                              exponential(1, 2, 14))),
      kv_error_family_(prometheus::BuildHistogram()
                           .Name("kvserve_kv_quantization_relative_error")
                           .Help("Relative reconstruction error ||x - deq(q(x))|| / ||x|| of "
                                 "sampled KV quantization groups as they are flushed into pages "
                                 "(--kv-error-sample-rate), by kind (key, value) and format")
                           .Register(*registry_)),
      kv_key_error_(kv_error_histogram(kv_error_family_, "key", build.kv_format)),
      kv_value_error_(kv_error_histogram(kv_error_family_, "value", build.kv_format)) {
  // Every label value that can occur exists from the start, so that rate() sees the first
  // increment and dashboards show zeros rather than gaps.
  for (const char* api : {"grpc", "http"}) requests_.Add({{"api", api}});
  for (const char* reason : {"length", "eos", "stop", "cancelled"})
    success_.Add({{"finish_reason", reason}});
  for (const char* code : {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED",
                           "DEADLINE_EXCEEDED", "INTERNAL"}) {
    failure_.Add({{"code", code}});
  }
  prometheus::BuildGauge()
      .Name("kvserve_build_info")
      .Help("Always 1; the labels describe this server")
      .Register(*registry_)
      .Add({{"version", build.version},
            {"device", build.device},
            {"kv_format", build.kv_format},
            {"model", build.model}})
      .Set(1);
}

void Metrics::set_cache(const CacheUsage& usage) {
  capacity_bytes_.Set(static_cast<double>(usage.capacity_bytes));
  used_bytes_.Set(static_cast<double>(usage.used_bytes));
  usage_ratio_.Set(usage.usage_ratio());
  fp16_equivalent_bytes_.Set(static_cast<double>(usage.fp16_equivalent_bytes));
  compression_ratio_.Set(usage.compression_ratio());
  cache_tokens_.Set(static_cast<double>(usage.tokens));
  blocks_used_.Set(usage.blocks_used);
  blocks_total_.Set(usage.blocks_total);
  prefix_cache_pages_.Set(static_cast<double>(usage.cached_pages));
}

void Metrics::observe_kv_errors(const KvQuantizationErrors& errors) {
  observe(kv_key_error_, errors.key, errors.key_bins);
  observe(kv_value_error_, errors.value, errors.value_bins);
}

void Metrics::set_requests(size_t running, size_t waiting) {
  requests_running_.Set(static_cast<double>(running));
  requests_waiting_.Set(static_cast<double>(waiting));
}

void Metrics::count_success(FinishReason reason) {
  success_.Add({{"finish_reason", to_string(reason)}}).Increment();
}

void Metrics::count_failure(const std::string& code) {
  failure_.Add({{"code", code}}).Increment();
}

}  // namespace kvserve
