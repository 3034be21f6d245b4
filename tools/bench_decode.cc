#include "tools/bench_decode.h"

#include <algorithm>
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>

#include "engine/engine_builder.h"

namespace kvserve {

void add_bench_decode_flags(CLI::App* app, BenchDecodeFlags& flags) {
  add_model_flags(app, flags.model);
  add_kv_flags(app, flags.kv, KvPoolFlag::kOmit);
  app->add_option("--batches", flags.batches, "batch sizes")->delimiter(',');
  app->add_option("--context", flags.context, "cached tokens per sequence before timing")
      ->check(positive());
  app->add_option("--context-spread", flags.context_spread,
                  "sequence i starts at context + i % this many tokens (1: all equal)")
      ->check(positive());
  app->add_option("--steps", flags.steps, "timed decode steps")->check(positive());
  app->add_option("--warmup", flags.warmup, "untimed decode steps first")->check(non_negative());
}

namespace {

// Bytes one decode step must read from memory at the least: every weight but the position table
// (one row of it), and the KV cache the attention reads. Not the activations: at B = 256 they are
// a few MB per layer, and L2-resident.
double weight_bytes(const ModelConfig& m) {
  const int64_t position_table = int64_t{m.n_positions} * m.n_embd;
  return 2.0 * static_cast<double>(m.parameter_count() - position_table);  // fp16 on the GPU
}

// KV bytes a query at context `len` (keys 0 .. len-1) reads in all layers: its paged tokens at
// the page format's bytes per token, the rest (KIVI's window) as residual keys and values.
double kv_bytes_read(const KvCacheConfig& config, const KvPageLayout& layout,
                     const ModelConfig& model, int len) {
  const int paged = paged_token_count(config, len);
  const double page_bytes =
      static_cast<double>(layout.code_bytes_per_page + layout.param_bytes_per_page);
  const double residual_token = 2.0 * static_cast<double>(layout.residual_token_bytes);
  return model.n_layer * (paged * page_bytes / config.page_tokens + (len - paged) * residual_token);
}

}  // namespace

// Each batch: B sequences are prefilled to `context` tokens, then every step feeds one token to
// each of them and picks each one's next token greedily, as the engine does (forward_sample: on
// the GPU, only token ids come back to the host). The figure is B * steps / the wall time of the
// timed steps. The roofline is the step's least bytes (weight_bytes + kv_bytes_read) over the
// device-to-device copy bandwidth measured in the same process (CUDA only).
int run_bench_decode(const BenchDecodeFlags& flags) {
  EngineSpec spec = engine_spec(flags.model, flags.kv);
  const ModelConfig model = read_model_config(spec.model);
  const KvCacheConfig& config = spec.kv;
  int max_batch = 0;
  for (int b : flags.batches) max_batch = std::max(max_batch, b);
  const int length = flags.context + flags.context_spread - 1 + flags.warmup + flags.steps;
  if (length > model.n_positions) {
    throw UsageError(
        "--context + --context-spread - 1 + --warmup + --steps = " + std::to_string(length) +
        " exceeds the model's context of " + std::to_string(model.n_positions));
  }
  // A KIVI sequence holds the most blocks just before a flush, not at its final length, and one
  // step holds both its old and new residual blocks.
  KvCacheManager probe(config, model, 1);
  int32_t per_sequence = 0;
  for (int n = flags.context; n <= length; ++n)
    per_sequence = std::max(per_sequence, probe.blocks_needed(n));
  spec.kv_pool_blocks = max_batch * 2 * per_sequence;
  BuiltBackend built = build_backend(spec);
  const std::string& device = built.device;
  KvCacheManager* cache = built.cache.get();
  Backend* backend = built.backend.get();
  const double weights_read = weight_bytes(model);
  const double copy_bytes_per_second = device_copy_bandwidth(device, size_t{1} << 30);
  std::vector<float> logits;
  const SamplingParams greedy{0.0f, 0, 1.0f, 1.0f, 0};
  const std::vector<int32_t> no_history;  // greedy without a penalty reads no history
  std::vector<SampleResult> picked;
  int64_t next_id = 0;
  for (int batch : flags.batches) {
    std::vector<int64_t> ids;
    for (int i = 0; i < batch; ++i) {
      ids.push_back(next_id++);
      cache->add_sequence(ids.back());
    }
    auto start_length = [&](int i) { return flags.context + i % flags.context_spread; };
    // Prefill in groups of 16 sequences, so activations stay small.
    for (int first = 0; first < batch; first += 16) {
      std::vector<ForwardItem> items;
      for (int i = first; i < std::min(batch, first + 16); ++i) {
        cache->grow(ids[i], start_length(i));
        std::vector<int32_t> tokens(start_length(i));
        for (int t = 0; t < start_length(i); ++t) {
          tokens[t] = (i * 131 + t * 7) % model.vocab_size;
        }
        items.push_back({ids[i], 0, tokens, false, cache->block_table(ids[i])});
      }
      backend->forward(items, logits);
      cache->finish_step();
    }
    using Clock = std::chrono::steady_clock;
    Clock::time_point start;
    GraphCounters graphs_before;
    double bytes = 0.0;  // least bytes of the timed steps
    std::vector<int32_t> next(batch);
    for (int i = 0; i < batch; ++i) next[i] = i % model.vocab_size;
    for (int step = 0; step < flags.warmup + flags.steps; ++step) {
      if (step == flags.warmup) {
        start = Clock::now();
        graphs_before = backend->graph_counters();
      }
      std::vector<ForwardItem> items;
      std::vector<SampleRequest> requests;
      for (int i = 0; i < batch; ++i) {
        const int pos = start_length(i) + step;
        if (!cache->grow(ids[i], pos + 1)) throw std::runtime_error("bench: KV pool too small");
        items.push_back({ids[i], pos, {next[i]}, false, cache->block_table(ids[i])});
        requests.push_back({&greedy, &no_history, static_cast<uint64_t>(step)});
        if (step >= flags.warmup) bytes += kv_bytes_read(config, cache->layout(), model, pos + 1);
      }
      backend->forward_sample(items, requests, picked);
      cache->finish_step();
      for (int i = 0; i < batch; ++i) next[i] = picked[i].token.id;
      if (step >= flags.warmup) bytes += weights_read;
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    const GraphCounters graphs = backend->graph_counters();
    const double roofline_ms =
        copy_bytes_per_second > 0.0 ? 1e3 * bytes / flags.steps / copy_bytes_per_second : 0.0;
    const nlohmann::json out = {
        {"bench", "decode"},
        {"model", spec.model},
        {"device", device},
        {"kv", flags.kv.format},
        {"kv_config", describe(config)},
        {"decode_attention", flags.model.decode_attention},
        {"prefill_attention", flags.model.prefill_attention},
        {"batch", batch},
        {"context", flags.context},
        {"context_spread", flags.context_spread},
        {"steps", flags.steps},
        // Timed steps replayed from CUDA graphs, and graphs captured during them.
        {"cuda_graphs", graphs.replayed > graphs_before.replayed},
        {"graph_replays", graphs.replayed - graphs_before.replayed},
        {"graphs_captured", graphs.captured - graphs_before.captured},
        {"ms_per_step", 1e3 * seconds / flags.steps},
        {"tokens_per_second", batch * flags.steps / seconds},
        {"bytes_per_step", bytes / flags.steps},
        {"copy_gb_per_second", copy_bytes_per_second * 1e-9},
        {"roofline_ms_per_step", roofline_ms},
        {"fraction_of_roofline",
         roofline_ms > 0.0 ? roofline_ms / (1e3 * seconds / flags.steps) : 0.0}};
    std::cout << out.dump() << std::endl;
    for (int64_t id : ids) cache->remove_sequence(id);
  }
  return 0;
}

}  // namespace kvserve
