// rint(offset / scale) for the quantizers' codes, with a multiplication where that cannot change
// a code. Plain C++ (host and device), no CUDA headers: the device quantizers
// (kernels/kv_cache_device.cuh) call it, and a host test (tests/kv_quant_test.cc) checks it against
// the division for every fp16 and e4m3 scale.
#pragma once

#include <math.h>

#include "kernels/host_device.h"

namespace kvserve {

// rintf(offset / scale), scale > 0 and inverse = 1 / scale, as far as a code clamped to [0, 255]
// can tell, without a division for almost every element. While |offset / scale| < 512, offset *
// inverse lies within 2^-13 of the divided quotient (each is within 2^-23 relative of the exact
// one), so both round alike unless the product lies within 2^-11 of a half-integer: only then
// (about one element in a thousand, and for NaN) it divides. The product is rounded by adding and
// subtracting 1.5 * 2^23 (round to nearest even, as rintf, for |x| < 2^22) and its distance to a
// half-integer taken from that rounding: plain float additions where rintf and floorf each take
// the SM's quarter-rate conversion unit, which the fp8 pair search (4 candidates an element) spent
// most of its time on. product - rounded is exact (both lie on product's grid, within 0.5 of each
// other), and subtracting 0.5 from its magnitude rounds only below 0.25, far from the band, so
// below 512 the test decides as |product - floor(product) - 0.5| > 2^-11. From 512 on the
// rounding may be off (beyond 2^22) or divide, but it keeps the sign and |rounded| >= 512, so it
// clamps to the quotient's end; infinities make the distance NaN and divide.
KVSERVE_HOST_DEVICE inline float rint_quotient(float offset, float scale, float inverse) {
  constexpr float kRoundingShift = 0x1.8p23f;
#if defined(__CUDA_ARCH__)
  // Never contracted or reassociated: each operation is rounded on its own, as on the host.
  const float product = __fmul_rn(offset, inverse);
  const float rounded = __fsub_rn(__fadd_rn(product, kRoundingShift), kRoundingShift);
  if (fabsf(fabsf(__fsub_rn(product, rounded)) - 0.5f) > 0x1p-11f) return rounded;
#else
  // ISO C++ builds neither contract (-ffp-contract=off) nor reassociate these operations.
  const float product = offset * inverse;
  const float rounded = (product + kRoundingShift) - kRoundingShift;
  if (fabsf(fabsf(product - rounded) - 0.5f) > 0x1p-11f) return rounded;
#endif
  return rintf(offset / scale);
}

}  // namespace kvserve
