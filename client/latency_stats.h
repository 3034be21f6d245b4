// Summary statistics of latency samples, computed as vLLM's benchmark_serving does (numpy).
#pragma once

#include <optional>
#include <vector>

namespace kvserve::client {

// The q-th percentile (0 <= q <= 100) of `sorted` (ascending) by linear interpolation between the
// two nearest ranks: rank = q/100 * (n - 1). This is numpy.percentile's default ("linear"), which
// vLLM's benchmark_serving uses, so figures compare one to one. nullopt for an empty input.
std::optional<double> percentile(const std::vector<double>& sorted, double q);

struct Summary {
  size_t count = 0;
  double mean = 0, stddev = 0;  // population standard deviation (numpy.std, ddof=0)
  double p50 = 0, p90 = 0, p99 = 0;
};

// nullopt when there are no samples: "no data" must not read as a latency of zero.
std::optional<Summary> summarize(std::vector<double> samples);

}  // namespace kvserve::client
