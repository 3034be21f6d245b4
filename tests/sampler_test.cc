#include "engine/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace kvserve {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

SamplingParams with_temperature(float temperature) {
  SamplingParams params;
  params.temperature = temperature;
  return params;
}

std::vector<float> normal_logits(size_t vocab, float stddev, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> logits(vocab);
  for (float& l : logits) l = normal(rng);
  return logits;
}

SampledToken sample(const std::vector<float>& logits, const SamplingParams& params,
                    uint64_t step = 0, const std::vector<int32_t>& history = {}) {
  return sample_token(logits.data(), static_cast<int>(logits.size()), params, history, step);
}

// How often each id comes out over steps 0..draws-1.
std::vector<int> histogram(const std::vector<float>& logits, const SamplingParams& params,
                           int draws) {
  std::vector<int> counts(logits.size(), 0);
  for (int step = 0; step < draws; ++step) ++counts[sample(logits, params, step).id];
  return counts;
}

// softmax(logits / temperature) in long double, the analytic distribution.
std::vector<double> softmax(const std::vector<float>& logits, double temperature) {
  long double max = *std::max_element(logits.begin(), logits.end()) / temperature;
  long double sum = 0;
  for (float l : logits) sum += std::exp(l / temperature - max);
  std::vector<double> probs;
  for (float l : logits)
    probs.push_back(static_cast<double>(std::exp(l / temperature - max) / sum));
  return probs;
}

// Every id's count is within 5 sigma of its binomial expectation (an id with p = 0 never comes
// out), and Pearson's chi-square over the ids with p > 0 stays below df + 6 sqrt(2 df), about 6
// sigma on its normal approximation. Either holds by chance with probability < 1e-6.
void expect_frequencies(const std::vector<int>& counts, const std::vector<double>& probs,
                        int draws) {
  double chi_square = 0.0;
  int df = -1;
  for (size_t id = 0; id < counts.size(); ++id) {
    const double expected = draws * probs[id];
    if (probs[id] == 0.0) {
      EXPECT_EQ(counts[id], 0) << "id " << id << " has probability 0";
      continue;
    }
    const double sigma = std::sqrt(expected * (1.0 - probs[id]));
    EXPECT_NEAR(counts[id], expected, 5.0 * sigma + 1.0) << "id " << id << " p=" << probs[id];
    chi_square += (counts[id] - expected) * (counts[id] - expected) / expected;
    ++df;
  }
  EXPECT_LT(chi_square, df + 6.0 * std::sqrt(2.0 * df)) << "df=" << df;
}

// The algorithm of sampler.h written the plain way, with a full sort, as the oracle for the
// sampler's lazy ranking. It follows the contract's arithmetic, so the ids agree exactly, not just
// in distribution; only the order of the sum S may differ (with top-k on), which could matter only
// for a u within ~1e-16 of a boundary, and these fixed draws have none.
int32_t reference_sample(const std::vector<float>& logits, const SamplingParams& params,
                         const std::vector<int32_t>& history, uint64_t step) {
  const size_t vocab = logits.size();
  std::vector<float> w = logits;
  for (int32_t id : history) {
    const float l = logits[id];
    w[id] = l > 0.0f ? l / params.repetition_penalty : l * params.repetition_penalty;
  }
  std::vector<int32_t> ranked(vocab);
  std::iota(ranked.begin(), ranked.end(), 0);
  std::stable_sort(ranked.begin(), ranked.end(), [&](int32_t a, int32_t b) { return w[a] > w[b]; });
  if (params.greedy()) return ranked[0];

  const size_t n = params.top_k > 0 && static_cast<size_t>(params.top_k) < vocab
                       ? static_cast<size_t>(params.top_k)
                       : vocab;
  std::vector<bool> candidate(vocab, false);
  for (size_t j = 0; j < n; ++j) candidate[ranked[j]] = true;
  auto weight = [&](int32_t id) { return std::exp((w[id] - w[ranked[0]]) / params.temperature); };
  double sum = 0.0;
  for (size_t id = 0; id < vocab; ++id) {
    if (candidate[id]) sum += weight(id);
  }
  std::vector<double> probs(n);
  for (size_t j = 0; j < n; ++j) probs[j] = weight(ranked[j]) / sum;

  size_t kept = n;
  double mass = 1.0;
  if (params.top_p < 1.0f) {
    double cumulative = 0.0;
    kept = 0;
    while (kept < n && cumulative < params.top_p) cumulative += probs[kept++];
    mass = cumulative;
  }
  const double threshold = sampling_uniform(params.seed, step) * mass;
  double cumulative = 0.0;
  size_t last_possible = 0;
  for (size_t j = 0; j < kept; ++j) {
    cumulative += probs[j];
    if (cumulative > threshold) return ranked[j];
    if (probs[j] > 0.0) last_possible = j;
  }
  return ranked[last_possible];
}

