// Greedy sampling, one block per row: a pass for the maximum (and the first id holding it), a
// pass for the softmax denominator. Two passes over a 200 KB row in L2 cost less than the copy
// of the row to the host that they replace.
#include "kernels/greedy_sample.h"

#include <cmath>
#include <stdexcept>

#include "kernels/cuda_check.h"

namespace kvserve::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// ---- CUDA kernels

__global__ void __launch_bounds__(kThreads)
    greedy_sample_kernel(const float* logits, int vocab, int32_t* token, float* logprob,
                         int32_t* invalid) {
  __shared__ float max_s[kWarps];
  __shared__ int id_s[kWarps];
  __shared__ int bad_s[kWarps];
  __shared__ double sum_s[kWarps];
  const float* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // Pass 1: the largest logit and the lowest id holding it; NaN and +inf are flagged.
  float best = -INFINITY;
  int best_id = vocab;  // none yet: loses every tie
  int bad = 0;
  for (int v = threadIdx.x; v < vocab; v += kThreads) {
    const float l = row[v];
    if (isnan(l) || l == INFINITY) bad = 1;
    if (l > best) {  // ids rise along the loop, so the first strict maximum is the lowest id
      best = l;
      best_id = v;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, best, o);
    const int other_id = __shfl_xor_sync(0xffffffffu, best_id, o);
    if (other > best || (other == best && other_id < best_id)) {
      best = other;
      best_id = other_id;
    }
    bad |= __shfl_xor_sync(0xffffffffu, bad, o);
  }
  if (lane == 0) {
    max_s[warp] = best;
    id_s[warp] = best_id;
    bad_s[warp] = bad;
  }
  __syncthreads();
  best = max_s[0];
  best_id = id_s[0];
  bad = bad_s[0];
  for (int w = 1; w < kWarps; ++w) {
    if (max_s[w] > best || (max_s[w] == best && id_s[w] < best_id)) {
      best = max_s[w];
      best_id = id_s[w];
    }
    bad |= bad_s[w];
  }
  if (best_id == vocab) bad = 1;  // every logit is -inf

  // Pass 2: sum of exp(l - max), each exp in float, accumulated in double.
  double sum = 0.0;
  if (!bad) {
    for (int v = threadIdx.x; v < vocab; v += kThreads) sum += expf(row[v] - best);
  }
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) sum_s[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += sum_s[w];
    token[blockIdx.x] = bad ? 0 : best_id;
    logprob[blockIdx.x] = bad ? 0.0f
                              : static_cast<float>(static_cast<double>(best) -
                                                   (static_cast<double>(best) + log(total)));
    invalid[blockIdx.x] = bad;
  }
}

}  // namespace

// ---- kernel launchers

void greedy_sample(const float* logits, int rows, int vocab, int32_t* token, float* logprob,
                   int32_t* invalid, cudaStream_t stream) {
  if (rows < 0 || vocab < 1) throw std::invalid_argument("greedy_sample: bad shape");
  if (rows == 0) return;
  if (!logits || !token || !logprob || !invalid) {
    throw std::invalid_argument("greedy_sample: null pointer");
  }
  greedy_sample_kernel<<<rows, kThreads, 0, stream>>>(logits, vocab, token, logprob, invalid);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
