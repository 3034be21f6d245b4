#include "engine/backend.h"

#include <stdexcept>

namespace kvserve {

void check_sample_batch(const std::vector<ForwardItem>& items,
                        const std::vector<SampleRequest>& requests) {
  if (requests.size() != items.size()) {
    throw std::invalid_argument("forward_sample: one sample request per item");
  }
  for (const ForwardItem& item : items) {
    if (item.all_logits) throw std::invalid_argument("forward_sample: an item wants all logits");
  }
}

void check_block_copy(const BlockCopy& copy, int32_t num_blocks, size_t block_bytes) {
  auto inside = [&](int32_t block, int32_t offset) {
    return block >= 0 && block < num_blocks && offset >= 0 && copy.bytes >= 0 &&
           static_cast<size_t>(offset) + static_cast<size_t>(copy.bytes) <= block_bytes;
  };
  if (!inside(copy.src, copy.src_offset) || !inside(copy.dst, copy.dst_offset)) {
    throw std::out_of_range("KV cache: block copy outside the pool");
  }
}

void Backend::copy_blocks(const std::vector<BlockCopy>& copies) {
  if (!copies.empty()) throw std::logic_error("backend " + name() + " cannot copy blocks");
}

void Backend::forward_sample(const std::vector<ForwardItem>& items,
                             const std::vector<SampleRequest>& requests,
                             std::vector<SampleResult>& results) {
  check_sample_batch(items, requests);
  forward(items, sample_logits_);
  const size_t vocab = items.empty() ? 0 : sample_logits_.size() / items.size();
  results.assign(items.size(), SampleResult{});
  for (size_t i = 0; i < items.size(); ++i) {
    const SampleRequest& r = requests[i];
    if (r.params == nullptr) continue;
    try {
      results[i].token = sample_token(&sample_logits_[i * vocab], static_cast<int>(vocab),
                                      *r.params, *r.history, r.step);
    } catch (const std::exception& e) {
      results[i].error = e.what();
    }
  }
}

}  // namespace kvserve
