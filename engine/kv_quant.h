// Asymmetric round-to-nearest quantization (KIVI): q = rint((x - zero) / scale), clamped to
// [0, 2^bits - 1], with scale = (max - min) / (2^bits - 1) and zero = min, both stored as fp16.
// The CPU reference of the cache format; the CUDA kernels are tested against these functions.
#pragma once

#include <cstdint>

#include "engine/fp16.h"

namespace kvserve {

struct QuantParams {
  uint16_t scale = 0;  // fp16 bits
  uint16_t zero = 0;   // fp16 bits
};

// Quantizes x[0], x[stride], ..., x[(n-1)*stride] (fp16-representable values) into codes[0..n).
// A constant group gets scale 0 and all-zero codes, which dequantize back to the constant.
QuantParams quantize_group(const float* x, int n, int stride, int bits, uint8_t* codes);

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
