#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <functional>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace kvserve {
namespace {

constexpr uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ull;

// Candidates are ranked lazily: the first chunk is this long and each next one kChunkGrowth times
// longer. Top-p prefixes and draws on peaked distributions end within the first few hundred ranks,
// so a 50257-id vocabulary is mostly left unsorted, while a flat one still needs only a handful of
// partitions.
constexpr size_t kFirstChunk = 64;
constexpr size_t kChunkGrowth = 4;
// Before ranking, candidates are split into a head and a tail whose ids each weigh less than
// kTailMass / n of the total, so the tail holds at most kTailMass of the probability. Ranking works
// on the head and reaches into the tail only for the rare walk that gets that far.
constexpr double kTailMass = 1e-3;

uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + kGoldenGamma;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename T>
std::string out_of_range(const char* field, const char* range, T got, const char* meaning) {
  std::ostringstream message;
  message << field << " must be " << range << " (got " << got << "); " << meaning;
  return message.str();
}

// A candidate as one integer whose descending order is the rank order: the logit's bits made
// monotone in the high half, the complemented id (lower id ranks first on ties) in the low half.
// Sorting these beats sorting ids through a comparator that reads the logits: no indirection.
uint64_t rank_key(float w, int32_t id) {
  uint32_t bits;
  const float folded = w + 0.0f;  // -0 becomes +0, as the two compare equal
  std::memcpy(&bits, &folded, sizeof(bits));
  bits = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
  return (static_cast<uint64_t>(bits) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(id));
}

int32_t key_id(uint64_t key) {
  return static_cast<int32_t>(0xFFFFFFFFu - (key & 0xFFFFFFFFu));
}

// Reused across calls on a thread so that sampling allocates only when the vocabulary grows; each
// engine or test thread gets its own, so concurrent calls never share it.
struct Scratch {
  std::vector<float> penalised;  // [vocab] logits after the repetition penalty
  std::vector<float> weight;     // [vocab] e = exp((w - w_max) / T), valid for the candidates
  std::vector<uint64_t> keys;    // [vocab] rank keys, a prefix of them sorted
};

Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

float max_of(const float* w, size_t vocab) {
  float max = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < vocab; ++i) max = std::max(max, w[i]);
  return max;
}

