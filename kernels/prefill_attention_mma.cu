// Prefill attention on tensor cores (FlashAttention-2 style), one kernel specialised on the cache
// format, dispatched in one place (prefill_attention below).
//
// A block of 4 warps takes 64 queries of one item and one head, 16 per warp, whose q stays in
// registers as the A operand of mma.m16n8k16 (kernels/mma.cuh has the fragment layouts). The keys
// are walked in tiles of 64: a tile's keys and values are written into shared memory as fp16 once
// for the whole block, either in their page form (read from pages, dequantized for KIVI and int8)
// or in their fp16 form (the old residual, or this step's k/v straight from qkv), and each warp
// then computes its 16 x 64 scores on tensor cores, runs the online softmax on them in fp32 and
// adds P V on tensor cores. Which form a query reads a key in is the contract of paged_attention:
// page form below paged(t + 1), fp16 form from there to t; a tile that some queries read in one
// form and others in the other (a flush inside a prefill chunk) is loaded and attended twice, once
// per form, each pass masking the keys its queries do not read in that form.
//
// Precision: q, fp16 pages and the fp16 window are exact in fp16. An int8 residual's window keeps
// its key codes (integers, exact in fp16) as the keys and each row's (scale, zero) beside them:
// q . k = scale (q . codes) + zero sum(q), one mma where split keys take two; its values are
// dequantized in fp32 and split like dequantized pages. Keys and values dequantized from
// int8 or KIVI pages are fp32 (code * scale + zero, as the CPU computes them) and are not: they are
// split into a high and a low fp16 part (x = hi + lo to about 2^-22 relative), and Q K and P V take
// one mma per part. Rounding them to one fp16 moved attention outputs by up to 3.2e-3 where the
// CPU gives 0.06 (int8, GpuKvCache tests on an H100), beyond the GPU tests' tolerance. The
// probabilities P are rounded to fp16 (the sum divides by the rounded values).
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/cuda_check.h"
#include "kernels/fp16_split.cuh"
#include "kernels/kv_cache_device.cuh"
#include "kernels/kv_dequantize_pages.h"
#include "kernels/mma.cuh"
#include "kernels/prefill_attention.h"

