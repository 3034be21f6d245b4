// Which steps the sampled KV quantization-error metric measures
// (engine/kv_quantization_error.h). One rule for both backends, so that the CPU and CUDA caches
// measure the same steps. Plain C++ (host and device), no CUDA headers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define KVSERVE_HOST_DEVICE __host__ __device__
#else
#define KVSERVE_HOST_DEVICE
#endif

namespace kvserve {

// Upper bounds of the histogram buckets of relative errors (0.001 * sqrt(2)^k, k = 0..20: 0.001
// to 1.024, two per octave), then +Inf: wide enough for int8 to 2-bit groups, fine enough that p50
// and p99 resolve to a factor of 1.41 (measured values: docs/design.md section 6.1). The server
// exports exactly these bounds.
inline constexpr int kKvErrorBuckets = 21;
// Bound k: 0.001 or 0.001 * sqrt(2), times 2^(k / 2), exactly (a power of two scales exactly).
// A function rather than a table, so that device code can use it.
KVSERVE_HOST_DEVICE constexpr double kv_error_bucket_bound(int k) {
  return (k % 2 == 0 ? 0.001 : 0.0014142135623730952) * static_cast<double>(1 << (k / 2));
}

// The bucket of `error` as Prometheus counts it: the first bound >= error, kKvErrorBuckets (+Inf)
// past the last.
KVSERVE_HOST_DEVICE inline int kv_error_bucket(double error) {
  int k = 0;
  while (k < kKvErrorBuckets && !(error <= kv_error_bucket_bound(k))) ++k;
  return k;
}

// splitmix64's finaliser: a cheap bijective mix whose output bits are all well distributed.
KVSERVE_HOST_DEVICE inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Whether forward step `step` measures the groups it flushes, at this sample rate: a step
// measures every group it flushes into pages, or none. Sampling whole steps rather than groups
// keeps the steps that measure nothing free (on CUDA no kernel is launched, and decode steps
// replay graphs without it), while the share of groups measured is still `rate` on average.
// Deterministic: the same steps measure on either backend. rate <= 0 samples nothing, rate >= 1
// every step.
KVSERVE_HOST_DEVICE inline bool kv_error_step_sampled(double rate, uint64_t step) {
  if (rate <= 0.0) return false;
  if (rate >= 1.0) return true;
  // The top 53 bits as a uniform double in [0, 1).
  return static_cast<double>(mix64(step + 0x9e3779b97f4a7c15ull) >> 11) *
             (1.0 / 9007199254740992.0) <
         rate;
}

}  // namespace kvserve
