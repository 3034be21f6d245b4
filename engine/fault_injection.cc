#include "engine/fault_injection.h"

namespace kvserve {

DeviceLostInjector::DeviceLostInjector(std::unique_ptr<Backend> inner, int64_t lose_at)
    : inner_(std::move(inner)), lose_at_(lose_at) {}

void DeviceLostInjector::count_call() {
  if (++calls_ >= lose_at_) {
    throw DeviceLostError("injected device loss at forward call " + std::to_string(calls_) +
                          " (--test-lose-device-at-forward)");
  }
}

void DeviceLostInjector::copy_blocks(const std::vector<BlockCopy>& copies) {
  if (calls_ >= lose_at_) {
    throw DeviceLostError("injected device loss at forward call " + std::to_string(lose_at_) +
                          " (--test-lose-device-at-forward)");
  }
  inner_->copy_blocks(copies);
}

void DeviceLostInjector::forward(const std::vector<ForwardItem>& items,
                                 std::vector<float>& logits) {
  count_call();
  inner_->forward(items, logits);
}

void DeviceLostInjector::forward_sample(const std::vector<ForwardItem>& items,
                                        const std::vector<SampleRequest>& requests,
                                        std::vector<SampleResult>& results) {
  count_call();
  inner_->forward_sample(items, requests, results);
}

}  // namespace kvserve
