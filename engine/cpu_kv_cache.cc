#include "engine/cpu_kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "engine/fp16.h"
#include "engine/kv_quant.h"
#include "kernels/kv_error_sample.h"
#include "kernels/residual_order.h"

namespace kvserve {
namespace {

// Online-softmax state of one query: running max, running sum and the unnormalised output.
struct SoftmaxState {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.0f;
};

float dot(const float* a, const float* b, int n) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Folds keys/values [0, count) (rows of `dim`, row stride `key_stride`/`value_stride`) into the
// state and accumulator of one query.
void attend_block(const float* query, const float* keys, int key_stride, const float* values,
                  int value_stride, int count, int dim, float* scores, SoftmaxState& state,
                  float* acc) {
  if (count <= 0) return;
  float block_max = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < count; ++j) {
    scores[j] = dot(query, keys + j * key_stride, dim);
    block_max = std::max(block_max, scores[j]);
  }
  const float new_max = std::max(state.max, block_max);
  const float rescale = std::exp(state.max - new_max);
  state.sum *= rescale;
  for (int d = 0; d < dim; ++d) acc[d] *= rescale;
  for (int j = 0; j < count; ++j) {
    const float p = std::exp(scores[j] - new_max);
    state.sum += p;
    const float* v = values + j * value_stride;
    for (int d = 0; d < dim; ++d) acc[d] += p * v[d];
  }
  state.max = new_max;
}

}  // namespace

CpuKvCache::CpuKvCache(const KvCacheConfig& config, int32_t num_blocks, const ModelConfig& model)
    : config_(config),
      layout_(make_page_layout(config, model)),
      n_head_(model.n_head),
      head_dim_(model.head_dim()),
      n_embd_(model.n_embd),
      n_layer_(model.n_layer),
      num_blocks_(num_blocks),
      storage_bytes_(static_cast<size_t>(model.n_layer) * num_blocks * layout_.block_bytes),
      storage_(static_cast<uint8_t*>(std::calloc(std::max<size_t>(storage_bytes_, 1), 1)),
               &std::free) {
  if (!storage_) {
    throw std::runtime_error("cannot allocate a KV pool of " + std::to_string(storage_bytes_) +
                             " bytes of host memory: use a smaller --kv-pool-mb");
  }
}

void CpuKvCache::write_pages(int layer, int head, const BlockTableView& seq, int first, int last,
                             int window_start, const float* window_k, const float* window_v) {
  const int D = head_dim_, P = config_.page_tokens, G = config_.key_group;
  const int GV = config_.value_group, bits = kv_bits(config_.format);
  uint8_t codes[256];
  auto row_k = [&](int pos) { return window_k + static_cast<size_t>(pos - window_start) * D; };
  auto row_v = [&](int pos) { return window_v + static_cast<size_t>(pos - window_start) * D; };

  // Per-token formats (fp16, int8, and the values of kivi) write each token on its own.
  for (int pos = first; pos < last; ++pos) {
    uint8_t* page = block(layer, seq.pages[pos / P]);
    const int slot = pos % P;
    if (config_.format == KvFormat::kFp16) {
      auto* k = reinterpret_cast<uint16_t*>(page + layout_.key_codes) + (head * P + slot) * D;
      auto* v = reinterpret_cast<uint16_t*>(page + layout_.value_codes) + (head * P + slot) * D;
      for (int d = 0; d < D; ++d) {
        k[d] = float_to_half(row_k(pos)[d]);
        v[d] = float_to_half(row_v(pos)[d]);
      }
    } else if (config_.format == KvFormat::kInt8) {
      auto* params_k = reinterpret_cast<QuantParams*>(page + layout_.key_params);
      auto* params_v = reinterpret_cast<QuantParams*>(page + layout_.value_params);
      params_k[head * P + slot] =
          quantize_group(row_k(pos), D, 1, 8, page + layout_.key_codes + (head * P + slot) * D);
      params_v[head * P + slot] =
          quantize_group(row_v(pos), D, 1, 8, page + layout_.value_codes + (head * P + slot) * D);
    } else {
      const int words = D * bits / 32;
      auto quantize_token = [&](const float* row, size_t codes_offset, size_t params_offset) {
        auto* w = reinterpret_cast<uint32_t*>(page + codes_offset) + (head * P + slot) * words;
        for (int g = 0; g < D / GV; ++g) {
          quantize_group_into(row + g * GV, GV, 1, bits, config_.params, page + params_offset,
                              (head * P + slot) * (D / GV) + g, codes);
          for (int i = 0; i < GV; ++i) set_code(w, g * GV + i, bits, codes[i]);
        }
      };
      quantize_token(row_v(pos), layout_.value_codes, layout_.value_params);
      if (config_.per_token_keys) quantize_token(row_k(pos), layout_.key_codes, layout_.key_params);
    }
  }
  if (!is_kivi(config_.format) || config_.per_token_keys) return;

  // KIVI keys: per channel over each group of G tokens, packed along tokens.
  const int words_per_channel = P * bits / 32;
  for (int group_start = first; group_start < last; group_start += G) {
    uint8_t* page = block(layer, seq.pages[group_start / P]);
    const int slot = group_start % P;
    auto* words = reinterpret_cast<uint32_t*>(page + layout_.key_codes);
    for (int d = 0; d < D; ++d) {
      quantize_group_into(row_k(group_start) + d, G, D, bits, config_.params,
                          page + layout_.key_params, (head * D + d) * (P / G) + slot / G, codes);
      uint32_t* channel = words + (head * D + d) * words_per_channel;
      for (int i = 0; i < G; ++i) set_code(channel, slot + i, bits, codes[i]);
    }
  }
}

