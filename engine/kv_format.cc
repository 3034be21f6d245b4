#include "engine/kv_format.h"

#include <stdexcept>

namespace kvserve {

std::string to_string(KvFormat format) {
  switch (format) {
    case KvFormat::kFp16:
      return "fp16";
    case KvFormat::kInt8:
      return "int8";
    case KvFormat::kKivi4:
      return "kivi4";
    case KvFormat::kKivi2:
      return "kivi2";
  }
  return "unknown";
}

KvFormat parse_kv_format(const std::string& name) {
  for (KvFormat f : {KvFormat::kFp16, KvFormat::kInt8, KvFormat::kKivi4, KvFormat::kKivi2}) {
    if (to_string(f) == name) return f;
  }
  throw std::invalid_argument("unknown KV format '" + name + "' (use fp16, int8, kivi4 or kivi2)");
}

std::string to_string(KvParamFormat params) {
  return params == KvParamFormat::kFp8 ? "fp8" : "fp16";
}

std::string to_string(KvResidualFormat residual) {
  return residual == KvResidualFormat::kInt8 ? "int8" : "fp16";
}

KvParamFormat parse_kv_params(const std::string& name) {
  for (KvParamFormat p : {KvParamFormat::kFp16, KvParamFormat::kFp8}) {
    if (to_string(p) == name) return p;
  }
  throw std::invalid_argument("unknown KV group parameter format '" + name + "' (use fp16 or fp8)");
}

KvResidualFormat parse_kv_residual_format(const std::string& name) {
  for (KvResidualFormat r : {KvResidualFormat::kFp16, KvResidualFormat::kInt8}) {
    if (to_string(r) == name) return r;
  }
  throw std::invalid_argument("unknown KV residual format '" + name + "' (use fp16 or int8)");
}

bool apply_kv_preset(const std::string& name, KvCacheConfig& config) {
  if (name != "kivi2c") return false;
  config.format = KvFormat::kKivi2;
  config.value_group = 64;
  config.params = KvParamFormat::kFp8;
  config.residual_format = KvResidualFormat::kInt8;
  return true;
}

int kv_bits(KvFormat format) {
  switch (format) {
    case KvFormat::kFp16:
      return 16;
    case KvFormat::kInt8:
      return 8;
    case KvFormat::kKivi4:
      return 4;
    case KvFormat::kKivi2:
      return 2;
  }
  return 0;
}

absl::Status validate(const KvCacheConfig& c, const ModelConfig& model) {
  const int head_dim = model.head_dim();
  if (c.page_tokens <= 0) return absl::InvalidArgumentError("--kv-page-tokens must be positive");
  if (head_dim > 256)
    return absl::InvalidArgumentError("head dimensions above 256 are not supported");
  if (!is_kivi(c.format)) {
    if (c.params != KvParamFormat::kFp16 || c.residual_format != KvResidualFormat::kFp16) {
      return absl::InvalidArgumentError(
          "--kv-params fp8 and --kv-residual-format int8 apply to kivi4 and kivi2 only (got --kv " +
          to_string(c.format) + ")");
    }
    return absl::OkStatus();
  }
  const int codes_per_word = 32 / kv_bits(c.format);
  const std::string bits = std::to_string(kv_bits(c.format));
  if (c.key_group <= 0 || c.key_group > 256 || c.key_group % codes_per_word != 0) {
    return absl::InvalidArgumentError(
        "--kv-group must be a multiple of " + std::to_string(codes_per_word) + " up to 256" +
        " for " + bits + "-bit codes (got " + std::to_string(c.key_group) + ")");
  }
  if (c.value_group <= 0 || c.value_group % codes_per_word != 0 || head_dim % c.value_group != 0) {
    return absl::InvalidArgumentError("--kv-value-group must divide the head dimension " +
                                      std::to_string(head_dim) + " and be a multiple of " +
                                      std::to_string(codes_per_word) + " (got " +
                                      std::to_string(c.value_group) + ")");
  }
  if (c.residual <= 0 || c.residual % c.key_group != 0) {
    return absl::InvalidArgumentError("--kv-residual must be a positive multiple of --kv-group " +
                                      std::to_string(c.key_group) + " (got " +
                                      std::to_string(c.residual) + ")");
  }
  if (c.page_tokens % c.key_group != 0) {
    return absl::InvalidArgumentError("--kv-page-tokens must be a multiple of --kv-group " +
                                      std::to_string(c.key_group) + " (got " +
                                      std::to_string(c.page_tokens) + ")");
  }
  return absl::OkStatus();
}

std::string describe(const KvCacheConfig& c) {
  std::string s = to_string(c.format);
  if (is_kivi(c.format)) {
    s += " (G" + std::to_string(c.key_group) + " GV" + std::to_string(c.value_group) + " R" +
         std::to_string(c.residual) + (c.per_token_keys ? ", per-token keys" : "") +
         (c.params == KvParamFormat::kFp8 ? ", fp8 params" : "") +
         (c.residual_format == KvResidualFormat::kInt8 ? ", int8 residual" : "") + ",";
    return s + " pages of " + std::to_string(c.page_tokens) + ")";
  }
  return s + " (pages of " + std::to_string(c.page_tokens) + ")";
}

int paged_token_count(const KvCacheConfig& c, int n) {
  if (!is_kivi(c.format)) return n;
  if (n < c.residual + c.key_group) return 0;
  return c.key_group * ((n - c.residual) / c.key_group);
}

KvPageLayout make_page_layout(const KvCacheConfig& c, const ModelConfig& model) {
  const size_t heads = model.n_head, dim = model.head_dim(), page = c.page_tokens;
  const size_t fp16_bytes = 2, fp16_pair_bytes = 2 * fp16_bytes;
  const size_t param_pair_bytes = c.params == KvParamFormat::kFp8 ? 2 : fp16_pair_bytes;
  KvPageLayout l;
  size_t key_codes_bytes = 0, key_param_bytes = 0, value_codes_bytes = 0, value_param_bytes = 0;
  switch (c.format) {
    case KvFormat::kFp16:
      key_codes_bytes = value_codes_bytes = heads * page * dim * fp16_bytes;
      break;
    case KvFormat::kInt8:
      key_codes_bytes = value_codes_bytes = heads * page * dim;
      key_param_bytes = value_param_bytes = heads * page * fp16_pair_bytes;
      break;
    case KvFormat::kKivi4:
    case KvFormat::kKivi2: {
      const size_t bits = kv_bits(c.format);
      key_codes_bytes = value_codes_bytes = heads * page * dim * bits / 8;
      value_param_bytes = heads * page * (dim / c.value_group) * param_pair_bytes;
      key_param_bytes = c.per_token_keys ? value_param_bytes
                                         : heads * dim * (page / c.key_group) * param_pair_bytes;
      break;
    }
  }
  l.key_codes = 0;
  l.key_params = l.key_codes + key_codes_bytes;
  l.value_codes = l.key_params + key_param_bytes;
  l.value_params = l.value_codes + value_codes_bytes;
  l.block_bytes = l.value_params + value_param_bytes;
  l.code_bytes_per_page = key_codes_bytes + value_codes_bytes;
  l.param_bytes_per_page = key_param_bytes + value_param_bytes;
  l.param_pair_bytes = param_pair_bytes;
  if (is_kivi(c.format)) {
    const bool int8 = c.residual_format == KvResidualFormat::kInt8;
    l.residual_token_bytes = int8 ? heads * (dim + fp16_pair_bytes) : heads * dim * fp16_bytes;
    l.residual_slot_bytes = (l.residual_token_bytes + 15) / 16 * 16;
    l.residual_tokens_per_block = static_cast<int>(l.block_bytes / l.residual_slot_bytes);
    if (int8) l.residual_params = heads * dim;
  }
  return l;
}

}  // namespace kvserve
