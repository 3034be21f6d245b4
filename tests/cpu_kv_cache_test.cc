// The CPU cache's write path and attention against an independent naive reference: the reference
// quantizes whole groups with kv_quant primitives and evaluates softmax attention in double,
// over lengths and chunkings that cross group, residual and page boundaries.
#include "engine/cpu_kv_cache.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "engine/fp16.h"
#include "engine/kv_cache_manager.h"
#include "engine/kv_quant.h"
#include "tests/kv_test_models.h"

namespace kvserve {
namespace {

constexpr int kHeads = 2, kDim = 64, kEmbd = kHeads * kDim;

struct RandomSequence {
  // [n][3C] rows laid out as c_attn's output: q | k | v, head-major inside each.
  std::vector<float> qkv;
  explicit RandomSequence(int n, uint32_t seed) : qkv(static_cast<size_t>(n) * 3 * kEmbd) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int t = 0; t < n; ++t) {
      for (int c = 0; c < 3 * kEmbd; ++c) {
        // A few outlier key channels, as in real models (the reason keys go per channel).
        const bool outlier = c >= kEmbd && c < 2 * kEmbd && (c % kDim) % 16 == 3;
        qkv[static_cast<size_t>(t) * 3 * kEmbd + c] = normal(rng) * (outlier ? 8.0f : 1.0f);
      }
    }
  }
  float q(int t, int h, int d) const {
    return qkv[static_cast<size_t>(t) * 3 * kEmbd + h * kDim + d];
  }
  float k(int t, int h, int d) const {
    return round_to_half(qkv[static_cast<size_t>(t) * 3 * kEmbd + kEmbd + h * kDim + d]);
  }
  float v(int t, int h, int d) const {
    return round_to_half(qkv[static_cast<size_t>(t) * 3 * kEmbd + 2 * kEmbd + h * kDim + d]);
  }
};

// Keys/values of one head as a query reads them: `keys`/`values` once a token's group is
// quantized, `window_keys`/`window_values` while it is in the residual window (fp16, or the int8
// residual's dequantized values, from which the flush quantizes).
struct QuantizedView {
  std::vector<float> keys, values;                // [n][D]
  std::vector<float> window_keys, window_values;  // [n][D]
};

// Quantizes x[0], x[stride], ... (n values) with the config's parameter format and writes the
// dequantized values to out[0], out[stride], ...
void fake_quantize(const float* x, int n, int stride, int bits, KvParamFormat params, float* out) {
  uint8_t codes[256];
  float scale, zero;
  if (params == KvParamFormat::kFp8) {
    const QuantParamsFp8 p = quantize_group_fp8(x, n, stride, bits, codes);
    scale = e4m3_to_float(p.scale);
    zero = e4m3_to_float(p.zero);
  } else {
    const QuantParams p = quantize_group(x, n, stride, bits, codes);
    scale = half_to_float(p.scale);
    zero = half_to_float(p.zero);
  }
  for (int i = 0; i < n; ++i) out[i * stride] = dequantize(codes[i], scale, zero);
}

QuantizedView quantized_view(const RandomSequence& s, int n, int head, const KvCacheConfig& c) {
  QuantizedView view{std::vector<float>(n * kDim), std::vector<float>(n * kDim),
                     std::vector<float>(n * kDim), std::vector<float>(n * kDim)};
  std::vector<float>&k = view.window_keys, &v = view.window_values;
  for (int t = 0; t < n; ++t) {
    for (int d = 0; d < kDim; ++d) {
      k[t * kDim + d] = s.k(t, head, d);
      v[t * kDim + d] = s.v(t, head, d);
    }
  }
  auto per_token = [&](const std::vector<float>& x, std::vector<float>& out, int bits, int group,
                       KvParamFormat params) {
    for (int t = 0; t < n; ++t) {
      for (int g = 0; g < kDim / group; ++g) {
        fake_quantize(&x[t * kDim + g * group], group, 1, bits, params, &out[t * kDim + g * group]);
      }
    }
  };
  if (c.format == KvFormat::kFp16) {
    view.keys = k;
    view.values = v;
    return view;
  }
  if (c.format == KvFormat::kInt8) {
    per_token(k, view.keys, 8, kDim, KvParamFormat::kFp16);
    per_token(v, view.values, 8, kDim, KvParamFormat::kFp16);
    return view;
  }
  if (c.residual_format == KvResidualFormat::kInt8) {  // each token enters the window as int8
    per_token(k, k, 8, kDim, KvParamFormat::kFp16);
    per_token(v, v, 8, kDim, KvParamFormat::kFp16);
  }
  const int bits = kv_bits(c.format);
  per_token(v, view.values, bits, c.value_group, c.params);
  if (c.per_token_keys) {
    per_token(k, view.keys, bits, c.value_group, c.params);
    return view;
  }
  for (int g0 = 0; g0 + c.key_group <= n; g0 += c.key_group) {
    for (int d = 0; d < kDim; ++d) {
      fake_quantize(&k[g0 * kDim + d], c.key_group, kDim, bits, c.params,
                    &view.keys[g0 * kDim + d]);
    }
  }
  return view;
}

