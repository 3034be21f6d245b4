// Sampling on the GPU in three launches on one stream:
//  1. prepare, one block per row: rejects non-finite rows, the raw log-normaliser for the logprob,
//     the repetition penalty, and greedy rows end here (an argmax). A row that draws writes sort
//     keys whose descending order is engine/sampler.h's rank order (w desc, id asc): for its
//     top_k candidates alone when top-k is on (a radix select finds them), else for every id.
//  2. CUB's segmented radix sort, one segment per drawing row (empty for the others).
//  3. draw, one block per drawing row: walks the sorted keys in rank order: the softmax sum over
//     the candidates, the top-p cut and the draw, each running sum a block-wide scan in double
//     carried from tile to tile, stopping at the first tile that settles it.
// Without top-k the whole row is sorted: top-p alone may keep the whole vocabulary, and one path
// for it, on a sort that is not ours to debug, is worth more than the time a cut would save.
#include "kernels/sample_token.h"

#include <climits>
#include <cmath>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <stdexcept>
#include <string>

#include "kernels/cuda_check.h"

namespace kvserve::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr size_t kScratchAlignment = 256;

// ---- Rank keys: (monotone bits of w) << id_bits | (vocab - 1 - id), id_bits the width of
// vocab - 1, so that a larger key ranks first and the key fits 32 + id_bits bits, the only bits
// the sort looks at.

__device__ uint64_t rank_key(float w, int id, int id_bits, int vocab) {
  uint32_t bits = __float_as_uint(w);
  if (bits == 0x80000000u) bits = 0;  // -0 becomes +0: they compare equal, so the id orders them
  bits = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
  return (static_cast<uint64_t>(bits) << id_bits) | static_cast<uint64_t>(vocab - 1 - id);
}

__device__ float key_logit(uint64_t key, int id_bits) {
  const uint32_t bits = static_cast<uint32_t>(key >> id_bits);
  return __uint_as_float((bits & 0x80000000u) ? bits & 0x7FFFFFFFu : ~bits);
}

__device__ int key_id(uint64_t key, int id_bits, int vocab) {
  return vocab - 1 - static_cast<int>(key & ((uint64_t{1} << id_bits) - 1));
}

// e = exp((w - w_max) / temperature) in float, as sampler.cc computes it: the argument in float,
// then exp evaluated in double and rounded once, which gives the correctly rounded float that
// the host's expf gives too (barring a result within ~1e-16 of a rounding midpoint). expf on the
// GPU is off by up to 2 ulp, which would move the cumulative sums by ~1e-7, not ~1e-15.
__device__ float candidate_weight(float w, float w_max, float temperature) {
  return static_cast<float>(exp(static_cast<double>((w - w_max) / temperature)));
}

// ---- Block-wide reductions; every thread gets the result, and the shared arrays may be reused
// on return.

// The largest value, the lowest id on ties (ids of `vocab` stand for none).
__device__ void block_argmax(float& value, int& id, float* value_s, int* id_s) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, value, o);
    const int other_id = __shfl_xor_sync(0xffffffffu, id, o);
    if (other > value || (other == value && other_id < id)) {
      value = other;
      id = other_id;
    }
  }
  if (lane == 0) {
    value_s[warp] = value;
    id_s[warp] = id;
  }
  __syncthreads();
  value = value_s[0];
  id = id_s[0];
  for (int w = 1; w < kWarps; ++w) {
    if (value_s[w] > value || (value_s[w] == value && id_s[w] < id)) {
      value = value_s[w];
      id = id_s[w];
    }
  }
  __syncthreads();
}

// Summed in a fixed order, so every thread gets the same bits.
__device__ double block_sum(double value, double* sum_s) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int o = 16; o > 0; o >>= 1) value += __shfl_xor_sync(0xffffffffu, value, o);
  if (lane == 0) sum_s[warp] = value;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kWarps; ++w) total += sum_s[w];
  __syncthreads();
  return total;
}

// ---- Top-k selection: the k-th largest rank key of a row by a radix select, 8 bits a pass from
// the top, each pass a histogram of the next digit over the keys that match the digits chosen so
// far. Keys are unique (they hold the id), so exactly k keys are >= the result.

constexpr int kDigitBits = 8;
constexpr int kDigits = 1 << kDigitBits;

struct SelectShared {
  unsigned int histogram[kDigits];
  uint64_t prefix;
  int rank;   // of the sought key among the keys that match prefix, 0 = the largest
  int count;  // keys written so far by the compaction
};