namespace kvserve::cuda {
namespace {

constexpr int kD = 64;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpRows = 16;  // queries of a warp: the m of m16n8k16
static_assert(kWarps * kWarpRows == kPrefillQueryTile, "16 queries per warp");
constexpr int kKeyTile = 64;
// A shared row is 64 channels + 8 halves of padding (144 bytes): the 8 rows that one ldmatrix
// phase reads start 4 banks apart, so they hit 32 distinct banks.
constexpr int kRowHalves = kD + 8;
constexpr float kLog2e = 1.4426950408889634f;

// One tile of keys and values in fp16, as the mma operands read them; the low parts only for
// dequantized pages (key = keys + keys_low, value = values + values_low).
struct SharedTile {
  __half keys[kKeyTile][kRowHalves];        // fp16 [key][channel]: B of Q K^T via ldmatrix
  __half values[kKeyTile][kRowHalves];      // fp16 [key][channel]: B of P V via ldmatrix.trans
  __half keys_low[kKeyTile][kRowHalves];    // fp16 [key][channel]: key - keys, rounded
  __half values_low[kKeyTile][kRowHalves];  // fp16 [key][channel]: value - values, rounded
  float2 key_pairs[kKeyTile];               // int8 window: (scale, zero) [key] of the key codes
};

enum class Form { kPage, kWindow };

// How a tile holds its keys and values: exact fp16 (fp16 pages, the fp16 window); both split into
// high and low parts (dequantized pages); or an int8 window's key codes with their pairs and
// split values.
enum class TileParts { kExact, kSplit, kInt8Keys };

// Keys and values [from, to) (within [k0, k0 + 64)) in their page form; the tile's other rows are
// zeroed, so that masked keys meet finite values (0 * NaN would poison P V).
template <KvKind KIND, int BITS>
__device__ __forceinline__ void load_page_tile(const KvCacheView& c, const int32_t* pages, int head,
                                               int k0, int from, int to, SharedTile& s) {
  if constexpr (KIND == KvKind::kFp16) {
    // fp16 [H][P][D] pages: 16-byte chunks, 8 per row.
#pragma unroll
    for (int e = threadIdx.x; e < kKeyTile * kD / 8; e += kThreads) {
      const int j = e / (kD / 8), chunk = e % (kD / 8), pos = k0 + j;
      uint4 k = make_uint4(0, 0, 0, 0), v = k;
      if (pos >= from && pos < to) {
        const uint8_t* page = block_ptr(c, pages[pos / c.page_tokens]);
        const int64_t at =
            ((static_cast<int64_t>(head) * c.page_tokens + pos % c.page_tokens) * kD + 8 * chunk) *
            static_cast<int64_t>(sizeof(__half));
        k = *reinterpret_cast<const uint4*>(page + c.key_codes + at);
        v = *reinterpret_cast<const uint4*>(page + c.value_codes + at);
      }
      *reinterpret_cast<uint4*>(&s.keys[j][8 * chunk]) = k;
      *reinterpret_cast<uint4*>(&s.values[j][8 * chunk]) = v;
    }
  } else {
    // KIVI keys per channel are packed along tokens: neighbouring lanes take neighbouring tokens
    // of one channel and share its code words and parameters. Values (and per-token keys) are
    // packed along channels: neighbouring lanes take neighbouring channels of one token.
    const bool keys_along_tokens = KIND == KvKind::kKivi && !c.per_token_keys;
    // Unrolled so that several elements' loads are in flight at once.
#pragma unroll 4
    for (int e = threadIdx.x; e < kKeyTile * kD; e += kThreads) {
      int j = e / kD, d = e % kD, pos = k0 + j;
      const bool value_read = pos >= from && pos < to;
      split_half(value_read ? paged_element<kD, KIND, BITS>(c, pages, head, pos, d, 1) : 0.0f,
                 s.values[j][d], s.values_low[j][d]);
      if (keys_along_tokens) {
        j = e % kKeyTile;
        d = e / kKeyTile;
        pos = k0 + j;
      }
      const bool key_read = pos >= from && pos < to;
      split_half(key_read ? paged_element<kD, KIND, BITS>(c, pages, head, pos, d, 0) : 0.0f,
                 s.keys[j][d], s.keys_low[j][d]);
    }
  }
}

// Keys and values [from, to) (within [k0, k0 + 64)) in their page form, high and low parts, from
// kv_dequantize_pages' scratch, whose page first + p holds the item's logical page p; 16-byte
// chunks. The tile's other rows are zeroed.
__device__ __forceinline__ void load_scratch_tile(const KvCacheView& c, const __half* scratch,
                                                  int first, int head, int k0, int from, int to,
                                                  SharedTile& s) {
  const int P = c.page_tokens;
  const int64_t part = static_cast<int64_t>(P) * kD;
#pragma unroll 2
  for (int e = threadIdx.x; e < kKeyTile * kD / 8; e += kThreads) {
    const int j = e / (kD / 8), chunk = e % (kD / 8), pos = k0 + j;
    uint4 k = make_uint4(0, 0, 0, 0), k_low = k, v = k, v_low = k;
    if (pos >= from && pos < to) {
      // fp16 [kDequantizedParts][P][D] of this page and head, at the row's chunk.
      const __half* row =
          scratch +
          (static_cast<int64_t>(first + pos / P) * c.n_head + head) * kDequantizedParts * part +
          (pos % P) * kD + 8 * chunk;
      k = *reinterpret_cast<const uint4*>(row);
      k_low = *reinterpret_cast<const uint4*>(row + part);
      v = *reinterpret_cast<const uint4*>(row + 2 * part);
      v_low = *reinterpret_cast<const uint4*>(row + 3 * part);
    }
    *reinterpret_cast<uint4*>(&s.keys[j][8 * chunk]) = k;
    *reinterpret_cast<uint4*>(&s.keys_low[j][8 * chunk]) = k_low;
    *reinterpret_cast<uint4*>(&s.values[j][8 * chunk]) = v;
    *reinterpret_cast<uint4*>(&s.values_low[j][8 * chunk]) = v_low;
  }
}

// Two int8 codes (bytes 0 and 2 of `word`, the others 0) as an fp16 pair: 1024 + code by its bits
// (0x6400 is 1024), less 1024, both exact.
__device__ __forceinline__ uint32_t code_pair_to_half2(uint32_t word) {
  const uint32_t biased = word | 0x64006400u;
  const __half2 codes =
      __hsub2(*reinterpret_cast<const __half2*>(&biased), __float2half2_rn(1024.0f));
  return *reinterpret_cast<const uint32_t*>(&codes);
}

// Keys and values [from, to) (within [k0, k0 + 64)) of an int8 residual window: the keys as their
// codes in fp16 with the row's (scale, zero) in key_pairs, the values dequantized in fp32 as the
// CPU reads them and split into high and low fp16 parts like dequantized pages. The tile's other
// rows are zeroed (pair (0, 0) for keys). A thread takes 8 channels of one row of keys or values:
// one lookup of the row's codes and pair, one 8-byte load of codes.
__device__ __forceinline__ void load_int8_window_tile(const KvWindow& w, int k0, int from, int to,
                                                      SharedTile& s) {
  static_assert(kD % 8 == 0, "8 channels a thread");
#pragma unroll 2
  for (int e = threadIdx.x; e < 2 * kKeyTile * kD / 8; e += kThreads) {
    const int which = e / (kKeyTile * kD / 8), j = e / (kD / 8) % kKeyTile;
    const int d0 = 8 * (e % (kD / 8)), pos = k0 + j;
    uint2 packed = make_uint2(0, 0);
    float2 p = make_float2(0.0f, 0.0f);
    if (pos >= from && pos < to) {
      const uint8_t* codes;
      __half2 pair;
      w.residual_int8_row(pos, which, codes, pair);
      packed = *reinterpret_cast<const uint2*>(codes + d0);
      p = __half22float2(pair);
    }
    if (which == 0) {
      // Channels d0 .. d0 + 7 in the order of the row: codes 0 and 1 of a word are its bytes 0, 1.
      const uint4 halves = make_uint4(code_pair_to_half2(__byte_perm(packed.x, 0, 0x7170)),
                                      code_pair_to_half2(__byte_perm(packed.x, 0, 0x7372)),
                                      code_pair_to_half2(__byte_perm(packed.y, 0, 0x7170)),
                                      code_pair_to_half2(__byte_perm(packed.y, 0, 0x7372)));
      *reinterpret_cast<uint4*>(&s.keys[j][d0]) = halves;
      if (d0 == 0) s.key_pairs[j] = p;
      continue;
    }
#pragma unroll
    for (int d = 0; d < 8; ++d) {
      const uint32_t word = d < 4 ? packed.x : packed.y;
      split_half(dequantize((word >> (8 * (d % 4))) & 0xffu, p.x, p.y), s.values[j][d0 + d],
                 s.values_low[j][d0 + d]);
    }
  }
}

// Keys and values [from, to) (within [k0, k0 + 64)) in their fp16 form, 16-byte chunks; the
// tile's other rows are zeroed.
__device__ __forceinline__ void load_window_tile(const KvWindow& w, int k0, int from, int to,
                                                 SharedTile& s) {
#pragma unroll
  for (int e = threadIdx.x; e < kKeyTile * kD / 8; e += kThreads) {
    const int j = e / (kD / 8), chunk = e % (kD / 8), pos = k0 + j;
    uint4 k = make_uint4(0, 0, 0, 0), v = k;
    if (pos >= from && pos < to) {
      k = *reinterpret_cast<const uint4*>(w.row(pos, 0) + 8 * chunk);
      v = *reinterpret_cast<const uint4*>(w.row(pos, 1) + 8 * chunk);
    }
    *reinterpret_cast<uint4*>(&s.keys[j][8 * chunk]) = k;
    *reinterpret_cast<uint4*>(&s.values[j][8 * chunk]) = v;
  }
}

// One warp's 16 queries: lane (g, t) holds rows g ("lo") and g + 8 ("hi") of the warp.
struct WarpRows {
  // A operand of Q K^T, fp16 q unscaled: q[kk] is the k-step of channels 16 kk .. 16 kk + 15,
  // registers a0 .. a3 of mma.cuh's layout (a row beyond the item's queries is 0).
  uint32_t q[kD / 16][4];
  // Positions of the rows (-1: no query) and their page limits paged(t + 1) (0: no query).
  int pos[2], paged_limit[2];
  // Output accumulator, fp32: n-tile nt (channels 8 nt ..) in mma.cuh's C/D layout.
  float o[kD / 8][4];
  // Running max (of the scores times log2(e) / sqrt(D)) and this lane's part of the running sum
  // of the fp16-rounded probabilities, per row.
  float max[2], sum[2];
  // sum(q) of each row over its channels, fp32: the zero's term of an int8 window key's score.
  float q_sum[2];
};

// Attends one warp's rows to the tile in shared memory (keys k0 .. k0 + 63) in `form`: a key j is
// read by row r in this form iff j < paged_limit[r] (page form) or paged_limit[r] <= j <= pos[r]
// (fp16 form). masked: whether some key of the tile is not read by some row (else the mask is
// skipped). kParts: how the tile holds keys and values; low parts add their own mma.
template <Form kForm, TileParts kParts>
__device__ __forceinline__ void attend_tile(WarpRows& w, const SharedTile& s, int k0, bool masked,
                                            int lane) {
  constexpr bool kLowKeys = kParts == TileParts::kSplit;
  constexpr bool kLowValues = kParts != TileParts::kExact;
  const int t = lane % 4;
  // Scores S = Q K^T, 16 x 64 in 8 n-tiles of 8 keys: s[nt] is mma.cuh's D layout.
  float scores[kKeyTile / 8][4];
#pragma unroll
  for (int nt = 0; nt < kKeyTile / 8; ++nt) {
    scores[nt][0] = scores[nt][1] = scores[nt][2] = scores[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; kk += 2) {
      // Matrix i (lanes 8 i ..): keys 8 nt .. 8 nt + 7, channels 16 kk + 8 i .. + 7, so r[0], r[1]
      // are b0, b1 of k-step kk and r[2], r[3] those of kk + 1.
      uint32_t b[4];
      ldmatrix_x4(b, &s.keys[8 * nt + lane % 8][16 * kk + 8 * (lane / 8)]);
      mma_m16n8k16(scores[nt], w.q[kk][0], w.q[kk][1], w.q[kk][2], w.q[kk][3], b[0], b[1]);
      mma_m16n8k16(scores[nt], w.q[kk + 1][0], w.q[kk + 1][1], w.q[kk + 1][2], w.q[kk + 1][3], b[2],
                   b[3]);
      if constexpr (kLowKeys) {
        ldmatrix_x4(b, &s.keys_low[8 * nt + lane % 8][16 * kk + 8 * (lane / 8)]);
        mma_m16n8k16(scores[nt], w.q[kk][0], w.q[kk][1], w.q[kk][2], w.q[kk][3], b[0], b[1]);
        mma_m16n8k16(scores[nt], w.q[kk + 1][0], w.q[kk + 1][1], w.q[kk + 1][2], w.q[kk + 1][3],
                     b[2], b[3]);
      }
    }
  }
  // Scale into the exp2 domain and mask; register e of an n-tile is row e / 2, key 2 t + e % 2.
  const float scale = kLog2e / sqrtf(static_cast<float>(kD));
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < kKeyTile / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = scores[nt][e];
      if constexpr (kParts == TileParts::kInt8Keys) {
        const float2 pair = s.key_pairs[8 * nt + 2 * t + e % 2];
        x = pair.x * x + pair.y * w.q_sum[e / 2];
      }
      x *= scale;
      if (masked) {
        const int r = e / 2, key = k0 + 8 * nt + 2 * t + e % 2;
        const bool read = kForm == Form::kPage ? key < w.paged_limit[r]
                                               : key >= w.paged_limit[r] && key <= w.pos[r];
        if (!read) x = -INFINITY;
      }
      scores[nt][e] = x;
      tile_max[e / 2] = fmaxf(tile_max[e / 2], x);
    }
  }
  // The row's max over its 4 lanes (t = 0 .. 3 hold its 64 keys), the rescale of what was summed.
  float base[2], rescale[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
    const float new_max = fmaxf(w.max[r], tile_max[r]);
    // A row with no key yet keeps max -inf: exponents against 0 give 0 instead of NaN.
    base[r] = new_max == -INFINITY ? 0.0f : new_max;
    rescale[r] = exp2f(w.max[r] - base[r]);
    w.max[r] = new_max;
    w.sum[r] *= rescale[r];
  }
#pragma unroll
  for (int nt = 0; nt < kD / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) w.o[nt][e] *= rescale[e / 2];
  }
  // P in fp16 as the A operand of P V: n-tiles 2 kk and 2 kk + 1 of the scores are k-step kk
  // (keys 16 kk ..): a0 = row lo keys 2t, 2t+1 of n-tile 2 kk, a1 = row hi of it, a2, a3 the
  // same of n-tile 2 kk + 1. The sum takes the rounded values, so that the output is an exact
  // weighted mean of the values with the weights the tensor cores used.
  uint32_t p[kKeyTile / 8][2];