// Attention output of query t (head h) with the cache semantics, in double.
std::vector<double> reference_attention(const RandomSequence& s, const QuantizedView& view,
                                        const KvCacheConfig& c, int t, int head) {
  const int quantized = paged_token_count(c, t + 1);
  std::vector<double> scores(t + 1);
  double max_score = -1e300;
  for (int j = 0; j <= t; ++j) {
    double dot = 0;
    for (int d = 0; d < kDim; ++d) {
      const double key = j < quantized ? view.keys[j * kDim + d] : view.window_keys[j * kDim + d];
      dot += static_cast<double>(s.q(t, head, d)) * key;
    }
    scores[j] = dot / std::sqrt(static_cast<double>(kDim));
    max_score = std::max(max_score, scores[j]);
  }
  std::vector<double> out(kDim, 0.0);
  double sum = 0;
  for (int j = 0; j <= t; ++j) {
    const double p = std::exp(scores[j] - max_score);
    sum += p;
    for (int d = 0; d < kDim; ++d) {
      out[d] += p * (j < quantized ? view.values[j * kDim + d] : view.window_values[j * kDim + d]);
    }
  }
  for (double& o : out) o /= sum;
  return out;
}

struct Case {
  const char* name;
  KvCacheConfig config;
};

std::vector<Case> all_formats() {
  std::vector<Case> cases;
  KvCacheConfig c;
  c.format = KvFormat::kFp16;
  cases.push_back({"fp16", c});
  c.format = KvFormat::kInt8;
  cases.push_back({"int8", c});
  c.format = KvFormat::kKivi4;
  cases.push_back({"kivi4", c});
  c.format = KvFormat::kKivi2;
  cases.push_back({"kivi2", c});
  c.value_group = 64;
  c.page_tokens = 64;
  cases.push_back({"kivi2 GV64 pages of 64", c});
  c.value_group = 32;
  c.page_tokens = 32;
  c.key_group = 16;
  c.residual = 48;
  cases.push_back({"kivi2 G16 R48", c});
  c.key_group = 32;
  c.residual = 32;
  c.per_token_keys = true;
  cases.push_back({"kivi2 per-token keys", c});
  c.per_token_keys = false;
  c.params = KvParamFormat::kFp8;
  cases.push_back({"kivi2 fp8 params", c});
  c.params = KvParamFormat::kFp16;
  c.residual_format = KvResidualFormat::kInt8;
  cases.push_back({"kivi2 int8 residual", c});
  c.format = KvFormat::kKivi4;
  c.params = KvParamFormat::kFp8;
  c.key_group = 16;
  c.residual = 48;
  cases.push_back({"kivi4 G16 R48 fp8 params int8 residual", c});
  KvCacheConfig preset;
  apply_kv_preset("kivi2c", preset);
  cases.push_back({"kivi2c", preset});
  preset.per_token_keys = true;
  cases.push_back({"kivi2c per-token keys", preset});
  return cases;
}

