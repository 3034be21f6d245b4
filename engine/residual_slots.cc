#include "engine/residual_slots.h"

#include <stdexcept>
#include <string>

namespace kvserve {

ResidualSlots::ResidualSlots(BlockPool& pool, int32_t slots_per_block)
    : pool_(pool), slots_per_block_(slots_per_block) {
  if (slots_per_block < 0) {
    throw std::invalid_argument("residual slots per block must be >= 0, not " +
                                std::to_string(slots_per_block));
  }
  if (slots_per_block == 0) return;
  const int32_t blocks = pool.num_blocks();
  if (int64_t{blocks} * slots_per_block > INT32_MAX) {
    throw std::invalid_argument("a pool of " + std::to_string(blocks) + " blocks of " +
                                std::to_string(slots_per_block) +
                                " residual slots has more slots than 32-bit ids number");
  }
  used_.assign(blocks, 0);
  free_.resize(blocks);
  open_position_.assign(blocks, -1);
  slot_in_use_.assign(static_cast<size_t>(blocks) * slots_per_block, false);
}

int32_t ResidualSlots::blocks_for(int64_t slots) const {
  if (slots <= 0) return 0;
  return static_cast<int32_t>((slots + slots_per_block_ - 1) / slots_per_block_);
}

int32_t ResidualSlots::blocks_to_take(int64_t count) const {
  return blocks_for(count - free_slots());
}

bool ResidualSlots::allocate(int64_t count, std::vector<int32_t>& out) {
  if (count <= 0) return count == 0;
  if (slots_per_block_ == 0 || blocks_to_take(count) > pool_.num_free()) return false;
  for (int64_t i = 0; i < count; ++i) {
    if (open_.empty()) open_block();
    const int32_t block = open_.back();
    std::vector<int32_t>& free = free_[block];
    const int32_t slot = block * slots_per_block_ + free.back();
    free.pop_back();
    slot_in_use_[slot] = true;
    ++used_[block];
    ++slots_in_use_;
    if (free.empty()) {
      open_position_[block] = -1;
      open_.pop_back();
    }
    out.push_back(slot);
  }
  return true;
}

void ResidualSlots::release(const int32_t* slots, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    const int32_t slot = slots[i];
    if (slots_per_block_ == 0 || slot < 0 || static_cast<size_t>(slot) >= slot_in_use_.size() ||
        !slot_in_use_[slot]) {
      throw std::logic_error("residual slots: release of slot " + std::to_string(slot) +
                             " that is not in use");
    }
    const int32_t block = block_of(slot);
    slot_in_use_[slot] = false;
    --slots_in_use_;
    free_[block].push_back(index_of(slot));
    if (--used_[block] == 0) {
      close_block(block);
    } else if (open_position_[block] < 0) {
      open_position_[block] = static_cast<int32_t>(open_.size());
      open_.push_back(block);
    }
  }
}

void ResidualSlots::open_block() {
  std::vector<int32_t> taken;
  if (!pool_.allocate(1, taken)) {
    throw std::logic_error("residual slots: no free block (allocate checks first)");
  }
  const int32_t block = taken[0];
  std::vector<int32_t>& free = free_[block];
  free.clear();
  for (int32_t index = slots_per_block_ - 1; index >= 0; --index) free.push_back(index);
  open_position_[block] = static_cast<int32_t>(open_.size());
  open_.push_back(block);
  ++blocks_in_use_;
}

void ResidualSlots::close_block(int32_t block) {
  const int32_t position = open_position_[block];
  if (position >= 0) {  // swap-remove from open_
    open_[position] = open_.back();
    open_position_[open_[position]] = position;
    open_.pop_back();
    open_position_[block] = -1;
  }
  free_[block].clear();
  --blocks_in_use_;
  pool_.release({block});
}

}  // namespace kvserve
