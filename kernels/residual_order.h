// Where a KIVI item's residual rows sit in its residual slot list across a step: one rule for the
// cache manager, which reorders the list when the step ends (KvCacheManager::finish_step), and for
// both caches, which write the step's rows into it. Plain C++ (host and device), no CUDA headers.
//
// The list holds the window in order, [keys 0, values 0, keys 1, ...] for window positions 0
// (oldest) on. A step feeds positions [start, end); before it the window is [paged(start), start)
// at entries 0 .. old_rows - 1 of the list, which the manager has grown to max(old_rows, the new
// window's rows) entries. No row moves: old rows that stay in the window ([paged(end), start))
// keep their entries, and the step's new rows that stay take, in order, the entries of the
// newest flushed old rows (as many as there are new rows, at most all of them) and then the
// entries the grow added. After the step the manager lists the kept old rows' entries, then the
// new rows', and releases the rest: the window is in order again. A decode step that flushes puts
// its token in the entry of the newest flushed token, next to the kept ones in the pool where they
// were allocated together, and releases the older ones, whole residual blocks where they were.
// (Before, the kept rows were copied down to entry 0: a kernel launch of its own at every flushing
// step.)
#pragma once

#include "kernels/host_device.h"

namespace kvserve {

struct ResidualStep {
  int old_rows = 0;  // window rows before the step: start - paged(start)
  int kept = 0;      // old rows still in the window after it: max(0, start - paged(end))
  int new_rows = 0;  // the step's rows in the window after it: end - max(start, paged(end))

  // paged_start = paged(start), paged_end = paged(end) (engine/kv_format.h paged_token_count).
  KVSERVE_HOST_DEVICE static ResidualStep of(int start, int end, int paged_start, int paged_end) {
    ResidualStep step;
    step.old_rows = start - paged_start;
    step.kept = start > paged_end ? start - paged_end : 0;
    step.new_rows = end - (start > paged_end ? start : paged_end);
    return step;
  }

  // Old rows that left the window: entries 0 .. flushed_old_rows() - 1.
  KVSERVE_HOST_DEVICE int flushed_old_rows() const { return old_rows - kept; }
  // Of those, the newest ones that new rows take.
  KVSERVE_HOST_DEVICE int reused_rows() const {
    return new_rows < flushed_old_rows() ? new_rows : flushed_old_rows();
  }
  // The entry (a token's; slot ids 2 e and 2 e + 1) of the step's k-th new row that stays,
  // k in [0, new_rows).
  KVSERVE_HOST_DEVICE int new_row_entry(int k) const {
    const int reused = reused_rows();
    return k < reused ? flushed_old_rows() - reused + k : old_rows + k - reused;
  }
};

}  // namespace kvserve
