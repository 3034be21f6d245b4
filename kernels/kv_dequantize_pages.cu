// One block per (scratch page, head): every element of the page's keys and values through
// page_element (the one page reader), split into high and low fp16 parts. Each thread takes 8
// neighbouring channels of one token and writes each part with one 16-byte store (neighbouring
// threads the next 8 channels), so a warp writes 512 contiguous bytes per part.
#include <cstdint>
#include <stdexcept>

#include "kernels/cuda_check.h"
#include "kernels/fp16_split.cuh"
#include "kernels/kv_cache_device.cuh"
#include "kernels/kv_dequantize_pages.h"

namespace kvserve::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChannels = 8;  // per thread: one 16-byte store of fp16 per part

// Elements d0 .. d0 + 7 of a slot's keys (which = 0) or values as high and low fp16 parts, each
// part packed into 16 bytes in channel order.
template <KvKind KIND, int BITS>
__device__ __forceinline__ void dequantize_run(const KvCacheView& c, const uint8_t* block, int head,
                                               int slot, int d0, int which, int D, uint4& high,
                                               uint4& low) {
  uint32_t h[kChannels / 2], l[kChannels / 2];
#pragma unroll
  for (int i = 0; i < kChannels / 2; ++i) {
    __half h0, l0, h1, l1;
    split_half(page_element<KIND, BITS>(c, block, head, slot, d0 + 2 * i, which, D), h0, l0);
    split_half(page_element<KIND, BITS>(c, block, head, slot, d0 + 2 * i + 1, which, D), h1, l1);
    h[i] = __half_as_ushort(h0) | (static_cast<uint32_t>(__half_as_ushort(h1)) << 16);
    l[i] = __half_as_ushort(l0) | (static_cast<uint32_t>(__half_as_ushort(l1)) << 16);
  }
  high = make_uint4(h[0], h[1], h[2], h[3]);
  low = make_uint4(l[0], l[1], l[2], l[3]);
}

template <KvKind KIND, int BITS>
__global__ void __launch_bounds__(kThreads)
    kv_dequantize_pages_kernel(const KvCacheView c, const KvBatchView batch,
                               const int32_t* scratch_pages, __half* scratch) {
  const int item = scratch_pages[2 * blockIdx.x], page = scratch_pages[2 * blockIdx.x + 1];
  const int head = blockIdx.y, P = c.page_tokens, D = c.head_dim;
  // Slots of this page that some query of the step reads in page form.
  const int slots = min(P, paged_count(c, batch.start[item] + batch.count[item]) - page * P);
  const uint8_t* block = block_ptr(c, batch.pages[batch.page_offset[item] + page]);
  // fp16 [kDequantizedParts][P][D] of this page and head, as 16-byte runs of 8 channels.
  uint4* out = reinterpret_cast<uint4*>(
      scratch + (static_cast<int64_t>(blockIdx.x) * c.n_head + head) * kDequantizedParts * P * D);
  const int runs = D / kChannels;
  const int64_t part = static_cast<int64_t>(P) * runs;  // runs per part
  for (int e = threadIdx.x; e < slots * runs; e += kThreads) {
    const int slot = e / runs, d0 = (e % runs) * kChannels;
#pragma unroll
    for (int which = 0; which < 2; ++which) {
      uint4 high, low;
      dequantize_run<KIND, BITS>(c, block, head, slot, d0, which, D, high, low);
      out[2 * which * part + e] = high;
      out[(2 * which + 1) * part + e] = low;
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
  if (cache.head_dim % kChannels != 0 || reinterpret_cast<uintptr_t>(scratch) % 16 != 0) {
    throw std::invalid_argument(
        "kv_dequantize_pages: head_dim not a multiple of 8 or scratch not 16-byte aligned");
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
