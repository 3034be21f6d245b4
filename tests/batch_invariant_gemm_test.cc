// engine/batch_invariant_gemm.h: a row's result is bit-identical whatever shares the call, and
// every element is within the rounding bound of a sum of K + 2 fp32 terms.
#include "engine/batch_invariant_gemm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

namespace kvserve {
namespace {

struct Problem {
  int k, n;
  std::vector<float> weights;  // [K][N]
  std::vector<float> bias;     // [N]
};

std::vector<float> random_floats(size_t count, std::mt19937& rng, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> values(count);
  for (float& v : values) v = normal(rng);
  return values;
}

Problem random_problem(int k, int n, std::mt19937& rng) {
  return {k, n, random_floats(static_cast<size_t>(k) * n, rng, 0.05f), random_floats(n, rng, 1.0f)};
}

// The output row of `row` when it sits at `slot` among `rows` random rows, onto `prior`.
std::vector<float> row_result(const Problem& p, const PackedWeights& packed,
                              const std::vector<float>& row, const std::vector<float>& prior,
                              int rows, int slot, bool accumulate, std::mt19937& rng) {
  std::vector<float> in = random_floats(static_cast<size_t>(rows) * p.k, rng, 1.0f);
  std::vector<float> out = random_floats(static_cast<size_t>(rows) * p.n, rng, 1.0f);
  std::copy(row.begin(), row.end(), in.begin() + static_cast<size_t>(slot) * p.k);
  std::copy(prior.begin(), prior.end(), out.begin() + static_cast<size_t>(slot) * p.n);
  batch_invariant_linear(in.data(), rows, packed, p.bias.data(), out.data(), accumulate);
  return {out.begin() + static_cast<size_t>(slot) * p.n,
          out.begin() + static_cast<size_t>(slot + 1) * p.n};
}

// Shapes off every multiple of the kernel's 4 rows and 16 columns; the wide one is above the
// threshold where threads split the columns, the narrow one below it.
TEST(BatchInvariantGemm, RowResultDoesNotDependOnTheOtherRowsOrItsSlot) {
  std::mt19937 rng(7);
  for (const auto& [k, n] : {std::pair{37, 21}, std::pair{300, 2000}}) {
    const Problem p = random_problem(k, n, rng);
    const PackedWeights packed(p.weights.data(), k, n, false);
    const std::vector<float> row = random_floats(k, rng, 1.0f);
    const std::vector<float> prior = random_floats(n, rng, 1.0f);
    for (bool accumulate : {false, true}) {
      const std::vector<float> alone = row_result(p, packed, row, prior, 1, 0, accumulate, rng);
      for (int rows : {2, 3, 4, 5, 7, 8, 13, 64}) {
        for (int slot : {0, 1, rows / 2, rows - 1}) {
          if (slot >= rows) continue;
          EXPECT_TRUE(row_result(p, packed, row, prior, rows, slot, accumulate, rng) == alone)
              << "K " << k << " N " << n << ": slot " << slot << " of " << rows << " rows";
        }
      }
    }
  }
}

// Column j depends only on column j of the weights: the first 16 columns of a wide matrix (threads
// split its panels) equal the same 16 columns multiplied alone (no threads).
TEST(BatchInvariantGemm, ColumnsDoNotDependOnTheirNeighboursOrTheThreads) {
  std::mt19937 rng(11);
  const int k = 256, wide = 3000, narrow = PackedWeights::kColumns, rows = 5;
  const Problem p = random_problem(k, wide, rng);
  std::vector<float> narrow_weights(static_cast<size_t>(k) * narrow);
  for (int i = 0; i < k; ++i) {
    std::copy_n(p.weights.begin() + static_cast<size_t>(i) * wide, narrow,
                narrow_weights.begin() + static_cast<size_t>(i) * narrow);
  }
  const std::vector<float> in = random_floats(static_cast<size_t>(rows) * k, rng, 1.0f);
  std::vector<float> wide_out(static_cast<size_t>(rows) * wide), narrow_out(rows * narrow);
  batch_invariant_linear(in.data(), rows, PackedWeights(p.weights.data(), k, wide, false),
                         p.bias.data(), wide_out.data(), false);
  batch_invariant_linear(in.data(), rows, PackedWeights(narrow_weights.data(), k, narrow, false),
                         p.bias.data(), narrow_out.data(), false);
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < narrow; ++j) {
      EXPECT_EQ(wide_out[static_cast<size_t>(r) * wide + j], narrow_out[r * narrow + j]);
    }
  }
}

// Each element is a recursive fp32 sum of K + 2 terms (prior, bias, K products), so its error is
// at most gamma(K + 2) * sum |term| with gamma(m) = m u / (1 - m u), u = 2^-24 (Higham, Accuracy
// and Stability of Numerical Algorithms, 3.1; fused or separate multiply-adds alike). Wrong
// indexing or packing breaks it by orders of magnitude. The transposed packing (the LM head's)
// must give the same result as packing the transpose.
TEST(BatchInvariantGemm, MatchesTheExactProductWithinTheRoundingBound) {
  std::mt19937 rng(3);
  const int k = 300, n = 45, rows = 6;
  const Problem p = random_problem(k, n, rng);
  std::vector<float> transposed(static_cast<size_t>(n) * k);
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j < n; ++j) transposed[static_cast<size_t>(j) * k + i] = p.weights[i * n + j];
  }
  const std::vector<float> in = random_floats(static_cast<size_t>(rows) * k, rng, 1.0f);
  const std::vector<float> prior = random_floats(static_cast<size_t>(rows) * n, rng, 1.0f);
  std::vector<float> out = prior, out_transposed = prior;
  batch_invariant_linear(in.data(), rows, PackedWeights(p.weights.data(), k, n, false),
                         p.bias.data(), out.data(), true);
  batch_invariant_linear(in.data(), rows, PackedWeights(transposed.data(), k, n, true),
                         p.bias.data(), out_transposed.data(), true);
  EXPECT_TRUE(out == out_transposed);
  const double u = std::ldexp(1.0, -24), gamma = (k + 2) * u / (1 - (k + 2) * u);
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < n; ++j) {
      double exact = double{prior[r * n + j]} + p.bias[j];
      double magnitude = std::fabs(prior[r * n + j]) + std::fabs(p.bias[j]);
      for (int i = 0; i < k; ++i) {
        const double term = double{in[r * k + i]} * p.weights[i * n + j];
        exact += term;
        magnitude += std::fabs(term);
      }
      EXPECT_LE(std::fabs(out[r * n + j] - exact), gamma * magnitude) << r << ", " << j;
    }
  }
}

}  // namespace
}  // namespace kvserve
