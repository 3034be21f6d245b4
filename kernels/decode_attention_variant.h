// Which kernel decode_attention runs for KIVI pages: a launch parameter, a CUDA backend option and
// the `--decode-attention` flag. Plain C++ (no CUDA headers), so that builds without CUDA parse the
// flag too.
#pragma once

#include <stdexcept>
#include <string>

namespace kvserve::cuda {

enum class DecodeAttentionVariant {
  // 2-bit pages: codes read with 16-byte coalesced loads, two pages per warp step, converted in
  // registers into fp16 pairs (one AND per two codes) and multiplied on tensor cores; every 2-bit
  // layout (value groups of 16, 32 or 64, fp16 or fp8 group parameters, an fp16 or int8 residual:
  // kivi2c too). 4-bit pages, and chunks of fewer than 8 pages, run kOnline
  // (decode_attention_kernel says which runs).
  kPacked,
  // One pass with a running softmax per warp, fp32 FMAs on codes masked in place.
  kOnline,
  // kOnline with 2-bit keys and values staged in shared memory for mma.m16n8k16; 4-bit pages run
  // kOnline.
  kTensor,
};

inline const char* decode_attention_variant_name(DecodeAttentionVariant v) {
  switch (v) {
    case DecodeAttentionVariant::kPacked:
      return "packed";
    case DecodeAttentionVariant::kOnline:
      return "online";
    case DecodeAttentionVariant::kTensor:
      return "tensor";
  }
  return "?";
}

// "packed", "online" or "tensor"; anything else throws std::invalid_argument.
inline DecodeAttentionVariant parse_decode_attention_variant(const std::string& name) {
  for (DecodeAttentionVariant v : {DecodeAttentionVariant::kPacked, DecodeAttentionVariant::kOnline,
                                   DecodeAttentionVariant::kTensor}) {
    if (name == decode_attention_variant_name(v)) return v;
  }
  throw std::invalid_argument("unknown decode attention variant '" + name +
                              "' (use packed, online or tensor)");
}

}  // namespace kvserve::cuda
