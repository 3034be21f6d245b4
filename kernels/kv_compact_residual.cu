// KV write path, part 2: compact the residual (fp16 rows, or int8 rows with their fp16 pairs).
//
// One block per (item, head), or in a decode step that lists its flushing items
// (KvBatchView::flushing) per (flushing item, head): the others' new rows are stored by
// decode_attention. A flush moves the surviving old-residual rows down by a multiple of
// G slots inside the same blocks, so the block first stages every row it writes (moved and new)
// in shared memory and only then writes; when nothing was flushed, old rows stay where they are
// and only the new rows are written (the decode case: one row per item and head).
#include "kernels/kv_compact_residual.h"

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda_check.h"
#include "kernels/device_info.h"
#include "kernels/kv_cache_device.cuh"

namespace kvserve::cuda {
namespace {

constexpr int kThreads = 128;
// Blocks an SM holds of a flushing-items grid (flushing_grid): the row table and staged rows take
// 20 KiB for GPT-2 (2 x (R + G) = 128 rows of head_dim 64 and 32 bytes of addresses each), so 8
// fit with room to spare.
constexpr int kBlocksPerMultiprocessor = 8;

// ---- CUDA kernels

// A compaction moves whole rows: the surviving old-residual rows from slot pos - first down to
// slot pos - last (when the step flushed, last > first), and the step's new rows from qkv (or
// the batch's int8 new rows) to slot pos - last. A row's addresses take dependent loads (its slot
// id, then, int8, its pair), so each row's are looked up once, by a thread of its own, into a
// table in shared memory; the rows are then read into shared memory in units of 8 channels (16
// bytes fp16, 8 bytes int8: KIVI's value groups divide head_dim and are multiples of 8, so D / 8
// units fill a row, each aligned), several loads a thread in flight, and written after a barrier,
// since a row's destination may be another's source. (Before, each unit of a row looked its slot
// up again: a flushing item's block, about 31 old rows of keys and values to move, took five
// rounds of its 128 threads, each a chain of dependent loads, slot id then unit, and as long
// again for the writes.)
struct RowCopy {
  const uint8_t* from;  // fp16 [D], or int8 codes u8 [D]
  uint8_t* to;
  uint32_t* to_pair;  // int8: the destination's fp16 (scale, zero) pair
  uint32_t pair;      // int8: the row's pair
};
static_assert(sizeof(RowCopy) % 16 == 0, "the staged units after the table stay 16-byte aligned");

// Units a thread of copy_rows loads before it stores any (copy_loads_in_flight).
constexpr int kUnitsInFlight = 4;

// Copies `rows` rows of `units` Units each as `table` lists them (filled, and published by a
// barrier, by the caller) through `staged` ([rows][units]); returns after the barrier between
// the reads and the writes, so that the caller may write more.
template <typename Unit>
__device__ void copy_rows(const RowCopy* table, int rows, int units, Unit* staged) {
  const int total = rows * units;
  copy_loads_in_flight<kUnitsInFlight>(
      total, [&](int e) { return reinterpret_cast<const Unit*>(table[e / units].from)[e % units]; },
      [&](int e, const Unit& unit) { staged[e] = unit; });
  __syncthreads();  // every row read before any is written
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    reinterpret_cast<Unit*>(table[e / units].to)[e % units] = staged[e];
  }
}

// The residual of (item, head): one block's work.
//   shared: the row table (RowCopy [2][rows]: moved rows, keys then values, then new rows), then
//   the staged rows' units (fp16 uint4 [2][rows][D / 8], int8 uint2 [2][rows][D / 8]).
__device__ void compact(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                        int qkv_stride, RowCopy* table, void* staged, int item, int head) {
  const int start = batch.start[item], end = start + batch.count[item];
  const int first = paged_count(cache, start), last = paged_count(cache, end);
  const int32_t* residual_slots = batch.residual_slots + batch.residual_offset[item];
  const KvWindow window = item_window(cache, batch, qkv, qkv_stride, item, head);
  // Old rows [last, start) move when last > first; new rows [max(start, last), end) arrive.
  const int moved = last > first ? max(0, start - last) : 0;
  const int new_first = max(start, last), fresh = end - new_first;
  const int rows = 2 * (moved + fresh);
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    const bool old = r < 2 * moved;
    const int count = old ? moved : fresh, i = old ? r : r - 2 * moved;
    const int which = i / count, pos = (old ? last : new_first) + i % count;
    RowCopy copy{};
    if (cache.residual_int8) {
      const uint8_t* codes;
      __half2 pair;
      window.residual_int8_row(pos, which, codes, pair);
      const Int8ResidualRow to = int8_residual_row(cache, residual_slots, head, pos - last, which);
      copy = {codes, to.codes, to.pair, *reinterpret_cast<const uint32_t*>(&pair)};
    } else {
      copy.from = reinterpret_cast<const uint8_t*>(window.row(pos, which));
      copy.to =
          reinterpret_cast<uint8_t*>(residual_row(cache, residual_slots, head, pos - last, which));
    }
    table[r] = copy;
  }
  __syncthreads();
  const int units = cache.head_dim / 8;
  if (!cache.residual_int8) {
    copy_rows(table, rows, units, static_cast<uint4*>(staged));
    return;
  }
  copy_rows(table, rows, units, static_cast<uint2*>(staged));
  for (int r = threadIdx.x; r < rows; r += blockDim.x) *table[r].to_pair = table[r].pair;
}

