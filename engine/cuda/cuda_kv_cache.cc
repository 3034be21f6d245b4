#include "engine/cuda/cuda_kv_cache.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/cuda_check.h"
#include "kernels/kv_dequantize_pages.h"
#include "kernels/kv_quantize_pages.h"
#include "kernels/kv_quantize_residual.h"
#include "kernels/kv_store_residual.h"
#include "kernels/paged_attention.h"
#include "kernels/prefill_attention.h"

namespace kvserve {
namespace {

cuda::KvCacheView make_view(const KvCacheConfig& c, const ModelConfig& model) {
  const KvPageLayout l = make_page_layout(c, model);
  cuda::KvCacheView v;
  v.block_bytes = static_cast<int64_t>(l.block_bytes);
  v.key_codes = static_cast<int64_t>(l.key_codes);
  v.key_params = static_cast<int64_t>(l.key_params);
  v.value_codes = static_cast<int64_t>(l.value_codes);
  v.value_params = static_cast<int64_t>(l.value_params);
  v.kind = c.format == KvFormat::kFp16   ? cuda::KvKind::kFp16
           : c.format == KvFormat::kInt8 ? cuda::KvKind::kInt8
                                         : cuda::KvKind::kKivi;
  v.bits = kv_bits(c.format);
  v.n_head = model.n_head;
  v.head_dim = model.head_dim();
  v.page_tokens = c.page_tokens;
  v.key_group = c.key_group;
  v.value_group = c.value_group;
  v.residual = c.residual;
  v.residual_tokens_per_block = l.residual_tokens_per_block;
  v.per_token_keys = c.per_token_keys;
  v.params_fp8 = is_kivi(c.format) && c.params == KvParamFormat::kFp8;
  v.residual_int8 = is_kivi(c.format) && c.residual_format == KvResidualFormat::kInt8;
  v.residual_params = static_cast<int64_t>(l.residual_params);
  v.residual_slot_bytes = static_cast<int64_t>(l.residual_slot_bytes);
  return v;
}

}  // namespace

CudaKvCache::CudaKvCache(const KvCacheConfig& config, int32_t num_blocks, const ModelConfig& model,
                         cuda::DecodeAttentionVariant variant,
                         cuda::PrefillAttentionVariant prefill)
    : config_(config),
      num_blocks_(num_blocks),
      view_(make_view(config, model)),
      n_layer_(model.n_layer),
      channels_(model.n_embd),
      layer_bytes_(static_cast<size_t>(num_blocks) * static_cast<size_t>(view_.block_bytes)),
      bytes_(layer_bytes_ * model.n_layer),
      decode_variant_(variant) {
  // Before anything a throw here would leak.
  cuda::kv_quantize_pages_prepare(view_);
  size_t free_bytes = 0, total_bytes = 0;
  KVSERVE_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (bytes_ > free_bytes) {
    throw std::runtime_error("the KV pool needs " + std::to_string(bytes_ >> 20) +
                             " MiB but the GPU has " + std::to_string(free_bytes >> 20) +
                             " MiB free: use a smaller --kv-pool-mb");
  }
  KVSERVE_CUDA_CHECK(cudaMalloc(&pool_, std::max<size_t>(bytes_, 1)));
  // Zeroed so that the pool's bytes equal the CPU cache's (calloc) in tests.
  KVSERVE_CUDA_CHECK(cudaMemset(pool_, 0, bytes_));
  KVSERVE_CUDA_CHECK(cudaEventCreateWithFlags(&meta_uploaded_, cudaEventDisableTiming));
  view_.blocks = pool_;
  int device = 0;
  KVSERVE_CUDA_CHECK(cudaGetDevice(&device));
  KVSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device));
  int major = 0;
  KVSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  prefill_variant_ = prefill == cuda::PrefillAttentionVariant::kTensor &&
                             cuda::prefill_attention_supported(view_, major)
                         ? cuda::PrefillAttentionVariant::kTensor
                         : cuda::PrefillAttentionVariant::kTiled;
}

CudaKvCache::~CudaKvCache() {
  if (meta_uploaded_ != nullptr) cudaEventDestroy(meta_uploaded_);
  cudaFree(pool_);
}

