// The residual slots of the KIVI formats: a residual block of the pool holds c slots, each the keys
// or the values of one residual token (engine/kv_format.h), and sequences take and return single
// slots. A sequence's residual therefore does not round up to whole blocks of its own: at 1024
// tokens kivi2c keeps 32 int8 residual tokens, 64 slots, which are 3.76 blocks of 17 slots shared
// with other sequences instead of 4 blocks of its own.
//
// A block is taken from the BlockPool only when a slot is wanted and no residual block has a free
// one, and goes back as soon as its last slot is free. So whenever a block is taken every residual
// block is full, and the residual blocks in use never exceed the larger of ceil(slots in use / c)
// at the last take and what is in use now: what the scheduler's admission reserves.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "engine/block_pool.h"

namespace kvserve {

class ResidualSlots {
 public:
  // `slots_per_block` (c) may be 0 for formats without a residual: then no slot is ever handed out.
  ResidualSlots(BlockPool& pool, int32_t slots_per_block);

  int32_t slots_per_block() const { return slots_per_block_; }
  // A slot id is block * c + index, index in [0, c).
  int32_t block_of(int32_t slot) const { return slot / slots_per_block_; }
  int32_t index_of(int32_t slot) const { return slot % slots_per_block_; }

  int32_t blocks_in_use() const { return blocks_in_use_; }
  int64_t slots_in_use() const { return slots_in_use_; }
  // Free slots of the residual blocks in use.
  int64_t free_slots() const { return int64_t{blocks_in_use_} * slots_per_block_ - slots_in_use_; }
  // Blocks that `count` more slots would take from the pool.
  int32_t blocks_to_take(int64_t count) const;
  // The residual blocks that `slots` slots fill, rounded up: 0 when there are no slots.
  int32_t blocks_for(int64_t slots) const;

  // Appends `count` slot ids to `out`; false, changing nothing, when the pool has fewer free
  // blocks than blocks_to_take(count).
  bool allocate(int64_t count, std::vector<int32_t>& out);
  // Returns slots; a block whose last slot returns goes back to the pool. Throws std::logic_error
  // on a slot that is not in use (the caller's bookkeeping is broken).
  void release(const int32_t* slots, size_t count);
  void release(const std::vector<int32_t>& slots) { release(slots.data(), slots.size()); }

 private:
  // Takes a block from the pool as a residual block whose slots are all free.
  void open_block();
  void close_block(int32_t block);

  BlockPool& pool_;
  int32_t slots_per_block_;
  int32_t blocks_in_use_ = 0;
  int64_t slots_in_use_ = 0;
  std::vector<int32_t> used_;               // [num_blocks] slots in use of each block
  std::vector<std::vector<int32_t>> free_;  // [num_blocks] free slot indices (LIFO)
  std::vector<int32_t> open_;               // residual blocks with a free slot (LIFO)
  std::vector<int32_t> open_position_;      // [num_blocks] index in open_, or -1
  std::vector<bool> slot_in_use_;           // [num_blocks * c]
};

}  // namespace kvserve
