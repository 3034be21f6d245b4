// KV write path, part 2: compact the residual (fp16 rows, or int8 rows with their fp16 pairs).
//
// One block per (item, head), or in a decode step that lists its flushing items
// (KvBatchView::flushing) per (flushing item, head): the others' new rows are stored by
// decode_attention. A flush moves the surviving old-residual rows down by a multiple of
// G slots inside the same blocks, so the block first stages them in shared memory and only then
// writes; when nothing was flushed, old rows stay where they are and only the new rows are
// written (the decode case: one row per item and head).
#include "kernels/kv_compact_residual.h"

#include <cstdint>
#include <stdexcept>

#include "kernels/cuda_check.h"
#include "kernels/kv_cache_device.cuh"

namespace kvserve::cuda {
namespace {

constexpr int kThreads = 128;
// Blocks an SM holds of a flushing-items grid (flushing_grid): the staged rows take 16 KiB for
// GPT-2 (R + G = 64 rows of head_dim 64, keys and values), so 8 fit with room to spare.
constexpr int kBlocksPerMultiprocessor = 8;

// ---- CUDA kernels

// Rows move in units of 8 channels: 16 bytes of an fp16 row, 8 of an int8 row's codes (KIVI's
// value groups divide head_dim and are multiples of 8, so D / 8 units fill a row, each aligned).
// Element by element, a flushing item's block (about 31 old rows to move, keys and values) took 32
// rounds of its 128 threads, each a chain of dependent loads (slot id, then the element).

// The int8 residual: codes u8 [D] and an fp16 (scale, zero) pair per row, moved as they are (the
// new rows from the batch's new rows, quantized by kv_quantize_residual or decode_attention), as
// D / 8 + 1 units of 8 bytes a row: its codes, then its pair (in the low 4 bytes).
//   staged: [2][rows][D / 8 + 1] such units
__device__ void compact_int8(const KvCacheView& cache, const KvBatchView& batch, uint2* staged,
                             int item, int head) {
  const int start = batch.start[item], end = start + batch.count[item];
  const int first = paged_count(cache, start), last = paged_count(cache, end);
  const int D = cache.head_dim, units = D / 8 + 1;
  const int32_t* residual_slots = batch.residual_slots + batch.residual_offset[item];
  const KvWindow window = item_window(cache, batch, nullptr, 0, item, head);
  auto read_unit = [&](int pos, int which, int u) {
    const uint8_t* codes;
    __half2 pair;
    window.residual_int8_row(pos, which, codes, pair);
    if (u + 1 < units) return reinterpret_cast<const uint2*>(codes)[u];
    return make_uint2(*reinterpret_cast<const uint32_t*>(&pair), 0u);
  };
  auto write_unit = [&](int slot, int which, int u, uint2 value) {
    const Int8ResidualRow row = int8_residual_row(cache, residual_slots, head, slot, which);
    if (u + 1 < units) {
      reinterpret_cast<uint2*>(row.codes)[u] = value;
    } else {
      *row.pair = value.x;
    }
  };
  const int moved_from = last, moved = last > first ? max(0, start - last) : 0;
  for (int e = threadIdx.x; e < 2 * moved * units; e += blockDim.x) {
    const int which = e / (moved * units), r = (e / units) % moved, u = e % units;
    staged[e] = read_unit(moved_from + r, which, u);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < 2 * moved * units; e += blockDim.x) {
    const int which = e / (moved * units), r = (e / units) % moved, u = e % units;
    write_unit(moved_from + r - last, which, u, staged[e]);
  }
  const int new_first = max(start, last), fresh = end - new_first;
  for (int e = threadIdx.x; e < 2 * fresh * units; e += blockDim.x) {
    const int which = e / (fresh * units), r = (e / units) % fresh, u = e % units;
    write_unit(new_first + r - last, which, u, read_unit(new_first + r, which, u));
  }
}

// The residual of (item, head): one block's work.
//   staged: the old rows that move, keys then values: fp16 [2][rows][D / 8] units of 16 bytes, or
//   the int8 residual's [2][rows][D / 8 + 1] units of 8 bytes (compact_int8).
__device__ void compact(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                        int qkv_stride, uint4* staged, int item, int head) {
  if (cache.residual_int8) {
    compact_int8(cache, batch, reinterpret_cast<uint2*>(staged), item, head);
    return;
  }
  const int start = batch.start[item], end = start + batch.count[item];
  const int first = paged_count(cache, start), last = paged_count(cache, end);
  const int units = cache.head_dim / 8;  // 16 bytes each
  const int32_t* residual_slots = batch.residual_slots + batch.residual_offset[item];
  const KvWindow window = item_window(cache, batch, qkv, qkv_stride, item, head);
  auto row_units = [&](int pos, int which) {
    return reinterpret_cast<const uint4*>(window.row(pos, which));
  };
  auto slot_units = [&](int slot, int which) {
    return reinterpret_cast<uint4*>(residual_row(cache, residual_slots, head, slot, which));
  };

  // Old rows [last, start) move from slot pos - first to slot pos - last when last > first.
  const int moved_from = last, moved = last > first ? max(0, start - last) : 0;
  for (int e = threadIdx.x; e < 2 * moved * units; e += blockDim.x) {
    const int which = e / (moved * units), r = (e / units) % moved, u = e % units;
    staged[e] = row_units(moved_from + r, which)[u];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < 2 * moved * units; e += blockDim.x) {
    const int which = e / (moved * units), r = (e / units) % moved, u = e % units;
    slot_units(moved_from + r - last, which)[u] = staged[e];
  }
  // New rows [max(start, last), end) come from qkv.
  const int new_first = max(start, last), fresh = end - new_first;
  for (int e = threadIdx.x; e < 2 * fresh * units; e += blockDim.x) {
    const int which = e / (fresh * units), r = (e / units) % fresh, u = e % units;
    slot_units(new_first + r - last, which)[u] = row_units(new_first + r, which)[u];
  }
}

// Every item (batch.flushing null): block (item, head). A decode step's flushing items
// (batch.flushing = [count, item...]): each block takes units (list entry, head) from blockIdx.x
// on, gridDim.x apart.
__global__ void kv_compact_residual_kernel(const KvCacheView cache, const KvBatchView batch,
                                           const __half* qkv, int qkv_stride) {
  extern __shared__ uint4 staged[];
  if (batch.flushing == nullptr) {
    compact(cache, batch, qkv, qkv_stride, staged, blockIdx.x, blockIdx.y);
    return;
  }
  for_each_flushing_unit(batch, cache.n_head, [&](int item, int head) {
    compact(cache, batch, qkv, qkv_stride, staged, item, head);
  });
}

}  // namespace

// ---- kernel launchers

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
  // At most R + G - 1 old rows survive a step (the residual holds fewer than R + G tokens); an
  // int8 row's units (D + 8 bytes) take no more than an fp16 row (2 D, D >= 8).
  const size_t shared_bytes =
      2 * static_cast<size_t>(cache.residual + cache.key_group) * cache.head_dim * sizeof(__half);
  KVSERVE_CUDA_CHECK(cudaFuncSetAttribute(kv_compact_residual_kernel,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared_bytes)));
  const dim3 grid = batch.flushing != nullptr
                        ? dim3(flushing_grid(batch.items * cache.n_head, kBlocksPerMultiprocessor))
                        : dim3(batch.items, cache.n_head);
  kv_compact_residual_kernel<<<grid, kThreads, shared_bytes, stream>>>(cache, batch, qkv,
                                                                       qkv_stride);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