const int32_t* CudaKvCache::prepare(const std::vector<ForwardItem>& items, cudaStream_t stream,
                                    const std::vector<int32_t>& step_indices) {
  const int n = static_cast<int>(items.size());
  // Layout of the metadata buffer: start, count, row [n] each; page_offset, residual_offset,
  // flushing (KvBatchView::flushing, used or not) [n + 1] each; step_indices; block ids (every
  // item's pages, then every item's residual blocks, so one base pointer serves both and the
  // offsets hold the variable part); tiles [num_tiles][2] (the items the prefill kernel attends);
  // where dequantized pages are used, the items' first scratch pages [n] and the scratch pages'
  // (item, logical page) pairs. Every region's address up to the block ids depends on n and
  // step_indices.size() alone, never on the block tables' lengths.
  const size_t header = 6 * static_cast<size_t>(n) + 3;
  const size_t ids_at = header + step_indices.size();
  host_meta_.assign(header, 0);
  int32_t* start = host_meta_.data();
  int32_t* count = start + n;
  int32_t* row = count + n;
  const int page_offset = 3 * n, residual_offset = 4 * n + 1, flushing = 5 * n + 2;
  std::vector<int32_t> pages, residual, tiles;
  int rows = 0, max_len = 0;
  const int query_tile = prefill_variant_ == cuda::PrefillAttentionVariant::kTensor
                             ? cuda::kPrefillQueryTile
                             : cuda::kAttentionQueryTile;
  // The step's single-token items go first in the metadata (their rows stay where the items put
  // them), so that decode_attention runs them as the batch's first decode_items_ items, and the
  // prefill kernel's tiles cover the others: a decode item of a step that also carries prompt
  // chunks is attended as in a decode step, not as a one-query tile of the prefill kernel, which
  // would read a KIVI page element by element.
  const bool decode_kernel = cuda::decode_attention_supported(view_);
  std::vector<int> order, first_row(n);
  order.reserve(n);
  size_t page_ids = 0, slot_ids = 0;
  for (int i = 0; i < n; ++i) {
    first_row[i] = rows;
    rows += static_cast<int>(items[i].tokens.size());
    if (decode_kernel && items[i].tokens.size() == 1) order.push_back(i);
    page_ids += items[i].blocks.pages.size;
    slot_ids += items[i].blocks.residual_slots.size;
  }
  // A decode step of hundreds of KIVI sequences carries tens of thousands of slot ids: one
  // allocation each, not a doubling series.
  pages.reserve(page_ids);
  residual.reserve(slot_ids);
  decode_items_ = static_cast<int>(order.size());
  decode_ = n > 0 && decode_items_ == n;
  for (int i = 0; i < n; ++i) {
    if (!decode_kernel || items[i].tokens.size() != 1) order.push_back(i);
  }
  int decode_max_len = 0;
  max_paged_tokens_ = 0;
  for (int i = 0; i < n; ++i) {
    const ForwardItem& item = items[order[i]];
    const BlockTableView& seq = item.blocks;
    const int tokens = static_cast<int>(item.tokens.size());
    if (item.start + tokens > seq.length) {
      throw std::logic_error("KV cache: append beyond the reserved length of the sequence");
    }
    max_len = std::max(max_len, item.start + tokens);
    const int paged_tokens =
        paged_token_count(config_, item.start + tokens) - paged_token_count(config_, item.start);
    max_paged_tokens_ = std::max(max_paged_tokens_, paged_tokens);
    if (paged_tokens > 0) {
      int32_t& listed = host_meta_[flushing];
      host_meta_[flushing + 1 + listed] = i;
      ++listed;
    }
    if (i < decode_items_) decode_max_len = max_len;
    start[i] = item.start;
    count[i] = tokens;
    row[i] = first_row[order[i]];
    host_meta_[page_offset + i] = static_cast<int32_t>(pages.size());
    host_meta_[residual_offset + i] = static_cast<int32_t>(residual.size());
    pages.insert(pages.end(), seq.pages.begin(), seq.pages.end());
    residual.insert(residual.end(), seq.residual_slots.begin(), seq.residual_slots.end());
    if (i < decode_items_) continue;
    for (int q = 0; q < tokens; q += query_tile) {
      tiles.push_back(i);
      tiles.push_back(q);
    }
  }
  host_meta_[page_offset + n] = static_cast<int32_t>(pages.size());
  // An int8 or KIVI item of more than one query tile would have each of its tiles dequantize its
  // pages again: its pages below paged(start + count) are dequantized once per layer instead.
  std::vector<int32_t> first_scratch, scratch_pages;
  if (!decode_ && prefill_variant_ == cuda::PrefillAttentionVariant::kTensor &&
      view_.kind != cuda::KvKind::kFp16) {
    first_scratch.assign(n, -1);
    for (int i = 0; i < n; ++i) {
      if (count[i] <= cuda::kPrefillQueryTile) continue;
      const int paged = paged_token_count(config_, start[i] + count[i]);
      const int page_count = (paged + view_.page_tokens - 1) / view_.page_tokens;
      if (page_count == 0) continue;
      first_scratch[i] = static_cast<int32_t>(scratch_pages.size() / 2);
      for (int p = 0; p < page_count; ++p) {
        scratch_pages.push_back(i);
        scratch_pages.push_back(p);
      }
    }
  }
  for (int i = 0; i < n; ++i) host_meta_[residual_offset + i] += static_cast<int32_t>(pages.size());
  host_meta_[residual_offset + n] = static_cast<int32_t>(pages.size() + residual.size());
  measures_errors_ = kv_error_step_sampled(error_sample_rate_, ++step_);
  // In a decode step only decode_attention reads the new rows before kv_store_residual stores
  // them (kv_quantize_pages and the error sampler read the flushed, older tokens), so it can
  // quantize them where it reads them, and store them: kv_store_residual only copies each item's
  // row into its slot (kernels/residual_order.h), no row moving. kv_quantize_pages then runs for
  // the flushing items alone (about one in G at mixed lengths; none in most steps of a batch of
  // equal lengths, which launch no write path at all): a grid over every item cost more in blocks
  // that found nothing to do than the flush itself. Steps that measure errors (rare, and run
  // without graphs) keep every launch for every item.
  const bool new_rows_in_attention =
      decode_ && view_.kind == cuda::KvKind::kKivi && !measures_errors_;
  decode_new_rows_.quantize = new_rows_in_attention && view_.residual_int8;
  decode_new_rows_.store = new_rows_in_attention;
  flushing_items_ = host_meta_[flushing];
  host_meta_.insert(host_meta_.end(), step_indices.begin(), step_indices.end());
  host_meta_.insert(host_meta_.end(), pages.begin(), pages.end());
  host_meta_.insert(host_meta_.end(), residual.begin(), residual.end());
  const size_t tiles_at = host_meta_.size();
  host_meta_.insert(host_meta_.end(), tiles.begin(), tiles.end());
  const size_t scratch_at = host_meta_.size();
  num_scratch_pages_ = static_cast<int>(scratch_pages.size() / 2);
  if (num_scratch_pages_ > 0) {
    host_meta_.insert(host_meta_.end(), first_scratch.begin(), first_scratch.end());
    host_meta_.insert(host_meta_.end(), scratch_pages.begin(), scratch_pages.end());
  }

  // The previous prepare()'s copy may still be queued behind its step's kernels (a caller that
  // does not wait for each step, as the engine does): overwriting the pinned buffer before that
  // copy has run would hand the previous step this step's block tables.
  KVSERVE_CUDA_CHECK(cudaEventSynchronize(meta_uploaded_));
  int32_t* pinned = pinned_meta_.reserve(host_meta_.size());
  // Distinct sequences hold distinct pages and slots, so a step's page ids fit in num_blocks and
  // its slot ids in num_blocks * c: room for that many keeps the buffer (and the graphs that
  // address it) in place as contexts grow.
  const size_t ids = pages.size() + residual.size();
  const size_t most_ids =
      static_cast<size_t>(num_blocks_) * (1 + static_cast<size_t>(view_.residual_tokens_per_block));
  int32_t* device = device_meta_.reserve(host_meta_.size() + std::max(ids, most_ids) - ids);
  std::memcpy(pinned, host_meta_.data(), host_meta_.size() * sizeof(int32_t));
  KVSERVE_CUDA_CHECK(cudaMemcpyAsync(device, pinned, host_meta_.size() * sizeof(int32_t),
                                     cudaMemcpyHostToDevice, stream));
  KVSERVE_CUDA_CHECK(cudaEventRecord(meta_uploaded_, stream));
  batch_.items = n;
  rows_ = rows;
  batch_.start = device;
  batch_.count = device + n;
  batch_.row = device + 2 * n;
  batch_.page_offset = device + page_offset;
  batch_.residual_offset = device + residual_offset;
  batch_.flushing = decode_new_rows_.store ? device + flushing : nullptr;
  batch_.pages = device + ids_at;
  batch_.residual_slots = device + ids_at;
  tiles_ = device + tiles_at;
  num_tiles_ = static_cast<int>(tiles.size() / 2);
  batch_.new_codes = nullptr;
  batch_.new_params = nullptr;
  if (view_.residual_int8) {
    // u8 [rows][2][H][D] codes, then fp16 pairs [rows][2][H]. Room for the larger of this step
    // and num_blocks rows, so that decode steps (and their graphs) keep the buffer in place.
    const size_t row_pairs = 2 * static_cast<size_t>(std::max(rows, num_blocks_)) * view_.n_head;
    uint32_t* buffer = new_rows_.reserve(row_pairs * (view_.head_dim / 4 + 1));
    batch_.new_codes = reinterpret_cast<uint8_t*>(buffer);
    batch_.new_params = buffer + row_pairs * (view_.head_dim / 4);
  }
  dequantized_ = {};
  scratch_pages_ = nullptr;
  if (num_scratch_pages_ > 0) {
    dequantized_.first_page = device + scratch_at;
    scratch_pages_ = device + scratch_at + n;
    dequantized_.scratch = scratch_.reserve(static_cast<size_t>(num_scratch_pages_) *
                                            cuda::dequantized_page_elements(view_));
  }
  if (decode_items_ > 0) {
    decode_split_ =
        cuda::decode_attention_split(decode_items_, view_.n_head, decode_max_len, sm_count_);
    if (decode_split_.splits > 1) {
      decode_partial_.reserve(static_cast<size_t>(decode_items_) * view_.n_head *
                              decode_split_.splits * (view_.head_dim + 2));
    }
  }
  return device + header;
}

