// kvserve bench decode: decode-step throughput of one backend at several batch sizes, every
// sequence at the same context length (the shape docs/design.md section 8 compares with
// transformers), or at lengths spread over a few tokens (--context-spread).
#pragma once

#include <CLI/CLI.hpp>
#include <vector>

#include "server/cli_flags.h"

namespace kvserve {

struct BenchDecodeFlags {
  ModelFlags model;
  // The pool is sized to hold every batch (--kv-pool-mb is not taken); fp16 unless --kv says.
  KvFlags kv = [] {
    KvFlags fp16;
    fp16.format = "fp16";
    return fp16;
  }();
  std::vector<int> batches = {1, 16, 64, 256};
  int context = 512;  // tokens in the cache before the timed steps
  // Sequence i starts at context + i % context_spread tokens: 1 keeps them equal, so a KIVI batch
  // flushes all at once every G steps; 32 (a group) has some of a large batch flush every step,
  // as sequences of mixed lengths do in serving.
  int context_spread = 1;
  int steps = 64;  // timed decode steps
  int warmup = 8;  // untimed decode steps first
};

void add_bench_decode_flags(CLI::App* app, BenchDecodeFlags& flags);
int run_bench_decode(const BenchDecodeFlags& flags);

}  // namespace kvserve