void CpuKvCache::dequantize_page(int layer, int head, int32_t id, int valid, float* keys,
                                 float* values) {
  const int D = head_dim_, P = config_.page_tokens, G = config_.key_group;
  const int GV = config_.value_group, bits = kv_bits(config_.format);
  const uint8_t* page = block(layer, id);
  if (config_.format == KvFormat::kFp16) {
    const auto* k = reinterpret_cast<const uint16_t*>(page + layout_.key_codes) + head * P * D;
    const auto* v = reinterpret_cast<const uint16_t*>(page + layout_.value_codes) + head * P * D;
    for (int i = 0; i < valid * D; ++i) {
      keys[i] = half_to_float(k[i]);
      values[i] = half_to_float(v[i]);
    }
    return;
  }
  if (config_.format == KvFormat::kInt8) {
    auto dequant = [&](size_t codes_offset, size_t params_offset, float* out) {
      const uint8_t* codes = page + codes_offset + head * P * D;
      const auto* params = reinterpret_cast<const QuantParams*>(page + params_offset) + head * P;
      for (int t = 0; t < valid; ++t) {
        const float scale = half_to_float(params[t].scale), zero = half_to_float(params[t].zero);
        for (int d = 0; d < D; ++d) out[t * D + d] = dequantize(codes[t * D + d], scale, zero);
      }
    };
    dequant(layout_.key_codes, layout_.key_params, keys);
    dequant(layout_.value_codes, layout_.value_params, values);
    return;
  }
  const int words_per_token = D * bits / 32;
  auto dequant_per_token = [&](size_t codes_offset, size_t params_offset, float* out) {
    const auto* words =
        reinterpret_cast<const uint32_t*>(page + codes_offset) + head * P * words_per_token;
    for (int t = 0; t < valid; ++t) {
      for (int g = 0; g < D / GV; ++g) {
        const GroupParams p =
            read_group_params(page + params_offset, (head * P + t) * (D / GV) + g, config_.params);
        for (int i = 0; i < GV; ++i) {
          const int d = g * GV + i;
          out[t * D + d] =
              dequantize(get_code(words + t * words_per_token, d, bits), p.scale, p.zero);
        }
      }
    }
  };
  dequant_per_token(layout_.value_codes, layout_.value_params, values);
  if (config_.per_token_keys) {
    dequant_per_token(layout_.key_codes, layout_.key_params, keys);
    return;
  }
  const int words_per_channel = P * bits / 32;
  const auto* words =
      reinterpret_cast<const uint32_t*>(page + layout_.key_codes) + head * D * words_per_channel;
  for (int d = 0; d < D; ++d) {
    for (int t = 0; t < valid; ++t) {
      const GroupParams p = read_group_params(page + layout_.key_params,
                                              (head * D + d) * (P / G) + t / G, config_.params);
      keys[t * D + d] =
          dequantize(get_code(words + d * words_per_channel, t, bits), p.scale, p.zero);
    }
  }
}

void CpuKvCache::copy_blocks(const std::vector<BlockCopy>& copies) {
  for (const BlockCopy& copy : copies) {
    check_block_copy(copy, num_blocks_, layout_.block_bytes);
    for (int layer = 0; layer < n_layer_; ++layer) {
      std::memmove(block(layer, copy.dst) + copy.dst_offset,
                   block(layer, copy.src) + copy.src_offset, copy.bytes);
    }
  }
}

