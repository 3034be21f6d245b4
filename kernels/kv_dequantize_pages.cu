// One block per (scratch page, head): every element of the page's keys and values through
// page_element (the one page reader), split into high and low fp16 parts. Neighbouring threads
// take neighbouring channels of one token, so the scratch writes are coalesced.
#include <stdexcept>

#include "kernels/cuda_check.h"
#include "kernels/fp16_split.cuh"
#include "kernels/kv_cache_device.cuh"
#include "kernels/kv_dequantize_pages.h"

namespace kvserve::cuda {
namespace {

constexpr int kThreads = 256;

template <KvKind KIND, int BITS>
__global__ void __launch_bounds__(kThreads)
    kv_dequantize_pages_kernel(const KvCacheView c, const KvBatchView batch,
                               const int32_t* scratch_pages, __half* scratch) {
  const int item = scratch_pages[2 * blockIdx.x], page = scratch_pages[2 * blockIdx.x + 1];
  const int head = blockIdx.y, P = c.page_tokens, D = c.head_dim;
  // Slots of this page that some query of the step reads in page form.
  const int slots = min(P, paged_count(c, batch.start[item] + batch.count[item]) - page * P);
  const uint8_t* block = block_ptr(c, batch.pages[batch.page_offset[item] + page]);
  // fp16 [kDequantizedParts][P][D] of this page and head.
  __half* out =
      scratch + (static_cast<int64_t>(blockIdx.x) * c.n_head + head) * kDequantizedParts * P * D;
  const int64_t part = static_cast<int64_t>(P) * D;
  for (int e = threadIdx.x; e < slots * D; e += kThreads) {
    const int slot = e / D, d = e % D;
#pragma unroll
    for (int which = 0; which < 2; ++which) {
      split_half(page_element<KIND, BITS>(c, block, head, slot, d, which, D),
                 out[2 * which * part + e], out[(2 * which + 1) * part + e]);
    }
  }
}

template <KvKind KIND, int BITS>
void launch(const KvCacheView& cache, const KvBatchView& batch, const int32_t* pages, int num_pages,
            __half* scratch, cudaStream_t stream) {
  kv_dequantize_pages_kernel<KIND, BITS>
      <<<dim3(num_pages, cache.n_head), kThreads, 0, stream>>>(cache, batch, pages, scratch);
}

}  // namespace

void kv_dequantize_pages(const KvCacheView& cache, const KvBatchView& batch, const int32_t* pages,
                         int num_pages, __half* scratch, cudaStream_t stream) {
  if (num_pages < 0) throw std::invalid_argument("kv_dequantize_pages: negative page count");
  if (num_pages == 0) return;
  if (cache.blocks == nullptr || pages == nullptr || scratch == nullptr || batch.items <= 0 ||
      batch.start == nullptr || batch.count == nullptr || batch.page_offset == nullptr ||
      batch.pages == nullptr) {
    throw std::invalid_argument("kv_dequantize_pages: null pool, batch, pages or scratch");
  }
  if (cache.n_head <= 0 || cache.head_dim <= 0 || cache.page_tokens <= 0) {
    throw std::invalid_argument("kv_dequantize_pages: empty geometry");
  }
  switch (cache.kind) {
    case KvKind::kFp16:
      throw std::invalid_argument("kv_dequantize_pages: fp16 pages need no dequantization");
    case KvKind::kInt8:
      launch<KvKind::kInt8, 8>(cache, batch, pages, num_pages, scratch, stream);
      break;
    case KvKind::kKivi:
      if (cache.bits == 4) {
        launch<KvKind::kKivi, 4>(cache, batch, pages, num_pages, scratch, stream);
      } else if (cache.bits == 2) {
        launch<KvKind::kKivi, 2>(cache, batch, pages, num_pages, scratch, stream);
      } else {
        throw std::invalid_argument("kv_dequantize_pages: KIVI bits must be 2 or 4");
      }
      break;
  }
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
