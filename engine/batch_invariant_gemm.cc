#include "engine/batch_invariant_gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace kvserve {
namespace {

constexpr int kColumns = PackedWeights::kColumns;
// Rows per kernel call. A last block of fewer rows is padded with zero rows, so every row runs
// through the same instructions whatever the number of rows.
constexpr int kRows = 4;
// Below this many multiply-adds a parallel region costs more than it saves (waking threads on a
// busy machine takes longer than the work).
constexpr int64_t kParallelWork = int64_t{1} << 23;

// Eight floats: one AVX register, two SSE ones. GCC and clang vector extensions keep the kernel
// portable (x86-64, ARM) while the compiler picks the instructions.
typedef float Floats8 __attribute__((vector_size(32)));
constexpr int kVectors = kColumns / 8;

// tile[r][j] += sum over i = 0..K-1 in order of in[r][i] * panel[i][j], for kRows rows and
// kColumns columns. Each output element has its own accumulator lane and sees the same sequence
// of multiply-adds; nothing depends on the row's slot.
__attribute__((always_inline)) inline void kernel_body(const float* in, int ld_in,
                                                       const float* panel, int k, float* tile) {
  Floats8 acc[kRows][kVectors];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) {
      std::memcpy(&acc[r][v], tile + r * kColumns + v * 8, sizeof(Floats8));
    }
  }
  for (int i = 0; i < k; ++i) {
    Floats8 w[kVectors];
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) {
      std::memcpy(&w[v], panel + static_cast<size_t>(i) * kColumns + v * 8, sizeof(Floats8));
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const float a = in[static_cast<size_t>(r) * ld_in + i];
#pragma GCC unroll 8
      for (int v = 0; v < kVectors; ++v) acc[r][v] += a * w[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) {
      std::memcpy(tile + r * kColumns + v * 8, &acc[r][v], sizeof(Floats8));
    }
  }
}

using Kernel = void (*)(const float*, int, const float*, int, float*);

void kernel_portable(const float* in, int ld_in, const float* panel, int k, float* tile) {
  kernel_body(in, ld_in, panel, k, tile);
}

#if defined(__x86_64__)
// The build targets baseline x86-64 (SSE2); CPUs with AVX2 and FMA get this copy, chosen once
// per process, so all rows of all steps use the same one.
__attribute__((target("avx2,fma"))) void kernel_avx2(const float* in, int ld_in, const float* panel,
                                                     int k, float* tile) {
  kernel_body(in, ld_in, panel, k, tile);
}
#endif

Kernel pick_kernel() {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kernel_avx2;
#endif
  return kernel_portable;
}

}  // namespace

PackedWeights::PackedWeights(const float* weights, int k, int n, bool transposed) : k_(k), n_(n) {
  data_.assign(static_cast<size_t>(panels()) * k * kColumns, 0.0f);
  for (int p = 0; p < panels(); ++p) {
    const int width = std::min(kColumns, n - p * kColumns);
    float* dst = data_.data() + static_cast<size_t>(p) * k * kColumns;
    for (int i = 0; i < k; ++i) {
      for (int j = 0; j < width; ++j) {
        const size_t column = static_cast<size_t>(p) * kColumns + j;
        dst[static_cast<size_t>(i) * kColumns + j] =
            transposed ? weights[column * k + i] : weights[static_cast<size_t>(i) * n + column];
      }
    }
  }
}

void batch_invariant_linear(const float* in, int rows, const PackedWeights& weights,
                            const float* bias, float* out, bool accumulate) {
  static const Kernel kernel = pick_kernel();
  const int k = weights.k(), n = weights.n();
  const int blocks = (rows + kRows - 1) / kRows;
  const int full_blocks = rows / kRows;
  // The last, partial block's rows followed by zero rows.
  std::vector<float> tail;
  if (full_blocks < blocks) {
    tail.assign(static_cast<size_t>(kRows) * k, 0.0f);
    std::copy(in + static_cast<size_t>(full_blocks) * kRows * k, in + static_cast<size_t>(rows) * k,
              tail.begin());
  }
  const int64_t work = int64_t{blocks} * kRows * n * k;
#pragma omp parallel for schedule(static) if (work >= kParallelWork)
  for (int p = 0; p < weights.panels(); ++p) {
    const int first_column = p * kColumns;
    const int width = std::min(kColumns, n - first_column);
    alignas(32) float tile[kRows * kColumns];
    for (int b = 0; b < blocks; ++b) {
      const int block_rows = std::min(kRows, rows - b * kRows);
      std::fill(tile, tile + kRows * kColumns, 0.0f);
      for (int r = 0; r < block_rows; ++r) {
        const float* prior = out + static_cast<size_t>(b * kRows + r) * n + first_column;
        for (int j = 0; j < width; ++j) {
          const float b_j = bias ? bias[first_column + j] : 0.0f;
          tile[r * kColumns + j] = accumulate ? prior[j] + b_j : b_j;
        }
      }
      const float* block_in =
          b < full_blocks ? in + static_cast<size_t>(b) * kRows * k : tail.data();
      kernel(block_in, k, weights.panel(p), k, tile);
      for (int r = 0; r < block_rows; ++r) {
        std::copy(tile + r * kColumns, tile + r * kColumns + width,
                  out + static_cast<size_t>(b * kRows + r) * n + first_column);
      }
    }
  }
}

}  // namespace kvserve
