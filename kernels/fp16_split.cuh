// An fp32 value as the sum of two fp16 values, for tensor-core kernels that take dequantized keys
// and values (not exact in one fp16) as two mma operands.
#pragma once

#include <cuda_fp16.h>

namespace kvserve::cuda {

// x as an fp16 high part and an fp16 low part (x - high, rounded): x = high + low to about 2^-22
// relative.
__device__ __forceinline__ void split_half(float x, __half& high, __half& low) {
  high = __float2half_rn(x);
  low = __float2half_rn(x - __half2float(high));
}

}  // namespace kvserve::cuda
