// Dequantizes the pages that a prefill step's long items read in page form, once per layer, into
// an fp16 scratch buffer that prefill_attention then reads with plain 16-byte loads (instead of
// dequantizing every key once per 64-query block of its item).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kv_cache_view.h"

namespace kvserve::cuda {

// Parts of a dequantized page in the scratch buffer: the high and low fp16 parts of each key and
// value (x = high + low, kernels/fp16_split.cuh).
constexpr int kDequantizedParts = 4;  // key high, key low, value high, value low

// fp16 elements of one scratch page: [n_head][kDequantizedParts][page_tokens][head_dim].
inline int64_t dequantized_page_elements(const KvCacheView& cache) {
  return static_cast<int64_t>(cache.n_head) * kDequantizedParts * cache.page_tokens *
         cache.head_dim;
}

// Scratch page s holds logical page pages[2 s + 1] of item pages[2 s], dequantized exactly as
// page_element reads it (kernels/kv_cache_device.cuh), split into high and low fp16 parts; slots
// at or beyond the item's paged(start + count) are left unwritten (no query reads them in page
// form).
//   pages:   int32 [num_pages][2] device memory: (item, logical page of the item)
//   scratch: fp16 [num_pages][n_head][kDequantizedParts][page_tokens][head_dim], 16-byte aligned
// int8 and KIVI only (fp16 pages are read as they are), head_dim a multiple of 8 (16-byte stores).
// Runs after kv_quantize_pages.
void kv_dequantize_pages(const KvCacheView& cache, const KvBatchView& batch, const int32_t* pages,
                         int num_pages, __half* scratch, cudaStream_t stream);

}  // namespace kvserve::cuda
