#include "engine/kv_quant.h"

#include <algorithm>
#include <cmath>

namespace kvserve {

QuantParams quantize_group(const float* x, int n, int stride, int bits, uint8_t* codes) {
  float lo = x[0], hi = x[0];
  for (int i = 1; i < n; ++i) {
    lo = std::min(lo, x[i * stride]);
    hi = std::max(hi, x[i * stride]);
  }
  const float max_code = static_cast<float>((1 << bits) - 1);
  QuantParams params{float_to_half((hi - lo) / max_code), float_to_half(lo)};
  const float scale = half_to_float(params.scale), zero = half_to_float(params.zero);
  for (int i = 0; i < n; ++i) {
    const float q = scale > 0.0f ? std::rint((x[i * stride] - zero) / scale) : 0.0f;
    codes[i] = static_cast<uint8_t>(std::clamp(q, 0.0f, max_code));
  }
  return params;
}

}  // namespace kvserve
