// What the engine asks of a backend: one forward pass over a batch of sequence chunks.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/block_table.h"
#include "engine/kv_quantization_error.h"
#include "engine/sampler.h"

namespace kvserve {

// How to pick the next token of one item (forward_sample): the sampler's inputs besides logits.
struct SampleRequest {
  const SamplingParams* params = nullptr;  // null: this item's token is not wanted (prefill chunk)
  const std::vector<int32_t>* history = nullptr;  // prompt and generated ids, for the penalty
  uint64_t step = 0;                              // index of the token being generated
};

// The token picked for one item, or why sampling failed (non-finite logits): that fails the
// item's request, not the batch.
struct SampleResult {
  SampledToken token{0, 0.0f};
  std::string error;  // empty on success
};

// A chunk of one sequence fed in one step: a prompt chunk (prefill) or one token (decode).
// Everything a backend needs is in the item: it never looks a sequence up.
struct ForwardItem {
  int64_t sequence_id = 0;      // the caller's name for the sequence (messages, test hooks)
  int start = 0;                // tokens of the sequence already in the cache
  std::vector<int32_t> tokens;  // the new tokens, at positions start .. start+tokens.size()-1
  bool all_logits = false;      // logits for every token (evaluation) or only for the last
  BlockTableView blocks;        // the sequence's blocks, reserved for >= start + tokens.size()
};

// A copy of `bytes` bytes of block src, from src_offset, over block dst from dst_offset, at every
// layer, inside the pool (prefix caching of KIVI caches: residual slots to and from a snapshot,
// engine/kv_cache_manager.h). A step's copies run in order, before its forward.
struct BlockCopy {
  int32_t src = 0;
  int32_t dst = 0;
  int32_t src_offset = 0;
  int32_t dst_offset = 0;
  int32_t bytes = 0;
};

// Throws std::out_of_range unless both byte ranges of `copy` lie in blocks of a pool of
// `num_blocks` blocks of `block_bytes` bytes.
void check_block_copy(const BlockCopy& copy, int32_t num_blocks, size_t block_bytes);

// How a backend has run its decode steps so far (benchmarks report it): CUDA graphs captured (each
// after an eager step) and steps replayed from one. Zero for backends without graphs.
struct GraphCounters {
  int64_t captured = 0;
  int64_t replayed = 0;
};

// The device can run no further steps; the process must restart. A backend throws it when a
// failure has left the device unusable (a sticky CUDA error: illegal address, kernel trap, ECC);
// what() says what failed.
class DeviceLostError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// forward and forward_sample report failures by throwing. DeviceLostError means the device is
// gone and every later step would fail too; any other exception means only this step failed (e.g.
// an allocation that did not fit) and the next step may succeed.
// What forward_sample requires of its arguments, for every backend's override: one request per
// item and no all_logits item; throws std::invalid_argument otherwise.
void check_sample_batch(const std::vector<ForwardItem>& items,
                        const std::vector<SampleRequest>& requests);

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // Runs the model over every item, appending their keys and values to the cache.
  // logits: resized to [rows][vocab], rows in item order: every token of an all_logits item,
  // else its last token.
  virtual void forward(const std::vector<ForwardItem>& items, std::vector<float>& logits) = 0;
  // Runs the model over `items` (none all_logits) and picks each item's next token from its last
  // logits by sample_token's contract. requests: one per item; results: resized to items.size(),
  // filled where the request has params. This default samples on the host from forward()'s
  // logits; a backend may override it to sample where the logits are (the CUDA backend, which
  // then copies only ids and logprobs).
  virtual void forward_sample(const std::vector<ForwardItem>& items,
                              const std::vector<SampleRequest>& requests,
                              std::vector<SampleResult>& results);
  // Copies blocks inside the pool, in order, before the step's forward (which sees the copies).
  // This default throws std::logic_error for any copy: a backend with a pool overrides it.
  virtual void copy_blocks(const std::vector<BlockCopy>& copies);
  virtual GraphCounters graph_counters() const { return {}; }
  // The sampled quantization error of the groups each step flushes into the pages
  // (engine/kv_quantization_error.h): the share of groups measured, in [0, 1]. A backend that
  // cannot measure (this default) reports no samples. Measuring never changes the tokens.
  virtual void set_kv_error_sample_rate(double rate) { (void)rate; }
  // Moves the errors measured since the last call to the end of `errors`.
  virtual void take_kv_errors(KvQuantizationErrors& errors) { (void)errors; }
  // The engine's default token budget per step (decodes plus prompt chunks) on this backend: about
  // where its steps stop getting cheaper per token (engine/README.md, "The token budget").
  // kDefaultBatchTokens suits the CPU backend; the CUDA backend asks for more.
  static constexpr int kDefaultBatchTokens = 2048;
  virtual int preferred_batch_tokens() const { return kDefaultBatchTokens; }

 private:
  std::vector<float> sample_logits_;  // [items][vocab], the default forward_sample's scratch
};

}  // namespace kvserve
