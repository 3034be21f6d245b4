#include "tools/bench_memory.h"

#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "common/command_line.h"
#include "engine/checkpoint.h"
#include "engine/kv_cache_manager.h"

namespace kvserve {
namespace {

struct NamedFormat {
  std::string name;
  KvCacheConfig config;
};

std::vector<NamedFormat> formats() {
  std::vector<NamedFormat> out;
  KvCacheConfig c;
  c.format = KvFormat::kFp16;
  out.push_back({"fp16", c});
  c.format = KvFormat::kInt8;
  out.push_back({"int8", c});
  c.format = KvFormat::kKivi4;
  out.push_back({"kivi4", c});
  c.format = KvFormat::kKivi2;
  out.push_back({"kivi2", c});
  c.value_group = 64;
  out.push_back({"kivi2-gv64", c});
  c.params = KvParamFormat::kFp8;
  out.push_back({"kivi2-gv64-p8", c});
  KvCacheConfig preset;
  apply_kv_preset("kivi2c", preset);
  out.push_back({"kivi2c", preset});
  return out;
}

// Grows `count` sequences to `tokens` each (as real requests would) and returns the pool usage.
CacheUsage usage_with(KvCacheManager& cache, int count, int tokens) {
  for (int i = 0; i < count; ++i) {
    cache.add_sequence(i);
    cache.grow(i, tokens);
  }
  cache.finish_step();
  return cache.usage();
}

int max_sequences(const KvCacheConfig& config, const ModelConfig& model, int64_t pool_bytes,
                  int tokens) {
  KvCacheManager cache(config, model, KvCacheManager::blocks_in_budget(pool_bytes, config, model));
  int count = 0;
  while (cache.can_admit(tokens)) {
    cache.add_sequence(count++);
    cache.grow(count - 1, tokens);
    cache.finish_step();
  }
  return count;
}

}  // namespace

void add_bench_memory_flags(CLI::App* app, BenchMemoryFlags& flags) {
  app->add_option("--models", flags.models, "dummy: geometries to report")->delimiter(',');
  app->add_option("--lengths", flags.lengths, "sequence lengths")->delimiter(',');
  app->add_option("--sequences", flags.sequences,
                  "sequences of each length in the pool whose bytes are counted (KIVI residual "
                  "slots share blocks)")
      ->check(positive());
  app->add_option("--kv-pool-mb", flags.pool_mb, "KV pool for the capacity figure (MiB)")
      ->check(positive());
  app->add_flag("--markdown", flags.markdown, "print a markdown table instead of JSON");
}

int run_bench_memory(const BenchMemoryFlags& flags) {
  const int64_t pool_bytes = flags.pool_mb << 20;
  nlohmann::json results = nlohmann::json::array();
  for (const std::string& spec : flags.models) {
    const ModelConfig model = dummy_model_config(spec);
    int fp16_capacity = 0;
    for (const NamedFormat& format : formats()) {
      nlohmann::json lengths = nlohmann::json::array();
      for (int tokens : flags.lengths) {
        // Per sequence in a pool of flags.sequences of them (KIVI residual slots share blocks),
        // and of one sequence alone.
        const int32_t blocks = KvCacheManager(format.config, model, 0).blocks_needed(tokens);
        KvCacheManager pool(format.config, model, blocks * flags.sequences);
        const CacheUsage u = usage_with(pool, flags.sequences, tokens);
        KvCacheManager one(format.config, model, blocks);
        const CacheUsage alone = usage_with(one, 1, tokens);
        const double sequence_tokens = static_cast<double>(flags.sequences) * tokens;
        lengths.push_back(
            {{"tokens", tokens},
             {"sequences", flags.sequences},
             {"used_bytes", u.used_bytes},
             {"bytes_per_token", static_cast<double>(u.used_bytes) / sequence_tokens},
             {"fp16_equivalent_bytes", u.fp16_equivalent_bytes},
             {"compression_ratio", u.compression_ratio()},
             {"code_bytes", u.code_bytes},
             {"param_bytes", u.param_bytes},
             {"residual_bytes", u.residual_bytes},
             {"slack_bytes", u.slack_bytes},
             {"alone_bytes_per_token", static_cast<double>(alone.used_bytes) / tokens},
             {"alone_compression_ratio", alone.compression_ratio()}});
      }
      const int capacity = max_sequences(format.config, model, pool_bytes, 1024);
      if (format.config.format == KvFormat::kFp16) fp16_capacity = capacity;
      results.push_back(
          {{"model", spec},
           {"format", format.name},
           {"config", describe(format.config)},
           {"lengths", lengths},
           {"pool_mb", flags.pool_mb},
           {"sequences_of_1024_in_pool", capacity},
           {"capacity_vs_fp16",
            fp16_capacity > 0 ? static_cast<double>(capacity) / fp16_capacity : 0.0}});
    }
  }
  if (!flags.markdown) {
    std::cout << nlohmann::json{{"benchmark", "memory"}, {"results", results}}.dump(1) << "\n";
    return 0;
  }
  std::cout << "| model | format | bytes/token @";
  for (int t : flags.lengths) std::cout << " " << t << " |";
  std::cout << " ratio @";
  for (int t : flags.lengths) std::cout << " " << t << " |";
  std::cout << " 1024-token seqs in " << flags.pool_mb << " MiB |\n|---|---|";
  for (size_t i = 0; i < 2 * flags.lengths.size() + 1; ++i) std::cout << "---|";
  std::cout << "\n";
  for (const auto& r : results) {
    std::cout << "| " << r["model"].get<std::string>() << " | " << r["format"].get<std::string>()
              << " |";
    for (const auto& l : r["lengths"]) {
      std::cout << " " << static_cast<int64_t>(l["bytes_per_token"].get<double>()) << " |";
    }
    for (const auto& l : r["lengths"]) {
      char ratio[32];
      std::snprintf(ratio, sizeof(ratio), " %.2fx |", l["compression_ratio"].get<double>());
      std::cout << ratio;
    }
    char capacity[64];
    std::snprintf(capacity, sizeof(capacity), " %d (%.2fx) |\n",
                  r["sequences_of_1024_in_pool"].get<int>(), r["capacity_vs_fp16"].get<double>());
    std::cout << capacity;
  }
  return 0;
}

}  // namespace kvserve
