// Tests that drive a backend by hand (no scheduler) give each item its sequence's block table.
#pragma once

#include <vector>

#include "engine/backend.h"
#include "engine/kv_cache_manager.h"

namespace kvserve::testing {

// `items` with their blocks as `cache` holds them now (after the step's grows).
inline std::vector<ForwardItem> with_block_tables(std::vector<ForwardItem> items,
                                                  const KvCacheManager& cache) {
  for (ForwardItem& item : items) item.blocks = cache.block_table(item.sequence_id);
  return items;
}

}  // namespace kvserve::testing