// w: the row's [vocab] penalised logits. Every thread of the block calls it and gets the key.
__device__ uint64_t kth_largest_key(const float* w, int vocab, int id_bits, int k,
                                    SelectShared& s) {
  const int lane = threadIdx.x % 32;
  const int key_bits = 32 + id_bits;
  uint64_t prefix = 0;
  int rank = k - 1;
  for (int shift = (key_bits - 1) / kDigitBits * kDigitBits; shift >= 0; shift -= kDigitBits) {
    for (int d = threadIdx.x; d < kDigits; d += kThreads) s.histogram[d] = 0;
    __syncthreads();
    // The bits above this digit; a shift by 64 would be undefined.
    const uint64_t above = shift + kDigitBits >= 64 ? 0 : ~uint64_t{0} << (shift + kDigitBits);
    for (int base = 0; base < vocab; base += kThreads) {  // whole warps in every iteration
      const int v = base + threadIdx.x;
      bool counted = false;
      unsigned int digit = 0;
      if (v < vocab) {
        const uint64_t key = rank_key(w[v], v, id_bits, vocab);
        counted = (key & above) == (prefix & above);
        digit = static_cast<unsigned int>(key >> shift) & (kDigits - 1);
      }
      // Lanes with the same digit add once: a row's leading digits are shared by most ids.
      const unsigned int peers = __match_any_sync(0xffffffffu, counted ? digit : kDigits);
      if (counted && lane == __ffs(peers) - 1) atomicAdd(&s.histogram[digit], __popc(peers));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      // The sought key has `rank` matching keys above it: find its digit from the top.
      int above_count = 0, d = kDigits - 1;
      for (; d > 0; --d) {
        const int here = static_cast<int>(s.histogram[d]);
        if (above_count + here > rank) break;
        above_count += here;
      }
      s.prefix = prefix | (static_cast<uint64_t>(d) << shift);
      s.rank = rank - above_count;
    }
    __syncthreads();
    prefix = s.prefix;  // thread 0 writes these again only after the next pass's barriers
    rank = s.rank;
  }
  return prefix;
}

// Writes the keys >= threshold of the row to keys[0, count), in no order; returns the count.
__device__ int write_keys_from(const float* w, int vocab, int id_bits, uint64_t threshold,
                               uint64_t* keys, SelectShared& s) {
  const int lane = threadIdx.x % 32;
  if (threadIdx.x == 0) s.count = 0;
  __syncthreads();
  for (int base = 0; base < vocab; base += kThreads) {  // whole warps in every iteration
    const int v = base + threadIdx.x;
    uint64_t key = 0;
    if (v < vocab) key = rank_key(w[v], v, id_bits, vocab);
    const bool take = v < vocab && key >= threshold;
    const unsigned int taken = __ballot_sync(0xffffffffu, take);
    int first = 0;
    if (lane == 0 && taken != 0) first = atomicAdd(&s.count, __popc(taken));
    first = __shfl_sync(0xffffffffu, first, 0);
    if (take) keys[first + __popc(taken & ((1u << lane) - 1))] = key;
  }
  __syncthreads();
  return s.count;
}

// ---- CUDA kernels

