// kvserve bench engine: the in-process counterpart of `kvserve-cli load` in closed loop. The same
// engine `serve` builds (scheduler, KV pool, backend) runs `requests` generations, keeping
// `concurrency` of them in flight, with no gRPC, tokenizer or streams in the way; comparing its
// output-token throughput with the load generator's against `serve` gives what the service layer
// costs.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>

#include "server/cli_flags.h"

namespace kvserve {

struct BenchEngineFlags {
  ModelFlags model;
  KvFlags kv;
  EngineFlags engine;
  int requests = 256;
  int concurrency = 256;
  int prompt_len = 512;  // random token ids, drawn as kvserve-cli load draws them
  // Request i's prompt has prompt_len + i % prompt_len_spread tokens: 1 keeps them equal, so a
  // KIVI batch admitted together flushes together; 32 (a group) spreads the flushes over steps,
  // as prompts of mixed lengths do.
  int prompt_len_spread = 1;
  int max_new_tokens = 128;
  float temperature = 0.0f;  // greedy; bench/serving.sh asks the same of `kvserve-cli load`
  // Untimed requests first, all at once (first-touch of the pool, buffer growth, CUDA graph
  // captures), as bench/serving.sh warms the server up with 4 before its loads.
  int warmup_requests = 4;
  uint64_t seed = 0;
};

void add_bench_engine_flags(CLI::App* app, BenchEngineFlags& flags);
int run_bench_engine(const BenchEngineFlags& flags);

}  // namespace kvserve