#pragma unroll
  for (int nt = 0; nt < kKeyTile / 8; ++nt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const __half2 h = __floats2half2_rn(exp2f(scores[nt][2 * r] - base[r]),
                                          exp2f(scores[nt][2 * r + 1] - base[r]));
      const float2 rounded = __half22float2(h);
      w.sum[r] += rounded.x + rounded.y;
      p[nt][r] = *reinterpret_cast<const uint32_t*>(&h);
    }
  }
  // O += P V: B = values [key][channel], transposed by ldmatrix.trans. Matrix i (lanes 8 i ..):
  // keys 16 kk + 8 (i % 2) .., channels 8 (2 np + i / 2) .., so r[0], r[1] are b0, b1 of n-tile
  // 2 np and r[2], r[3] those of 2 np + 1.
#pragma unroll
  for (int kk = 0; kk < kKeyTile / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < kD / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(
          b, &s.values[16 * kk + lane % 8 + 8 * ((lane / 8) % 2)][8 * (2 * np + lane / 16)]);
      mma_m16n8k16(w.o[2 * np], p[2 * kk][0], p[2 * kk][1], p[2 * kk + 1][0], p[2 * kk + 1][1],
                   b[0], b[1]);
      mma_m16n8k16(w.o[2 * np + 1], p[2 * kk][0], p[2 * kk][1], p[2 * kk + 1][0], p[2 * kk + 1][1],
                   b[2], b[3]);
      if constexpr (kLowValues) {
        ldmatrix_x4_trans(
            b, &s.values_low[16 * kk + lane % 8 + 8 * ((lane / 8) % 2)][8 * (2 * np + lane / 16)]);
        mma_m16n8k16(w.o[2 * np], p[2 * kk][0], p[2 * kk][1], p[2 * kk + 1][0], p[2 * kk + 1][1],
                     b[0], b[1]);
        mma_m16n8k16(w.o[2 * np + 1], p[2 * kk][0], p[2 * kk][1], p[2 * kk + 1][0],
                     p[2 * kk + 1][1], b[2], b[3]);
      }
    }
  }
}