// Steps 1, 2 and 4 of engine/sampler.h, and the sort keys of the rows that draw.
// penalised: fp32 [rows][vocab] scratch
// keys: [rows][vocab], a drawing row's keys from the start of its row, all vocab or top_k of them
// segment_begin, segment_end: [rows], the row's keys to sort (an empty range: nothing to draw)
// log_normaliser: [rows], l_max + log(sum exp(l - l_max)) of the raw logits, for drawing rows
__global__ void __launch_bounds__(kThreads)
    prepare_kernel(const float* logits, int vocab, int id_bits, const SampleRowParams* params,
                   const int32_t* history, float* penalised, uint64_t* keys, int* segment_begin,
                   int* segment_end, double* log_normaliser, int32_t* token, float* logprob,
                   int32_t* status) {
  __shared__ float best_s[kWarps];
  __shared__ int best_id_s[kWarps];
  __shared__ double sum_s[kWarps];
  __shared__ SelectShared select_s;
  const int row = blockIdx.x;
  const int64_t row_offset = static_cast<int64_t>(row) * vocab;
  const float* raw = logits + row_offset;
  const SampleRowParams p = params[row];
  auto finish_without_draw = [&](int32_t id, float id_logprob, int32_t row_status) {
    if (threadIdx.x == 0) {
      token[row] = id;
      logprob[row] = id_logprob;
      status[row] = row_status;
      segment_begin[row] = segment_end[row] = static_cast<int>(row_offset);
    }
  };

  // The raw maximum, the lowest id holding it, and what sample_token rejects: a +inf or no
  // finite value (the maximum skips NaNs), else a NaN.
  float best = -INFINITY;
  int best_id = vocab;
  int nan_seen = 0, posinf_seen = 0;
  for (int v = threadIdx.x; v < vocab; v += kThreads) {
    const float l = raw[v];
    nan_seen |= isnan(l);
    posinf_seen |= l == INFINITY;
    if (l > best) {  // ids rise along the loop, so the first strict maximum is the lowest id
      best = l;
      best_id = v;
    }
  }
  block_argmax(best, best_id, best_s, best_id_s);
  nan_seen = __syncthreads_or(nan_seen);
  posinf_seen = __syncthreads_or(posinf_seen);
  if (posinf_seen || best_id == vocab) {
    finish_without_draw(0, 0.0f, kSampleLogitsInfOrNoFinite);
    return;
  }
  if (nan_seen) {
    finish_without_draw(0, 0.0f, kSampleLogitsNan);
    return;
  }
  double partial = 0.0;
  for (int v = threadIdx.x; v < vocab; v += kThreads) partial += expf(raw[v] - best);
  const double row_log_normaliser = static_cast<double>(best) + log(block_sum(partial, sum_s));

  // The penalty, from the raw logit each time, so an id repeated in history is penalised once
  // (two threads writing one id write the same value).
  const float* w = raw;
  if (p.repetition_penalty != 1.0f && p.history_end > p.history_begin) {
    float* out = penalised + row_offset;
    for (int v = threadIdx.x; v < vocab; v += kThreads) out[v] = raw[v];
    __syncthreads();
    for (int h = p.history_begin + threadIdx.x; h < p.history_end; h += kThreads) {
      const int id = history[h];
      if (id < 0 || id >= vocab) continue;  // the caller rejects these; never write outside
      const float l = raw[id];
      out[id] = l > 0.0f ? l / p.repetition_penalty : l * p.repetition_penalty;
    }
    __syncthreads();
    w = out;
    best = -INFINITY;
    best_id = vocab;
    for (int v = threadIdx.x; v < vocab; v += kThreads) {
      if (w[v] > best) {
        best = w[v];
        best_id = v;
      }
    }
    block_argmax(best, best_id, best_s, best_id_s);
  }

  if (p.temperature == 0.0f) {
    finish_without_draw(best_id,
                        static_cast<float>(static_cast<double>(raw[best_id]) - row_log_normaliser),
                        kSampleOk);
    return;
  }
  // The keys to sort: the top-k candidates alone when top-k is on, else the whole row.
  int sorted_count = vocab;
  if (p.top_k > 0 && p.top_k < vocab) {
    const uint64_t kth_key = kth_largest_key(w, vocab, id_bits, p.top_k, select_s);
    sorted_count = write_keys_from(w, vocab, id_bits, kth_key, keys + row_offset, select_s);
  } else {
    for (int v = threadIdx.x; v < vocab; v += kThreads) {
      keys[row_offset + v] = rank_key(w[v], v, id_bits, vocab);
    }
  }
  if (threadIdx.x == 0) {
    segment_begin[row] = static_cast<int>(row_offset);
    segment_end[row] = static_cast<int>(row_offset + sorted_count);
    log_normaliser[row] = row_log_normaliser;
  }
}

