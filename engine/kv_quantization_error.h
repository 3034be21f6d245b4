// The sampled quantization error of the KV cache (docs/design.md section 6, issue 16): while
// serving, a share of the groups that a step flushes from the fp16 residual into the pages is read
// back through the cache's own dequantization and compared with the fp16 values it was quantized
// from. Measuring never changes the cache or the tokens.
//
// A sample is one quantization group as the format defines it, per layer and head:
//   kivi keys:   G tokens of one channel (per_token_keys: GV channels of one token, as values)
//   kivi values: GV channels of one token
//   int8:        the D channels of one token (keys and values alike)
//   fp16:        nothing is quantized, nothing is sampled.
// Its relative error is ||x - deq(q(x))||_2 / max(||x||_2, kRelativeErrorEpsilon), in double, x
// the group's fp16 values. An all-zero group (and, with fp16 parameters, any constant group)
// reconstructs exactly and counts as a sample of error 0; a group of norm below the epsilon
// reports its absolute error divided by the epsilon.
#pragma once

#include <absl/status/status.h>

#include <array>
#include <cstdint>
#include <vector>

#include "kernels/kv_error_sample.h"

namespace kvserve {

// serve's and bench engine's default --kv-error-sample-rate: about 1 group in 100, which keeps
// the measuring cost out of sight (docs/benchmarks.md) and still fills the histogram within
// seconds of traffic.
inline constexpr double kDefaultKvErrorSampleRate = 0.01;
// Far below the norm of any group holding a normal fp16 value (>= 6.1e-5): only groups of zeros
// and fp16 subnormals come near it.
inline constexpr double kRelativeErrorEpsilon = 1e-6;

// Errors already counted per bucket of kv_error_bucket_bound (kernels/kv_error_sample.h), where a
// backend measures them on its device.
struct KvErrorBins {
  std::array<uint64_t, kKvErrorBuckets + 1> counts{};  // per bucket (not cumulative), +Inf last
  double sum = 0.0;                                    // of the errors counted

  uint64_t total() const;
  void add(const KvErrorBins& other);
};

// The relative errors of the groups sampled during one or more steps: one by one (CPU backend, in
// no particular order) and/or already binned (CUDA backend).
struct KvQuantizationErrors {
  std::vector<float> key;
  std::vector<float> value;
  KvErrorBins key_bins;
  KvErrorBins value_bins;

  bool empty() const;
  void append(const KvQuantizationErrors& other);
  void clear();
};

// `errors` counted per bucket, as the CUDA backend bins them.
KvErrorBins bin_errors(const std::vector<float>& errors);
// The q-quantile (0 < q < 1) as Prometheus' histogram_quantile estimates it from these buckets
// (linear inside a bucket, the first from 0; the last finite bound when it falls in +Inf), so
// that benchmarks report what a dashboard and the alert will show. 0 without samples.
double histogram_quantile(const KvErrorBins& bins, double q);

// OK for a rate in [0, 1], else INVALID_ARGUMENT naming the flag.
absl::Status validate_kv_error_sample_rate(double rate);

// ||x - y||_2 / max(||x||_2, kRelativeErrorEpsilon) over x[i * stride], y[i * stride], i < n.
double relative_error(const float* x, const float* y, int n, int stride);

}  // namespace kvserve