void CpuKvCache::append_and_attend(int layer, int head, const BlockTableView& seq, int start,
                                   int count, const float* qkv, int qkv_stride, float* out,
                                   int out_stride) {
  const int D = head_dim_, C = n_embd_, P = config_.page_tokens;
  const int end = start + count;
  if (end > seq.length) {
    throw std::logic_error("KV cache: append beyond the reserved length of the sequence");
  }
  const int paged_before = paged_token_count(config_, start);
  const int paged_after = paged_token_count(config_, end);

  // The window: keys/values of positions [paged_before, end), i.e. the old residual and the new
  // tokens, as attention reads them (fp16, or an int8 residual's dequantized values). Copying the
  // old residual first lets the new rows take the flushed rows' slots.
  const int window_start = paged_before;
  const int window_len = end - window_start;
  std::vector<float> window_k(static_cast<size_t>(window_len) * D);  // [window_len][D]
  std::vector<float> window_v(static_cast<size_t>(window_len) * D);  // [window_len][D]
  float* window[2] = {window_k.data(), window_v.data()};             // kind 0: keys, 1: values
  // int8 residual: each window row's codes and (scale, zero), computed once as the token enters
  // the window.
  const bool int8_residual = config_.residual_format == KvResidualFormat::kInt8;
  const size_t int8_rows = int8_residual ? static_cast<size_t>(window_len) : 0;
  std::vector<uint8_t> window_codes[2] = {std::vector<uint8_t>(int8_rows * D),
                                          std::vector<uint8_t>(int8_rows * D)};  // [window_len][D]
  std::vector<QuantParams> window_params[2] = {std::vector<QuantParams>(int8_rows),
                                               std::vector<QuantParams>(int8_rows)};
  // Residual token `row` of the window (0 = oldest): its keys (kind 0) or values (kind 1) sit in
  // the slot seq.residual_slots[2 * row + kind]; this head's row of it, and its int8 pair.
  const int per_block = layout_.residual_tokens_per_block;
  auto residual_slot = [&](int row, int kind) {
    const int32_t slot = seq.residual_slots[2 * row + kind];
    return block(layer, slot / per_block) + (slot % per_block) * layout_.residual_slot_bytes;
  };
  auto residual_row = [&](int row, int kind) {  // D codes (int8) or D fp16 values
    const size_t element_bytes = int8_residual ? 1 : 2;
    return residual_slot(row, kind) + static_cast<size_t>(head) * D * element_bytes;
  };
  auto residual_params = [&](int row, int kind) {
    return reinterpret_cast<QuantParams*>(residual_slot(row, kind) + layout_.residual_params) +
           head;
  };
  auto dequantize_int8_row = [&](int row, int kind) {
    const QuantParams p = window_params[kind][row];
    const float scale = half_to_float(p.scale), zero = half_to_float(p.zero);
    for (int d = 0; d < D; ++d) {
      window[kind][row * D + d] = dequantize(window_codes[kind][row * D + d], scale, zero);
    }
  };
  for (int pos = window_start; pos < start; ++pos) {
    const int row = pos - window_start;
    for (int kind = 0; kind < 2; ++kind) {
      if (int8_residual) {
        const uint8_t* codes = residual_row(row, kind);
        std::copy(codes, codes + D, &window_codes[kind][row * D]);
        window_params[kind][row] = *residual_params(row, kind);
        dequantize_int8_row(row, kind);
      } else {
        const auto* fp16 = reinterpret_cast<const uint16_t*>(residual_row(row, kind));
        for (int d = 0; d < D; ++d) window[kind][row * D + d] = half_to_float(fp16[d]);
      }
    }
  }
  for (int pos = start; pos < end; ++pos) {
    const float* qkv_row = qkv + static_cast<size_t>(pos - start) * qkv_stride;
    const int row = pos - window_start;
    for (int kind = 0; kind < 2; ++kind) {
      float* w = &window[kind][row * D];
      for (int d = 0; d < D; ++d) w[d] = round_to_half(qkv_row[(1 + kind) * C + head * D + d]);
      if (int8_residual) {
        window_params[kind][row] = quantize_group(w, D, 1, 8, &window_codes[kind][row * D]);
        dequantize_int8_row(row, kind);
      }
    }
  }

  // A flush quantizes from the window as attention sees it: with an int8 residual, from the int8
  // values (docs/design.md section 3 says why), so prefill and decode store the same codes.
  write_pages(layer, head, seq, paged_before, paged_after, window_start, window_k.data(),
              window_v.data());
  if (paged_after > paged_before && kv_error_step_sampled(error_sample_rate_, step_)) {
    KvQuantizationErrors errors;
    measure_flush_errors(layer, head, seq, paged_before, paged_after, window_start, window_k.data(),
                         window_v.data(), errors);
    if (!errors.empty()) {
      const std::lock_guard<std::mutex> lock(errors_mutex_);
      errors_.append(errors);
    }
  }
  if (is_kivi(config_.format)) {
    // The new rows that stay go to the entries kernels/residual_order.h gives them; the old rows
    // that stay are where they were.
    const ResidualStep step = ResidualStep::of(start, end, paged_before, paged_after);
    for (int k = 0; k < step.new_rows; ++k) {
      const int row = end - step.new_rows + k - window_start, slot = step.new_row_entry(k);
      for (int kind = 0; kind < 2; ++kind) {
        if (int8_residual) {
          std::copy_n(&window_codes[kind][row * D], D, residual_row(slot, kind));
          *residual_params(slot, kind) = window_params[kind][row];
        } else {
          auto* fp16 = reinterpret_cast<uint16_t*>(residual_row(slot, kind));
          for (int d = 0; d < D; ++d) fp16[d] = float_to_half(window[kind][row * D + d]);
        }
      }
    }
  }

  // Attention, page by page: each page is dequantized once for all of the step's queries.
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> queries(static_cast<size_t>(count) * D);    // [count][D], pre-scaled
  std::vector<float> acc(static_cast<size_t>(count) * D, 0.0f);  // [count][D]
  std::vector<SoftmaxState> state(count);
  std::vector<int> visible(count);  // keys [0, visible) are read from pages
  for (int i = 0; i < count; ++i) {
    for (int d = 0; d < D; ++d)
      queries[i * D + d] = qkv[i * qkv_stride + head * D + d] * inv_sqrt_d;
    visible[i] = paged_token_count(config_, start + i + 1);
  }
  std::vector<float> page_k(static_cast<size_t>(P) * D), page_v(static_cast<size_t>(P) * D);
  std::vector<float> scores(std::max(P, window_len));
  const int paged_total = visible[count - 1];
  for (int page = 0; page * P < paged_total; ++page) {
    const int first = page * P;
    const int valid = std::min(P, paged_total - first);
    dequantize_page(layer, head, seq.pages[page], valid, page_k.data(), page_v.data());
    for (int i = 0; i < count; ++i) {
      const int n = std::min(valid, visible[i] - first);
      attend_block(&queries[i * D], page_k.data(), D, page_v.data(), D, n, D, scores.data(),
                   state[i], &acc[i * D]);
    }
  }
  for (int i = 0; i < count; ++i) {
    const int from = visible[i] - window_start, to = start + i + 1 - window_start;
    attend_block(&queries[i * D], &window_k[from * D], D, &window_v[from * D], D, to - from, D,
                 scores.data(), state[i], &acc[i * D]);
    float* o = out + static_cast<size_t>(i) * out_stride + head * D;
    for (int d = 0; d < D; ++d) o[d] = acc[i * D + d] / state[i].sum;
  }
}

