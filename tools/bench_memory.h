// kvserve bench memory: bytes per token, compression ratio and pool capacity of every KV format
// at GPT-2's real geometries, computed by the real cache manager (no weights, no data).
#pragma once

#include <CLI/CLI.hpp>
#include <string>
#include <vector>

namespace kvserve {

struct BenchMemoryFlags {
  std::vector<std::string> models = {"dummy:gpt2", "dummy:gpt2-medium", "dummy:gpt2-large",
                                     "dummy:gpt2-xl"};
  // 2048 is past GPT-2's context: the cache manager computes it all the same (no model runs).
  std::vector<int> lengths = {128, 256, 512, 1024, 2048};
  // Bytes per token are counted over a pool of this many sequences of each length: KIVI residual
  // slots share blocks, so one sequence alone (reported too) rounds its residual up to blocks.
  int sequences = 1000;
  int64_t pool_mb = 1024;
  bool markdown = false;
};

void add_bench_memory_flags(CLI::App* app, BenchMemoryFlags& flags);
int run_bench_memory(const BenchMemoryFlags& flags);

}  // namespace kvserve
