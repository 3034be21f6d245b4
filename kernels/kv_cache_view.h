// What the KV cache kernels see of the paged cache: one layer's blocks and the page geometry
// (engine/kv_format.h), and one step's batch: where each item's tokens sit and its block tables.
// Small POD structs passed by value, as TensorRT-LLM's KVBlockArray: the kernels know nothing of
// sequences, requests or the block allocator.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace kvserve::cuda {

enum class KvKind : int32_t { kFp16, kInt8, kKivi };

// One layer of the pool. Offsets and sizes are in bytes inside one block of this layer.
struct KvCacheView {
  uint8_t* blocks = nullptr;  // [num_blocks][block_bytes] of this layer
  int64_t block_bytes = 0;
  int64_t key_codes = 0;     // fp16 [H][P][D] | u8 [H][P][D] | u32 [H][D][P*b/32] (kivi)
  int64_t key_params = 0;    // pairs [H][P] (int8, fp16) | [H][D][P/G] (kivi, fp16 or fp8)
  int64_t value_codes = 0;   // fp16 [H][P][D] | u8 [H][P][D] | u32 [H][P][D*b/32] (kivi)
  int64_t value_params = 0;  // pairs [H][P] (int8, fp16) | [H][P][D/GV] (kivi, fp16 or fp8)
  KvKind kind = KvKind::kFp16;
  int32_t bits = 16;  // 16, 8, 4 or 2
  int32_t n_head = 0;
  int32_t head_dim = 0;
  int32_t page_tokens = 0;                // P
  int32_t key_group = 0;                  // G (kivi)
  int32_t value_group = 0;                // GV (kivi)
  int32_t residual = 0;                   // R (kivi)
  int32_t residual_tokens_per_block = 0;  // c: slots of a residual block, each keys or values of
  int64_t residual_slot_bytes = 0;        //    one token, every head, this many bytes apart:
  int64_t residual_params = 0;            //    fp16 [H][D], or u8 [H][D] + fp16 pairs [H] here
  bool per_token_keys = false;            // kivi ablation: keys laid out like values
  bool params_fp8 = false;     // kivi: (scale, zero) pairs are two fp8 e4m3 bytes, not two fp16
  bool residual_int8 = false;  // kivi: the residual is int8 per token and head (see above)
};

// One step: item i feeds positions [start[i], start[i] + count[i]) of one sequence, whose rows
// in the step's qkv and attention output start at row[i]. All pointers are device memory; pages
// and residual_slots may point at one array that holds both (the offsets tell the parts apart).
struct KvBatchView {
  int32_t items = 0;
  const int32_t* start = nullptr;            // [items]
  const int32_t* count = nullptr;            // [items]
  const int32_t* row = nullptr;              // [items]
  const int32_t* page_offset = nullptr;      // [items + 1] into pages
  const int32_t* pages = nullptr;            // logical page -> block id, items concatenated
  const int32_t* residual_offset = nullptr;  // [items + 1] into residual_slots
  // kivi: slot ids (block * c + index) [keys 0, values 0, keys 1, ...], items concatenated
  const int32_t* residual_slots = nullptr;
  // int8 residual: the step's new keys and values quantized to int8 as they enter the window
  // (kv_quantize_residual, or in a decode step decode_attention: DecodeNewRows), read by every
  // kernel of the step before kv_store_residual stores them into the residual blocks. Indexed by
  // the step's rows (row[i] + position - start[i]).
  uint8_t* new_codes = nullptr;    // u8 [rows][2 (keys, values)][H][D]
  uint32_t* new_params = nullptr;  // fp16 (scale, zero) pairs [rows][2][H]
  // A decode step whose kv_quantize_pages runs for the items that flush a group at this step
  // alone, decode_attention storing every item's new row (DecodeNewRows::store): [1 + items], the
  // count, then those items in ascending order. Null: the write path runs for every item.
  const int32_t* flushing = nullptr;
};

// Launcher precondition check shared by the KV cache kernels: throws std::invalid_argument naming
// the operation and what is wrong.
inline void check_kv_launch(const char* op, const KvCacheView& c, const KvBatchView& b,
                            const void* qkv, int qkv_stride) {
  auto fail = [op](const std::string& what) {
    throw std::invalid_argument(std::string(op) + ": " + what);
  };
  if (b.items < 0) fail("negative item count");
  if (b.items == 0) return;
  if (c.blocks == nullptr || qkv == nullptr) fail("null pool or qkv pointer");
  if (!b.start || !b.count || !b.row || !b.page_offset || !b.pages || !b.residual_offset)
    fail("null batch pointer");
  if (c.n_head <= 0 || c.head_dim <= 0 || c.page_tokens <= 0) fail("empty geometry");
  if (qkv_stride < 3 * c.n_head * c.head_dim) fail("qkv row stride below 3 * n_head * head_dim");
  const int expected_bits = c.kind == KvKind::kFp16 ? 16 : c.kind == KvKind::kInt8 ? 8 : c.bits;
  if (c.bits != expected_bits || (c.kind == KvKind::kKivi && c.bits != 2 && c.bits != 4))
    fail("bits " + std::to_string(c.bits) + " do not match the format");
  if (c.kind == KvKind::kKivi) {
    const int per_word = 32 / c.bits;
    if (c.key_group <= 0 || c.key_group % per_word != 0 || c.page_tokens % c.key_group != 0 ||
        c.value_group <= 0 || c.value_group % per_word != 0 || c.head_dim % c.value_group != 0 ||
        c.residual <= 0 || c.residual_tokens_per_block <= 0 || c.residual_slot_bytes <= 0 ||
        b.residual_slots == nullptr)
      fail("inconsistent KIVI geometry (groups, page size, residual)");
    if (c.residual_int8 && (c.residual_params <= 0 || !b.new_codes || !b.new_params))
      fail("int8 residual without its parameters or the step's quantized rows");
  }
}

}  // namespace kvserve::cuda
