// KV write path, part 2: compact the fp16 residual.
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

__global__ void kv_compact_residual_kernel(const KvCacheView cache, const KvBatchView batch,
                                           const __half* qkv, int qkv_stride) {
  extern __shared__ __half staged[];  // [2][rows][D]: the old rows that move (keys, values)
  const int item = blockIdx.x, head = blockIdx.y;
  const int start = batch.start[item], end = start + batch.count[item];
  const int first = paged_count(cache, start), last = paged_count(cache, end);
  const int D = cache.head_dim;
  const int32_t* residual_blocks = batch.residual_blocks + batch.residual_offset[item];
  const KvWindow window{&cache,
                        residual_blocks,
                        qkv + static_cast<int64_t>(batch.row[item]) * qkv_stride,
                        qkv_stride,
                        head,
                        start,
                        first};

  // Old rows [last, start) move from slot pos - first to slot pos - last when last > first.
  const int moved_from = last, moved = last > first ? max(0, start - last) : 0;
  for (int e = threadIdx.x; e < 2 * moved * D; e += blockDim.x) {
    const int which = e / (moved * D), r = (e / D) % moved, d = e % D;
    staged[e] = window.row(moved_from + r, which)[d];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < 2 * moved * D; e += blockDim.x) {
    const int which = e / (moved * D), r = (e / D) % moved, d = e % D;
    residual_row(cache, residual_blocks, head, moved_from + r - last, which)[d] = staged[e];
  }
  // New rows [max(start, last), end) come from qkv.
  const int new_first = max(start, last), fresh = end - new_first;
  for (int e = threadIdx.x; e < 2 * fresh * D; e += blockDim.x) {
    const int which = e / (fresh * D), r = (e / D) % fresh, d = e % D;
    residual_row(cache, residual_blocks, head, new_first + r - last, which)[d] =
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
