// kernels/sample_token.cu against the CPU sampler (engine/sampler.h) on the same logits: every
// parameter combination over random rows of three vocabulary sizes, ties, -inf masks, peaked and
// flat rows, repetition penalties with repeated history ids, and the rows sample_token rejects.
// Skipped when no GPU is visible.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/cuda/device_buffer.h"
#include "engine/sampler.h"
#include "kernels/cuda_check.h"
#include "kernels/device_info.h"
#include "kernels/sample_token.h"

namespace kvserve {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (cuda::visible_device_count() == 0) GTEST_SKIP() << "no CUDA GPU visible"

// One row to sample: the CPU sampler's inputs.
struct Row {
  std::vector<float> logits;  // [vocab]
  SamplingParams params;
  std::vector<int32_t> history;
  uint64_t step = 0;
};

struct GpuPick {
  int32_t token;
  float logprob;
  int32_t status;
};

// All rows in one sample_tokens call, as CudaBackend::forward_sample makes it.
std::vector<GpuPick> sample_on_gpu(const std::vector<Row>& rows, int vocab) {
  const int n = static_cast<int>(rows.size());
  std::vector<float> logits;
  std::vector<int32_t> history;
  std::vector<cuda::SampleRowParams> params;
  for (const Row& row : rows) {
    logits.insert(logits.end(), row.logits.begin(), row.logits.end());
    const SamplingParams& p = row.params;
    const int32_t begin = static_cast<int32_t>(history.size());
    history.insert(history.end(), row.history.begin(), row.history.end());
    params.push_back({sampling_uniform(p.seed, row.step), p.temperature, p.top_p,
                      p.repetition_penalty, p.top_k, begin, static_cast<int32_t>(history.size())});
  }
  history.push_back(0);  // never empty, so the device copy exists
  cuda::DeviceBuffer<float> logits_device;
  cuda::DeviceBuffer<cuda::SampleRowParams> params_device;
  cuda::DeviceBuffer<int32_t> history_device, token_device, status_device;
  cuda::DeviceBuffer<float> logprob_device;
  cuda::DeviceBuffer<unsigned char> scratch;
  auto upload = [](auto& buffer, const auto& v) {
    auto* p = buffer.reserve(v.size());
    KVSERVE_CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(v[0]), cudaMemcpyHostToDevice));
    return p;
  };
  const size_t scratch_bytes = cuda::sample_tokens_scratch_bytes(n, vocab);
  cuda::sample_tokens(upload(logits_device, logits), n, vocab, upload(params_device, params),
                      params.data(), upload(history_device, history),
                      scratch.reserve(scratch_bytes), scratch_bytes, token_device.reserve(n),
                      logprob_device.reserve(n), status_device.reserve(n), nullptr);
  KVSERVE_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<int32_t> token(n), status(n);
  std::vector<float> logprob(n);
  KVSERVE_CUDA_CHECK(
      cudaMemcpy(token.data(), token_device.get(), n * sizeof(int32_t), cudaMemcpyDeviceToHost));
  KVSERVE_CUDA_CHECK(
      cudaMemcpy(status.data(), status_device.get(), n * sizeof(int32_t), cudaMemcpyDeviceToHost));
  KVSERVE_CUDA_CHECK(
      cudaMemcpy(logprob.data(), logprob_device.get(), n * sizeof(float), cudaMemcpyDeviceToHost));
  std::vector<GpuPick> picks;
  for (int r = 0; r < n; ++r) picks.push_back({token[r], logprob[r], status[r]});
  return picks;
}

// sample_token's rank order and running sums, spelled out plainly (a full sort, sequential sums)
// to tell why two picks differ: cumulative[j] is c_(j+1), the sum over ranks 0..j.
struct Walk {
  std::vector<int32_t> order;  // ids in rank order, the candidates only
  std::vector<double> cumulative;
  double threshold;  // u * M
};

Walk reference_walk(const Row& row, int vocab) {
  std::vector<float> w = row.logits;
  for (int32_t id : row.history) {
    const float l = row.logits[id], penalty = row.params.repetition_penalty;
    w[id] = l > 0.0f ? l / penalty : l * penalty;
  }
  Walk walk;
  walk.order.resize(vocab);
  std::iota(walk.order.begin(), walk.order.end(), 0);
  std::sort(walk.order.begin(), walk.order.end(),
            [&](int32_t a, int32_t b) { return w[a] > w[b] || (w[a] == w[b] && a < b); });
  const int top_k = row.params.top_k;
  walk.order.resize(top_k > 0 && top_k < vocab ? top_k : vocab);
  const float w_max = w[walk.order[0]], temperature = row.params.temperature;
  std::vector<float> e;
  double sum = 0.0;
  for (int32_t id : walk.order) {
    e.push_back(std::exp((w[id] - w_max) / temperature));
    sum += e.back();
  }
  double c = 0.0, kept_mass = 1.0;
  for (float weight : e) walk.cumulative.push_back(c += weight / sum);
  if (row.params.top_p < 1.0f) {
    kept_mass = walk.cumulative.back();
    for (double cj : walk.cumulative) {
      if (cj >= row.params.top_p) {
        kept_mass = cj;
        break;
      }
    }
  }
  walk.threshold = sampling_uniform(row.params.seed, row.step) * kept_mass;
  return walk;
}

