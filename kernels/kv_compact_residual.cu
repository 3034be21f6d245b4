// KV write path, part 2: compact the residual (fp16 rows, or int8 rows with their fp16 pairs).
//
// One block per (item, head). A flush moves the surviving old-residual rows down by a multiple of
// G slots inside the same blocks, so the block first stages them in shared memory and only then
// writes; when nothing was flushed, old rows stay where they are and only the new rows are
// written (the decode case: one row per item and head).
#include "kernels/kv_compact_residual.h"

#include "kernels/cuda_check.h"
#include "kernels/kv_cache_device.cuh"

namespace kvserve::cuda {
namespace {

constexpr int kThreads = 128;

// ---- CUDA kernels

// The int8 residual: codes u8 [D] and an fp16 (scale, zero) pair per row, moved as they are (the
// new rows from the batch's new rows, quantized by kv_quantize_residual or decode_attention).
//   staged: u8 [2][rows][D] codes, then [2][rows] pairs (4 bytes each)
__device__ void compact_int8(const KvCacheView& cache, const KvBatchView& batch, uint8_t* staged,
                             int item, int head) {
  const int start = batch.start[item], end = start + batch.count[item];
  const int first = paged_count(cache, start), last = paged_count(cache, end);
  const int D = cache.head_dim;
  const int32_t* residual_slots = batch.residual_slots + batch.residual_offset[item];
  const KvWindow window = item_window(cache, batch, nullptr, 0, item, head);
  // Destination of residual slot `slot`: its codes and its pair.
  auto destination = [&](int slot, int which, uint8_t*& codes, uint32_t*& pair) {
    uint8_t* base = residual_slot(cache, residual_slots, slot, which);
    codes = base + static_cast<int64_t>(head) * D;
    pair = reinterpret_cast<uint32_t*>(base + cache.residual_params) + head;
  };
  const int moved_from = last, moved = last > first ? max(0, start - last) : 0;
  uint32_t* staged_pairs = reinterpret_cast<uint32_t*>(staged + 2 * moved * D);
  for (int e = threadIdx.x; e < 2 * moved * (D + 1); e += blockDim.x) {
    const int which = e / (moved * (D + 1)), r = (e / (D + 1)) % moved, d = e % (D + 1);
    const uint8_t* codes;
    __half2 pair;
    window.residual_int8_row(moved_from + r, which, codes, pair);
    if (d < D) {
      staged[(which * moved + r) * D + d] = codes[d];
    } else {
      staged_pairs[which * moved + r] = *reinterpret_cast<const uint32_t*>(&pair);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < 2 * moved * (D + 1); e += blockDim.x) {
    const int which = e / (moved * (D + 1)), r = (e / (D + 1)) % moved, d = e % (D + 1);
    uint8_t* codes;
    uint32_t* pair;
    destination(moved_from + r - last, which, codes, pair);
    if (d < D) {
      codes[d] = staged[(which * moved + r) * D + d];
    } else {
      *pair = staged_pairs[which * moved + r];
    }
  }
  const int new_first = max(start, last), fresh = end - new_first;
  for (int e = threadIdx.x; e < 2 * fresh * (D + 1); e += blockDim.x) {
    const int which = e / (fresh * (D + 1)), r = (e / (D + 1)) % fresh, d = e % (D + 1);
    const uint8_t* from;
    __half2 from_pair;
    window.residual_int8_row(new_first + r, which, from, from_pair);
    uint8_t* codes;
    uint32_t* pair;
    destination(new_first + r - last, which, codes, pair);
    if (d < D) {
      codes[d] = from[d];
    } else {
      *pair = *reinterpret_cast<const uint32_t*>(&from_pair);
    }
  }
}

__global__ void kv_compact_residual_kernel(const KvCacheView cache, const KvBatchView batch,
                                           const __half* qkv, int qkv_stride) {
  extern __shared__ __half staged[];  // [2][rows][D]: the old rows that move (keys, values)
  const int item = blockIdx.x, head = blockIdx.y;
  if (cache.residual_int8) {
    compact_int8(cache, batch, reinterpret_cast<uint8_t*>(staged), item, head);
    return;
  }
  const int start = batch.start[item], end = start + batch.count[item];
  const int first = paged_count(cache, start), last = paged_count(cache, end);
  const int D = cache.head_dim;
  const int32_t* residual_slots = batch.residual_slots + batch.residual_offset[item];
  const KvWindow window = item_window(cache, batch, qkv, qkv_stride, item, head);

  // Old rows [last, start) move from slot pos - first to slot pos - last when last > first.
  const int moved_from = last, moved = last > first ? max(0, start - last) : 0;
  for (int e = threadIdx.x; e < 2 * moved * D; e += blockDim.x) {
    const int which = e / (moved * D), r = (e / D) % moved, d = e % D;
    staged[e] = window.row(moved_from + r, which)[d];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < 2 * moved * D; e += blockDim.x) {
    const int which = e / (moved * D), r = (e / D) % moved, d = e % D;
    residual_row(cache, residual_slots, head, moved_from + r - last, which)[d] = staged[e];
  }
  // New rows [max(start, last), end) come from qkv.
  const int new_first = max(start, last), fresh = end - new_first;
  for (int e = threadIdx.x; e < 2 * fresh * D; e += blockDim.x) {
    const int which = e / (fresh * D), r = (e / D) % fresh, d = e % D;
    residual_row(cache, residual_slots, head, new_first + r - last, which)[d] =
        window.row(new_first + r, which)[d];
  }
}

}  // namespace

// ---- kernel launchers

void kv_compact_residual(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                         int qkv_stride, cudaStream_t stream) {
  check_kv_launch("kv_compact_residual", cache, batch, qkv, qkv_stride);
  if (batch.items == 0 || cache.kind != KvKind::kKivi) return;
  // At most R + G - 1 old rows survive a step (the residual holds fewer than R + G tokens).
  const size_t shared_bytes =
      2 * static_cast<size_t>(cache.residual + cache.key_group) * cache.head_dim * sizeof(__half);
  KVSERVE_CUDA_CHECK(cudaFuncSetAttribute(kv_compact_residual_kernel,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared_bytes)));
  kv_compact_residual_kernel<<<dim3(batch.items, cache.n_head), kThreads, shared_bytes, stream>>>(
      cache, batch, qkv, qkv_stride);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