// ---- The sampled quantization error (engine/kv_quantization_error.h)

void CpuKvCache::measure_flush_errors(int layer, int head, const BlockTableView& seq, int first,
                                      int last, int window_start, const float* window_k,
                                      const float* window_v, KvQuantizationErrors& errors) {
  if (config_.format == KvFormat::kFp16) return;
  const int D = head_dim_, P = config_.page_tokens, G = config_.key_group;
  // Per-token groups: int8 keys and values (all D channels), kivi values and per-token keys.
  const int token_group = config_.format == KvFormat::kInt8 ? D : config_.value_group;
  const bool keys_per_channel = is_kivi(config_.format) && !config_.per_token_keys;
  std::vector<float> page_k(static_cast<size_t>(P) * D), page_v(page_k.size());  // [P][D]
  auto window_row = [&](const float* window, int pos) {
    return window + static_cast<size_t>(pos - window_start) * D;
  };
  for (int page = first / P; page * P < last; ++page) {
    const int32_t id = seq.pages[page];
    const int from = std::max(first, page * P), to = std::min(last, (page + 1) * P);
    dequantize_page(layer, head, id, to - page * P, page_k.data(), page_v.data());
    for (int pos = from; pos < to; ++pos) {
      const int slot = pos % P;
      for (int g = 0; g < D / token_group; ++g) {
        const int at = slot * D + g * token_group;
        errors.value.push_back(static_cast<float>(relative_error(
            window_row(window_v, pos) + g * token_group, &page_v[at], token_group, 1)));
        if (!keys_per_channel) {
          errors.key.push_back(static_cast<float>(relative_error(
              window_row(window_k, pos) + g * token_group, &page_k[at], token_group, 1)));
        }
      }
    }
    if (!keys_per_channel) continue;
    for (int group_start = from; group_start < to; group_start += G) {
      const int slot = group_start % P;
      for (int d = 0; d < D; ++d) {
        errors.key.push_back(static_cast<float>(
            relative_error(window_row(window_k, group_start) + d, &page_k[slot * D + d], G, D)));
      }
    }
  }
}

void CpuKvCache::take_errors(KvQuantizationErrors& errors) {
  const std::lock_guard<std::mutex> lock(errors_mutex_);
  errors.append(errors_);
  errors_.clear();
}

}  // namespace kvserve