// A pick that differs from the CPU's is allowed only where the contract allows it: u * M, or
// top_p, within rounding of a running sum between the two picks' ranks.
bool near_a_boundary(const Row& row, int vocab, int32_t a, int32_t b) {
  const Walk walk = reference_walk(row, vocab);
  const auto rank = [&](int32_t id) {
    return std::find(walk.order.begin(), walk.order.end(), id) - walk.order.begin();
  };
  const size_t lo = std::min(rank(a), rank(b)), hi = std::max(rank(a), rank(b));
  constexpr double kRounding = 1e-12;
  for (size_t j = lo; j < hi && j < walk.cumulative.size(); ++j) {
    const double c = walk.cumulative[j];
    if (std::fabs(c - walk.threshold) < kRounding) return true;
    if (row.params.top_p < 1.0f && std::fabs(c - row.params.top_p) < kRounding) return true;
  }
  return false;
}

// Checks every row's GPU pick against sample_token; returns the number of picks that differ at
// a rounding boundary (each printed), failing the test on any other difference.
int expect_same_picks(const std::vector<Row>& rows, int vocab) {
  const std::vector<GpuPick> gpu = sample_on_gpu(rows, vocab);
  int boundary_cases = 0;
  for (size_t r = 0; r < rows.size(); ++r) {
    const Row& row = rows[r];
    const SamplingParams& p = row.params;
    SCOPED_TRACE("vocab " + std::to_string(vocab) + " row " + std::to_string(r) + ": T " +
                 std::to_string(p.temperature) + " top_k " + std::to_string(p.top_k) + " top_p " +
                 std::to_string(p.top_p) + " penalty " + std::to_string(p.repetition_penalty) +
                 " seed " + std::to_string(p.seed) + " step " + std::to_string(row.step));
    SampledToken cpu;
    try {
      cpu = sample_token(row.logits.data(), vocab, p, row.history, row.step);
    } catch (const std::invalid_argument& e) {
      const std::string message = e.what();
      if (message == kLogitsNanError) {
        EXPECT_EQ(gpu[r].status, cuda::kSampleLogitsNan);
      } else {
        EXPECT_EQ(message, kLogitsInfOrNoFiniteError);
        EXPECT_EQ(gpu[r].status, cuda::kSampleLogitsInfOrNoFinite);
      }
      continue;
    }
    EXPECT_EQ(gpu[r].status, cuda::kSampleOk);
    if (gpu[r].status != cuda::kSampleOk) continue;
    if (gpu[r].token != cpu.id) {
      const bool at_boundary = !p.greedy() && near_a_boundary(row, vocab, gpu[r].token, cpu.id);
      EXPECT_TRUE(at_boundary) << "GPU picks " << gpu[r].token << ", the CPU " << cpu.id;
      if (at_boundary) {
        std::printf("boundary case: vocab %d row %zu, GPU %d CPU %d\n", vocab, r, gpu[r].token,
                    cpu.id);
        ++boundary_cases;
      }
      continue;
    }
    EXPECT_NEAR(gpu[r].logprob, cpu.logprob, 1e-5 + 1e-6 * std::fabs(cpu.logprob));
  }
  return boundary_cases;
}

// Logits of one of six shapes, so that rank order, top-k and top-p meet ties, masks, a dominant
// id and near-uniform rows.
std::vector<float> random_logits(int vocab, int shape, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> logits(vocab);
  for (float& l : logits) l = normal(rng);
  switch (shape) {
    case 0:  // plain
      break;
    case 1:  // coarse values: ties everywhere, and the same maximum at several ids
      for (float& l : logits) l = std::round(l);
      for (int k = 0; k < 3; ++k) logits[rng() % vocab] = 12.0f;
      break;
    case 2:  // every other id masked, the first included
      for (int v = 0; v < vocab; v += 2) logits[v] = -INFINITY;
      break;
    case 3:  // one dominant id, the last
      logits[vocab - 1] = 40.0f;
      break;
    case 4:  // near-uniform: top-p keeps most of the vocabulary
      for (float& l : logits) l *= 0.05f;
      break;
    case 5:  // all equal, some of them -0: the id alone orders them
      for (size_t v = 0; v < logits.size(); ++v) logits[v] = v % 3 == 1 ? -0.0f : 0.0f;
      break;
  }
  return logits;
}

