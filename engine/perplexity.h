// Perplexity on held-out text, with the convention of docs/design.md section 8: documents split on
// "\n<|endoftext|>\n", each encoded without special tokens and followed by token 50256, all
// concatenated and cut into non-overlapping windows; the mean next-token NLL over every predicted
// position of the first N windows. Windows run through the real cache (prefill with the same
// quantized view as decode), so the figure measures the KV format.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/kv_cache_manager.h"
#include "engine/tokenizer.h"

namespace kvserve {

std::vector<int32_t> evaluation_tokens(const Tokenizer& tokenizer, const std::string& text);

struct PerplexityResult {
  double nll = 0.0;  // mean negative log-likelihood (nats)
  double ppl = 0.0;
  int64_t tokens = 0;  // predicted positions
  int windows = 0;
  std::vector<double> window_nll;  // mean NLL of each window
};

// Called after each window with the number of windows done (for a progress display).
using WindowDone = std::function<void(int windows_done)>;

// Throws std::invalid_argument when `tokens` holds fewer than windows * seq tokens.
PerplexityResult evaluate_perplexity(Backend& backend, KvCacheManager& cache,
                                     const std::vector<int32_t>& tokens, int windows, int seq,
                                     const WindowDone& on_window = nullptr);

}  // namespace kvserve
