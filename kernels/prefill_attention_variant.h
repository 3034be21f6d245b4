// Which kernel runs the attention of prefill and mixed steps (every step that is not a pure decode
// step in a geometry decode_attention handles): a CUDA backend option and the `--prefill-attention`
// flag. Plain C++ (no CUDA headers), so that builds without CUDA parse the flag too.
#pragma once

#include <stdexcept>
#include <string>

namespace kvserve::cuda {

enum class PrefillAttentionVariant {
  // prefill_attention (prefill_attention_mma.cu): mma.m16n8k16 on tensor cores, fp16 in and fp32
  // accumulate, 64 queries per block; needs sm_80 or newer and head_dim 64, else kTiled runs.
  kTensor,
  // paged_attention (paged_attention.cu): fp32 on CUDA cores, 16 queries per block.
  kTiled,
};

inline const char* prefill_attention_variant_name(PrefillAttentionVariant v) {
  switch (v) {
    case PrefillAttentionVariant::kTensor:
      return "tensor";
    case PrefillAttentionVariant::kTiled:
      return "tiled";
  }
  return "?";
}

// "tensor" or "tiled"; anything else throws std::invalid_argument.
inline PrefillAttentionVariant parse_prefill_attention_variant(const std::string& name) {
  for (PrefillAttentionVariant v :
       {PrefillAttentionVariant::kTensor, PrefillAttentionVariant::kTiled}) {
    if (name == prefill_attention_variant_name(v)) return v;
  }
  throw std::invalid_argument("unknown prefill attention variant '" + name +
                              "' (use tensor or tiled)");
}

}  // namespace kvserve::cuda