TEST(SamplerGreedy, ArgmaxWithLowestIdOnTies) {
  const std::vector<float> logits = {0.5f, 3.0f, -1.0f, 3.0f, 2.9f};
  const SampledToken token = sample(logits, with_temperature(0.0f));
  EXPECT_EQ(token.id, 1);
  // The seed and step do not matter to greedy decoding.
  SamplingParams params = with_temperature(0.0f);
  params.seed = 1234;
  params.top_k = 3;
  params.top_p = 0.1f;
  for (uint64_t step = 0; step < 20; ++step) EXPECT_EQ(sample(logits, params, step).id, 1);
}

TEST(SamplerGreedy, TopKOneEqualsGreedy) {
  std::vector<float> logits = normal_logits(50257, 2.0f, 1);
  const float max = *std::max_element(logits.begin(), logits.end());
  logits[40000] = max;  // ties with the original argmax, at a higher id than ...
  logits[17] = max;     // ... this one, which must win
  SamplingParams top1;
  top1.top_k = 1;
  top1.temperature = 0.7f;
  for (uint64_t step = 0; step < 50; ++step) {
    top1.seed = step * 7;
    EXPECT_EQ(sample(logits, top1, step).id, 17);
  }
  // Also after a repetition penalty has moved the argmax.
  top1.repetition_penalty = 2.0f;
  SamplingParams greedy = with_temperature(0.0f);
  greedy.repetition_penalty = 2.0f;
  const std::vector<int32_t> history = {17, 40000};
  const int32_t expected = sample(logits, greedy, 0, history).id;
  EXPECT_NE(expected, 17);
  for (uint64_t step = 0; step < 50; ++step) {
    EXPECT_EQ(sample(logits, top1, step, history).id, expected);
  }
}

TEST(SamplerDeterminism, SameSeedAndStepSameToken) {
  const std::vector<float> logits = normal_logits(50257, 1.0f, 2);
  const std::vector<float> other = normal_logits(1000, 1.0f, 3);
  SamplingParams params;
  params.seed = 42;
  params.top_p = 0.95f;
  std::vector<int32_t> first;
  for (uint64_t step = 0; step < 30; ++step) first.push_back(sample(logits, params, step).id);
  for (uint64_t step = 0; step < 30; ++step) {
    // Calls for another sequence and vocabulary in between leave no trace in the scratch.
    sample(other, with_temperature(2.0f), step + 100);
    EXPECT_EQ(sample(logits, params, step).id, first[step]) << "step " << step;
  }
}

TEST(SamplerDeterminism, VariesAcrossStepsAndSeeds) {
  const std::vector<float> flat(16, 0.0f);
  SamplingParams seed_a;
  seed_a.seed = 1;
  SamplingParams seed_b;
  seed_b.seed = 2;
  std::set<int32_t> seen;
  int differing = 0;
  for (uint64_t step = 0; step < 200; ++step) {
    const int32_t a = sample(flat, seed_a, step).id;
    seen.insert(a);
    differing += a != sample(flat, seed_b, step).id;
  }
  EXPECT_EQ(seen.size(), 16u);  // 200 uniform draws over 16 ids miss one with p ~ 4e-5
  EXPECT_GT(differing, 150);    // expected 187.5 of 200
}

TEST(SamplerDeterminism, ThreadsDoNotShareState) {
  const std::vector<float> logits = normal_logits(50257, 1.5f, 4);
  SamplingParams params;
  params.top_k = 200;
  params.top_p = 0.9f;
  params.repetition_penalty = 1.2f;
  const std::vector<int32_t> history = {1, 2, 3, 500};
  std::vector<int32_t> serial(100);
  for (uint64_t step = 0; step < 100; ++step)
    serial[step] = sample(logits, params, step, history).id;
  std::vector<int32_t> a(100), b(100);
  std::thread thread_a([&] {
    for (uint64_t step = 0; step < 100; ++step) a[step] = sample(logits, params, step, history).id;
  });
  std::thread thread_b([&] {
    for (uint64_t step = 0; step < 100; ++step) b[step] = sample(logits, params, step, history).id;
  });
  thread_a.join();
  thread_b.join();
  EXPECT_EQ(a, serial);
  EXPECT_EQ(b, serial);
}

