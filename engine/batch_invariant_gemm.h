// The CPU backend's matrix products, batch-invariant by construction: row r of the output depends
// only on row r of the input and on the weights, never on how many rows share the call or where
// row r sits among them. BLAS libraries do not promise that: OpenBLAS picks its kernel, blocking
// and threading from the matrix shape and the CPU (OPENBLAS_CORETYPE), and even a fixed shape
// gives a row different bits depending on its position in the call. Here every output element
// is summed in the same order (k = 0, 1, ..., K-1, onto bias and the previous value) by the same
// instructions, whichever thread computes it: a sequence's logits are bit-identical whatever it
// is batched with. Results may still differ between CPUs (FMA or not), not between batches.
#pragma once

#include <cstddef>
#include <vector>

namespace kvserve {

// A weight matrix W[K][N] stored as panels of kColumns columns, each panel K rows of kColumns
// contiguous floats (the last panel padded with zero columns), so the kernel streams it.
class PackedWeights {
 public:
  static constexpr int kColumns = 16;

  PackedWeights() = default;
  // From W[K][N] row-major, or, with `transposed`, from its transpose stored as [N][K] (the
  // tied LM head reads the token embedding [V][C] as W = embedding^T).
  PackedWeights(const float* weights, int k, int n, bool transposed);

  int k() const { return k_; }
  int n() const { return n_; }
  int panels() const { return (n_ + kColumns - 1) / kColumns; }
  const float* panel(int p) const { return data_.data() + static_cast<size_t>(p) * k_ * kColumns; }

 private:
  int k_ = 0, n_ = 0;
  std::vector<float> data_;  // [panels][K][kColumns]
};

// out[r][j] = (accumulate ? out[r][j] : 0) + bias[j] + sum_k in[r][k] * W[k][j] for r < rows,
// with in [rows][K] and out [rows][N] row-major; bias may be null (zero). Threads (OpenMP) split
// the columns; no element's arithmetic depends on the split.
void batch_invariant_linear(const float* in, int rows, const PackedWeights& weights,
                            const float* bias, float* out, bool accumulate);

}  // namespace kvserve
