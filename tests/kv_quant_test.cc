#include "engine/kv_quant.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "engine/fp16.h"
#include "kernels/e4m3_rounding.h"
#include "kernels/rint_quotient.h"

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

// fp8 e4m3 group parameters (--kv-params fp8).

TEST(E4m3, DecodesTheFormatsLandmarks) {
  EXPECT_EQ(e4m3_to_float(0x00), 0.0f);
  EXPECT_EQ(e4m3_to_float(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(e4m3_to_float(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(e4m3_to_float(0x3c), 1.5f);
  EXPECT_EQ(e4m3_to_float(0x7e), 448.0f);  // largest finite
  EXPECT_EQ(e4m3_to_float(0xb8), -1.0f);
}

// Every finite e4m3 value, ascending.
std::vector<float> all_e4m3_values() {
  std::vector<float> v;
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7f) == 0x7f || code == 0x80) continue;  // NaNs, -0
    v.push_back(e4m3_to_float(static_cast<uint8_t>(code)));
  }
  std::sort(v.begin(), v.end());
  return v;
}

TEST(E4m3, RoundDownAndUpBracketEveryValueTightlyAndSaturate) {
  const std::vector<float> values = all_e4m3_values();
  EXPECT_EQ(values.size(), 253u);
  for (float x : values) {  // representable values round to themselves
    EXPECT_EQ(e4m3_to_float(e4m3_round_down(x)), x);
    EXPECT_EQ(e4m3_to_float(e4m3_round_up(x)), x);
  }
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> exponent(-14.0f, 9.5f);
  for (int i = 0; i < 20000; ++i) {
    const float x = (i % 2 ? -1.0f : 1.0f) * std::exp2(exponent(rng));
    const float down = e4m3_to_float(e4m3_round_down(x));
    const float up = e4m3_to_float(e4m3_round_up(x));
    if (x >= 448.0f) {
      EXPECT_EQ(up, 448.0f);  // saturates
      EXPECT_EQ(down, 448.0f);
      continue;
    }
    if (x <= -448.0f) {
      EXPECT_EQ(down, -448.0f);
      EXPECT_EQ(up, -448.0f);
      continue;
    }
    ASSERT_LE(down, x);
    ASSERT_GE(up, x);
    // Adjacent: no e4m3 value strictly between them.
    const auto between =
        std::count_if(values.begin(), values.end(), [&](float v) { return v > down && v < up; });
    ASSERT_EQ(between, 0) << x;
  }
  for (float x : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                  std::numeric_limits<float>::quiet_NaN(), 1e30f, -1e30f}) {
    for (uint8_t code : {e4m3_round_down(x), e4m3_round_up(x)}) {
      EXPECT_NE(code & 0x7f, 0x7f) << "a NaN encoding for " << x;
      EXPECT_TRUE(std::isfinite(e4m3_to_float(code)));
    }
  }
}

// The device quantizers read e4m3 codes off a float's bits (kernels/e4m3_rounding.h); they must
// pick the codes the table search above picks, for every float a group's minimum or spread can
// be: every float whose magnitude lies within 2^-40 .. 2^20 (the e4m3 range and far beyond it
// both ways) at a stride of 37 mantissa steps, every float within 64 ulps of each e4m3 value and
// of the midpoints between neighbours, and the special values.
TEST(E4m3, CodesFromTheFloatsBitsMatchTheTableSearch) {
  auto check = [](float x) {
    ASSERT_EQ(e4m3_code_down(x), e4m3_round_down(x)) << "down " << x;
    ASSERT_EQ(e4m3_code_up(x), e4m3_round_up(x)) << "up " << x;
  };
  auto check_around = [&](float x) {
    float below = x, above = x;
    for (int i = 0; i < 64; ++i) {
      check(below = std::nextafter(below, -INFINITY));
      check(above = std::nextafter(above, INFINITY));
    }
    check(x);
  };
  for (uint32_t bits = (127u - 40u) << 23; bits < (127u + 20u) << 23; bits += 37u) {
    float x;
    std::memcpy(&x, &bits, sizeof(x));
    check(x);
    check(-x);
  }
  const std::vector<float> values = all_e4m3_values();
  for (size_t i = 0; i < values.size(); ++i) {
    check_around(values[i]);
    if (i + 1 < values.size()) check_around(values[i] / 2 + values[i + 1] / 2);
  }
  for (float x : {0.0f, -0.0f, std::numeric_limits<float>::denorm_min(),
                  -std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(),
                  std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                  449.0f, -449.0f, 464.0f, 480.0f, 1e30f}) {
    check(x);
  }
  EXPECT_EQ(e4m3_code_down(std::numeric_limits<float>::quiet_NaN()), 0u);
  EXPECT_EQ(e4m3_code_up(std::numeric_limits<float>::quiet_NaN()), 0u);
}