// Step 3 of engine/sampler.h over a drawing row's keys, sorted in rank order, and the logprob.
// sorted_keys: [rows][vocab], each drawing row's segment sorted (its candidates, or every id)
__global__ void __launch_bounds__(kThreads)
    draw_kernel(const float* logits, int vocab, int id_bits, const SampleRowParams* params,
                const uint64_t* sorted_keys, const int* segment_begin, const int* segment_end,
                const double* log_normaliser, int32_t* token, float* logprob, int32_t* status) {
  using BlockScan = cub::BlockScan<double, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ double sum_s[kWarps];
  __shared__ int first_s;  // the first rank of a tile that meets the walk's condition
  __shared__ int last_possible_s;
  __shared__ double kept_mass_s;
  const int row = blockIdx.x;
  const int begin = segment_begin[row];
  if (segment_end[row] == begin) return;  // greedy, or rejected logits: prepare_kernel finished it
  const uint64_t* keys = sorted_keys + begin;
  const SampleRowParams p = params[row];
  const float w_max = key_logit(keys[0], id_bits);
  auto weight = [&](int rank) {
    return candidate_weight(key_logit(keys[rank], id_bits), w_max, p.temperature);
  };

  // 3a and 3b: the candidates and the sum of their weights.
  const int candidates = p.top_k > 0 && p.top_k < vocab ? p.top_k : vocab;
  double partial = 0.0;
  for (int j = threadIdx.x; j < candidates; j += kThreads) partial += weight(j);
  const double sum = block_sum(partial, sum_s);

  // 3c: keep the first `kept` candidates, J the first rank where the running sum c_j reaches
  // top_p; the kept mass M is c_J.
  int kept = candidates;
  double kept_mass = 1.0;
  if (p.top_p < 1.0f) {
    if (threadIdx.x == 0) first_s = INT_MAX;
    __syncthreads();
    double carry = 0.0;  // c before this tile
    bool reached = false;
    for (int base = 0; base < candidates; base += kThreads) {
      const int j = base + threadIdx.x;
      const double prob = j < candidates ? weight(j) / sum : 0.0;
      double inclusive, tile_mass;
      BlockScan(scan_storage).InclusiveSum(prob, inclusive, tile_mass);
      const double cumulative = carry + inclusive;
      if (j < candidates && cumulative >= p.top_p) atomicMin(&first_s, j);
      __syncthreads();
      const int first = first_s;
      if (j == first) kept_mass_s = cumulative;
      __syncthreads();  // also: every thread read first_s before the next tile's atomicMin
      carry += tile_mass;
      if (first != INT_MAX) {
        kept = first + 1;
        kept_mass = kept_mass_s;
        reached = true;
        break;
      }
    }
    if (!reached) kept_mass = carry;  // rounding never got there: every candidate is kept
  }

  // 3d: the first kept candidate with c_j > u * M. The running sum repeats 3c's bit for bit
  // (same tiles, same scan) up to J. Ids of weight 0 (masked) are never picked: sequentially
  // their c_j equals c_(j-1), but a parallel scan may round it an ulp higher.
  const double threshold = p.uniform * kept_mass;
  if (threadIdx.x == 0) {
    first_s = INT_MAX;
    last_possible_s = 0;  // rank 0 has weight 1
  }
  __syncthreads();
  double carry = 0.0;
  for (int base = 0; base < kept; base += kThreads) {
    const int j = base + threadIdx.x;
    const float e = j < kept ? weight(j) : 0.0f;
    double inclusive, tile_mass;
    BlockScan(scan_storage).InclusiveSum(e / sum, inclusive, tile_mass);
    const double cumulative = carry + inclusive;
    if (e > 0.0f) {
      if (cumulative > threshold) atomicMin(&first_s, j);
      atomicMax(&last_possible_s, j);
    }
    __syncthreads();
    const int first = first_s;
    __syncthreads();  // every thread read first_s before the next tile's atomicMin
    if (first != INT_MAX) break;
    carry += tile_mass;
  }
  if (threadIdx.x == 0) {
    // When rounding leaves no c_j above u * M: the last kept candidate with p > 0.
    const int rank = first_s != INT_MAX ? first_s : last_possible_s;
    const int id = key_id(keys[rank], id_bits, vocab);
    token[row] = id;
    logprob[row] = static_cast<float>(
        static_cast<double>(logits[static_cast<int64_t>(row) * vocab + id]) - log_normaliser[row]);
    status[row] = kSampleOk;
  }
}

// ---- Scratch layout

size_t aligned(size_t bytes) {
  return (bytes + kScratchAlignment - 1) / kScratchAlignment * kScratchAlignment;
}

// The width of vocab - 1: ids need that many bits in a rank key.
int id_bits_of(int vocab) {
  int bits = 0;
  while ((static_cast<uint32_t>(vocab - 1) >> bits) != 0) ++bits;
  return bits;
}

// Byte offsets into the scratch. The penalised logits live in the sort's alternate key buffer:
// prepare_kernel is done with them before the sort writes there.
struct ScratchLayout {
  size_t keys = 0;            // uint64 [rows][vocab], prepare_kernel's output, the sort's input
  size_t keys_alternate = 0;  // uint64 [rows][vocab], the sort's other buffer; fp32 penalised
  size_t segment_begin = 0;   // int [rows]
  size_t segment_end = 0;     // int [rows]
  size_t log_normaliser = 0;  // double [rows]
  size_t sort_storage = 0;    // CUB's temporary storage
  size_t sort_storage_bytes = 0;
  size_t total = 0;
};

