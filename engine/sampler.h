// Next-token sampling: the CPU reference. The CUDA sampler implements the same algorithm, so the
// algorithm below is a contract, spelled out step by step; change both or neither.
//
// sample_token(logits, vocab, params, history, step):
//
//  1. Repetition penalty (CTRL, Keskar et al. 2019; Hugging Face convention). For each distinct id
//     in `history`, in float: w = l > 0 ? l / p : l * p, where l is the raw logit and p the
//     penalty. Every other id keeps w = l. Repeats in history do not compound: the penalty is a
//     function of the raw logit, applied once per id.
//  2. Greedy (temperature == 0): the id with the largest w, the lowest such id on ties. top_k,
//     top_p and the seed are ignored.
//  3. Otherwise ids are ranked by w descending, ties by lower id; this one total order is used for
//     top-k, top-p and the draw (dividing by a positive temperature does not change it).
//     a. Top-k (0 < top_k < vocab): the candidates are the first top_k ids of that order; otherwise
//        every id is a candidate.
//     b. Softmax over the candidates, max subtracted: e = exp((w - w_max) / temperature) in float
//        (e = 1 at the top rank), S = the sum of e over the candidates in double, p = e / S in
//        double.
//     c. Top-p (top_p < 1): walking the candidates in rank order, c_j = c_(j-1) + p_j (c_0 = 0);
//        keep the first J candidates, J the smallest j with c_j >= top_p (all of them if rounding
//        never gets there). The kept mass M is c_J. With top_p == 1 every candidate is kept and
//        M is taken as exactly 1.
//     d. Draw u = sampling_uniform(seed, step) and walk the kept candidates in rank order with the
//        same running sum c: the result is the first candidate with c_j > u * M (in real
//        arithmetic: the first whose cumulative renormalised probability c_j / M exceeds u). When
//        rounding leaves no such candidate, the last kept one with p > 0 (never a masked id).
//  4. logprob: the log-softmax of the RAW logits (no penalty, no temperature) at the chosen id:
//     l_id - (l_max + log(sum over all ids of exp(l - l_max))), exp in float, the rest in double.
//     Clients read it as the model's confidence, independent of how the token was picked.
//
// The contract is exact in real arithmetic and the result deterministic on a given build. The
// order of the sum S is not part of it (a GPU reduces in parallel) and exp() may differ by an ulp
// between libraries, so two implementations can pick different tokens only when u * M falls within
// rounding (~1e-15 relative) of a cumulative boundary, or c_j lies that close to top_p.
#pragma once

#include <absl/status/status.h>

#include <cstdint>
#include <string>
#include <vector>

namespace kvserve {

struct SamplingParams {
  float temperature = 1.0f;         // 0 = greedy
  int top_k = 0;                    // 0 = off
  float top_p = 1.0f;               // 1 = off
  float repetition_penalty = 1.0f;  // 1 = off
  uint64_t seed = 0;
  bool greedy() const { return temperature == 0.0f; }
};

// OK when `params` are valid, else INVALID_ARGUMENT with a message a person can act on that names
// the field, e.g. "temperature must be in [0, 100] (got -1)". Limits: temperature in [0, 100],
// top_k >= 0 (values beyond the vocabulary mean off), top_p in (0, 1], repetition_penalty in
// (0, 10], all finite.
absl::Status validate(const SamplingParams& params);

struct SampledToken {
  int32_t id;
  float logprob;  // log-softmax of the raw logits at `id`
};

// Counter-based uniform in [0, 1): a pure function of (seed, step), so that the CUDA sampler draws
// the same numbers without carrying generator state per sequence, and a request replays exactly
// after preemption and recompute. With x = seed ^ (step * 0x9E3779B97F4A7C15) (mod 2^64):
//   z = x + 0x9E3779B97F4A7C15
//   z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
//   z = (z ^ (z >> 27)) * 0x94D049BB133111EB
//   z = z ^ (z >> 31)
// (Vigna's SplitMix64 output for state x), and the result is (z >> 11) * 2^-53: the top 53 bits,
// exactly representable in a double and never 1.
double sampling_uniform(uint64_t seed, uint64_t step);

// Why sample_token rejects these inputs before it reads the logits (params that fail validate(),
// vocab_size < 1, a history id outside [0, vocab_size)): the message it throws, or empty when
// they are fine. A sampler elsewhere (the CUDA backend's) reports the same failures through it.
std::string sample_input_error(const SamplingParams& params, int vocab_size,
                               const std::vector<int32_t>& history);

// The messages sample_token throws for logits it rejects, for the same reason.
extern const char* const kLogitsInfOrNoFiniteError;  // +inf, or no finite value
extern const char* const kLogitsNanError;            // a NaN among finite values

// Picks the next token by the algorithm at the top of this file. logits: [vocab_size] raw model
// output, finite or -inf (a masked id), read only. history: the prompt and generated ids so far,
// for the repetition penalty. step: the index of the token being generated (0 for the first), the
// RNG counter. Deterministic given (logits, params, history, step). Allocation-free once the
// calling thread has seen this vocab size (the scratch is thread_local).
// Throws std::invalid_argument when params fail validate(), vocab_size < 1, a history id is out of
// [0, vocab_size), or the logits hold a NaN or +inf or no finite value: those are bugs upstream,
// and a quietly wrong token would hide them.
SampledToken sample_token(const float* logits, int vocab_size, const SamplingParams& params,
                          const std::vector<int32_t>& history, uint64_t step);

}  // namespace kvserve
