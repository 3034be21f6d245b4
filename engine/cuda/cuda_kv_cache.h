// The paged KV cache of the CUDA backend: device memory in the exact format of kv_format.h (same
// block ids and layout as CpuKvCache), the step's block tables, and the write path and attention
// kernels run per layer.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "engine/backend.h"
#include "engine/cuda/device_buffer.h"
#include "engine/kv_format.h"
#include "engine/kv_quantization_error.h"
#include "engine/model_config.h"
#include "kernels/decode_attention.h"
#include "kernels/kv_cache_view.h"
#include "kernels/kv_quantization_error.h"
#include "kernels/prefill_attention.h"
#include "kernels/prefill_attention_variant.h"

namespace kvserve {

class CudaKvCache {
 public:
  // Allocates n_layer * num_blocks * block_bytes of device memory once, after checking that it
  // fits in the free memory of the current device. Decode steps of KIVI caches run the
  // decode_attention kernel `variant` names; the other steps run the kernel `prefill` names
  // (prefill_attention on tensor cores where the device and geometry allow it, else
  // paged_attention).
  CudaKvCache(const KvCacheConfig& config, int32_t num_blocks, const ModelConfig& model,
              cuda::DecodeAttentionVariant variant = cuda::DecodeAttentionVariant::kPacked,
              cuda::PrefillAttentionVariant prefill = cuda::PrefillAttentionVariant::kTensor);
  ~CudaKvCache();
  CudaKvCache(const CudaKvCache&) = delete;
  CudaKvCache& operator=(const CudaKvCache&) = delete;

  // Uploads the step's item geometry and block tables (the items' `blocks`) together with
  // `step_indices` (the caller's per-step ints: tokens, positions, ...) in one asynchronous copy;
  // the items' rows in qkv/out are consecutive in item order. Returns the device copy of
  // step_indices, valid until the next prepare(). Every device address the step's kernels get
  // (batch pointers, the returned one, decode_partial) depends only on the item count, the size
  // of step_indices and buffer_moves(), so decode steps can replay a captured CUDA graph.
  const int32_t* prepare(const std::vector<ForwardItem>& items, cudaStream_t stream,
                         const std::vector<int32_t>& step_indices = {});
  // Copies each pair's src block over its dst block at every layer, in order, on `stream`
  // (one strided device-to-device copy per pair: the layers are layer_bytes_ apart).
  void copy_blocks(const std::vector<BlockCopy>& copies, cudaStream_t stream);
  // One layer: quantizes the positions that enter pages, attends, stores the new residual rows.
  //   qkv: fp16 [rows][3C] (q | k | v, biases added)   out: fp16 [rows][C]
  void append_and_attend(int layer, const __half* qkv, __half* out, cudaStream_t stream);
  // The attention of append_and_attend alone, for benchmarks of the attention kernels: right only
  // once append_and_attend has run for the prepared step. The write path stays out, but for what
  // a KIVI decode step hands decode_attention (decode_new_rows(): its new rows, written again).
  void attend(int layer, const __half* qkv, __half* out, cudaStream_t stream);
  // The page write of append_and_attend alone (kv_quantize_pages), for benchmarks: chunks of
  // chunk_tokens positions per block (0: the kernel's default, as append_and_attend runs it; else
  // a multiple of the key group). Right only once append_and_attend has run for the prepared step.
  void quantize_pages(int layer, const __half* qkv, cudaStream_t stream, int chunk_tokens = 0);
  // The most positions any item of the prepared step moves into pages (sizes that kernel's grid).
  int max_paged_tokens() const { return max_paged_tokens_; }

  // Whether the prepared step is a decode step (every item one token) run by decode_attention,
  // and how that splits the contexts: what a CUDA graph of append_and_attend bakes in.
  bool decode_step() const { return decode_; }
  // The prepared step's items that decode_attention attends (its single-token items, where the
  // geometry allows the kernel), the rest going to the prefill kernel.
  int decode_items() const { return decode_items_; }
  // What the prepared step's decode_attention does with the new rows besides attending (a KIVI
  // decode step that does not measure errors): quantize an int8 residual's, in place of a
  // kv_quantize_residual launch; and store every item's into its residual slot, in place of a
  // kv_store_residual launch, kv_quantize_pages then running for the flushing items alone
  // (flushing_items()), or not at all where there are none. What a CUDA graph of the step bakes
  // in, with whether flushing_items() is 0.
  cuda::DecodeNewRows decode_new_rows() const { return decode_new_rows_; }
  // The prepared step's items that move positions into pages (flush a group, in a KIVI decode
  // step).
  int flushing_items() const { return flushing_items_; }
  cuda::DecodeSplit decode_split() const { return decode_split_; }
  cuda::DecodeAttentionVariant decode_attention_variant() const { return decode_variant_; }
  // The KIVI kernel that the prepared step's decode_attention runs (the variant asked for, or
  // kOnline where that kernel does not take the format or split), for tests and reports.
  cuda::DecodeAttentionVariant decode_attention_kernel() const {
    return cuda::decode_attention_kernel(view_, decode_split_, decode_variant_);
  }
  // Grows whenever a device buffer that append_and_attend's kernels address has moved.
  uint64_t buffer_moves() const {
    return device_meta_.moves() + decode_partial_.moves() + error_bins_.moves() + new_rows_.moves();
  }

