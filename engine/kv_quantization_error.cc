#include "engine/kv_quantization_error.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace kvserve {

uint64_t KvErrorBins::total() const {
  uint64_t n = 0;
  for (uint64_t c : counts) n += c;
  return n;
}

void KvErrorBins::add(const KvErrorBins& other) {
  for (size_t k = 0; k < counts.size(); ++k) counts[k] += other.counts[k];
  sum += other.sum;
}

bool KvQuantizationErrors::empty() const {
  return key.empty() && value.empty() && key_bins.total() == 0 && value_bins.total() == 0;
}

void KvQuantizationErrors::append(const KvQuantizationErrors& other) {
  key.insert(key.end(), other.key.begin(), other.key.end());
  value.insert(value.end(), other.value.begin(), other.value.end());
  key_bins.add(other.key_bins);
  value_bins.add(other.value_bins);
}

void KvQuantizationErrors::clear() {
  *this = KvQuantizationErrors{};
}

KvErrorBins bin_errors(const std::vector<float>& errors) {
  KvErrorBins bins;
  for (float e : errors) {
    ++bins.counts[kv_error_bucket(e)];
    bins.sum += e;
  }
  return bins;
}

absl::Status validate_kv_error_sample_rate(double rate) {
  if (!(rate >= 0.0 && rate <= 1.0)) {  // NaN fails too
    return absl::InvalidArgumentError("--kv-error-sample-rate " + std::to_string(rate) +
                                      " is outside [0, 1] (0 disables the measurement)");
  }
  return absl::OkStatus();
}

double histogram_quantile(const KvErrorBins& bins, double q) {
  const uint64_t total = bins.total();
  if (total == 0) return 0.0;
  const double rank = q * static_cast<double>(total);
  double below = 0.0;
  for (int k = 0; k < kKvErrorBuckets; ++k) {
    const double count = static_cast<double>(bins.counts[k]);
    if (below + count >= rank && count > 0) {
      const double lower = k == 0 ? 0.0 : kv_error_bucket_bound(k - 1);
      return lower + (kv_error_bucket_bound(k) - lower) * (rank - below) / count;
    }
    below += count;
  }
  return kv_error_bucket_bound(kKvErrorBuckets - 1);
}

double relative_error(const float* x, const float* y, int n, int stride) {
  double error = 0.0, norm = 0.0;
  for (int i = 0; i < n; ++i) {
    const double a = x[i * stride], d = a - static_cast<double>(y[i * stride]);
    error += d * d;
    norm += a * a;
  }
  return std::sqrt(error) / std::max(std::sqrt(norm), kRelativeErrorEpsilon);
}

}  // namespace kvserve
