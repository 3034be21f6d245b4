#include "engine/kv_quant.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

namespace kvserve {
namespace {

constexpr uint8_t kE4m3MaxCode = 0x7e;  // 448; 0x7f is NaN
constexpr uint8_t kE4m3Sign = 0x80;

// The 127 non-negative finite e4m3 values, ascending with their code.
const std::array<float, kE4m3MaxCode + 1>& e4m3_magnitudes() {
  static const std::array<float, kE4m3MaxCode + 1> table = [] {
    std::array<float, kE4m3MaxCode + 1> t{};
    for (int code = 0; code <= kE4m3MaxCode; ++code) {
      const int exponent = code >> 3, mantissa = code & 7;
      t[code] = exponent == 0
                    ? std::ldexp(static_cast<float>(mantissa), -9)
                    : std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f, exponent - 7);
    }
    return t;
  }();
  return table;
}

// The code of the smallest magnitude >= m (m >= 0), saturating at 448.
uint8_t magnitude_up(float m) {
  const auto& t = e4m3_magnitudes();
  const auto it = std::lower_bound(t.begin(), t.end(), m);
  return it == t.end() ? kE4m3MaxCode : static_cast<uint8_t>(it - t.begin());
}

// The code of the largest magnitude <= m (m >= 0), saturating at 448.
uint8_t magnitude_down(float m) {
  const auto& t = e4m3_magnitudes();
  const auto it = std::upper_bound(t.begin(), t.end(), m);
  return static_cast<uint8_t>(it - t.begin() - 1);
}

void min_max(const float* x, int n, int stride, float& lo, float& hi) {
  lo = x[0];
  hi = x[0];
  for (int i = 1; i < n; ++i) {
    lo = std::min(lo, x[i * stride]);
    hi = std::max(hi, x[i * stride]);
  }
}

void write_codes(const float* x, int n, int stride, int bits, float scale, float zero,
                 uint8_t* codes) {
  const float max_code = static_cast<float>((1 << bits) - 1);
  for (int i = 0; i < n; ++i) {
    const float q = scale > 0.0f ? std::rint((x[i * stride] - zero) / scale) : 0.0f;
    codes[i] = static_cast<uint8_t>(std::clamp(q, 0.0f, max_code));
  }
}

}  // namespace

float e4m3_to_float(uint8_t bits) {
  const float magnitude = e4m3_magnitudes()[std::min<uint8_t>(bits & 0x7f, kE4m3MaxCode)];
  return (bits & kE4m3Sign) ? -magnitude : magnitude;
}

uint8_t e4m3_round_down(float x) {
  if (std::isnan(x)) return 0;
  return x >= 0.0f ? magnitude_down(x) : static_cast<uint8_t>(kE4m3Sign | magnitude_up(-x));
}

uint8_t e4m3_round_up(float x) {
  if (std::isnan(x)) return 0;
  return x >= 0.0f ? magnitude_up(x) : static_cast<uint8_t>(kE4m3Sign | magnitude_down(-x));
}

QuantParams quantize_group(const float* x, int n, int stride, int bits, uint8_t* codes) {
  float lo, hi;
  min_max(x, n, stride, lo, hi);
  const float max_code = static_cast<float>((1 << bits) - 1);
  QuantParams params{float_to_half((hi - lo) / max_code), float_to_half(lo)};
  write_codes(x, n, stride, bits, half_to_float(params.scale), half_to_float(params.zero), codes);
  return params;
}

QuantParamsFp8 quantize_group_fp8(const float* x, int n, int stride, int bits, uint8_t* codes) {
  float lo, hi;
  min_max(x, n, stride, lo, hi);
  const float max_code = static_cast<float>((1 << bits) - 1);
  // e4m3 keeps 3 mantissa bits: rounding the zero alone may cost a large share of a small range.
  // Of the pairs around (min, (max - min) / max_code), keep the one with the least squared error;
  // the first, which covers the group, wins ties (so a constant e4m3 group stays exact).
  QuantParamsFp8 best;
  float best_error = std::numeric_limits<float>::infinity();
  for (const uint8_t zero_bits : {e4m3_round_down(lo), e4m3_round_up(lo)}) {
    const float zero = e4m3_to_float(zero_bits);
    const float spread = std::max(0.0f, (hi - zero) / max_code);
    for (const uint8_t scale_bits : {e4m3_round_up(spread), e4m3_round_down(spread)}) {
      const float scale = e4m3_to_float(scale_bits);
      write_codes(x, n, stride, bits, scale, zero, codes);
      float error = 0.0f;
      for (int i = 0; i < n; ++i) {
        const float e = dequantize(codes[i], scale, zero) - x[i * stride];
        error += e * e;
      }
      if (error < best_error) {
        best_error = error;
        best = {scale_bits, zero_bits};
      }
    }
  }
  write_codes(x, n, stride, bits, e4m3_to_float(best.scale), e4m3_to_float(best.zero), codes);
  return best;
}

GroupParams quantize_group_into(const float* x, int n, int stride, int bits, KvParamFormat format,
                                uint8_t* params, int index, uint8_t* codes) {
  if (format == KvParamFormat::kFp8) {
    const QuantParamsFp8 p = quantize_group_fp8(x, n, stride, bits, codes);
    params[2 * index] = p.scale;
    params[2 * index + 1] = p.zero;
  } else {
    const QuantParams p = quantize_group(x, n, stride, bits, codes);
    std::memcpy(params + 4 * static_cast<size_t>(index), &p, sizeof(p));
  }
  return read_group_params(params, index, format);
}

}  // namespace kvserve