void CudaKvCache::append_and_attend(int layer, const __half* qkv, __half* out,
                                    cudaStream_t stream) {
  if (layer < 0 || layer >= n_layer_) throw std::out_of_range("KV cache: layer out of range");
  cuda::KvCacheView view = view_;
  view.blocks = pool_ + layer * layer_bytes_;
  const int qkv_stride = 3 * channels_;
  if (!decode_new_rows_.quantize) {
    cuda::kv_quantize_residual(view, batch_, qkv, qkv_stride, rows_, stream);
  }
  if (!decode_new_rows_.store || flushing_items_ > 0) quantize_pages(layer, qkv, stream);
  if (measures_errors_) {
    cuda::kv_quantization_error(view, batch_, qkv, qkv_stride, error_bins_.get(), stream);
    if (layer == n_layer_ - 1) {  // the step's errors, read by take_errors after its sync
      KVSERVE_CUDA_CHECK(cudaMemcpyAsync(error_bins_host_.get(), error_bins_.get(),
                                         sizeof(cuda::KvErrorDeviceBins), cudaMemcpyDeviceToHost,
                                         stream));
      KVSERVE_CUDA_CHECK(
          cudaMemsetAsync(error_bins_.get(), 0, sizeof(cuda::KvErrorDeviceBins), stream));
    }
  }
  attend(layer, qkv, out, stream);
  if (!decode_new_rows_.store) cuda::kv_store_residual(view, batch_, qkv, qkv_stride, stream);
}

