// The paged KV cache of the CPU backend: host memory in the exact format of kv_format.h, the
// write path (append, flush a key group, store the residual rows) and attention that dequantizes
// page by page inside the loop, never materialising a dequantized copy of the cache.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

#include "engine/backend.h"
#include "engine/block_table.h"
#include "engine/kv_format.h"
#include "engine/kv_quantization_error.h"
#include "engine/model_config.h"

namespace kvserve {

class CpuKvCache {
 public:
  // Allocates n_layer * num_blocks * block_bytes of host memory, once.
  CpuKvCache(const KvCacheConfig& config, int32_t num_blocks, const ModelConfig& model);

  // One head of one sequence at one layer: appends the step's keys and values (positions
  // start .. start+count-1, within the blocks `seq` reserved) and writes the attention output of
  // the step's queries.
  //   qkv: [count][3C] rows (row stride qkv_stride floats) of the c_attn output: q | k | v
  //   out: [count][C]  rows (row stride out_stride); this head writes columns head*D .. head*D+D-1
  // Query at position t reads key/value j through its quantized form when j < paged(t + 1), and
  // through its fp16 form otherwise: decode and prefill (chunked or not) give the same result.
  void append_and_attend(int layer, int head, const BlockTableView& seq, int start, int count,
                         const float* qkv, int qkv_stride, float* out, int out_stride);

  // Copies each pair's src block over its dst block at every layer, in order.
  void copy_blocks(const std::vector<BlockCopy>& copies);

  // The sampled quantization error (engine/kv_quantization_error.h): the share of steps whose
  // flushed groups are measured, in [0, 1]; 0 (the default) measures nothing.
  void set_error_sample_rate(double rate) { error_sample_rate_ = rate; }
  // Called once per forward step, before its append_and_attend calls: the step's number picks
  // whether it is measured (kv_error_step_sampled, kernels/kv_error_sample.h).
  void begin_step() { ++step_; }
  // Moves the errors measured since the last call to the end of `errors`.
  void take_errors(KvQuantizationErrors& errors);

  size_t bytes() const { return storage_bytes_; }
  // The whole pool, [n_layer][num_blocks][block_bytes]: the CUDA cache is tested against it.
  const uint8_t* data() const { return storage_.get(); }

 private:
  uint8_t* block(int layer, int32_t id) {
    return storage_.get() + (static_cast<size_t>(layer) * num_blocks_ + id) * layout_.block_bytes;
  }
  void write_pages(int layer, int head, const BlockTableView& seq, int first, int last,
                   int window_start, const float* window_k, const float* window_v);
  void dequantize_page(int layer, int head, int32_t id, int valid, float* keys, float* values);
  // Measures every group of positions [first, last) (on a sampled step), just written into the
  // pages from the fp16 window (as write_pages takes it), by reading them back with
  // dequantize_page.
  void measure_flush_errors(int layer, int head, const BlockTableView& seq, int first, int last,
                            int window_start, const float* window_k, const float* window_v,
                            KvQuantizationErrors& errors);

  KvCacheConfig config_;
  KvPageLayout layout_;
  int n_head_, head_dim_, n_embd_, n_layer_;
  int32_t num_blocks_;
  size_t storage_bytes_;
  // [n_layer][num_blocks][block_bytes], zeroed by calloc: the OS maps pages lazily, so a large
  // pool costs no start-up time and no resident memory until it is used.
  std::unique_ptr<uint8_t, decltype(&std::free)> storage_;
  double error_sample_rate_ = 0.0;
  uint64_t step_ = 0;
  std::mutex errors_mutex_;  // append_and_attend runs in parallel over heads and items
  KvQuantizationErrors errors_;
};

}  // namespace kvserve