// The lowest id holding the largest value.
int32_t argmax(const float* w, size_t vocab) {
  size_t best = 0;
  for (size_t i = 1; i < vocab; ++i) {
    if (w[i] > w[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

// Step 3 of the algorithm in sampler.h over the penalised logits w, whose max is w_max. When
// `weights_ready`, scratch.weight already holds every id's e: w is the raw logits and T is 1, so
// the logprob's pass computed exactly these.
int32_t draw(const float* w, float w_max, bool weights_ready, size_t vocab,
             const SamplingParams& params, uint64_t step, Scratch& scratch) {
  std::vector<uint64_t>& keys = scratch.keys;
  keys.resize(vocab);
  for (size_t i = 0; i < vocab; ++i) keys[i] = rank_key(w[i], static_cast<int32_t>(i));
  const auto ranks_before = std::greater<uint64_t>();

  const bool top_k_on = params.top_k > 0 && static_cast<size_t>(params.top_k) < vocab;
  const size_t n = top_k_on ? static_cast<size_t>(params.top_k) : vocab;
  if (top_k_on) std::nth_element(keys.begin(), keys.begin() + n - 1, keys.end(), ranks_before);

  float* weight = scratch.weight.data();
  const float temperature = params.temperature;
  double sum = 0.0;
  for (size_t j = 0; j < n; ++j) {
    const int32_t id = key_id(keys[j]);
    if (!weights_ready) weight[id] = std::exp((w[id] - w_max) / temperature);
    sum += weight[id];
  }
  auto prob_at_rank = [&](size_t j) { return weight[key_id(keys[j])] / sum; };

  // The head/tail cut is made on w, not on the rounded weights, so that it follows the rank order
  // exactly: every head candidate ranks before every tail one.
  const double cut = w_max + temperature * std::log(kTailMass * sum / static_cast<double>(n));
  const size_t head = std::partition(keys.begin(), keys.begin() + n,
                                     [&](uint64_t key) { return w[key_id(key)] >= cut; }) -
                      keys.begin();

  // keys[0, ranked) holds the best `ranked` candidates in rank order; the rest of keys[0, head)
  // holds the other head candidates and keys[head, n) the tail, each unordered.
  size_t ranked = 0;
  auto rank_more = [&] {
    const size_t end = ranked < head ? head : n;
    const size_t target = std::min(end, std::max(ranked * kChunkGrowth, kFirstChunk));
    if (target < end) {
      std::nth_element(keys.begin() + ranked, keys.begin() + target, keys.begin() + end,
                       ranks_before);
    }
    std::sort(keys.begin() + ranked, keys.begin() + target, ranks_before);
    ranked = target;
  };

  size_t kept = n;
  double kept_mass = 1.0;
  if (params.top_p < 1.0f) {
    double cumulative = 0.0;
    size_t j = 0;
    while (j < n && cumulative < params.top_p) {
      if (j == ranked) rank_more();
      cumulative += prob_at_rank(j++);
    }
    kept = j;
    kept_mass = cumulative;
  }

  const double threshold = sampling_uniform(params.seed, step) * kept_mass;
  double cumulative = 0.0;
  size_t last_possible = 0;  // rank 0 has e = 1, so p > 0
  for (size_t j = 0; j < kept; ++j) {
    if (j == ranked) rank_more();
    const double p = prob_at_rank(j);
    cumulative += p;
    if (cumulative > threshold) return key_id(keys[j]);
    if (p > 0.0) last_possible = j;
  }
  return key_id(keys[last_possible]);
}

}  // namespace

absl::Status validate(const SamplingParams& params) {
  std::string errors;
  auto add = [&errors](const std::string& error) {
    errors += errors.empty() ? error : "; " + error;
  };
  // Written as !(in range) so that NaN, which fails every comparison, is rejected too.
  if (!(params.temperature >= 0.0f && params.temperature <= 100.0f)) {
    add(out_of_range("temperature", "in [0, 100]", params.temperature, "0 means greedy"));
  }
  if (params.top_k < 0) add(out_of_range("top_k", ">= 0", params.top_k, "0 means off"));
  if (!(params.top_p > 0.0f && params.top_p <= 1.0f)) {
    add(out_of_range("top_p", "in (0, 1]", params.top_p, "1 means off"));
  }
  if (!(params.repetition_penalty > 0.0f && params.repetition_penalty <= 10.0f)) {
    add(out_of_range("repetition_penalty", "in (0, 10]", params.repetition_penalty, "1 means off"));
  }
  if (errors.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(errors);
}

double sampling_uniform(uint64_t seed, uint64_t step) {
  return static_cast<double>(splitmix64(seed ^ (step * kGoldenGamma)) >> 11) * 0x1.0p-53;
}

const char* const kLogitsInfOrNoFiniteError =
    "sample_token: the logits hold +inf or no finite value";
const char* const kLogitsNanError = "sample_token: the logits hold a NaN";

std::string sample_input_error(const SamplingParams& params, int vocab_size,
                               const std::vector<int32_t>& history) {
  if (const absl::Status error = validate(params); !error.ok()) {
    return "sample_token: " + std::string(error.message());
  }
  if (vocab_size < 1) {
    return "sample_token: vocab_size must be >= 1 (got " + std::to_string(vocab_size) + ")";
  }
  for (int32_t id : history) {
    if (id < 0 || id >= vocab_size) {
      return "sample_token: history id " + std::to_string(id) + " is outside the vocabulary [0, " +
             std::to_string(vocab_size) + ")";
    }
  }
  return {};
}

SampledToken sample_token(const float* logits, int vocab_size, const SamplingParams& params,
                          const std::vector<int32_t>& history, uint64_t step) {
  if (const std::string error = sample_input_error(params, vocab_size, history); !error.empty()) {
    throw std::invalid_argument(error);
  }
  const size_t vocab = static_cast<size_t>(vocab_size);
  Scratch& scratch = thread_scratch();
  scratch.weight.resize(vocab);

  // The raw log-normaliser, for the logprob. The max scan rejects +inf and all -inf; a NaN, which
  // every comparison skips, surfaces in the sum.
  const float raw_max = max_of(logits, vocab);
  if (!std::isfinite(raw_max)) {
    throw std::invalid_argument(kLogitsInfOrNoFiniteError);
  }
  double raw_sum = 0.0;
  for (size_t i = 0; i < vocab; ++i) {
    scratch.weight[i] = std::exp(logits[i] - raw_max);
    raw_sum += scratch.weight[i];
  }
  if (!std::isfinite(raw_sum)) throw std::invalid_argument(kLogitsNanError);
  const double log_normaliser = raw_max + std::log(raw_sum);

  const float* w = logits;
  const float penalty = params.repetition_penalty;
  if (penalty != 1.0f && !history.empty()) {
    scratch.penalised.assign(logits, logits + vocab);
    // From the raw logit each time, so an id repeated in history is penalised once.
    for (int32_t id : history) {
      const float l = logits[id];
      scratch.penalised[id] = l > 0.0f ? l / penalty : l * penalty;
    }
    w = scratch.penalised.data();
  }

  int32_t id;
  if (params.greedy()) {
    id = argmax(w, vocab);
  } else {
    const bool raw = w == logits;
    const bool weights_ready = raw && params.temperature == 1.0f;
    id = draw(w, raw ? raw_max : max_of(w, vocab), weights_ready, vocab, params, step, scratch);
  }
  return {id, static_cast<float>(logits[id] - log_normaliser)};
}

}  // namespace kvserve
