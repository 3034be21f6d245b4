// rint(offset / scale) for the quantizers' codes, with a multiplication where that cannot change
// a code. Plain C++ (host and device), no CUDA headers: the device quantizers
// (kernels/kv_cache_device.cuh) call it, and a host test (tests/kv_quant_test.cc) checks it against
// the division for every fp16 and e4m3 scale.
#pragma once

#include <math.h>

#ifndef KVSERVE_HOST_DEVICE
#if defined(__CUDACC__)
#define KVSERVE_HOST_DEVICE __host__ __device__
#else
#define KVSERVE_HOST_DEVICE
#endif
#endif

namespace kvserve {

// rintf(offset / scale), scale > 0 and inverse = 1 / scale, as far as a code clamped to [0, 255]
// can tell, without a division for almost every element. While |offset / scale| < 512, offset *
// inverse lies within 2^-13 of the divided quotient (each is within 2^-23 relative of the exact
// one), so both round alike unless the product lies within 2^-11 of a half-integer: only then
// (about one element in a thousand, and for NaN) it divides. From 512 on (infinities too) both
// clamp to the same end, so the product is returned unrounded.
KVSERVE_HOST_DEVICE inline float rint_quotient(float offset, float scale, float inverse) {
#if defined(__CUDA_ARCH__)
  const float product = __fmul_rn(offset, inverse);  // never contracted into the subtraction below
#else
  const float product = offset * inverse;  // ISO C++ builds do not contract (-ffp-contract=off)
#endif
  if (fabsf(product) >= 512.0f) return product;
  if (fabsf(product - floorf(product) - 0.5f) > 0x1p-11f) return rintf(product);
  return rintf(offset / scale);
}

}  // namespace kvserve