TEST(SamplerDistribution, FrequenciesMatchTemperedSoftmax) {
  const std::vector<float> logits = {1.0f, 2.0f, 0.0f, -1.0f, 1.5f, 0.5f, 2.2f, -0.5f};
  constexpr int kDraws = 100000;
  for (float temperature : {0.5f, 1.0f, 2.0f}) {
    SCOPED_TRACE("temperature " + std::to_string(temperature));
    SamplingParams params = with_temperature(temperature);
    params.seed = 7;
    expect_frequencies(histogram(logits, params, kDraws), softmax(logits, temperature), kDraws);
  }
}

TEST(SamplerDistribution, MaskedIdsNeverComeOut) {
  std::vector<float> logits = normal_logits(64, 1.0f, 5);
  for (size_t id = 0; id < logits.size(); id += 2) logits[id] = -kInf;
  constexpr int kDraws = 20000;
  SamplingParams params = with_temperature(1.5f);
  expect_frequencies(histogram(logits, params, kDraws), softmax(logits, 1.5), kDraws);
}

TEST(SamplerTopK, NeverOutsideTheKLargest) {
  const std::vector<float> logits = normal_logits(1000, 1.0f, 6);
  std::vector<int32_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::partial_sort(ids.begin(), ids.begin() + 5, ids.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  const std::set<int32_t> top5(ids.begin(), ids.begin() + 5);
  SamplingParams params = with_temperature(3.0f);  // flat enough that all five come out often
  params.top_k = 5;
  std::set<int32_t> seen;
  for (uint64_t step = 0; step < 5000; ++step) {
    const int32_t id = sample(logits, params, step).id;
    ASSERT_TRUE(top5.count(id)) << "id " << id << " at step " << step;
    seen.insert(id);
  }
  EXPECT_EQ(seen, top5);
}

TEST(SamplerTopK, TiesAtTheCutKeepTheLowerId) {
  // Ranked: 0 (5), then 2, 3, 5 tie at 4; top-2 keeps 0 and 2.
  const std::vector<float> logits = {5.0f, 3.0f, 4.0f, 4.0f, 1.0f, 4.0f};
  SamplingParams params = with_temperature(100.0f);
  params.top_k = 2;
  const std::vector<int> counts = histogram(logits, params, 4000);
  EXPECT_GT(counts[0], 1500);
  EXPECT_GT(counts[2], 1500);
  EXPECT_EQ(counts[0] + counts[2], 4000);
}

TEST(SamplerTopK, FrequenciesRenormaliseOverTheK) {
  const std::vector<float> logits = {0.0f, 2.0f, 1.0f, 1.5f, -1.0f, 0.5f};
  SamplingParams params;
  params.top_k = 3;  // ids 1, 3, 2
  constexpr int kDraws = 50000;
  const std::vector<float> kept = {-kInf, 2.0f, 1.0f, 1.5f, -kInf, -kInf};
  expect_frequencies(histogram(logits, params, kDraws), softmax(kept, 1.0), kDraws);
}

// Probabilities 0.15, 0.5, 0.05, 0.3 at ids 0..3: ranked 1, 3, 0, 2 with cumulative 0.5, 0.8,
// 0.95, 1. The cuts below stay clear of those sums so that rounding cannot move them.
std::vector<float> known_prefix_logits() {
  return {std::log(0.15f), std::log(0.5f), std::log(0.05f), std::log(0.3f)};
}

TEST(SamplerTopP, ExcludesTheTail) {
  const std::vector<float> logits = known_prefix_logits();
  SamplingParams params;
  params.top_p = 0.75f;  // keeps 1 and 3, renormalised to 0.625 and 0.375
  constexpr int kDraws = 50000;
  expect_frequencies(histogram(logits, params, kDraws), {0.0, 0.625, 0.0, 0.375}, kDraws);

  params.top_p = 0.9f;  // keeps 1, 3 and 0
  expect_frequencies(histogram(logits, params, kDraws), {0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95},
                     kDraws);
}

TEST(SamplerTopP, KeepsAtLeastOneToken) {
  const std::vector<float> logits = known_prefix_logits();
  SamplingParams params;
  for (float top_p : {0.4f, 1e-6f}) {
    params.top_p = top_p;
    for (uint64_t step = 0; step < 200; ++step) EXPECT_EQ(sample(logits, params, step).id, 1);
  }
}

TEST(SamplerTopP, AppliesToTheTopKRenormalisedDistribution) {
  // Top-2 leaves 0.5 / 0.8 = 0.625 on id 1, which alone reaches top_p = 0.6. Measured on the full
  // softmax (0.5) it would not, and id 3 would come out too.
  const std::vector<float> logits = known_prefix_logits();
  SamplingParams params;
  params.top_k = 2;
  params.top_p = 0.6f;
  for (uint64_t step = 0; step < 200; ++step) EXPECT_EQ(sample(logits, params, step).id, 1);
}

TEST(SamplerRepetitionPenalty, ChangesTheArgmax) {
  const std::vector<float> logits = {2.0f, 1.8f, 0.5f};
  SamplingParams params = with_temperature(0.0f);
  params.repetition_penalty = 1.5f;  // 2.0 -> 1.33, below 1.8
  EXPECT_EQ(sample(logits, params).id, 0);
  EXPECT_EQ(sample(logits, params, 0, {0}).id, 1);
  EXPECT_EQ(sample(logits, params, 0, {2}).id, 0);  // penalising another id changes nothing
}

TEST(SamplerRepetitionPenalty, MultipliesNegativeLogits) {
  // Dividing -1.0 by 2 would raise it to -0.5 and keep id 0; the CTRL rule lowers it to -2.0.
  const std::vector<float> logits = {-1.0f, -1.2f, -3.0f};
  SamplingParams params = with_temperature(0.0f);
  params.repetition_penalty = 2.0f;
  EXPECT_EQ(sample(logits, params, 0, {0}).id, 1);
}

TEST(SamplerRepetitionPenalty, RepeatsInHistoryDoNotCompound) {
  // Once: 2.0 / 1.5 = 1.33 stays above 1.0. Three times: 2.0 / 3.375 = 0.59 would fall below.
  const std::vector<float> logits = {2.0f, 1.0f};
  SamplingParams params = with_temperature(0.0f);
  params.repetition_penalty = 1.5f;
  EXPECT_EQ(sample(logits, params, 0, {0, 0, 0}).id, 0);
}

TEST(SamplerRepetitionPenalty, ShiftsTheSampledDistribution) {
  const std::vector<float> logits = {1.0f, 0.0f, -1.0f, 0.5f};
  SamplingParams params;
  params.repetition_penalty = 2.0f;
  constexpr int kDraws = 50000;
  std::vector<int> counts(logits.size(), 0);
  for (int step = 0; step < kDraws; ++step) ++counts[sample(logits, params, step, {0, 2}).id];
  expect_frequencies(counts, softmax({0.5f, 0.0f, -2.0f, 0.5f}, 1.0), kDraws);
}

TEST(SamplerRepetitionPenalty, LeavesTheLogitsUntouched) {
  const std::vector<float> logits = normal_logits(100, 1.0f, 7);
  std::vector<float> copy = logits;
  SamplingParams params;
  params.repetition_penalty = 3.0f;
  params.top_p = 0.5f;
  sample_token(copy.data(), static_cast<int>(copy.size()), params, {1, 2, 3}, 0);
  EXPECT_EQ(copy, logits);
}

TEST(SamplerLogprob, IsTheRawLogSoftmax) {
  std::vector<float> logits = normal_logits(1000, 3.0f, 8);
  logits[5] = -kInf;
  long double max = *std::max_element(logits.begin(), logits.end());
  long double sum = 0;
  for (float l : logits) sum += std::exp(l - max);
  const long double log_normaliser = max + std::log(sum);

  SamplingParams tempered;
  tempered.temperature = 0.5f;
  tempered.top_k = 50;
  tempered.repetition_penalty = 1.7f;
  const std::vector<int32_t> history = {0, 1, 2, 3, 4};
  std::vector<SampledToken> tokens = {sample(logits, with_temperature(0.0f))};
  for (uint64_t step = 0; step < 50; ++step)
    tokens.push_back(sample(logits, tempered, step, history));
  for (const SampledToken& token : tokens) {
    const double expected = static_cast<double>(logits[token.id] - log_normaliser);
    EXPECT_NEAR(token.logprob, expected, 1e-5) << "id " << token.id;
  }
}

TEST(SamplerReference, AgreesExactlyWithAFullSort) {
  struct Case {
    size_t vocab;
    float stddev;
    SamplingParams params;
  };
  // SamplingParams{temperature, top_k, top_p, repetition_penalty, seed}
  const std::vector<Case> cases = {
      {50257, 1.0f,
       SamplingParams{1.0f, 0, 1.0f, 1.0f, 1}},  // flat: draws rank deep into the vocab
      {50257, 3.0f, SamplingParams{0.8f, 0, 0.9f, 1.3f, 2}},
      {50257, 3.0f, SamplingParams{1.2f, 40, 0.95f, 1.0f, 3}},
      {50257, 2.0f, SamplingParams{1.0f, 5000, 1.0f, 1.1f, 4}},
      {50257, 2.0f, SamplingParams{0.0f, 0, 1.0f, 1.5f, 5}},
      {300, 1.0f, SamplingParams{1.0f, 0, 0.999f, 1.0f, 6}},
  };
  const std::vector<int32_t> history = {0, 7, 7, 100, 299, 11};
  for (size_t c = 0; c < cases.size(); ++c) {
    const std::vector<float> logits = normal_logits(cases[c].vocab, cases[c].stddev, 100 + c);
    for (uint64_t step = 0; step < 40; ++step) {
      EXPECT_EQ(sample(logits, cases[c].params, step, history).id,
                reference_sample(logits, cases[c].params, history, step))
          << "case " << c << " step " << step;
    }
  }
  // Integer logits in a narrow range: ties everywhere, at every top-k and top-p cut.
  std::mt19937 rng(9);
  std::uniform_int_distribution<int> level(-3, 3);
  std::vector<float> tied(2000);
  for (float& l : tied) l = static_cast<float>(level(rng));
  for (int top_k : {0, 1, 3, 700, 1999, 2000, 5000}) {
    for (float top_p : {0.05f, 0.5f, 1.0f}) {
      const SamplingParams p = SamplingParams{0.9f, top_k, top_p, 1.4f, 10};
      for (uint64_t step = 0; step < 20; ++step) {
        EXPECT_EQ(sample(tied, p, step, history).id, reference_sample(tied, p, history, step))
            << "top_k " << top_k << " top_p " << top_p << " step " << step;
      }
    }
  }
}

TEST(SamplerReference, AgreesOnDrawsDeepInTheTail) {
  // One id holds ~99.95% of the mass and 4999 near-equal ones share the rest, so a draw with u
  // close to 1 walks past thousands of ranks. Only such draws are checked.
  std::vector<float> logits = normal_logits(5000, 0.5f, 11);
  for (float& l : logits) l += std::log(1e-7f);
  logits[4321] = 0.0f;
  for (float top_p : {1.0f, 0.99999f}) {
    SamplingParams params;
    params.top_p = top_p;
    params.seed = 12;
    int checked = 0;
    for (uint64_t step = 0; step < 200000 && checked < 20; ++step) {
      if (sampling_uniform(params.seed, step) < 0.9998) continue;
      const int32_t id = sample(logits, params, step).id;
      EXPECT_NE(id, 4321) << "step " << step;
      EXPECT_EQ(id, reference_sample(logits, params, {}, step)) << "step " << step;
      ++checked;
    }
    EXPECT_EQ(checked, 20);
  }
}

TEST(SamplerTopK, NegativeZeroTiesWithZero) {
  // -0 and +0 compare equal, so the lower id wins the tie whatever its sign bit.
  SamplingParams params;
  params.top_k = 1;
  EXPECT_EQ(sample({-5.0f, -0.0f, 0.0f}, params).id, 1);
  EXPECT_EQ(sample({-5.0f, 0.0f, -0.0f}, params).id, 1);
}

TEST(SamplerValidate, AcceptsTheDefaultsAndTheLimits) {
  EXPECT_TRUE(validate(SamplingParams{}).ok());
  SamplingParams limits;
  limits.temperature = 100.0f;
  limits.top_k = 1 << 30;
  limits.top_p = 1.0f;
  limits.repetition_penalty = 10.0f;
  EXPECT_TRUE(validate(limits).ok()) << validate(limits);
  limits.temperature = 0.0f;
  limits.top_p = 1e-6f;
  limits.repetition_penalty = 1e-6f;
  EXPECT_TRUE(validate(limits).ok()) << validate(limits);
}

TEST(SamplerValidate, RejectsEachBadValueNamingTheField) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  struct Bad {
    const char* field;
    SamplingParams params;
  };
  std::vector<Bad> bad;
  for (float t : {-1.0f, 100.5f, nan, kInf}) {
    bad.push_back({"temperature", SamplingParams{}});
    bad.back().params.temperature = t;
  }
  bad.push_back({"top_k", SamplingParams{}});
  bad.back().params.top_k = -1;
  for (float p : {0.0f, -0.5f, 1.5f, nan, kInf}) {
    bad.push_back({"top_p", SamplingParams{}});
    bad.back().params.top_p = p;
  }
  for (float p : {0.0f, -1.0f, 10.5f, nan, kInf}) {
    bad.push_back({"repetition_penalty", SamplingParams{}});
    bad.back().params.repetition_penalty = p;
  }
  for (const Bad& b : bad) {
    const std::string message(validate(b.params).message());
    EXPECT_NE(message.find(b.field), std::string::npos) << message;
    EXPECT_NE(message.find("(got "), std::string::npos) << message;
  }
  EXPECT_EQ(validate(bad[0].params),
            absl::InvalidArgumentError("temperature must be in [0, 100] (got -1); 0 means greedy"));
}

