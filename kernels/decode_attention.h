// Decode attention (one query per item) over the paged KV cache of one layer, split along the
// context (flash-decoding) so that a few long sequences still fill every SM.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/decode_attention_variant.h"
#include "kernels/kv_cache_view.h"

namespace kvserve::cuda {

// Whether decode_attention handles this cache geometry: fp16, or KIVI with per-channel keys and
// key groups of 32; pages of 32 tokens; head_dim 64; 16-byte aligned blocks. Other geometries
// (int8, the per-token-keys ablation) use paged_attention.
bool decode_attention_supported(const KvCacheView& cache);

// How a step's contexts are cut: `splits` pieces of `chunk` tokens (a multiple of 32) per item
// and head, enough blocks to fill `sm_count` SMs a few times over; splits == 1 when the batch
// alone does, with a chunk of the power of two at or above max_len. Otherwise splits is rounded
// up to a power of two, the last ones possibly empty even for the longest item. max_len: the
// longest item's context (keys) this step.
struct DecodeSplit {
  int chunk = 0;
  int splits = 0;
};
DecodeSplit decode_attention_split(int items, int n_head, int max_len, int sm_count);

// What decode_attention does in a KIVI decode step with each item's new row (position start, in
// qkv) besides attending to it, so that the step launches fewer of the write path's kernels. The
// block that reads the row does it, before it reads the window.
struct DecodeNewRows {
  // An int8 residual: quantize the row into batch.new_codes / new_params (byte for byte as
  // kv_quantize_residual, which the step then does not launch). Right where no kernel before
  // decode_attention reads the new rows: in a decode step kv_quantize_pages and
  // kv_quantization_error read only the flushed tokens, older ones (a residual of R >= 1 keeps
  // the newest).
  bool quantize = false;
  // Store the row (fp16, or the int8 codes and pair) into its residual slot as kv_store_residual
  // would (kernels/residual_order.h), for every item: the step then launches no
  // kv_store_residual, and kv_quantize_pages for its flushing items alone
  // (KvBatchView::flushing), or not at all where none flushes. Nothing else reads that slot later
  // in the step (a flushing item's is the newest flushed token's, which kv_quantize_pages has
  // read before and attention reads from its page). With an int8 residual the row is quantized
  // for it, into the batch's new rows too, whatever `quantize` says.
  bool store = false;
};

// The KIVI kernel decode_attention runs for `variant` on this cache and split: kPacked for 2-bit
// pages (any value group, fp16 or fp8 pairs, fp16 or int8 window) with chunks of at least 8
// pages, else kOnline; kTensor for 2-bit pages; 4-bit pages always kOnline. fp16 pages: `variant`
// unchanged (their one kernel ignores it).
DecodeAttentionVariant decode_attention_kernel(const KvCacheView& cache, DecodeSplit split,
                                               DecodeAttentionVariant variant);

// Every item of `batch` has count 1 (a decode step): its query (row row[item] of qkv) attends to
// keys 0 .. start[item], read as paged_attention reads them (pages up to paged(start + 1), then the
// fp16 window). Runs after kv_quantize_pages and before kv_store_residual (which a step that
// stores its new rows here does not launch).
// new_rows: what the kernel does with each item's new row besides reading it (DecodeNewRows).
//   qkv:     fp16 [items][3C] (row stride qkv_stride, a multiple of 8): q | k | v
//   out:     fp16 [items][C]  (row stride out_stride)
//   partial: fp32 [items][n_head][splits][head_dim + 2] scratch (output, max, sum of each
//            split); unused (may be null) when splits == 1
// KIVI pages run the kernel `variant` names (decode_attention_variant.h; the tensor-core ones
// need sm_80 or newer); fp16 pages have one kernel and ignore it.
void decode_attention(const KvCacheView& cache, const KvBatchView& batch, DecodeSplit split,
                      const __half* qkv, int qkv_stride, __half* out, int out_stride,
                      float* partial, DecodeAttentionVariant variant, DecodeNewRows new_rows,
                      cudaStream_t stream);

}  // namespace kvserve::cuda
