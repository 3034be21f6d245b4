// Bias add with an optional GELU, in place on a GEMM output.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace kvserve::cuda {

enum class BiasActivation { kNone, kGeluTanh, kGeluErf };

// y[r][n] = act(y[r][n] + bias[n]) in fp32 math, stored fp16.
//   y: fp16 [rows][cols] (cols even)   bias: fp16 [cols]
void bias_activation_forward(__half* y, const __half* bias, int rows, int cols,
                             BiasActivation activation, cudaStream_t stream);

}  // namespace kvserve::cuda