struct Fp8Group {
  GroupParams params;
  std::vector<uint8_t> codes;
};

Fp8Group quantize_fp8(const std::vector<float>& x, int bits) {
  Fp8Group g{{}, std::vector<uint8_t>(x.size())};
  std::vector<uint8_t> pair(2);
  g.params = quantize_group_into(x.data(), static_cast<int>(x.size()), 1, bits, KvParamFormat::kFp8,
                                 pair.data(), 0, g.codes.data());
  return g;
}

// The covering pair of a group [lo, hi] inside e4m3's range, computed here in double: zero the
// e4m3 value just below lo, scale the e4m3 value just above (hi - zero) / max_code. Its codes
// reach every value within scale / 2; quantize_group_fp8 keeps it or a pair with less error.
struct CoveringPair {
  double scale, zero, squared_error, max_error;
};

CoveringPair covering_pair(const std::vector<float>& x, int bits) {
  const double lo = *std::min_element(x.begin(), x.end());
  const double hi = *std::max_element(x.begin(), x.end());
  const double max_code = (1 << bits) - 1;
  CoveringPair c{};
  c.zero = e4m3_to_float(e4m3_round_down(static_cast<float>(lo)));
  c.scale = e4m3_to_float(e4m3_round_up(static_cast<float>((hi - c.zero) / max_code)));
  for (float v : x) {
    const double q =
        c.scale > 0 ? std::clamp(std::nearbyint((v - c.zero) / c.scale), 0.0, max_code) : 0.0;
    const double e = q * c.scale + c.zero - v;
    c.squared_error += e * e;
    c.max_error = std::max(c.max_error, std::fabs(e));
  }
  return c;
}

// e4m3 steps: the covering pair's zero is at most one step below lo, its scale at most one step
// above (hi - zero) / max_code: a bound of how much coarser than fp16 parameters it can be.
double fp8_scale_bound(double lo, double hi, int bits) {
  const double step_of_lo = std::max(std::fabs(lo) / 8.0, std::ldexp(1.0, -9));
  const double spread = (hi - lo + step_of_lo) / ((1 << bits) - 1);
  return spread * 1.125 + std::ldexp(1.0, -9);
}

double squared_error(const std::vector<float>& x, const Fp8Group& g) {
  double sum = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double e = dequantize(g.codes[i], g.params.scale, g.params.zero) - double{x[i]};
    sum += e * e;
  }
  return sum;
}

TEST(KvQuantFp8, ErrorNeverAboveTheCoveringPairsFromTinyToHugeRanges) {
  std::mt19937 rng(17);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  int chose_other_than_covering = 0;
  for (int bits : {2, 4}) {
    // Ranges from far below e4m3's smallest subnormal (2^-9) to near its largest value, around
    // 0 and around offsets (a key channel with an outlier offset).
    for (float range : {1e-6f, 1e-4f, 2e-3f, 0.05f, 1.0f, 8.0f, 40.0f, 100.0f}) {
      for (float offset : {0.0f, 0.3f, -2.5f, 17.0f, -90.0f}) {
        if (std::fabs(offset) + 4.0f * range > 440.0f) continue;  // stay inside e4m3's range
        for (int trial = 0; trial < 8; ++trial) {
          std::vector<float> x(32);
          for (auto& v : x) v = round_to_half(offset + range * normal(rng));
          const double lo = *std::min_element(x.begin(), x.end());
          const double hi = *std::max_element(x.begin(), x.end());
          const CoveringPair cover = covering_pair(x, bits);
          ASSERT_LE(cover.zero, lo);
          ASSERT_LE(cover.scale, fp8_scale_bound(lo, hi, bits));
          ASSERT_LE(cover.max_error, cover.scale / 2 * (1 + 1e-6) + 1e-12);
          const Fp8Group g = quantize_fp8(x, bits);
          ASSERT_TRUE(std::isfinite(g.params.scale) && std::isfinite(g.params.zero));
          for (uint8_t code : g.codes) ASSERT_LT(code, 1u << bits);
          const double error = squared_error(x, g);
          ASSERT_LE(error, cover.squared_error * (1 + 1e-5) + 1e-12)
              << "bits " << bits << " range " << range << " offset " << offset;
          if (g.params.zero != cover.zero || g.params.scale != cover.scale) {
            ++chose_other_than_covering;
          }
        }
      }
    }
  }
  EXPECT_GT(chose_other_than_covering, 0) << "the search never beat the covering pair";
}