template <KvKind KIND, int BITS>
__global__ void __launch_bounds__(kThreads)
    prefill_attention_kernel(const KvCacheView cache, const KvBatchView batch, const int32_t* tiles,
                             const DequantizedPages dequantized, const __half* qkv, int qkv_stride,
                             __half* out, int out_stride) {
  __shared__ __align__(16) SharedTile tile;

  const int item = tiles[2 * blockIdx.x], q0 = tiles[2 * blockIdx.x + 1];
  const int head = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int start = batch.start[item];
  const int queries = min(kPrefillQueryTile, batch.count[item] - q0);
  const int64_t row0 = static_cast<int64_t>(batch.row[item]) + q0;
  const int32_t* pages = batch.pages + batch.page_offset[item];
  // The item's first page in the scratch, or -1: its pages are dequantized here.
  const int first_scratch = KIND != KvKind::kFp16 && dequantized.first_page != nullptr
                                ? dequantized.first_page[item]
                                : -1;
  const KvWindow window = item_window(cache, batch, qkv, qkv_stride, item, head);
  const int first_pos = start + q0, last_pos = first_pos + queries - 1;
  // Keys below page_end are read in page form by some query of the block, keys from window_begin
  // to last_pos in fp16 form by some query (none outside KIVI: every key is paged at once).
  const int page_end = paged_count(cache, last_pos + 1);
  const int window_begin =
      cache.kind == KvKind::kKivi ? paged_count(cache, first_pos + 1) : last_pos + 1;

  // The warp's rows, and the same bounds for them alone (to skip tiles the warp does not read).
  WarpRows w;
  const int warp_rows = min(kWarpRows, queries - kWarpRows * warp);
  const int warp_first = first_pos + kWarpRows * warp, warp_last = warp_first + warp_rows - 1;
  const int warp_page_end = warp_rows > 0 ? paged_count(cache, warp_last + 1) : 0;
  const int warp_window_begin = warp_rows > 0 && cache.kind == KvKind::kKivi
                                    ? paged_count(cache, warp_first + 1)
                                    : warp_last + 1;
  const __half* q_rows[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = kWarpRows * warp + g + 8 * r;  // query index inside the block
    const bool valid = i < queries;
    w.pos[r] = valid ? first_pos + i : -1;
    w.paged_limit[r] = valid ? paged_count(cache, first_pos + i + 1) : 0;
    q_rows[r] = valid ? qkv + (row0 + i) * qkv_stride + head * kD : nullptr;
    w.max[r] = -INFINITY;
    w.sum[r] = 0.0f;
  }
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      // a0: row lo, channels 16 kk + 2t, +1; a1: row hi; a2, a3: the same 8 channels on.
      const __half* row = q_rows[a % 2];
      w.q[kk][a] =
          row ? *reinterpret_cast<const uint32_t*>(row + 16 * kk + 8 * (a / 2) + 2 * t) : 0u;
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // This lane's 16 channels of the row (registers a = r and r + 2 of every k-step), then the
    // row's 4 lanes.
    float q_sum = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
#pragma unroll
      for (int a = r; a < 4; a += 2) {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w.q[kk][a]));
        q_sum += f.x + f.y;
      }
    }
    q_sum += __shfl_xor_sync(0xffffffffu, q_sum, 1);
    w.q_sum[r] = q_sum + __shfl_xor_sync(0xffffffffu, q_sum, 2);
  }
