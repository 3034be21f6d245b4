// KV cache formats and the byte layout of one page (docs/design.md section 3).
//
// The pool is an array of blocks per layer; every layer uses the same block ids (as in vLLM). A
// block is either a page holding `page_tokens` tokens of one sequence for every head, or, for the
// KIVI formats, a residual block holding fp16 keys (or values) of the newest tokens.
//
// Page layouts for one layer (H heads, D = head_dim, P = page_tokens, b bits, G key group, GV value
// group). Codes are packed LSB first: code i of a 32-bit word sits at bit offset b * i.
//   fp16:  keys   fp16 [H][P][D]                     values fp16 [H][P][D]
//   int8:  keys   u8   [H][P][D]  + fp16 [H][P][2]   values the same  (per token and head)
//   kivi:  keys   u32  [H][D][P*b/32]  (per channel, packed along tokens)
//                 fp16 [H][D][P/G][2]  (scale, zero of each G-token group of a channel)
//          values u32  [H][P][D*b/32]  (per token, packed along channels)
//                 fp16 [H][P][D/GV][2] (scale, zero of each GV-channel group of a token)
//   kivi with per_token_keys (ablation): keys laid out like values.
// A (scale, zero) pair is two fp16 (4 bytes) or, with fp8 parameters (KvParamFormat::kFp8), two
// fp8 e4m3 bytes (2 bytes): zero rounded down and scale rounded up so the codes still cover the
// group (engine/kv_quant.h).
// Residual block (kivi): c = residual_tokens_per_block slots, each the keys or the values of one
// residual token, every head; slot j starts at j * residual_slot_bytes:
//   fp16 residual: fp16 [H][D]
//   int8 residual: u8 [H][D], then fp16 [H][2] (scale, zero per token and head, as int8 pages)
// Slots are handed out one by one and shared by sequences (KvCacheManager), so a sequence's
// residual does not round up to whole blocks.
#pragma once

#include <absl/status/status.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/model_config.h"

namespace kvserve {

enum class KvFormat { kFp16, kInt8, kKivi4, kKivi2 };

std::string to_string(KvFormat format);
// Throws std::invalid_argument naming the valid formats.
KvFormat parse_kv_format(const std::string& name);
int kv_bits(KvFormat format);  // 16, 8, 4 or 2
inline bool is_kivi(KvFormat format) {
  return format == KvFormat::kKivi4 || format == KvFormat::kKivi2;
}

// How a kivi group's (scale, zero) pair is stored (--kv-params).
enum class KvParamFormat { kFp16, kFp8 };
// How a kivi residual token is stored (--kv-residual-format).
enum class KvResidualFormat { kFp16, kInt8 };

std::string to_string(KvParamFormat params);
std::string to_string(KvResidualFormat residual);
// Throw std::invalid_argument naming the valid choices.
KvParamFormat parse_kv_params(const std::string& name);
KvResidualFormat parse_kv_residual_format(const std::string& name);

struct KvCacheConfig {
  KvFormat format = KvFormat::kKivi2;
  int key_group = 32;           // G: tokens per key quantization group (one channel of one head)
  int value_group = 32;         // GV: channels per value quantization group (one token of one head)
  int residual = 32;            // R: newest tokens kept in fp16 (at least R, fewer than R + G)
  int page_tokens = 32;         // tokens per page; a multiple of G
  bool per_token_keys = false;  // ablation: quantize keys per token, as values are
  KvParamFormat params = KvParamFormat::kFp16;                 // kivi group (scale, zero) pairs
  KvResidualFormat residual_format = KvResidualFormat::kFp16;  // kivi residual tokens
};

// Named presets of --kv beyond the plain formats: "kivi2c" = kivi2 with value groups of 64, fp8
// group parameters and an int8 residual (docs/quality.md). True when `name` is one; then sets the
// preset's fields of `config` (format, value_group, params, residual_format).
bool apply_kv_preset(const std::string& name, KvCacheConfig& config);

// OK when `config` works with the model geometry, else INVALID_ARGUMENT saying what is wrong and
// how to fix it.
absl::Status validate(const KvCacheConfig& config, const ModelConfig& model);
// "kivi2 (G32 GV32 R32, pages of 32)" for logs and reports.
std::string describe(const KvCacheConfig& config);

// Tokens of an n-token sequence that live in pages: quantized for int8/kivi, as fp16 for fp16.
// For kivi: 0 below R + G tokens, else the largest multiple of G that leaves R..R+G-1 tokens.
int paged_token_count(const KvCacheConfig& config, int n);

// Byte offsets inside one block of one layer.
struct KvPageLayout {
  size_t key_codes = 0;   // offset of the key data (fp16 values, u8 or packed u32 codes)
  size_t key_params = 0;  // offset of the key scale/zero pairs (int8, kivi)
  size_t value_codes = 0;
  size_t value_params = 0;
  size_t block_bytes = 0;  // bytes of one block in one layer
  int residual_tokens_per_block =
      0;                            // kivi: residual slots (a token's keys or values) a block holds
  size_t code_bytes_per_page = 0;   // key + value code (or fp16 data) bytes of a page
  size_t param_bytes_per_page = 0;  // key + value scale/zero bytes of a page
  size_t param_pair_bytes = 0;      // bytes of one (scale, zero) pair: 4 (fp16) or 2 (fp8)
  // kivi residual slot: offset of the fp16 (scale, zero) pairs [H] of an int8 residual inside a
  // slot, the bytes one residual token's keys (or values), all heads, hold, and the slot stride
  // (those bytes rounded up to 16, so every row can be read with 16-byte loads).
  size_t residual_params = 0;
  size_t residual_token_bytes = 0;
  size_t residual_slot_bytes = 0;
};

KvPageLayout make_page_layout(const KvCacheConfig& config, const ModelConfig& model);

}  // namespace kvserve
