// Rounding a float down or up to an fp8 e4m3 code, for the device quantizers' fp8 pair search
// (kernels/kv_cache_device.cuh). Plain C++ (host and device), no CUDA headers: a host test
// (tests/kv_quant_test.cc) checks it against engine/kv_quant.cc's e4m3_round_down and
// e4m3_round_up, which search the table of e4m3 values; these read the code off the float's bits
// instead, where a binary search over the 127 magnitudes took seven dependent rounds, each
// decoding a code, and each group's search rounds three to six values.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels/host_device.h"

namespace kvserve {

// e4m3: bias 7, 3 mantissa bits, no infinities; magnitude codes 0 .. 0x7e ascend with their value
// (0x7e = 448; 0x7f is NaN). Codes 0 .. 7 are the subnormals k 2^-9, code 8 is 2^-6.
constexpr uint32_t kE4m3LargestCode = 0x7e;
constexpr float kE4m3Largest = 448.0f;
constexpr float kE4m3SmallestNormal = 0x1p-6f;

// The e4m3 code of a normal magnitude m in [2^-6, 448) with the mantissa bits below e4m3's
// dropped (a round down): the float's exponent, rebased, then its top 3 mantissa bits.
KVSERVE_HOST_DEVICE inline uint32_t e4m3_truncated_code(uint32_t float_bits) {
  return (((float_bits >> 23) - 127u + 7u) << 3) | ((float_bits >> 20) & 7u);
}

KVSERVE_HOST_DEVICE inline uint32_t bits_of(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  return bits;
}

// The code of the largest e4m3 magnitude <= m (m >= 0 or -0, not NaN), saturating at 448.
KVSERVE_HOST_DEVICE inline uint32_t e4m3_magnitude_down(float m) {
  if (m >= kE4m3Largest) return kE4m3LargestCode;
  // Subnormals: m 2^9 is exact, and its floor the count of 2^-9 steps.
  if (m < kE4m3SmallestNormal) return static_cast<uint32_t>(floorf(m * 512.0f));
  return e4m3_truncated_code(bits_of(m));
}

// The code of the smallest e4m3 magnitude >= m (m >= 0 or -0, not NaN), saturating at 448.
KVSERVE_HOST_DEVICE inline uint32_t e4m3_magnitude_up(float m) {
  if (m >= kE4m3Largest) return kE4m3LargestCode;
  if (m < kE4m3SmallestNormal) return static_cast<uint32_t>(ceilf(m * 512.0f));  // up to 2^-6
  const uint32_t bits = bits_of(m);
  // Dropped bits: the next code up (codes ascend, so past mantissa 7 is the next exponent's 0).
  return e4m3_truncated_code(bits) + ((bits & 0xfffffu) != 0u ? 1u : 0u);
}

// The e4m3 code (sign bit 0x80) of the largest value <= x, and of the smallest >= x, saturating
// at +-448; 0 for NaN. As engine/kv_quant.h's e4m3_round_down and e4m3_round_up.
KVSERVE_HOST_DEVICE inline uint32_t e4m3_code_down(float x) {
  if (isnan(x)) return 0;
  return x >= 0.0f ? e4m3_magnitude_down(x) : 0x80u | e4m3_magnitude_up(-x);
}
KVSERVE_HOST_DEVICE inline uint32_t e4m3_code_up(float x) {
  if (isnan(x)) return 0;
  return x >= 0.0f ? e4m3_magnitude_up(x) : 0x80u | e4m3_magnitude_down(-x);
}

}  // namespace kvserve
