// Next-token sampling on the GPU: engine/sampler.h's algorithm (repetition penalty, greedy,
// top-k, top-p, the seeded draw, the raw logprob) for every row of a batch, so a step copies ids
// and logprobs to the host instead of [rows][vocab] logits.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace kvserve::cuda {

// One row's sampling parameters, already validated (engine/sampler.h's validate()); the same
// struct on the host and the device.
struct SampleRowParams {
  double uniform;            // the draw's u in [0, 1): sampling_uniform(seed, step)
  float temperature;         // 0 = greedy
  float top_p;               // in (0, 1]; 1 = off
  float repetition_penalty;  // 1 = off
  int32_t top_k;             // 0 or >= vocab = off
  int32_t history_begin;     // this row's history (prompt and generated ids) is
  int32_t history_end;       // history[history_begin, history_end), each id in [0, vocab)
};

// Why a row got no token: the logits sample_token rejects.
enum SampleStatus : int32_t {
  kSampleOk = 0,
  kSampleLogitsInfOrNoFinite = 1,  // a +inf, or every logit -inf or NaN
  kSampleLogitsNan = 2,            // a NaN among finite values
};

// Bytes of device scratch sample_tokens needs for `rows` rows of `vocab` logits (sort keys twice
// over, the penalised logits inside them, the sort's own storage): about 16 * rows * vocab.
// Asks CUB for its storage size, so it needs the device.
size_t sample_tokens_scratch_bytes(int rows, int vocab);

// Per row r of logits, by the algorithm of engine/sampler.h:
//   token[r]   = the sampled id
//   logprob[r] = log-softmax of the raw logits at token[r]
//   status[r]  = kSampleOk, or why the row's logits were rejected (token and logprob then 0)
// logits: fp32 [rows][vocab], device, read only   params: [rows], device
// params_host: the same [rows] on the host, read to skip the sort when no row draws
// history: int32 [sum of the rows' history lengths], device
// scratch: sample_tokens_scratch_bytes(rows, vocab) bytes, device, 256-byte aligned
// token, status: int32 [rows]   logprob: fp32 [rows], device
// Everything runs on `stream`, asynchronously; rows * vocab must fit an int.
void sample_tokens(const float* logits, int rows, int vocab, const SampleRowParams* params,
                   const SampleRowParams* params_host, const int32_t* history, void* scratch,
                   size_t scratch_bytes, int32_t* token, float* logprob, int32_t* status,
                   cudaStream_t stream);

}  // namespace kvserve::cuda