TEST(KvQuantFp8, ConstantGroupsAreExactOrWithinTheCoveringPairsError) {
  for (float value : {0.0f, 1.0f, -0.75f, 448.0f, 0.3f, -3.1f, 1e-5f, 100.3f}) {
    const std::vector<float> x(32, round_to_half(value));
    const Fp8Group g = quantize_fp8(x, 2);
    ASSERT_TRUE(std::isfinite(g.params.scale) && std::isfinite(g.params.zero));
    const bool representable = e4m3_to_float(e4m3_round_down(x[0])) == x[0];
    if (representable) {
      EXPECT_EQ(g.params.scale, 0.0f) << value;
    }
    const CoveringPair cover = covering_pair(x, 2);
    for (size_t i = 0; i < x.size(); ++i) {
      const float back = dequantize(g.codes[i], g.params.scale, g.params.zero);
      if (representable) {
        EXPECT_EQ(back, x[i]) << value;
      }
      EXPECT_LE(std::fabs(back - x[i]), cover.max_error + 1e-6) << value;
    }
  }
}

TEST(KvQuantFp8, GroupsBeyondTheRangeAreClampedNeverNaN) {
  // fp16 values reach 65504; e4m3 parameters saturate at 448: the group is clamped to
  // [-448, -448 + 3 * 448] (2-bit) and nothing becomes NaN or infinite.
  const std::vector<float> x = {-65504.0f, -1000.0f, -448.0f, 0.0f, 500.0f, 896.0f, 65504.0f, 1.0f};
  const Fp8Group g = quantize_fp8(x, 2);
  EXPECT_EQ(g.params.zero, -448.0f);
  EXPECT_EQ(g.params.scale, 448.0f);
  for (size_t i = 0; i < x.size(); ++i) {
    const float back = dequantize(g.codes[i], g.params.scale, g.params.zero);
    ASSERT_TRUE(std::isfinite(back));
    const float clamped = std::clamp(x[i], -448.0f, 896.0f);
    EXPECT_LE(std::fabs(back - clamped), 224.0f) << x[i];
  }
  const Fp8Group high = quantize_fp8({1000.0f, 1001.0f}, 4);  // above 448: zero saturates at 448
  EXPECT_EQ(high.params.zero, 448.0f);
  EXPECT_TRUE(std::isfinite(high.params.scale));
}

TEST(KvQuantFp8, PairsAreStoredAsTwoBytesAndReadBack) {
  const std::vector<float> x = {0.5f, 1.0f, 2.0f, 3.0f};
  uint8_t pairs[6] = {0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa};
  uint8_t codes[4];
  const GroupParams p =
      quantize_group_into(x.data(), 4, 1, 2, KvParamFormat::kFp8, pairs, 1, codes);
  EXPECT_EQ(pairs[0], 0xaa);  // pair 1 starts at byte 2
  EXPECT_EQ(pairs[4], 0xaa);
  EXPECT_EQ(e4m3_to_float(pairs[2]), p.scale);
  EXPECT_EQ(e4m3_to_float(pairs[3]), p.zero);
  const GroupParams read = read_group_params(pairs, 1, KvParamFormat::kFp8);
  EXPECT_EQ(read.scale, p.scale);
  EXPECT_EQ(read.zero, p.zero);
  EXPECT_EQ(p.zero, 0.5f);
  // (3 - 0.5) / 3 = 0.833 lies between e4m3's 0.8125 and 0.875; 0.8125 gives less error here
  // (squared 0.117 against 0.219), though code 3 then stops at 2.9375.
  EXPECT_EQ(p.scale, 0.8125f);
}

