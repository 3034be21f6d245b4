#include "engine/block_pool.h"

#include <gtest/gtest.h>

#include <set>
#include <stdexcept>

namespace kvserve {
namespace {

TEST(BlockPool, AllocatesDistinctIdsUntilExhausted) {
  BlockPool pool(10);
  std::vector<int32_t> ids;
  ASSERT_TRUE(pool.allocate(4, ids));
  ASSERT_TRUE(pool.allocate(6, ids));
  EXPECT_EQ(pool.num_free(), 0);
  EXPECT_EQ(std::set<int32_t>(ids.begin(), ids.end()).size(), 10u);
  EXPECT_FALSE(pool.allocate(1, ids));
  EXPECT_EQ(ids.size(), 10u) << "a failed allocation changes nothing";
}

TEST(BlockPool, ANegativeSizeIsAnInvalidArgument) {
  EXPECT_THROW(BlockPool(-100), std::invalid_argument);
  EXPECT_THROW(BlockPool(-1), std::invalid_argument);
  EXPECT_EQ(BlockPool(0).num_free(), 0);
}

TEST(BlockPool, RefusesPartialAllocation) {
  BlockPool pool(3);
  std::vector<int32_t> ids;
  EXPECT_FALSE(pool.allocate(4, ids));
  EXPECT_TRUE(ids.empty());
  EXPECT_EQ(pool.num_free(), 3);
}

TEST(BlockPool, ReleaseReturnsBlocksAndRejectsDoubleFree) {
  BlockPool pool(4);
  std::vector<int32_t> ids;
  ASSERT_TRUE(pool.allocate(4, ids));
  pool.release({ids[1], ids[2]});
  EXPECT_EQ(pool.num_free(), 2);
  EXPECT_THROW(pool.release({ids[1]}), std::logic_error);
  EXPECT_THROW(pool.release({99}), std::logic_error);
  pool.release({ids[0], ids[3]});
  EXPECT_EQ(pool.num_free(), 4);
  EXPECT_EQ(pool.num_used(), 0);
}

}  // namespace
}  // namespace kvserve
