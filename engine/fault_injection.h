// Fault injection for the tests of device loss (BackendOptions::lose_device_at_forward, see
// backend_factory.h): a backend whose device is lost at a chosen forward call.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"

namespace kvserve {

// Runs `inner` until its `lose_at`th forward or forward_sample call (from 1); that call and every
// later one throw DeviceLostError, as a backend whose device faulted would.
class DeviceLostInjector : public Backend {
 public:
  DeviceLostInjector(std::unique_ptr<Backend> inner, int64_t lose_at);

  std::string name() const override { return inner_->name(); }
  void forward(const std::vector<ForwardItem>& items, std::vector<float>& logits) override;
  void forward_sample(const std::vector<ForwardItem>& items,
                      const std::vector<SampleRequest>& requests,
                      std::vector<SampleResult>& results) override;
  // Copies run on `inner` while the device lives; after the loss they fail like a forward.
  void copy_blocks(const std::vector<BlockCopy>& copies) override;
  GraphCounters graph_counters() const override { return inner_->graph_counters(); }
  int preferred_batch_tokens() const override { return inner_->preferred_batch_tokens(); }

 private:
  void count_call();

  std::unique_ptr<Backend> inner_;
  int64_t lose_at_;
  int64_t calls_ = 0;
};

}  // namespace kvserve
