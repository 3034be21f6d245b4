#include "server/bench_decode.h"

#include <spdlog/spdlog.h>
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>

#include "engine/backend_factory.h"
#include "engine/checkpoint.h"
#include "engine/kv_cache_manager.h"

namespace kvserve {

void add_bench_decode_flags(CLI::App* app, BenchDecodeFlags& flags) {
  app->add_option("--model", flags.model, "model directory or dummy:NAME");
  app->add_option("--device", flags.device, "auto, cpu or cuda");
  app->add_option("--kv", flags.kv, "fp16, int8, kivi4 or kivi2 (default groups)");
  app->add_option("--batches", flags.batches, "batch sizes")->delimiter(',');
  app->add_option("--context", flags.context, "cached tokens per sequence before timing")
      ->check(CLI::PositiveNumber);
  app->add_option("--steps", flags.steps, "timed decode steps")->check(CLI::PositiveNumber);
  app->add_option("--warmup", flags.warmup, "untimed decode steps first");
}

// Each batch: B sequences are prefilled to `context` tokens, then every step feeds one token to
// each of them and returns its logits to the host (the engine's sampler would take them there).
// The figure is B * steps / the wall time of the timed steps.
int run_bench_decode(const BenchDecodeFlags& flags) {
  std::string reason;
  const std::string device = resolve_device(flags.device, reason);
  ModelWeights weights = load_model(flags.model);
  const ModelConfig model = weights.config;
  KvCacheConfig config;
  config.format = parse_kv_format(flags.kv);
  int max_batch = 0;
  for (int b : flags.batches) max_batch = std::max(max_batch, b);
  const int length = flags.context + flags.warmup + flags.steps;
  if (length > model.n_positions) throw std::invalid_argument("context + steps beyond n_positions");
  // A KIVI sequence holds the most blocks just before a flush, not at its final length, and one
  // step holds both its old and new residual blocks.
  KvCacheManager probe(config, model, 1);
  int32_t per_sequence = 0;
  for (int n = flags.context; n <= length; ++n)
    per_sequence = std::max(per_sequence, probe.blocks_needed(n));
  auto cache = std::make_unique<KvCacheManager>(config, model, max_batch * 2 * per_sequence);
  auto backend = make_backend(device, std::move(weights), *cache);
  std::vector<float> logits;
  int64_t next_id = 0;
  for (int batch : flags.batches) {
    std::vector<int64_t> ids;
    for (int i = 0; i < batch; ++i) {
      ids.push_back(next_id++);
      cache->add_sequence(ids.back());
    }
    // Prefill in groups of 16 sequences, so activations stay small.
    for (int first = 0; first < batch; first += 16) {
      std::vector<ForwardItem> items;
      for (int i = first; i < std::min(batch, first + 16); ++i) {
        cache->grow(ids[i], flags.context);
        std::vector<int32_t> tokens(flags.context);
        for (int t = 0; t < flags.context; ++t) tokens[t] = (i * 131 + t * 7) % model.vocab_size;
        items.push_back({ids[i], 0, tokens, false});
      }
      backend->forward(items, logits);
      cache->finish_step();
    }
    using Clock = std::chrono::steady_clock;
    Clock::time_point start;
    for (int step = 0; step < flags.warmup + flags.steps; ++step) {
      if (step == flags.warmup) start = Clock::now();
      std::vector<ForwardItem> items;
      for (int i = 0; i < batch; ++i) {
        const int pos = flags.context + step;
        if (!cache->grow(ids[i], pos + 1)) throw std::runtime_error("bench: KV pool too small");
        items.push_back({ids[i], pos, {(i + step * 17) % model.vocab_size}, false});
      }
      backend->forward(items, logits);
      cache->finish_step();
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    const nlohmann::json out = {{"bench", "decode"},
                                {"model", flags.model},
                                {"device", device},
                                {"kv", flags.kv},
                                {"batch", batch},
                                {"context", flags.context},
                                {"steps", flags.steps},
                                {"ms_per_step", 1e3 * seconds / flags.steps},
                                {"tokens_per_second", batch * flags.steps / seconds}};
    std::cout << out.dump() << std::endl;
    for (int64_t id : ids) cache->remove_sequence(id);
  }
  return 0;
}

}  // namespace kvserve
