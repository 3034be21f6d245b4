// KV write path, part 0: the step's new keys and values quantized to int8 as they enter the
// window. A lane takes 8 channels of one (row, keys or values, head) with one 16-byte load; the
// lanes of a head (a segment of D / 8 lanes, rounded up to a power of two) reduce min and max by
// shuffles, and a warp takes 32 / segment heads. One warp per (row, kind, head) with 2 channels a
// lane took 67 us a layer for 16 x 512 rows on an H200 (ncu): some 200,000 warps, each mostly
// waiting on its load and its two 5-step reductions.
#include "kernels/kv_quantize_residual.h"

#include <stdexcept>

#include "kernels/cuda_check.h"
#include "kernels/kv_quantize_residual.cuh"

namespace kvserve::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxHeadDim = 256;  // engine/kv_format.cc's limit: 32 lanes of 8 channels

// ---- CUDA kernels

__global__ void kv_quantize_residual_kernel(const KvCacheView cache, const KvBatchView batch,
                                            const __half* qkv, int qkv_stride, int rows) {
  const int lane = threadIdx.x % 32;
  const int D = cache.head_dim, H = cache.n_head;
  const int lanes = residual_segment_lanes(D), heads_per_warp = 32 / lanes;
  const int head_groups = (H + heads_per_warp - 1) / heads_per_warp;
  // Warp w: head group w % head_groups, keys or values (w / head_groups) % 2, row
  // w / (2 head_groups): consecutive warps read consecutive heads of one row.
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (warp >= static_cast<int64_t>(rows) * 2 * head_groups) return;  // whole warps leave
  const int which = static_cast<int>(warp / head_groups % 2);
  const int head = static_cast<int>(warp % head_groups) * heads_per_warp + lane / lanes;
  const int chunk = lane % lanes;  // channels 8 chunk .. 8 chunk + 7
  const int64_t row = warp / (2 * head_groups);
  const bool active = head < H && chunk < D / 8;
  const Int8RowShare share = quantize_row_share(
      qkv + row * qkv_stride + (1 + which) * H * D + head * D + 8 * chunk, lanes, active);
  if (active) store_new_row_share(cache, batch, row, which, head, chunk, share);
}

}  // namespace

// ---- kernel launchers

void kv_quantize_residual(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                          int qkv_stride, int rows, cudaStream_t stream) {
  check_kv_launch("kv_quantize_residual", cache, batch, qkv, qkv_stride);
  if (batch.items == 0 || cache.kind != KvKind::kKivi || !cache.residual_int8) return;
  if (cache.head_dim > kMaxHeadDim || cache.head_dim % 8 != 0) {
    throw std::invalid_argument("kv_quantize_residual: head_dim not a multiple of 8 up to 256");
  }
  if (qkv_stride % 8 != 0) {
    throw std::invalid_argument("kv_quantize_residual: qkv row stride not a multiple of 8");
  }
  if (rows < batch.items) {
    throw std::invalid_argument("kv_quantize_residual: fewer rows than items");
  }
  const int heads_per_warp = 32 / residual_segment_lanes(cache.head_dim);
  const int64_t head_groups = (cache.n_head + heads_per_warp - 1) / heads_per_warp;
  const int64_t warps = static_cast<int64_t>(rows) * 2 * head_groups;
  const int64_t blocks = (warps + kWarps - 1) / kWarps;
  if (blocks > INT32_MAX) throw std::invalid_argument("kv_quantize_residual: too many rows");
  kv_quantize_residual_kernel<<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(
      cache, batch, qkv, qkv_stride, rows);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