// The int8 residual (--kv-residual-format int8): per token and head, fp16 (scale, zero), against
// a double-precision reference of the same rule.
TEST(KvQuant, Int8ResidualRowMatchesADoublePrecisionReference) {
  std::mt19937 rng(23);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int trial = 0; trial < 100; ++trial) {
    std::vector<float> row(64);
    for (int d = 0; d < 64; ++d) row[d] = round_to_half(normal(rng) * (d % 16 == 3 ? 8.0f : 1.0f));
    uint8_t codes[64];
    const QuantParams p = quantize_group(row.data(), 64, 1, 8, codes);
    const double lo = *std::min_element(row.begin(), row.end());
    const double hi = *std::max_element(row.begin(), row.end());
    const double scale = half_to_float(p.scale), zero = half_to_float(p.zero);
    EXPECT_NEAR(scale, (hi - lo) / 255.0, (hi - lo) / 255.0 * 1e-3);  // fp16 rounding
    EXPECT_NEAR(zero, lo, std::fabs(lo) * 1e-3);
    for (int d = 0; d < 64; ++d) {
      const double expected = std::clamp(std::nearbyint((row[d] - zero) / scale), 0.0, 255.0);
      ASSERT_EQ(codes[d], expected) << d;
      ASSERT_LE(std::fabs(dequantize(codes[d], scale, zero) - row[d]),
                scale / 2 + 1e-3 * (hi - lo) / 255.0 + 1e-6);
    }
  }
}

// The CUDA quantizers round offset * (1 / scale) where that gives the code offset / scale gives
// (kernels/rint_quotient.h). Every positive finite fp16 and e4m3 scale, offsets at and a few ulps
// around every half-integer quotient of the codes' range and beyond it, random offsets, and the
// special values: the clamped codes of 2, 4 and 8 bits must equal the division's.
TEST(RintQuotient, GivesTheDividedQuotientsCodeForEveryFp16AndE4m3Scale) {
  std::vector<float> scales;
  for (uint16_t bits = 1; bits < 0x7c00; ++bits) scales.push_back(half_to_float(bits));
  for (uint8_t bits = 1; bits < 0x7f; ++bits) scales.push_back(e4m3_to_float(bits));
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> quotient(-3.0f, 300.0f);
  const float specials[] = {0.0f,
                            -0.0f,
                            std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            3e38f,
                            -3e38f};
  int64_t checked = 0, divided = 0, mismatches = 0;
  std::string first_mismatch;
  for (const float scale : scales) {
    const float inverse = 1.0f / scale;
    auto check = [&](float offset) {
      const float fast = rint_quotient(offset, scale, inverse);
      const float exact = rintf(offset / scale);
      for (const float max_code : {3.0f, 15.0f, 255.0f}) {
        // Clamped as the kernels clamp (fmaxf takes 0 over NaN).
        if (fminf(fmaxf(fast, 0.0f), max_code) != fminf(fmaxf(exact, 0.0f), max_code) &&
            mismatches++ == 0) {
          char text[96];
          std::snprintf(text, sizeof text, "offset %a scale %a max code %g", offset, scale,
                        max_code);
          first_mismatch = text;
        }
      }
      ++checked;
      // The band rint_quotient divides in, computed as it does.
      const float product = offset * inverse;
      const float rounded = (product + 0x1.8p23f) - 0x1.8p23f;
      if (std::fabs(std::fabs(product - rounded) - 0.5f) <= 0x1p-11f) ++divided;
    };
    for (int k = -3; k <= 300; ++k) {
      float offset = (static_cast<float>(k) + 0.5f) * scale;
      for (int step = 0; step < 3; ++step) offset = std::nextafter(offset, -INFINITY);
      for (int step = 0; step < 7; ++step, offset = std::nextafter(offset, INFINITY)) check(offset);
    }
    for (int i = 0; i < 16; ++i) check(quotient(rng) * scale);
    for (const float offset : specials) check(offset);
    // Quotients beyond the codes, where the rounding is no longer exact (from 2^22) but must clamp
    // to the same end.
    for (const float big : {511.5f, 512.5f, 1000.5f, 0x1p22f + 0.5f, 0x1p23f + 1.0f, 3e7f, 1e30f}) {
      check(big * scale);
      check(-big * scale);
    }
  }
  EXPECT_EQ(mismatches, 0) << "first: " << first_mismatch;
  EXPECT_GT(checked, 50'000'000);
  EXPECT_GT(divided, 0) << "no offset took the division";
}

}  // namespace
}  // namespace kvserve