#pragma unroll
  for (int nt = 0; nt < kD / 8; ++nt) w.o[nt][0] = w.o[nt][1] = w.o[nt][2] = w.o[nt][3] = 0.0f;

  for (int k0 = 0; k0 <= last_pos; k0 += kKeyTile) {
    const int k1 = min(k0 + kKeyTile, last_pos + 1);
    if (k0 < page_end) {
      __syncthreads();  // the previous pass is done with the tile
      if (first_scratch >= 0) {
        load_scratch_tile(cache, dequantized.scratch, first_scratch, head, k0, k0,
                          min(k1, page_end), tile);
      } else {
        load_page_tile<KIND, BITS>(cache, pages, head, k0, k0, min(k1, page_end), tile);
      }
      __syncthreads();
      if (k0 < warp_page_end) {
        // Unmasked when every row reads every key of the tile from pages.
        const bool masked = k0 + kKeyTile > paged_count(cache, warp_first + 1);
        attend_tile<Form::kPage, KIND == KvKind::kFp16 ? TileParts::kExact : TileParts::kSplit>(
            w, tile, k0, masked, lane);
      }
    }
    if (k1 > window_begin) {
      __syncthreads();
      const bool int8_window = KIND == KvKind::kKivi && cache.residual_int8;
      if (int8_window) {
        load_int8_window_tile(window, k0, max(k0, window_begin), k1, tile);
      } else {
        load_window_tile(window, k0, max(k0, window_begin), k1, tile);
      }
      __syncthreads();
      if (warp_rows > 0 && k0 <= warp_last && k0 + kKeyTile > warp_window_begin) {
        const bool masked =
            k0 < paged_count(cache, warp_last + 1) || k0 + kKeyTile - 1 > warp_first;
        if (int8_window) {
          attend_tile<Form::kWindow, TileParts::kInt8Keys>(w, tile, k0, masked, lane);
        } else {
          attend_tile<Form::kWindow, TileParts::kExact>(w, tile, k0, masked, lane);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = w.sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (w.pos[r] < 0) continue;
    const float inv = 1.0f / sum;
    __half* o = out + (row0 + kWarpRows * warp + g + 8 * r) * out_stride + head * kD + 2 * t;
#pragma unroll
    for (int nt = 0; nt < kD / 8; ++nt) {
      *reinterpret_cast<__half2*>(o + 8 * nt) =
          __floats2half2_rn(w.o[nt][2 * r] * inv, w.o[nt][2 * r + 1] * inv);
    }
  }
}

template <KvKind KIND, int BITS>
void launch(const KvCacheView& cache, const KvBatchView& batch, const int32_t* tiles, int num_tiles,
            const DequantizedPages& dequantized, const __half* qkv, int qkv_stride, __half* out,
            int out_stride, cudaStream_t stream) {
  prefill_attention_kernel<KIND, BITS><<<dim3(num_tiles, cache.n_head), kThreads, 0, stream>>>(
      cache, batch, tiles, dequantized, qkv, qkv_stride, out, out_stride);
}

}  // namespace

// ---- kernel launchers

bool prefill_attention_supported(const KvCacheView& c, int compute_capability_major) {
  const bool aligned = c.block_bytes % 16 == 0 && c.key_codes % 16 == 0 && c.key_params % 16 == 0 &&
                       c.value_codes % 16 == 0 && c.value_params % 16 == 0;
  return compute_capability_major >= 8 && c.head_dim == kD && aligned;
}

void prefill_attention(const KvCacheView& cache, const KvBatchView& batch, const int32_t* tiles,
                       int num_tiles, const DequantizedPages& dequantized, const __half* qkv,
                       int qkv_stride, __half* out, int out_stride, cudaStream_t stream) {
  check_kv_launch("prefill_attention", cache, batch, qkv, qkv_stride);
  if (num_tiles < 0 || (num_tiles > 0 && (tiles == nullptr || out == nullptr))) {
    throw std::invalid_argument("prefill_attention: null tiles or output");
  }
  if ((dequantized.first_page == nullptr) != (dequantized.scratch == nullptr) ||
      reinterpret_cast<uintptr_t>(dequantized.scratch) % 16 != 0) {
    throw std::invalid_argument(
        "prefill_attention: dequantized pages need both first pages and a 16-byte aligned scratch");
  }
  if (batch.items == 0 || num_tiles == 0) return;
  if (cache.head_dim != kD) {
    throw std::invalid_argument("prefill_attention: head_dim " + std::to_string(cache.head_dim) +
                                " is not supported (64 only)");
  }
  if (!prefill_attention_supported(cache, 8)) {
    throw std::invalid_argument(
        "prefill_attention: blocks, codes or parameters not 16-byte aligned");
  }
  if (qkv_stride % 8 != 0 || reinterpret_cast<uintptr_t>(qkv) % 16 != 0) {
    throw std::invalid_argument("prefill_attention: qkv rows must be 16-byte aligned");
  }
  if (out_stride < cache.n_head * kD || out_stride % 2 != 0 ||
      reinterpret_cast<uintptr_t>(out) % 4 != 0) {
    throw std::invalid_argument(
        "prefill_attention: output row stride below n_head * head_dim, odd, or unaligned");
  }
  switch (cache.kind) {
    case KvKind::kFp16:
      launch<KvKind::kFp16, 16>(cache, batch, tiles, num_tiles, dequantized, qkv, qkv_stride, out,
                                out_stride, stream);
      break;
    case KvKind::kInt8:
      launch<KvKind::kInt8, 8>(cache, batch, tiles, num_tiles, dequantized, qkv, qkv_stride, out,
                               out_stride, stream);
      break;
    case KvKind::kKivi:
      if (cache.bits == 4) {
        launch<KvKind::kKivi, 4>(cache, batch, tiles, num_tiles, dequantized, qkv, qkv_stride, out,
                                 out_stride, stream);
      } else {
        launch<KvKind::kKivi, 2>(cache, batch, tiles, num_tiles, dequantized, qkv, qkv_stride, out,
                                 out_stride, stream);
      }
      break;
  }
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
