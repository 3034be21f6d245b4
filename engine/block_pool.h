// Fixed pool of integer block ids with a free list; knows nothing of what a block holds.
#pragma once

#include <cstdint>
#include <vector>

namespace kvserve {

class BlockPool {
 public:
  explicit BlockPool(int32_t num_blocks);

  int32_t num_blocks() const { return static_cast<int32_t>(in_use_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t num_used() const { return num_blocks() - num_free(); }

  // Appends `count` block ids to `out` and returns true, or changes nothing and returns false
  // when fewer than `count` are free.
  bool allocate(int32_t count, std::vector<int32_t>& out);
  // Returns blocks to the pool. Throws std::logic_error on a double free or an unknown id: the
  // caller's bookkeeping is broken and continuing would corrupt another sequence's cache.
  void release(const std::vector<int32_t>& ids);

 private:
  std::vector<int32_t> free_;  // LIFO: recently freed blocks are reused first (warm in cache)
  std::vector<bool> in_use_;
};

}  // namespace kvserve