ScratchLayout scratch_layout(int rows, int vocab) {
  const size_t cells = static_cast<size_t>(rows) * static_cast<size_t>(vocab);
  ScratchLayout layout;
  cub::DoubleBuffer<uint64_t> no_keys(nullptr, nullptr);
  const int* no_offsets = nullptr;
  KVSERVE_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeysDescending(
      nullptr, layout.sort_storage_bytes, no_keys, static_cast<int>(cells), rows, no_offsets,
      no_offsets, 0, 32 + id_bits_of(vocab)));
  size_t offset = 0;
  auto take = [&offset](size_t bytes) {
    const size_t at = offset;
    offset += aligned(bytes);
    return at;
  };
  layout.keys = take(cells * sizeof(uint64_t));
  layout.keys_alternate = take(cells * sizeof(uint64_t));
  layout.segment_begin = take(rows * sizeof(int));
  layout.segment_end = take(rows * sizeof(int));
  layout.log_normaliser = take(rows * sizeof(double));
  layout.sort_storage = take(layout.sort_storage_bytes);
  layout.total = offset;
  return layout;
}

void check_shape(const char* caller, int rows, int vocab) {
  if (rows < 0 || vocab < 1) throw std::invalid_argument(std::string(caller) + ": bad shape");
  if (static_cast<int64_t>(rows) * vocab > INT_MAX) {
    throw std::invalid_argument(std::string(caller) + ": rows * vocab beyond an int");
  }
}

}  // namespace

// ---- kernel launchers

size_t sample_tokens_scratch_bytes(int rows, int vocab) {
  check_shape("sample_tokens_scratch_bytes", rows, vocab);
  return scratch_layout(rows, vocab).total;
}

void sample_tokens(const float* logits, int rows, int vocab, const SampleRowParams* params,
                   const SampleRowParams* params_host, const int32_t* history, void* scratch,
                   size_t scratch_bytes, int32_t* token, float* logprob, int32_t* status,
                   cudaStream_t stream) {
  check_shape("sample_tokens", rows, vocab);
  if (rows == 0) return;
  if (!logits || !params || !params_host || !history || !scratch || !token || !logprob || !status) {
    throw std::invalid_argument("sample_tokens: null pointer");
  }
  if (reinterpret_cast<uintptr_t>(scratch) % kScratchAlignment != 0) {
    throw std::invalid_argument("sample_tokens: scratch not 256-byte aligned");
  }
  const ScratchLayout layout = scratch_layout(rows, vocab);
  if (scratch_bytes < layout.total) throw std::invalid_argument("sample_tokens: scratch too small");
  char* base = static_cast<char*>(scratch);
  uint64_t* keys = reinterpret_cast<uint64_t*>(base + layout.keys);
  uint64_t* keys_alternate = reinterpret_cast<uint64_t*>(base + layout.keys_alternate);
  int* segment_begin = reinterpret_cast<int*>(base + layout.segment_begin);
  int* segment_end = reinterpret_cast<int*>(base + layout.segment_end);
  double* log_normaliser = reinterpret_cast<double*>(base + layout.log_normaliser);
  const int id_bits = id_bits_of(vocab);

  prepare_kernel<<<rows, kThreads, 0, stream>>>(
      logits, vocab, id_bits, params, history, reinterpret_cast<float*>(keys_alternate), keys,
      segment_begin, segment_end, log_normaliser, token, logprob, status);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
  bool any_draw = false;
  for (int r = 0; r < rows; ++r) any_draw = any_draw || params_host[r].temperature != 0.0f;
  if (!any_draw) return;

  cub::DoubleBuffer<uint64_t> sort_keys(keys, keys_alternate);
  size_t sort_storage_bytes = layout.sort_storage_bytes;
  const int* sort_begin = segment_begin;  // the offsets' type of scratch_layout's size query
  const int* sort_end = segment_end;
  KVSERVE_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeysDescending(
      base + layout.sort_storage, sort_storage_bytes, sort_keys, rows * vocab, rows, sort_begin,
      sort_end, 0, 32 + id_bits, stream));
  draw_kernel<<<rows, kThreads, 0, stream>>>(logits, vocab, id_bits, params, sort_keys.Current(),
                                             segment_begin, segment_end, log_normaliser, token,
                                             logprob, status);
  KVSERVE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvserve::cuda
