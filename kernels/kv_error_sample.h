// Which flushed quantization groups the sampled KV quantization-error metric measures
// (engine/kv_quantization_error.h). One rule for both backends, so that the CPU and CUDA caches
// measure the same groups of the same steps. Plain C++ (host and device), no CUDA headers.
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

// Whether the group whose (scale, zero) pair is number `group` of its page's head region (keys:
// which = 0, values: 1), written into block `block` of layer `layer` at forward step `step`, is
// measured at this sample rate. Deterministic: the same steps over the same blocks sample the
// same groups, on either backend. The step enters the hash so that a block reused by later
// sequences is sampled at other groups (KIVI keys have outlier channels: a fixed subset would be
// biased). rate <= 0 samples nothing, rate >= 1 everything.
KVSERVE_HOST_DEVICE inline bool kv_error_sampled(double rate, uint64_t step, int layer,
                                                 int32_t block, int head, int which, int group) {
  if (rate <= 0.0) return false;
  if (rate >= 1.0) return true;
  uint64_t h = mix64(step + 0x9e3779b97f4a7c15ull);
  h = mix64(h ^ (static_cast<uint64_t>(static_cast<uint32_t>(layer)) << 32 |
                 static_cast<uint32_t>(block)));
  h = mix64(h ^ (static_cast<uint64_t>(static_cast<uint32_t>(head)) << 33 |
                 static_cast<uint64_t>(which) << 32 | static_cast<uint32_t>(group)));
  // The top 53 bits as a uniform double in [0, 1).
  return static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0) < rate;
}

}  // namespace kvserve
