#include "engine/perplexity.h"

#include <cmath>
#include <stdexcept>

namespace kvserve {

std::vector<int32_t> evaluation_tokens(const Tokenizer& tokenizer, const std::string& text) {
  static const std::string kSeparator = "\n<|endoftext|>\n";
  std::vector<int32_t> tokens;
  size_t begin = 0;
  while (true) {
    const size_t end = text.find(kSeparator, begin);
    const std::string_view doc(text.data() + begin,
                               (end == std::string::npos ? text.size() : end) - begin);
    const std::vector<int32_t> ids = tokenizer.encode_ordinary(doc);
    tokens.insert(tokens.end(), ids.begin(), ids.end());
    tokens.push_back(tokenizer.eos_token_id());
    if (end == std::string::npos) break;
    begin = end + kSeparator.size();
  }
  return tokens;
}

PerplexityResult evaluate_perplexity(Backend& backend, KvCacheManager& cache,
                                     const std::vector<int32_t>& tokens, int windows, int seq,
                                     const WindowDone& on_window) {
  if (windows < 1 || seq < 2) throw std::invalid_argument("need at least 1 window of 2 tokens");
  if (static_cast<int64_t>(tokens.size()) < int64_t{windows} * seq) {
    throw std::invalid_argument("the text has " + std::to_string(tokens.size()) +
                                " tokens, fewer than " + std::to_string(windows) + " windows of " +
                                std::to_string(seq));
  }
  PerplexityResult result;
  result.windows = windows;
  std::vector<float> logits;
  double total = 0.0;
  for (int w = 0; w < windows; ++w) {
    const int64_t id = w;
    cache.add_sequence(id);
    if (!cache.grow(id, seq)) {
      cache.remove_sequence(id);
      throw std::runtime_error("the KV pool cannot hold one window of " + std::to_string(seq) +
                               " tokens: use a larger --kv-pool-mb");
    }
    ForwardItem item;
    item.sequence_id = id;
    item.tokens.assign(tokens.begin() + int64_t{w} * seq, tokens.begin() + int64_t{w + 1} * seq);
    item.all_logits = true;
    item.blocks = cache.block_table(id);
    try {
      backend.forward({item}, logits);
    } catch (...) {
      cache.finish_step();
      cache.remove_sequence(id);
      throw;
    }
    cache.finish_step();
    cache.remove_sequence(id);
    const size_t vocab = logits.size() / seq;
    double window_total = 0.0;
    for (int t = 0; t + 1 < seq; ++t) {
      const float* row = &logits[t * vocab];
      double max_logit = row[0];
      for (size_t v = 1; v < vocab; ++v) max_logit = std::max<double>(max_logit, row[v]);
      double sum = 0.0;
      for (size_t v = 0; v < vocab; ++v) sum += std::exp(row[v] - max_logit);
      window_total += max_logit + std::log(sum) - row[item.tokens[t + 1]];
    }
    result.window_nll.push_back(window_total / (seq - 1));
    total += window_total;
    if (on_window) on_window(w + 1);
  }
  result.tokens = int64_t{windows} * (seq - 1);
  result.nll = total / result.tokens;
  result.ppl = std::exp(result.nll);
  return result;
}

}  // namespace kvserve
