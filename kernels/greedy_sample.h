// Greedy sampling on the GPU (engine/sampler.h steps 2 and 4 with no repetition penalty): the
// token and its logprob per row, so a decode step copies ids, not [rows][vocab] logits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvserve::cuda {

// Per row r of logits:
//   token[r]   = the id of the largest logit, the lowest such id on ties
//   logprob[r] = l_id - (l_max + log(sum_v exp(l_v - l_max))): exp in float, the sum and the rest
//                in double, as sample_token
//   invalid[r] = 1 when the row holds a NaN or +inf or no finite value (sample_token throws), else
//   0 logits: fp32 [rows][vocab]   token, invalid: int32 [rows]   logprob: fp32 [rows]
void greedy_sample(const float* logits, int rows, int vocab, int32_t* token, float* logprob,
                   int32_t* invalid, cudaStream_t stream);

}  // namespace kvserve::cuda
