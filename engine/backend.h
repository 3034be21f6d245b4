// What the engine asks of a backend: one forward pass over a batch of sequence chunks.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvserve {

// A chunk of one sequence fed in one step: a prompt chunk (prefill) or one token (decode).
struct ForwardItem {
  int64_t sequence_id = 0;      // the KvCacheManager sequence, already grown to start + tokens
  int start = 0;                // tokens of the sequence already in the cache
  std::vector<int32_t> tokens;  // the new tokens, at positions start .. start+tokens.size()-1
  bool all_logits = false;      // logits for every token (evaluation) or only for the last
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // Runs the model over every item, appending their keys and values to the cache.
  // logits: resized to [rows][vocab], rows in item order: every token of an all_logits item,
  // else its last token.
  virtual void forward(const std::vector<ForwardItem>& items, std::vector<float>& logits) = 0;
};

}  // namespace kvserve
