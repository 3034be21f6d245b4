// kvserve bench decode: decode-step throughput of one backend at several batch sizes, every
// sequence at the same context length (the shape DESIGN.md section 8 compares with transformers).
#pragma once

#include <CLI/CLI.hpp>
#include <string>
#include <vector>

namespace kvserve {

struct BenchDecodeFlags {
  std::string model = "dummy:gpt2";
  std::string device = "auto";
  std::string kv = "fp16";
  std::vector<int> batches = {1, 16, 64, 256};
  int context = 512;               // tokens in the cache before the timed steps
  int steps = 64;                  // timed decode steps
  int warmup = 8;                  // untimed decode steps first
  std::string cuda_graphs = "on";  // CUDA backend: replay decode steps from CUDA graphs
  // CUDA backend: the KIVI decode attention kernel (kernels/decode_attention_variant.h)
  std::string decode_attention = "packed";
};

void add_bench_decode_flags(CLI::App* app, BenchDecodeFlags& flags);
int run_bench_decode(const BenchDecodeFlags& flags);

}  // namespace kvserve
