// Decode attention: the split along the context, the dispatch to the kernel of the cache's
// format and the launch's variant, and the merge of the splits. One block of 4 warps per
// (split, head, item) in every kernel; with splits > 1 a second kernel merges the splits'
// (output, max, sum) into the output. The kernels:
//   fp16                       decode_attention_fp16.cu (two phases through shared scores)
//   KIVI "online", "tensor"    decode_attention_kivi.cu (one pass, a running softmax per warp)
//   KIVI 2-bit "packed"        decode_attention_packed.cu (one pass, two pages per warp step,
//                              codes converted in registers and multiplied on tensor cores;
//                              fp16 or fp8 pairs, value groups of 16, 32 or 64, an fp16 or int8
//                              window: every 2-bit layout decode_attention supports)
#include "kernels/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "kernels/cuda_check.h"
#include "kernels/decode_attention_common.cuh"

namespace kvserve::cuda {
namespace {

using namespace decode_detail;

// Merges the splits of one (item, head): o = sum_s o_s e^(m_s - m) / sum_s l_s e^(m_s - m).
__global__ void __launch_bounds__(kD)
    decode_attention_merge_kernel(const KvBatchView batch, int n_head, int splits,
                                  const float* partial, __half* out, int out_stride) {
  const int head = blockIdx.x, item = blockIdx.y, d = threadIdx.x;
  const float* part = partial + (static_cast<int64_t>(item) * n_head + head) * splits * (kD + 2);
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, part[s * (kD + 2) + kD]);
  float o = 0.0f, l = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float* ps = part + s * (kD + 2);
    if (ps[kD] == -INFINITY) continue;  // an empty split: its output was never written
    const float scale = expf(ps[kD] - m);
    o += ps[d] * scale;
    l += ps[kD + 1] * scale;
  }
  out[static_cast<int64_t>(batch.row[item]) * out_stride + head * kD + d] = __float2half_rn(o / l);
}

}  // namespace

bool decode_attention_supported(const KvCacheView& c) {
  const bool aligned = c.block_bytes % 16 == 0 && c.key_codes % 16 == 0 && c.key_params % 16 == 0 &&
                       c.value_codes % 16 == 0 && c.value_params % 16 == 0;
  const bool format =
      c.kind == KvKind::kFp16 || (c.kind == KvKind::kKivi && !c.per_token_keys &&
                                  c.key_group == kPage && (c.bits == 2 || c.bits == 4));
  return aligned && format && c.head_dim == kD && c.page_tokens == kPage;
}

DecodeAttentionVariant decode_attention_kernel(const KvCacheView& c, DecodeSplit split,
                                               DecodeAttentionVariant variant) {
  if (c.kind != KvKind::kKivi) return variant;  // fp16 pages: one kernel, which ignores it
  if (c.bits == 4) return DecodeAttentionVariant::kOnline;
  // "packed" takes its pages two per warp: with chunks of fewer than 8 pages (small batches
  // split finely) the warps would run half-empty pairs, and "online" is the faster there.
  if (variant == DecodeAttentionVariant::kPacked && split.chunk < 2 * kWarps * kPage) {
    return DecodeAttentionVariant::kOnline;
  }
  return variant;
}

DecodeSplit decode_attention_split(int items, int n_head, int max_len, int sm_count) {
  if (items < 1 || n_head < 1 || max_len < 1 || sm_count < 1) {
    throw std::invalid_argument("decode_attention_split: bad geometry");
  }
  // About 8 blocks per SM; splits of fewer than 32 tokens cost more to merge than they save.
  const int64_t pairs = static_cast<int64_t>(items) * n_head;
  const int64_t wanted = (8LL * sm_count + pairs - 1) / pairs;
  const int most = (max_len + kPage - 1) / kPage;
  int splits = static_cast<int>(std::clamp<int64_t>(wanted, 1, most));
  int chunk = (max_len + splits - 1) / splits;
  chunk = std::min(kMaxChunk, (chunk + kPage - 1) / kPage * kPage);
  splits = (max_len + chunk - 1) / chunk;
  // Round up to powers of two without changing a bit of the result, so that the launch, and a
  // CUDA graph that captured it, stay the same while the context grows (not a new split every 32
  // tokens): one split reads the whole context whatever its chunk (which only sizes the shared
  // scores); with several, a split past an item's context leaves an empty partial (max -inf)
  // that the merge skips, so extra splits leave the sums and their order as they were.
  if (splits == 1) {
    int whole = kPage;
    while (whole < chunk) whole *= 2;
    chunk = whole;
  } else {
    int rounded = 2;
    while (rounded < splits) rounded *= 2;
    splits = rounded;
  }
  return {chunk, splits};
}

void decode_attention(const KvCacheView& cache, const KvBatchView& batch, DecodeSplit split,
                      const __half* qkv, int qkv_stride, __half* out, int out_stride,
                      float* partial, DecodeAttentionVariant variant, DecodeNewRows new_rows,
                      cudaStream_t stream) {
  check_kv_launch("decode_attention", cache, batch, qkv, qkv_stride);
  if (batch.items == 0) return;
  if (!decode_attention_supported(cache)) {
    throw std::invalid_argument("decode_attention: unsupported cache geometry");
  }
  if (out == nullptr || out_stride < cache.n_head * kD) {
    throw std::invalid_argument("decode_attention: null output or row stride below n_head * 64");
  }
  if (qkv_stride % 8 != 0 || reinterpret_cast<uintptr_t>(qkv) % 16 != 0) {
    throw std::invalid_argument("decode_attention: qkv rows must be 16-byte aligned");
  }
  if (split.splits < 1 || split.chunk < kPage || split.chunk % kPage != 0 ||
      split.chunk > kMaxChunk || (split.splits > 1 && partial == nullptr)) {
    throw std::invalid_argument("decode_attention: bad split (chunk a multiple of 32 up to 2048)");
  }
  if (new_rows.quantize && !(cache.kind == KvKind::kKivi && cache.residual_int8)) {
    throw std::invalid_argument("decode_attention: quantizing new rows needs an int8 residual");
  }
  if (new_rows.store && cache.kind != KvKind::kKivi) {
    throw std::invalid_argument("decode_attention: storing new rows needs a KIVI residual");
  }
  float* split_partial = split.splits > 1 ? partial : nullptr;
  switch (cache.kind) {
    case KvKind::kFp16:
      launch_fp16(cache, batch, split, qkv, qkv_stride, out, out_stride, split_partial, new_rows,
                  stream);
      break;
    case KvKind::kKivi: {
      const DecodeAttentionVariant kernel = decode_attention_kernel(cache, split, variant);
      if (kernel == DecodeAttentionVariant::kPacked) {
        launch_kivi_packed(cache, batch, split, qkv, qkv_stride, out, out_stride, split_partial,
                           new_rows, stream);
      } else {
        launch_kivi_online(kernel == DecodeAttentionVariant::kTensor, cache, batch, split, qkv,
                           qkv_stride, out, out_stride, split_partial, new_rows, stream);
      }
      break;
    }
    case KvKind::kInt8:
      return;  // rejected by decode_attention_supported
  }
  if (split.splits > 1) {
    decode_attention_merge_kernel<<<dim3(cache.n_head, batch.items), kD, 0, stream>>>(
        batch, cache.n_head, split.splits, partial, out, out_stride);
    KVSERVE_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace kvserve::cuda