// Shared memory of a block: at most R + G - 1 rows of keys and as many of values survive a step
// (the residual holds fewer than R + G tokens), each a RowCopy and its units, an fp16 row's (2 D
// bytes) no fewer than an int8 row's (D).
size_t compact_shared_bytes(const KvCacheView& cache) {
  const size_t rows = 2 * static_cast<size_t>(cache.residual + cache.key_group);
  return rows * (sizeof(RowCopy) + cache.head_dim * sizeof(__half));
}

// Every item (batch.flushing null): block (item, head). A decode step's flushing items
// (batch.flushing = [count, item...]): each block takes units (list entry, head) from blockIdx.x
// on, gridDim.x apart.
__global__ void kv_compact_residual_kernel(const KvCacheView cache, const KvBatchView batch,
                                           const __half* qkv, int qkv_stride) {
  extern __shared__ uint4 shared[];
  auto* table = reinterpret_cast<RowCopy*>(shared);
  void* staged = table + 2 * (cache.residual + cache.key_group);
  if (batch.flushing == nullptr) {
    compact(cache, batch, qkv, qkv_stride, table, staged, blockIdx.x, blockIdx.y);
    return;
  }
  for_each_flushing_unit(batch, cache.n_head, [&](int item, int head) {
    compact(cache, batch, qkv, qkv_stride, table, staged, item, head);
  });
}

}  // namespace

// ---- kernel launchers

void kv_compact_residual_prepare(const KvCacheView& cache) {
  if (cache.kind != KvKind::kKivi) return;
  allow_dynamic_shared_memory("kv_compact_residual",
                              reinterpret_cast<const void*>(kv_compact_residual_kernel),
                              compact_shared_bytes(cache),
                              "the keys and values of a residual of up to " +
                                  std::to_string(cache.residual + cache.key_group) +
                                  " tokens of head_dim " + std::to_string(cache.head_dim) +
                                  " are staged; use a smaller --kv-residual or --kv-group");
}

void kv_compact_residual(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                         int qkv_stride, cudaStream_t stream) {
  check_kv_launch("kv_compact_residual", cache, batch, qkv, qkv_stride);
  if (batch.items == 0 || cache.kind != KvKind::kKivi) return;
  if (cache.head_dim % 8 != 0) {
    throw std::invalid_argument("kv_compact_residual: head_dim not a multiple of 8");
  }
  if (qkv_stride % 8 != 0 || reinterpret_cast<uintptr_t>(qkv) % 16 != 0) {
    throw std::invalid_argument("kv_compact_residual: qkv rows must be 16-byte aligned");
  }
  const size_t shared_bytes = compact_shared_bytes(cache);
  allow_dynamic_shared_memory("kv_compact_residual",
                              reinterpret_cast<const void*>(kv_compact_residual_kernel),
                              shared_bytes);
  const dim3 grid = batch.flushing != nullptr
                        ? dim3(flushing_grid(batch.items * cache.n_head, kBlocksPerMultiprocessor))
                        : dim3(batch.items, cache.n_head);
  kv_compact_residual_kernel<<<grid, kThreads, shared_bytes, stream>>>(cache, batch, qkv,
                                                                       qkv_stride);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
