// Token plus position embedding: the residual stream's first value.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kvserve::cuda {

// x[t][c] = wte[tokens[t]][c] + wpe[positions[t]][c], in fp32 (the residual stream stays fp32 so
// that 2 * n_layer additions do not each round to fp16).
//   tokens, positions: int32 [rows] (ids and positions already checked by the caller)
//   wte: fp16 [vocab][C]   wpe: fp16 [n_positions][C]   x: fp32 [rows][C]
void embedding_forward(float* x, const int32_t* tokens, const int32_t* positions, const __half* wte,
                       const __half* wpe, int rows, int channels, cudaStream_t stream);

}  // namespace kvserve::cuda