// Feeds `n` tokens of a sequence in the given chunk sizes (the last repeats), checking every
// query's output against the reference.
void check_sequence(const Case& tc, const std::vector<int>& chunks, int n, uint32_t seed) {
  const ModelConfig model = testing::gpt2_geometry(1, kHeads, kEmbd);
  KvCacheManager manager(tc.config, model, 200);
  CpuKvCache cache(manager.config(), manager.num_blocks(), model);
  const RandomSequence s(n, seed);
  const QuantizedView views[kHeads] = {quantized_view(s, n, 0, tc.config),
                                       quantized_view(s, n, 1, tc.config)};
  manager.add_sequence(1);
  int pos = 0;
  for (size_t step = 0; pos < n; ++step) {
    const int count = std::min(n - pos, chunks[std::min(step, chunks.size() - 1)]);
    ASSERT_TRUE(manager.grow(1, pos + count));
    std::vector<float> out(static_cast<size_t>(count) * kEmbd);
    for (int h = 0; h < kHeads; ++h) {
      cache.append_and_attend(0, h, manager.block_table(1), pos, count,
                              &s.qkv[static_cast<size_t>(pos) * 3 * kEmbd], 3 * kEmbd, out.data(),
                              kEmbd);
    }
    manager.finish_step();
    for (int i = 0; i < count; ++i) {
      for (int h = 0; h < kHeads; ++h) {
        const std::vector<double> expected =
            reference_attention(s, views[h], tc.config, pos + i, h);
        for (int d = 0; d < kDim; ++d) {
          ASSERT_NEAR(out[i * kEmbd + h * kDim + d], expected[d], 2e-5)
              << tc.name << ": position " << pos + i << " head " << h << " channel " << d
              << " (chunk of " << count << " from " << pos << ")";
        }
      }
    }
    pos += count;
  }
}

TEST(CpuKvCache, DecodeTokenByTokenMatchesReference) {
  for (const Case& tc : all_formats()) check_sequence(tc, {1}, 150, 1);
}

TEST(CpuKvCache, PrefillAcrossBoundariesMatchesReference) {
  // Prompt lengths around G-1, G, R, R+G-1, R+G and page boundaries, then decode.
  for (const Case& tc : all_formats()) {
    for (int prompt : {1, 31, 32, 33, 63, 64, 65, 95, 96, 97, 128, 130}) {
      check_sequence(tc, {prompt, 1}, prompt + 40, 100 + prompt);
    }
  }
}

TEST(CpuKvCache, ChunkedPrefillMatchesReference) {
  for (const Case& tc : all_formats()) {
    check_sequence(tc, {7, 13, 50, 3, 1}, 200, 5);
    check_sequence(tc, {64, 64, 64}, 192, 6);
  }
}

void check_isolation(const Case& tc) {
  const ModelConfig model = testing::gpt2_geometry(1, kHeads, kEmbd);
  auto run = [&](bool interleaved, int which) {
    KvCacheManager manager(tc.config, model, 200);
    CpuKvCache cache(manager.config(), manager.num_blocks(), model);
    const RandomSequence a(120, 21), b(120, 22);
    manager.add_sequence(1);
    manager.add_sequence(2);
    std::vector<float> result;
    for (int pos = 0; pos < 120; ++pos) {
      for (int id : {1, 2}) {
        if (!interleaved && id != which) continue;
        const RandomSequence& s = id == 1 ? a : b;
        EXPECT_TRUE(manager.grow(id, pos + 1));
        std::vector<float> out(kEmbd);
        for (int h = 0; h < kHeads; ++h) {
          cache.append_and_attend(0, h, manager.block_table(id), pos, 1,
                                  &s.qkv[static_cast<size_t>(pos) * 3 * kEmbd], 3 * kEmbd,
                                  out.data(), kEmbd);
        }
        if (id == which) result.insert(result.end(), out.begin(), out.end());
      }
      manager.finish_step();
    }
    return result;
  };
  EXPECT_EQ(run(true, 1), run(false, 1));
  EXPECT_EQ(run(true, 2), run(false, 2));
}

TEST(CpuKvCache, SequencesDoNotShareGroupsOrBlocks) {
  // Two sequences interleaved step by step read exactly what each reads alone.
  for (const Case& tc : all_formats()) {
    if (std::string(tc.name) == "kivi2" || std::string(tc.name) == "kivi2c") check_isolation(tc);
  }
}

}  // namespace
}  // namespace kvserve
