#include "engine/residual_slots.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>
#include <stdexcept>
#include <vector>

namespace kvserve {
namespace {

TEST(ResidualSlots, SequencesShareBlocksAndEmptyBlocksGoBack) {
  BlockPool pool(10);
  ResidualSlots slots(pool, 4);
  std::vector<int32_t> a, b;
  ASSERT_TRUE(slots.allocate(6, a));  // one full block and half of another
  EXPECT_EQ(slots.blocks_in_use(), 2);
  EXPECT_EQ(slots.free_slots(), 2);
  EXPECT_EQ(slots.blocks_to_take(2), 0);
  EXPECT_EQ(slots.blocks_to_take(3), 1);
  ASSERT_TRUE(slots.allocate(2, b));  // the two free slots: no new block
  EXPECT_EQ(slots.blocks_in_use(), 2);
  EXPECT_EQ(pool.num_free(), 8);
  std::set<int32_t> distinct(a.begin(), a.end());
  distinct.insert(b.begin(), b.end());
  EXPECT_EQ(distinct.size(), 8u);
  for (int32_t slot : distinct) {
    EXPECT_GE(slots.index_of(slot), 0);
    EXPECT_LT(slots.index_of(slot), 4);
  }
  slots.release(a);
  EXPECT_EQ(slots.blocks_in_use(), 1) << "the block only `a` used went back";
  EXPECT_EQ(pool.num_free(), 9);
  slots.release(b);
  EXPECT_EQ(slots.blocks_in_use(), 0);
  EXPECT_EQ(slots.slots_in_use(), 0);
  EXPECT_EQ(pool.num_free(), 10);
}

TEST(ResidualSlots, AShortPoolChangesNothingAndABadReleaseThrows) {
  BlockPool pool(2);
  ResidualSlots slots(pool, 3);
  std::vector<int32_t> held;
  EXPECT_FALSE(slots.allocate(7, held));
  EXPECT_TRUE(held.empty());
  EXPECT_EQ(pool.num_free(), 2);
  ASSERT_TRUE(slots.allocate(6, held));
  EXPECT_THROW(slots.release({held[0], held[0]}), std::logic_error);
  EXPECT_THROW(slots.release({held[0]}), std::logic_error) << "freed just above";
  EXPECT_THROW(slots.release({-1}), std::logic_error);
  EXPECT_THROW(slots.release({6}), std::logic_error) << "beyond the pool's slots";
  EXPECT_THROW(ResidualSlots(pool, -1), std::invalid_argument);
  BlockPool other(1);
  ResidualSlots none(other, 0);
  std::vector<int32_t> out;
  EXPECT_TRUE(none.allocate(0, out));
  EXPECT_FALSE(none.allocate(1, out));
}

// What admission relies on (engine/residual_slots.h): a block is taken only when every residual
// block is full, so the blocks in use never exceed the larger of what they were before an
// allocation and ceil(slots in use / c) after it, whatever the order of allocations and releases.
TEST(ResidualSlots, RandomChurnTakesABlockOnlyWhenEveryBlockIsFull) {
  const int32_t c = 17;
  BlockPool pool(400);
  ResidualSlots slots(pool, c);
  std::mt19937 rng(11);
  std::vector<std::vector<int32_t>> owners(40);
  for (int round = 0; round < 20000; ++round) {
    std::vector<int32_t>& owner = owners[rng() % owners.size()];
    if (rng() % 2 == 0 && !owner.empty()) {
      const size_t keep = rng() % owner.size();
      slots.release(owner.data() + keep, owner.size() - keep);
      owner.resize(keep);
      continue;
    }
    const int32_t before = slots.blocks_in_use();
    ASSERT_TRUE(slots.allocate(1 + rng() % 70, owner));
    const int32_t bound = std::max(before, slots.blocks_for(slots.slots_in_use()));
    ASSERT_LE(slots.blocks_in_use(), bound) << "round " << round;
  }
  std::vector<int32_t> all;
  for (const auto& owner : owners) all.insert(all.end(), owner.begin(), owner.end());
  EXPECT_EQ(static_cast<int64_t>(all.size()), slots.slots_in_use());
  std::sort(all.begin(), all.end());
  EXPECT_EQ(std::adjacent_find(all.begin(), all.end()), all.end()) << "a slot handed out twice";
  EXPECT_EQ(pool.num_used(), slots.blocks_in_use());
}

}  // namespace
}  // namespace kvserve
