#include "engine/block_pool.h"

#include <stdexcept>
#include <string>

namespace kvserve {

namespace {

// Checked before the members are sized: a negative count would become a huge size_t.
size_t checked_block_count(int32_t num_blocks) {
  if (num_blocks < 0) {
    throw std::invalid_argument("block pool size must be >= 0, not " + std::to_string(num_blocks));
  }
  return static_cast<size_t>(num_blocks);
}

}  // namespace

BlockPool::BlockPool(int32_t num_blocks) : in_use_(checked_block_count(num_blocks), false) {
  free_.reserve(num_blocks);
  for (int32_t id = num_blocks - 1; id >= 0; --id) free_.push_back(id);
}

bool BlockPool::allocate(int32_t count, std::vector<int32_t>& out) {
  if (count < 0 || count > num_free()) return false;
  for (int32_t i = 0; i < count; ++i) {
    const int32_t id = free_.back();
    free_.pop_back();
    in_use_[id] = true;
    out.push_back(id);
  }
  return true;
}

void BlockPool::release(const std::vector<int32_t>& ids) {
  for (int32_t id : ids) {
    if (id < 0 || id >= num_blocks() || !in_use_[id]) {
      throw std::logic_error("block pool: release of block " + std::to_string(id) +
                             " that is not allocated");
    }
    in_use_[id] = false;
    free_.push_back(id);
  }
}

}  // namespace kvserve
