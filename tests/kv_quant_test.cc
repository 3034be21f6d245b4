#include "engine/kv_quant.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "engine/fp16.h"

namespace kvserve {
namespace {

TEST(Fp16, RoundTripsEveryHalfValue) {
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float f = half_to_float(h);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(half_to_float(float_to_half(f))));
      continue;
    }
    ASSERT_EQ(float_to_half(f), h) << "half bits " << bits << " value " << f;
  }
}

TEST(Fp16, RoundsToNearestEven) {
  EXPECT_EQ(half_to_float(float_to_half(1.0f + 1.0f / 2048)), 1.0f);  // tie -> even (1.0)
  EXPECT_EQ(half_to_float(float_to_half(1.0f + 3.0f / 2048)), 1.0f + 2.0f / 1024);
  EXPECT_EQ(half_to_float(float_to_half(65504.0f)), 65504.0f);
  EXPECT_TRUE(std::isinf(half_to_float(float_to_half(65520.0f))));
  EXPECT_EQ(half_to_float(float_to_half(65519.0f)), 65504.0f);
  EXPECT_EQ(half_to_float(float_to_half(std::ldexp(1.0f, -24))), std::ldexp(1.0f, -24));
  EXPECT_EQ(half_to_float(float_to_half(std::ldexp(1.0f, -25))), 0.0f);  // tie -> even (0)
  EXPECT_EQ(half_to_float(float_to_half(std::ldexp(1.5f, -25))), std::ldexp(1.0f, -24));
}

TEST(KvQuant, PackUnpackRoundTrip) {
  std::mt19937 rng(7);
  for (int bits : {2, 4, 8}) {
    const int count = 256;
    std::vector<uint32_t> words(count * bits / 32, 0xdeadbeefu);
    std::vector<uint32_t> codes(count);
    for (auto& c : codes) c = rng() & ((1u << bits) - 1u);
    for (int i = 0; i < count; ++i) set_code(words.data(), i, bits, codes[i]);
    for (int i = 0; i < count; ++i) ASSERT_EQ(get_code(words.data(), i, bits), codes[i]);
  }
  uint32_t word = 0;
  set_code(&word, 0, 2, 3);
  set_code(&word, 15, 2, 1);
  EXPECT_EQ(word, 0x40000003u) << "code i sits at bit offset bits * i, LSB first";
}

TEST(KvQuant, ErrorWithinHalfAScale) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (int bits : {2, 4, 8}) {
    for (int trial = 0; trial < 200; ++trial) {
      const int n = 32, stride = 3;
      std::vector<float> x(n * stride);
      for (auto& v : x) v = round_to_half(normal(rng) + (trial % 5 == 0 ? 40.0f : 0.0f));
      uint8_t codes[32];
      const QuantParams p = quantize_group(x.data(), n, stride, bits, codes);
      const float scale = half_to_float(p.scale), zero = half_to_float(p.zero);
      float lo = x[0], hi = x[0];
      for (int i = 0; i < n; ++i) {
        lo = std::min(lo, x[i * stride]);
        hi = std::max(hi, x[i * stride]);
      }
      // fp16 rounding of zero and scale adds at most a few ulps on top of the scale/2 bound.
      const float slack = 2e-3f * std::max(std::fabs(lo), std::fabs(hi)) + 1e-6f;
      for (int i = 0; i < n; ++i) {
        ASSERT_LT(codes[i], 1u << bits);
        const float error = std::fabs(dequantize(codes[i], scale, zero) - x[i * stride]);
        ASSERT_LE(error, scale / 2 + slack) << "bits " << bits << " element " << i;
      }
    }
  }
}

TEST(KvQuant, ConstantGroupIsExact) {
  std::vector<float> x(32, round_to_half(3.14159f));
  uint8_t codes[32];
  const QuantParams p = quantize_group(x.data(), 32, 1, 2, codes);
  EXPECT_EQ(half_to_float(p.scale), 0.0f);
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ(codes[i], 0);
    EXPECT_EQ(dequantize(codes[i], 0.0f, half_to_float(p.zero)), x[i]);
  }
}

TEST(KvQuant, ExtremesMapToFirstAndLastCode) {
  std::vector<float> x = {-1.0f, 0.0f, 0.25f, 2.0f};
  uint8_t codes[4];
  quantize_group(x.data(), 4, 1, 2, codes);
  EXPECT_EQ(codes[0], 0);
  EXPECT_EQ(codes[3], 3);
  EXPECT_EQ(codes[1], 1);  // (0 - -1) / 1 = 1
}

}  // namespace
}  // namespace kvserve
