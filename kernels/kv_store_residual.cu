// KV write path, part 2: store the step's new residual rows (fp16 rows, or int8 rows with their
// fp16 pairs) where kernels/residual_order.h puts them.
//
// One block per (item, head). Nothing moves inside the pool: each row is read from the step's
// rows (qkv, or the batch's int8 new rows) and written to its slot, 8 channels a thread (16 bytes
// fp16, 8 bytes int8: head_dim is a multiple of 8), several loads a thread in flight.
#include "kernels/kv_store_residual.h"

#include <cstdint>
#include <stdexcept>

#include "kernels/cuda_check.h"
#include "kernels/kv_cache_device.cuh"
#include "kernels/residual_order.h"

namespace kvserve::cuda {
namespace {

constexpr int kThreads = 128;
// Units a thread loads before it stores any (copy_loads_in_flight).
constexpr int kUnitsInFlight = 4;

// ---- CUDA kernels

// Block (item, head): the item's new rows that stay, keys and values, units of 8 channels.
__global__ void kv_store_residual_kernel(const KvCacheView cache, const KvBatchView batch,
                                         const __half* qkv, int qkv_stride) {
  const int item = blockIdx.x, head = blockIdx.y;
  const int start = batch.start[item], end = start + batch.count[item];
  const ResidualStep step =
      ResidualStep::of(start, end, paged_count(cache, start), paged_count(cache, end));
  const int32_t* residual_slots = batch.residual_slots + batch.residual_offset[item];
  const KvWindow window = item_window(cache, batch, qkv, qkv_stride, item, head);
  const int first_new = end - step.new_rows;
  // Row r: the new row k = r / 2, keys (r even) or values.
  const int units = cache.head_dim / 8, total = 2 * step.new_rows * units;
  if (!cache.residual_int8) {
    copy_loads_in_flight<kUnitsInFlight>(
        total,
        [&](int e) {
          const int r = e / units;
          return reinterpret_cast<const uint4*>(window.row(first_new + r / 2, r % 2))[e % units];
        },
        [&](int e, const uint4& unit) {
          const int r = e / units;
          __half* to = residual_row(cache, residual_slots, head, step.new_row_entry(r / 2), r % 2);
          reinterpret_cast<uint4*>(to)[e % units] = unit;
        });
    return;
  }
  copy_loads_in_flight<kUnitsInFlight>(
      total,
      [&](int e) {
        const int r = e / units;
        const uint8_t* codes;
        __half2 pair;
        window.residual_int8_row(first_new + r / 2, r % 2, codes, pair);
        return reinterpret_cast<const uint2*>(codes)[e % units];
      },
      [&](int e, const uint2& unit) {
        const int r = e / units;
        const Int8ResidualRow to =
            int8_residual_row(cache, residual_slots, head, step.new_row_entry(r / 2), r % 2);
        reinterpret_cast<uint2*>(to.codes)[e % units] = unit;
      });
  for (int r = threadIdx.x; r < 2 * step.new_rows; r += blockDim.x) {
    const uint8_t* codes;
    __half2 pair;
    window.residual_int8_row(first_new + r / 2, r % 2, codes, pair);
    *int8_residual_row(cache, residual_slots, head, step.new_row_entry(r / 2), r % 2).pair =
        *reinterpret_cast<const uint32_t*>(&pair);
  }
}

}  // namespace

// ---- kernel launchers

void kv_store_residual(const KvCacheView& cache, const KvBatchView& batch, const __half* qkv,
                       int qkv_stride, cudaStream_t stream) {
  check_kv_launch("kv_store_residual", cache, batch, qkv, qkv_stride);
  if (batch.items == 0 || cache.kind != KvKind::kKivi) return;
  if (cache.head_dim % 8 != 0) {
    throw std::invalid_argument("kv_store_residual: head_dim not a multiple of 8");
  }
  if (qkv_stride % 8 != 0 || reinterpret_cast<uintptr_t>(qkv) % 16 != 0) {
    throw std::invalid_argument("kv_store_residual: qkv rows must be 16-byte aligned");
  }
  kv_store_residual_kernel<<<dim3(batch.items, cache.n_head), kThreads, 0, stream>>>(
      cache, batch, qkv, qkv_stride);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