TEST(SamplerValidate, ReportsEveryBadField) {
  SamplingParams params;
  params.temperature = -1.0f;
  params.top_k = -2;
  const std::string message(validate(params).message());
  EXPECT_NE(message.find("temperature"), std::string::npos) << message;
  EXPECT_NE(message.find("top_k must be >= 0 (got -2)"), std::string::npos) << message;
}

TEST(SamplerValidate, SampleTokenRejectsBadInput) {
  const std::vector<float> logits = {0.0f, 1.0f, 2.0f};
  SamplingParams bad;
  bad.top_p = 0.0f;
  EXPECT_THROW(sample(logits, bad), std::invalid_argument);
  EXPECT_THROW(sample(logits, SamplingParams{}, 0, {3}), std::invalid_argument);
  EXPECT_THROW(sample(logits, SamplingParams{}, 0, {-1}), std::invalid_argument);
  EXPECT_THROW(sample_token(logits.data(), 0, SamplingParams{}, {}, 0), std::invalid_argument);
  EXPECT_THROW(sample({0.0f, std::numeric_limits<float>::quiet_NaN()}, SamplingParams{}),
               std::invalid_argument);
  EXPECT_THROW(sample({0.0f, kInf}, SamplingParams{}), std::invalid_argument);
  EXPECT_THROW(sample({-kInf, -kInf}, SamplingParams{}), std::invalid_argument);
}

