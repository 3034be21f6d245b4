// Asymmetric round-to-nearest quantization (KIVI): q = rint((x - zero) / scale), clamped to
// [0, 2^bits - 1], with scale = (max - min) / (2^bits - 1) and zero = min, stored as an fp16 pair
// or, for --kv-params fp8, an fp8 e4m3 pair (see quantize_group_fp8 for the rounding).
// The CPU reference of the cache format; the CUDA kernels are tested against these functions, and
// read_group_params / dequantize are the one place that turns stored bytes back into values.
#pragma once

#include <cstdint>
#include <cstring>

#include "engine/fp16.h"
#include "engine/kv_format.h"

namespace kvserve {

struct QuantParams {
  uint16_t scale = 0;  // fp16 bits
  uint16_t zero = 0;   // fp16 bits
};

// The same pair stored as fp8 e4m3 (OCP "E4M3FN", CUDA's __nv_fp8_e4m3: bias 7, no infinities,
// largest finite 448, smallest subnormal 2^-9).
struct QuantParamsFp8 {
  uint8_t scale = 0;
  uint8_t zero = 0;
};

// A pair decoded to floats (exact: every fp16 and e4m3 value is a float).
struct GroupParams {
  float scale = 0.0f;
  float zero = 0.0f;
};

// Quantizes x[0], x[stride], ..., x[(n-1)*stride] (fp16-representable values) into codes[0..n).
// A constant group gets scale 0 and all-zero codes, which dequantize back to the constant.
QuantParams quantize_group(const float* x, int n, int stride, int bits, uint8_t* codes);

// The same with an e4m3 pair. e4m3 keeps 3 mantissa bits, so rounding the zero alone can cost a
// large share of a small range far from 0 (a key channel with an offset). Of the four pairs
// zero in {down(min), up(min)} x scale in {up(s), down(s)}, s = (max - zero) / (2^bits - 1), the
// one with the least squared error over the group is kept (codes computed with the pair as read
// back; ties keep the first). The first pair covers the group (zero <= min, codes reach max)
// whenever it lies in [-448, 448 + 448 * (2^bits - 1)], so the error is never above that pair's
// (each value within scale / 2). A scale below e4m3's smallest subnormal becomes 2^-9 (or 0); a
// group equal to an e4m3 value gets scale 0 and dequantizes exactly. Values beyond that range
// (never seen in GPT-2's keys and values) are clamped to it. No input gives NaN or infinity.
QuantParamsFp8 quantize_group_fp8(const float* x, int n, int stride, int bits, uint8_t* codes);

// e4m3 <-> float. e4m3_round_down/up saturate at -448/448 and never return the NaN encodings.
float e4m3_to_float(uint8_t bits);
uint8_t e4m3_round_down(float x);
uint8_t e4m3_round_up(float x);

// Quantizes a group with the given parameter format and writes the pair at params[index] of an
// array of pairs of that format (4 bytes per pair for fp16, 2 for fp8).
GroupParams quantize_group_into(const float* x, int n, int stride, int bits, KvParamFormat format,
                                uint8_t* params, int index, uint8_t* codes);

// Pair `index` of an array of pairs stored in `format`, decoded.
inline GroupParams read_group_params(const uint8_t* params, int index, KvParamFormat format) {
  if (format == KvParamFormat::kFp8) {
    return {e4m3_to_float(params[2 * index]), e4m3_to_float(params[2 * index + 1])};
  }
  uint16_t pair[2];
  std::memcpy(pair, params + 4 * static_cast<size_t>(index), sizeof(pair));
  return {half_to_float(pair[0]), half_to_float(pair[1])};
}

inline float dequantize(uint32_t code, float scale, float zero) {
  return static_cast<float>(code) * scale + zero;
}

// Code `index` of a packed array of 32-bit words, `bits` bits per code, LSB first.
inline uint32_t get_code(const uint32_t* words, int index, int bits) {
  const int per_word = 32 / bits;
  return (words[index / per_word] >> (bits * (index % per_word))) & ((1u << bits) - 1u);
}

inline void set_code(uint32_t* words, int index, int bits, uint32_t code) {
  const int per_word = 32 / bits;
  const int shift = bits * (index % per_word);
  uint32_t& word = words[index / per_word];
  word = (word & ~(((1u << bits) - 1u) << shift)) | (code << shift);
}

}  // namespace kvserve
