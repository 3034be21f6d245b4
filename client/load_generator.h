// The load generator behind `kvserve-cli load`: many concurrent Generate streams, closed or open
// loop, measured the way vLLM's benchmark_serving measures (so numbers compare with vLLM's).
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "client/generation_client.h"

namespace kvserve::client {

struct LoadOptions {
  int requests = 100;
  // Requests per second of a Poisson arrival process; infinity sends every request at once (each
  // still waits for one of the `concurrency` slots, which makes it a closed loop).
  double rate = std::numeric_limits<double>::infinity();
  int concurrency = 16;  // the cap on requests in flight, for either kind of loop
  int prompt_len = 128;
  // > 0: every prompt starts with the same shared_prefix_len random token ids, then prompt_len
  // ids of its own (a system prompt or document shared by all requests: prefix caching's case).
  // Random token ids only.
  int shared_prefix_len = 0;
  int max_new_tokens = 128;
  // Empty: prompts are `prompt_len` random token ids. Otherwise prompts are text slices of this
  // file
  // (".xz" is decompressed) of about prompt_len * chars_per_token characters: the client has no
  // tokenizer, so the prompt length in tokens is approximate; the server's counts are reported.
  std::string prompts_file;
  double chars_per_token = 4;
  uint64_t seed = 0;
  bool ignore_eos = true;  // so every request produces exactly max_new_tokens tokens
  // Sampling temperature of every request (0: greedy); unset leaves the server's default (1.0).
  std::optional<float> temperature;
  double timeout_s = 0;  // per request; <= 0: none
};

struct LoadProgress {
  int total = 0, started = 0, completed = 0, failed = 0;
};
// Called after each request ends, from a gRPC thread; calls never overlap.
using ProgressCallback = std::function<void(const LoadProgress&)>;

// Per-request figures in seconds, defined as in vLLM's benchmark_serving.
struct RequestMeasures {
  std::optional<double> ttft;  // start to first chunk; unset when no token came
  double e2e = 0;              // start to the end of the stream
  std::optional<double> tpot;  // (e2e - ttft) / (output_tokens - 1), when output_tokens > 1
  // Gaps between consecutive chunk arrivals; a chunk of k tokens contributes k samples of gap / k,
  // so a server that batches tokens into chunks is measured per token, as TPOT is.
  std::vector<double> itl;
  uint32_t prompt_tokens = 0, output_tokens = 0;  // the server's counts
};
// Measures a successful call (status OK, final present).
RequestMeasures measure(const GenerateOutcome& outcome);

// Seconds from the start at which each of n requests is sent: a Poisson process of `rate` per
// second (exponential gaps, the first request at 0), or all zeros for an infinite rate.
std::vector<double> arrival_offsets(int n, double rate, uint64_t seed);

// The requests of a run (see LoadOptions::prompts_file); vocab_size bounds random token ids.
std::vector<v1::GenerateRequest> make_requests(const LoadOptions& options, int vocab_size);

// Runs the whole benchmark against `client` and returns its JSON result: the configuration, the
// server's ModelInfo, counts, throughputs, latency summaries in milliseconds (vLLM's key names:
// mean_ttft_ms, median_ttft_ms, std_ttft_ms, p50/p90/p99_ttft_ms, likewise tpot, itl, e2el) and
// failures by status code name. Throws std::runtime_error when the server cannot be asked for its
// model (nothing is sent then).
nlohmann::json run_load(GenerateApi& client, const LoadOptions& options,
                        const ProgressCallback& progress = nullptr);

}  // namespace kvserve::client