TEST(SamplerUniform, MatchesSplitMix64) {
  // Seed 0 at steps 0 and 1 feeds SplitMix64 the states 0 and 0x9E3779B97F4A7C15, whose outputs
  // are the generator's published first two: 0xE220A8397B1DCDAF and 0x6E789E6AA1B965F4.
  EXPECT_EQ(sampling_uniform(0, 0), static_cast<double>(0xE220A8397B1DCDAFull >> 11) * 0x1.0p-53);
  EXPECT_EQ(sampling_uniform(0, 1), static_cast<double>(0x6E789E6AA1B965F4ull >> 11) * 0x1.0p-53);
}

TEST(SamplerUniform, InUnitIntervalAndUniform) {
  constexpr int kDraws = 1000000;
  constexpr int kBuckets = 20;
  std::vector<int> counts(kBuckets, 0);
  double sum = 0.0;
  for (uint64_t step = 0; step < kDraws; ++step) {
    const double u = sampling_uniform(0xC0FFEE, step);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    const double scaled = u * 0x1.0p53;
    ASSERT_EQ(scaled, std::floor(scaled)) << "not a multiple of 2^-53";
    ++counts[static_cast<int>(u * kBuckets)];
    sum += u;
  }
  expect_frequencies(counts, std::vector<double>(kBuckets, 1.0 / kBuckets), kDraws);
  EXPECT_NEAR(sum / kDraws, 0.5, 5.0 * std::sqrt(1.0 / 12.0 / kDraws));
  // Neighbouring seeds at one step are as unrelated as steps are.
  std::vector<int> across_seeds(kBuckets, 0);
  for (uint64_t seed = 0; seed < 100000; ++seed)
    ++across_seeds[static_cast<int>(sampling_uniform(seed, 3) * kBuckets)];
  expect_frequencies(across_seeds, std::vector<double>(kBuckets, 1.0 / kBuckets), 100000);
}

}  // namespace
}  // namespace kvserve