void CudaKvCache::quantize_pages(int layer, const __half* qkv, cudaStream_t stream,
                                 int chunk_tokens) {
  if (layer < 0 || layer >= n_layer_) throw std::out_of_range("KV cache: layer out of range");
  cuda::KvCacheView view = view_;
  view.blocks = pool_ + layer * layer_bytes_;
  if (chunk_tokens == 0) chunk_tokens = cuda::kv_quantize_pages_chunk_tokens(view);
  cuda::kv_quantize_pages(view, batch_, qkv, 3 * channels_, max_paged_tokens_, chunk_tokens,
                          stream);
}

void CudaKvCache::attend(int layer, const __half* qkv, __half* out, cudaStream_t stream) {
  if (layer < 0 || layer >= n_layer_) throw std::out_of_range("KV cache: layer out of range");
  cuda::KvCacheView view = view_;
  view.blocks = pool_ + layer * layer_bytes_;
  const int qkv_stride = 3 * channels_;
  if (decode_items_ > 0) {
    cuda::KvBatchView decode_batch = batch_;
    decode_batch.items = decode_items_;
    cuda::decode_attention(view, decode_batch, decode_split_, qkv, qkv_stride, out, channels_,
                           decode_partial_.get(), decode_variant_, decode_new_rows_, stream);
  }
  if (num_tiles_ == 0) return;
  if (prefill_variant_ == cuda::PrefillAttentionVariant::kTensor) {
    cuda::kv_dequantize_pages(view, batch_, scratch_pages_, num_scratch_pages_, scratch_.get(),
                              stream);
    cuda::prefill_attention(view, batch_, tiles_, num_tiles_, dequantized_, qkv, qkv_stride, out,
                            channels_, stream);
  } else {
    cuda::paged_attention(view, batch_, tiles_, num_tiles_, qkv, qkv_stride, out, channels_,
                          stream);
  }
}