  // The sampled quantization error (engine/kv_quantization_error.h): the share of steps whose
  // flushed groups are measured (kv_error_step_sampled), in [0, 1]; 0 (the default) launches
  // nothing.
  void set_error_sample_rate(double rate);
  // Whether the step prepare() set up measures its flushed groups: such a step runs eagerly, so
  // that no captured decode graph holds the measuring kernel.
  bool measures_errors() const { return measures_errors_; }
  // Adds the errors the last completed step measured to `errors`. Only after that step's
  // synchronising copy (forward's and forward_sample's last), as the Engine calls it.
  void take_errors(KvQuantizationErrors& errors);

  size_t bytes() const { return bytes_; }
  // Whether decode steps use decode_attention (else paged_attention), for tests.
  bool decode_attention_supported() const { return cuda::decode_attention_supported(view_); }
  // The kernel that runs the steps decode_attention does not: kTensor (prefill_attention) when
  // asked for and supported here, else kTiled (paged_attention).
  cuda::PrefillAttentionVariant prefill_attention_variant() const { return prefill_variant_; }
  // The whole pool, [n_layer][num_blocks][block_bytes], for tests.
  std::vector<uint8_t> download(cudaStream_t stream) const;

 private:
  KvCacheConfig config_;
  int32_t num_blocks_;
  cuda::KvCacheView view_;  // blocks points at layer 0
  int n_layer_, channels_;
  size_t layer_bytes_, bytes_;
  uint8_t* pool_ = nullptr;
  cuda::KvBatchView batch_;
  int max_paged_tokens_ = 0;  // max over the step's items of paged(start + count) - paged(start)
  int flushing_items_ = 0;    // items with paged(start + count) > paged(start)
  int num_tiles_ = 0;
  const int32_t* tiles_ = nullptr;  // [num_tiles][2]: (item, first query) of the prefill kernel
  // The step's pages that kv_dequantize_pages dequantizes for prefill_attention at each layer:
  // (item, logical page) pairs in device metadata, and the scratch they go to (grows, reused by
  // every layer; fp16 [pages][n_head][4][page_tokens][head_dim]).
  int num_scratch_pages_ = 0;
  const int32_t* scratch_pages_ = nullptr;
  cuda::DequantizedPages dequantized_;
  cuda::DeviceBuffer<__half> scratch_;
  // In a geometry decode_attention handles, the step's single-token items (the metadata's first
  // decode_items_) use it, split along the context as decode_split_ says; the other items use the
  // prefill kernel's tiles. decode_: every item is a single-token one (a decode step).
  int rows_ = 0;  // the prepared step's rows: every item's tokens
  int decode_items_ = 0;
  bool decode_ = false;
  cuda::DecodeNewRows decode_new_rows_;
  cuda::DecodeSplit decode_split_;
  cuda::DecodeAttentionVariant decode_variant_;
  cuda::PrefillAttentionVariant prefill_variant_;
  int sm_count_ = 0;
  cuda::DeviceBuffer<float> decode_partial_;  // [items][n_head][splits][head_dim + 2]
  // int8 residual: the step's new rows quantized (KvBatchView::new_codes and new_params).
  cuda::DeviceBuffer<uint32_t> new_rows_;
  std::vector<int32_t> host_meta_;
  cuda::PinnedBuffer<int32_t> pinned_meta_;
  cudaEvent_t meta_uploaded_ = nullptr;  // recorded after each prepare()'s copy from pinned_meta_
  cuda::DeviceBuffer<int32_t> device_meta_;
  // The sampled quantization error: the step counter that picks the measured steps, whether the
  // prepared step is one, and the device bins the last layer copies into pinned memory and then
  // clears.
  double error_sample_rate_ = 0.0;
  uint64_t step_ = 0;
  bool measures_errors_ = false;
  cuda::DeviceBuffer<cuda::KvErrorDeviceBins> error_bins_;
  cuda::PinnedBuffer<cuda::KvErrorDeviceBins> error_bins_host_;
};

}  // namespace kvserve
