// The sampled KV quantization error (engine/kv_quantization_error.h): the relative error of a
// known group, what the CPU cache measures at flush time against a double-precision reference
// built from kv_quant's primitives, the sampling rule, and that measuring never changes the cache
// or the tokens.
#include "engine/kv_quantization_error.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <vector>

#include "engine/cpu_kv_cache.h"
#include "engine/engine_builder.h"
#include "engine/fp16.h"
#include "engine/kv_cache_manager.h"
#include "engine/kv_quant.h"
#include "kernels/kv_error_sample.h"
#include "tests/kv_test_models.h"
#include "tests/test_support.h"

namespace kvserve {
namespace {

constexpr int kHeads = 2, kDim = 64, kEmbd = kHeads * kDim;

TEST(KvQuantizationError, RelativeErrorOfAKnownGroup) {
  const float x[] = {3.0f, 4.0f}, y[] = {3.0f, 4.5f};
  EXPECT_DOUBLE_EQ(relative_error(x, y, 2, 1), 0.1);  // |0.5| / 5
  // Strided: every other element of x2/y2 is the group.
  const float x2[] = {3.0f, 9.0f, 4.0f, 9.0f}, y2[] = {3.0f, -9.0f, 4.5f, 0.0f};
  EXPECT_DOUBLE_EQ(relative_error(x2, y2, 2, 2), 0.1);
  // An all-zero group reconstructed exactly counts as 0; a tiny one is divided by the epsilon.
  const float zeros[] = {0.0f, 0.0f};
  EXPECT_EQ(relative_error(zeros, zeros, 2, 1), 0.0);
  const float tiny[] = {0.0f, 1e-8f};
  EXPECT_NEAR(relative_error(tiny, zeros, 2, 1),
              static_cast<double>(tiny[1]) / kRelativeErrorEpsilon, 1e-12);
}

TEST(KvQuantizationError, ConstantAndZeroGroupsReconstructExactly) {
  uint8_t codes[32];
  for (float c : {0.0f, 1.5f, -3.25f}) {
    std::vector<float> x(32, c), y(32);
    const QuantParams p = quantize_group(x.data(), 32, 1, 2, codes);
    for (int i = 0; i < 32; ++i)
      y[i] = dequantize(codes[i], half_to_float(p.scale), half_to_float(p.zero));
    EXPECT_EQ(relative_error(x.data(), y.data(), 32, 1), 0.0) << c;
  }
}

TEST(KvQuantizationError, BinsAsPrometheusCountsBuckets) {
  // A bucket holds the errors up to and including its bound.
  const KvErrorBins bins = bin_errors({0.0f, 0.0009f, 0.0011f, 0.3f, 0.3001f, 1.5f});
  EXPECT_EQ(bins.counts[0], 2u);                // 0 and 0.0009 <= 0.001
  EXPECT_EQ(bins.counts[1], 1u);                // 0.001 < 0.0011 <= 0.001 * sqrt(2)
  EXPECT_EQ(bins.counts[17], 2u);               // 0.256 < 0.3 <= 0.362
  EXPECT_EQ(bins.counts[kKvErrorBuckets], 1u);  // 1.5 > 1.024: +Inf
  EXPECT_EQ(bins.total(), 6u);
  EXPECT_NEAR(bins.sum, 0.0009 + 0.0011 + 0.3 + 0.3001 + 1.5, 1e-6);
  EXPECT_DOUBLE_EQ(kv_error_bucket_bound(0), 0.001);
  EXPECT_DOUBLE_EQ(kv_error_bucket_bound(20), 1.024);
  for (int k = 1; k < kKvErrorBuckets; ++k) {
    EXPECT_NEAR(kv_error_bucket_bound(k) / kv_error_bucket_bound(k - 1), std::sqrt(2.0), 1e-12);
  }
  EXPECT_EQ(kv_error_bucket(kv_error_bucket_bound(5)), 5);
  EXPECT_EQ(kv_error_bucket(std::nextafter(kv_error_bucket_bound(5), 1.0)), 6);
}

TEST(KvQuantizationError, QuantileInterpolatesAsPrometheusDoes) {
  KvErrorBins bins;
  EXPECT_EQ(histogram_quantile(bins, 0.5), 0.0);
  bins.counts[0] = 2;   // (0, 0.001]
  bins.counts[16] = 2;  // (0.181, 0.256]
  // Rank 2 of 4 is the top of the first bucket, rank 3 halfway through bucket 16.
  EXPECT_DOUBLE_EQ(histogram_quantile(bins, 0.5), 0.001);
  EXPECT_DOUBLE_EQ(histogram_quantile(bins, 0.75),
                   (kv_error_bucket_bound(15) + kv_error_bucket_bound(16)) / 2);
  bins.counts[kKvErrorBuckets] = 4;  // beyond the last bound
  EXPECT_DOUBLE_EQ(histogram_quantile(bins, 0.99), kv_error_bucket_bound(kKvErrorBuckets - 1));
}

TEST(KvQuantizationError, ValidatesTheRate) {
  EXPECT_TRUE(validate_kv_error_sample_rate(0.0).ok());
  EXPECT_TRUE(validate_kv_error_sample_rate(1.0).ok());
  EXPECT_FALSE(validate_kv_error_sample_rate(-0.1).ok());
  EXPECT_FALSE(validate_kv_error_sample_rate(1.5).ok());
  EXPECT_FALSE(validate_kv_error_sample_rate(std::nan("")).ok());
}

TEST(KvQuantizationError, SamplingRuleIsDeterministicAndHonoursTheRate) {
  int sampled = 0, again = 0;
  const int trials = 200000;
  for (int step = 1; step <= trials; ++step) {
    sampled += kv_error_step_sampled(0.01, step);
    again += kv_error_step_sampled(0.01, step);
    EXPECT_FALSE(kv_error_step_sampled(0.0, step));
    EXPECT_TRUE(kv_error_step_sampled(1.0, step));
  }
  EXPECT_EQ(sampled, again);
  // Binomial(200000, 0.01): mean 2000, standard deviation 44.5; 6 sigma either side.
  EXPECT_NEAR(sampled, 2000, 270);
}

// Keys/values of one head, rounded to fp16 as the cache stores them: [n][3C] rows q | k | v.
std::vector<float> random_qkv(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> qkv(static_cast<size_t>(n) * 3 * kEmbd);
  for (int t = 0; t < n; ++t) {
    for (int c = 0; c < 3 * kEmbd; ++c) {
      const bool outlier = c >= kEmbd && c < 2 * kEmbd && (c % kDim) % 16 == 3;
      qkv[static_cast<size_t>(t) * 3 * kEmbd + c] = normal(rng) * (outlier ? 8.0f : 1.0f);
    }
  }
  return qkv;
}

struct CacheRun {
  KvQuantizationErrors errors;
  std::vector<uint8_t> pool;
  std::vector<float> out;  // every step's attention output
};

// Prefills `prompt` tokens of one sequence, then decodes until `n`, through one layer of a
// `rate`-sampled CPU cache.
CacheRun run_cache(const KvCacheConfig& config, double rate, int prompt, int n, uint32_t seed) {
  const ModelConfig model = testing::gpt2_geometry(1, kHeads, kEmbd);
  KvCacheManager manager(config, model, 64);
  CpuKvCache cache(manager.config(), manager.num_blocks(), model);
  cache.set_error_sample_rate(rate);
  const std::vector<float> qkv = random_qkv(n, seed);
  manager.add_sequence(1);
  CacheRun run;
  for (int pos = 0; pos < n;) {
    const int count = pos == 0 ? prompt : 1;
    EXPECT_TRUE(manager.grow(1, pos + count));
    cache.begin_step();
    std::vector<float> out(static_cast<size_t>(count) * kEmbd);
    for (int h = 0; h < kHeads; ++h) {
      cache.append_and_attend(0, h, manager.block_table(1), pos, count,
                              &qkv[static_cast<size_t>(pos) * 3 * kEmbd], 3 * kEmbd, out.data(),
                              kEmbd);
    }
    manager.finish_step();
    cache.take_errors(run.errors);
    run.out.insert(run.out.end(), out.begin(), out.end());
    pos += count;
  }
  run.pool.assign(cache.data(), cache.data() + cache.bytes());
  return run;
}

// The relative errors of every group of the first `paged` tokens, in double from kv_quant's
// quantize_group and dequantize, independent of the cache's layout.
KvQuantizationErrors reference_errors(const KvCacheConfig& c, int paged, uint32_t seed) {
  const std::vector<float> qkv = random_qkv(paged, seed);
  KvQuantizationErrors errors;
  uint8_t codes[256];
  auto group_error = [&](const float* x, int n, int stride) {
    const int bits = kv_bits(c.format);
    const QuantParams p = quantize_group(x, n, stride, bits, codes);
    double diff = 0.0, norm = 0.0;
    for (int i = 0; i < n; ++i) {
      const double a = x[i * stride];
      const double y = static_cast<double>(codes[i]) * half_to_float(p.scale) +
                       static_cast<double>(half_to_float(p.zero));
      diff += (a - y) * (a - y);
      norm += a * a;
    }
    return static_cast<float>(std::sqrt(diff) / std::max(std::sqrt(norm), 1e-6));
  };
  const int token_group = c.format == KvFormat::kInt8 ? kDim : c.value_group;
  const bool per_channel_keys = is_kivi(c.format) && !c.per_token_keys;
  for (int h = 0; h < kHeads; ++h) {
    std::vector<float> k(static_cast<size_t>(paged) * kDim), v(k.size());  // [paged][D], fp16
    for (int t = 0; t < paged; ++t) {
      for (int d = 0; d < kDim; ++d) {
        const size_t row = static_cast<size_t>(t) * 3 * kEmbd;
        k[t * kDim + d] = round_to_half(qkv[row + kEmbd + h * kDim + d]);
        v[t * kDim + d] = round_to_half(qkv[row + 2 * kEmbd + h * kDim + d]);
      }
    }
    for (int t = 0; t < paged; ++t) {
      for (int g = 0; g < kDim / token_group; ++g) {
        errors.value.push_back(group_error(&v[t * kDim + g * token_group], token_group, 1));
        if (!per_channel_keys) {
          errors.key.push_back(group_error(&k[t * kDim + g * token_group], token_group, 1));
        }
      }
    }
    if (!per_channel_keys) continue;
    for (int g0 = 0; g0 < paged; g0 += c.key_group) {
      for (int d = 0; d < kDim; ++d) {
        errors.key.push_back(group_error(&k[g0 * kDim + d], c.key_group, kDim));
      }
    }
  }
  return errors;
}

std::vector<float> sorted(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v;
}

std::vector<KvCacheConfig> quantized_formats() {
  std::vector<KvCacheConfig> formats;
  KvCacheConfig c;
  for (KvFormat f : {KvFormat::kInt8, KvFormat::kKivi4, KvFormat::kKivi2}) {
    c.format = f;
    formats.push_back(c);
  }
  c.value_group = 64;
  c.page_tokens = 64;
  formats.push_back(c);
  c = KvCacheConfig{};
  c.per_token_keys = true;
  formats.push_back(c);
  return formats;
}

TEST(KvQuantizationError, RateOneMeasuresEveryFlushedGroupAgainstTheReference) {
  // A prompt of 100 tokens and decoding to 161: flushes at prefill (64 of kivi's tokens) and
  // again at 128 and 160 during decode, across a page boundary.
  const int n = 161;
  for (const KvCacheConfig& c : quantized_formats()) {
    const int paged = paged_token_count(c, n);
    const CacheRun run = run_cache(c, 1.0, 100, n, 7);
    const KvQuantizationErrors expected = reference_errors(c, paged, 7);
    ASSERT_EQ(run.errors.key.size(), expected.key.size()) << describe(c);
    ASSERT_EQ(run.errors.value.size(), expected.value.size()) << describe(c);
    const std::vector<float> got_k = sorted(run.errors.key), want_k = sorted(expected.key);
    const std::vector<float> got_v = sorted(run.errors.value), want_v = sorted(expected.value);
    for (size_t i = 0; i < got_k.size(); ++i)
      ASSERT_NEAR(got_k[i], want_k[i], 1e-6) << describe(c) << " key " << i;
    for (size_t i = 0; i < got_v.size(); ++i)
      ASSERT_NEAR(got_v[i], want_v[i], 1e-6) << describe(c) << " value " << i;
    // The errors are those of real quantization: none negative, not all zero.
    EXPECT_GT(want_k.back(), 0.0f) << describe(c);
    EXPECT_GE(got_k.front(), 0.0f) << describe(c);
  }
}

TEST(KvQuantizationError, RateZeroMeasuresNothingAndFp16HasNothingToMeasure) {
  KvCacheConfig c;
  EXPECT_TRUE(run_cache(c, 0.0, 100, 161, 3).errors.empty());
  c.format = KvFormat::kFp16;
  EXPECT_TRUE(run_cache(c, 1.0, 100, 161, 3).errors.empty());
}

TEST(KvQuantizationError, SamplingNeverChangesTheCacheOrTheOutputs) {
  for (const KvCacheConfig& c : quantized_formats()) {
    const CacheRun off = run_cache(c, 0.0, 70, 150, 11);
    for (double rate : {0.3, 1.0}) {
      const CacheRun on = run_cache(c, rate, 70, 150, 11);
      EXPECT_EQ(on.pool, off.pool) << describe(c) << " rate " << rate;
      EXPECT_EQ(on.out, off.out) << describe(c) << " rate " << rate;
    }
  }
}

TEST(KvQuantizationError, PartialRateSamplesASubsetReproducibly) {
  const KvCacheConfig c;
  const CacheRun all = run_cache(c, 1.0, 100, 161, 5);
  const CacheRun some = run_cache(c, 0.3, 100, 161, 5);
  const CacheRun again = run_cache(c, 0.3, 100, 161, 5);
  EXPECT_EQ(sorted(some.errors.key), sorted(again.errors.key));
  EXPECT_EQ(sorted(some.errors.value), sorted(again.errors.value));
  EXPECT_GT(some.errors.key.size(), 0u);
  EXPECT_LT(some.errors.key.size(), all.errors.key.size());
  EXPECT_LT(some.errors.value.size(), all.errors.value.size());
  // Each sampled error is one of the full set's.
  const std::vector<float> every = sorted(all.errors.key);
  for (float e : some.errors.key)
    EXPECT_TRUE(std::binary_search(every.begin(), every.end(), e)) << e;
}

// The engine reports the samples in its step stats, and sampled serving makes the same tokens.
TEST(KvQuantizationError, SampledServingIsBitIdentical) {
  auto serve = [](double rate, KvQuantizationErrors& errors) {
    EngineSpec spec;
    spec.model = testing::shared_model_dir();
    spec.device = "cpu";
    spec.kv.format = KvFormat::kKivi2;
    spec.engine.kv_error_sample_rate = rate;
    const std::unique_ptr<Engine> engine = build_engine(spec);
    std::map<RequestId, std::vector<int32_t>> tokens;
    for (int r = 0; r < 3; ++r) {
      GenerationRequest request;
      for (int i = 0; i < 70 + 20 * r; ++i) {
        request.prompt.push_back((464 + 37 * i * (r + 1)) % 5000);
      }
      request.max_new_tokens = 40;
      request.ignore_eos = true;
      request.sampling.temperature = r == 2 ? 0.8f : 0.0f;
      request.sampling.seed = 9;
      tokens[engine->add_request(request)];
    }
    std::vector<StepEvent> events;
    while (engine->has_work()) {
      events.clear();
      const StepStats stats = engine->step(events);
      errors.append(stats.kv_errors);
      for (const StepEvent& e : events) {
        if (e.has_token) tokens.at(e.request).push_back(e.token);
      }
    }
    return tokens;
  };
  KvQuantizationErrors none, every;
  const auto unsampled = serve(0.0, none);
  const auto sampled = serve(1.0, every);
  EXPECT_EQ(sampled, unsampled);
  EXPECT_TRUE(none.empty());
  EXPECT_FALSE(every.key.empty());
  EXPECT_FALSE(every.value.empty());
  EXPECT_THROW(
      {
        EngineSpec bad;
        bad.model = testing::shared_model_dir();
        bad.device = "cpu";
        bad.engine.kv_error_sample_rate = 2.0;
        build_engine(bad);
      },
      std::invalid_argument);
}

}  // namespace
}  // namespace kvserve
