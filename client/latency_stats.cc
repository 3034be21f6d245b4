#include "client/latency_stats.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

namespace kvserve::client {

std::optional<double> percentile(const std::vector<double>& sorted, double q) {
  if (!(q >= 0 && q <= 100)) {
    throw std::invalid_argument("percentile must be in [0, 100], got " + std::to_string(q));
  }
  if (sorted.empty()) return std::nullopt;
  const double rank = q / 100.0 * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - static_cast<double>(lo));
}

std::optional<Summary> summarize(std::vector<double> samples) {
  if (samples.empty()) return std::nullopt;
  std::sort(samples.begin(), samples.end());
  Summary s;
  s.count = samples.size();
  s.mean = std::accumulate(samples.begin(), samples.end(), 0.0) / static_cast<double>(s.count);
  double squares = 0;
  for (double x : samples) squares += (x - s.mean) * (x - s.mean);
  s.stddev = std::sqrt(squares / static_cast<double>(s.count));
  s.p50 = *percentile(samples, 50);
  s.p90 = *percentile(samples, 90);
  s.p99 = *percentile(samples, 99);
  return s;
}

}  // namespace kvserve::client