// Ids to penalise: repeats, the row's best few (so the penalty changes the order), ids of
// positive and negative logits.
std::vector<int32_t> random_history(const std::vector<float>& logits, std::mt19937& rng) {
  const int vocab = static_cast<int>(logits.size());
  std::vector<int32_t> by_logit(vocab);
  std::iota(by_logit.begin(), by_logit.end(), 0);
  std::partial_sort(by_logit.begin(), by_logit.begin() + std::min(vocab, 4), by_logit.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  std::vector<int32_t> history;
  for (int k = 0; k < std::min(vocab, 4); k += 2) history.push_back(by_logit[k]);
  for (int k = 0; k < 12; ++k) history.push_back(static_cast<int32_t>(rng() % vocab));
  history.push_back(history[0]);
  history.push_back(history[2]);
  return history;
}

TEST(GpuSampleTokens, EveryParameterCombinationMatchesTheCpuSampler) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(11);
  int boundary_cases = 0, draws = 0;
  for (const int vocab : {7, 1000, 50257}) {
    std::vector<Row> rows;
    for (const float temperature : {0.0f, 0.3f, 1.0f, 2.0f}) {
      for (const int top_k : {0, 1, 5, 50, vocab - 1, vocab + 1}) {
        for (const float top_p : {0.1f, 0.9f, 1.0f}) {
          for (const float penalty : {1.0f, 1.3f}) {
            for (int shape = 0; shape < 6; ++shape) {
              Row row;
              row.logits = random_logits(vocab, shape, rng);
              row.params.temperature = temperature;
              row.params.top_k = top_k;
              row.params.top_p = top_p;
              row.params.repetition_penalty = penalty;
              row.params.seed = rng();
              row.step = rng() % 1000;
              row.history = random_history(row.logits, rng);
              rows.push_back(std::move(row));
            }
          }
        }
      }
    }
    draws += static_cast<int>(rows.size());
    boundary_cases += expect_same_picks(rows, vocab);
  }
  // Each boundary case is a u * M or top_p within 1e-12 of a running sum: about one in 1e11
  // draws, so even one here would be worth a look.
  std::printf("%d draws, %d at a rounding boundary\n", draws, boundary_cases);
  EXPECT_LE(boundary_cases, 1);
}

// One row's parameters, many steps: the draws follow sampling_uniform(seed, step), and a flat
// row's top-p walk crosses many tiles of the block.
TEST(GpuSampleTokens, SeedsAndStepsMatchTheCpuSampler) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(12);
  const int vocab = 50257;
  std::vector<Row> rows;
  for (int step = 0; step < 64; ++step) {
    Row row;
    row.logits = random_logits(vocab, step % 6, rng);
    row.params.temperature = step % 2 == 0 ? 1.0f : 0.7f;
    row.params.top_p = step % 3 == 0 ? 1.0f : 0.95f;
    row.params.top_k = step % 4 == 0 ? 200 : 0;
    row.params.seed = 1234 + step % 3;
    row.step = static_cast<uint64_t>(step);
    rows.push_back(std::move(row));
  }
  EXPECT_LE(expect_same_picks(rows, vocab), 1);
}

// The rows sample_token rejects, each beside valid rows that must not notice.
TEST(GpuSampleTokens, RejectsWhatTheCpuSamplerRejects) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(13);
  for (const int vocab : {7, 50257}) {
    std::vector<Row> rows;
    for (int kind = 0; kind < 6; ++kind) {
      for (const float temperature : {0.0f, 1.0f}) {
        Row row;
        row.logits = random_logits(vocab, 0, rng);
        row.params.temperature = temperature;
        row.params.repetition_penalty = 1.3f;
        row.history = {1, 1, 2};
        switch (kind) {
          case 0:  // NaN among finite values
            row.logits[3] = NAN;
            break;
          case 1:  // +inf
            row.logits[vocab - 1] = INFINITY;
            break;
          case 2:  // every id masked
            std::fill(row.logits.begin(), row.logits.end(), -INFINITY);
            break;
          case 3:  // a NaN and nothing finite: no finite value wins
            std::fill(row.logits.begin(), row.logits.end(), -INFINITY);
            row.logits[2] = NAN;
            break;
          case 4:  // NaN and +inf: +inf wins
            row.logits[0] = NAN;
            row.logits[1] = INFINITY;
            break;
          case 5:  // valid: a single finite id
            std::fill(row.logits.begin(), row.logits.end(), -INFINITY);
            row.logits[vocab / 2] = -3.0f;
            break;
        }
        rows.push_back(std::move(row));
      }
    }
    expect_same_picks(rows, vocab);
  }
}

TEST(GpuSampleTokens, LauncherChecksItsArguments) {
  SKIP_WITHOUT_GPU();
  cuda::SampleRowParams params{};
  int32_t out = 0;
  EXPECT_THROW(cuda::sample_tokens(nullptr, 1, 7, &params, &params, &out, &out, 1 << 20, &out,
                                   nullptr, &out, nullptr),
               std::invalid_argument);
  EXPECT_THROW(cuda::sample_tokens_scratch_bytes(-1, 7), std::invalid_argument);
  EXPECT_THROW(cuda::sample_tokens_scratch_bytes(1 << 16, 1 << 16), std::invalid_argument);
}

}  // namespace
}  // namespace kvserve