void CudaKvCache::set_error_sample_rate(double rate) {
  if (const absl::Status problem = validate_kv_error_sample_rate(rate); !problem.ok()) {
    throw std::invalid_argument(std::string(problem.message()));
  }
  error_sample_rate_ = rate;
  if (rate == 0.0) return;
  KVSERVE_CUDA_CHECK(cudaMemset(error_bins_.reserve(1), 0, sizeof(cuda::KvErrorDeviceBins)));
  std::memset(error_bins_host_.reserve(1), 0, sizeof(cuda::KvErrorDeviceBins));
}

void CudaKvCache::take_errors(KvQuantizationErrors& errors) {
  if (error_sample_rate_ == 0.0) return;
  cuda::KvErrorDeviceBins& step = *error_bins_host_.get();
  KvErrorBins* kinds[2] = {&errors.key_bins, &errors.value_bins};
  for (int which = 0; which < 2; ++which) {
    for (int k = 0; k <= kKvErrorBuckets; ++k) kinds[which]->counts[k] += step.counts[which][k];
    kinds[which]->sum += step.sum[which];
  }
  // A step that fails before its last layer copies nothing: it must not count this one again.
  std::memset(&step, 0, sizeof(step));
}

void CudaKvCache::copy_blocks(const std::vector<BlockCopy>& copies, cudaStream_t stream) {
  const size_t block_bytes = static_cast<size_t>(view_.block_bytes);
  for (const BlockCopy& copy : copies) {
    check_block_copy(copy, num_blocks_, block_bytes);
    if (copy.bytes == 0) continue;
    KVSERVE_CUDA_CHECK(
        cudaMemcpy2DAsync(pool_ + copy.dst * block_bytes + copy.dst_offset, layer_bytes_,
                          pool_ + copy.src * block_bytes + copy.src_offset, layer_bytes_,
                          copy.bytes, n_layer_, cudaMemcpyDeviceToDevice, stream));
  }
}

std::vector<uint8_t> CudaKvCache::download(cudaStream_t stream) const {
  std::vector<uint8_t> out(bytes_);
  KVSERVE_CUDA_CHECK(cudaMemcpyAsync(out.data(), pool_, bytes_, cudaMemcpyDeviceToHost, stream));
  KVSERVE_CUDA_CHECK(cudaStreamSynchronize(stream));
  return out;
}

}  // namespace kvserve
