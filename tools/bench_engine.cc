#include "tools/bench_engine.h"

#include <algorithm>
#include <chrono>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/engine_builder.h"

namespace kvserve {

void add_bench_engine_flags(CLI::App* app, BenchEngineFlags& flags) {
  add_model_flags(app, flags.model);
  add_kv_flags(app, flags.kv);
  add_engine_flags(app, flags.engine);
  add_kv_error_sample_rate_flag(app, flags.engine);
  app->add_option("--requests", flags.requests, "generations to run")->check(positive());
  app->add_option("--concurrency", flags.concurrency, "generations in flight at most")
      ->check(positive());
  app->add_option("--prompt-len", flags.prompt_len, "prompt length in tokens (random ids)")
      ->check(positive());
  app->add_option("--prompt-len-spread", flags.prompt_len_spread,
                  "request i's prompt has prompt-len + i % this many tokens (1: all equal)")
      ->check(positive())
      ->capture_default_str();
  app->add_option("--max-new-tokens", flags.max_new_tokens, "tokens generated per request")
      ->check(positive());
  app->add_option("--temperature", flags.temperature, "sampling temperature, 0 for greedy")
      ->check(CLI::Range(0.0f, 100.0f))
      ->capture_default_str();
  app->add_option("--warmup-requests", flags.warmup_requests, "untimed requests run together first")
      ->check(non_negative())
      ->capture_default_str();
  app->add_option("--seed", flags.seed, "seed of the prompts and of sampling")
      ->capture_default_str();
}

// Generations (greedy unless --temperature says otherwise) that ignore end-of-text, so every
// request makes exactly max_new_tokens, as `kvserve-cli load` asks (--ignore-eos is its default).
// The clock runs from the first request queued to the last finished: prefill included, as the load
// generator counts it.
int run_bench_engine(const BenchEngineFlags& flags) {
  const EngineSpec spec = engine_spec(flags.model, flags.kv, flags.engine);
  BuiltBackend built = build_backend(spec);
  const ModelConfig model = built.model;
  const std::string device = built.device;
  const std::unique_ptr<Engine> built_engine = build_engine(std::move(built), spec.engine);
  Engine& engine = *built_engine;

  std::mt19937_64 rng(flags.seed);
  // The last id is left out, as the load generator leaves it out: GPT-2 puts <|endoftext|> there.
  std::uniform_int_distribution<int32_t> token(0, std::max(0, model.vocab_size - 2));
  std::vector<GenerationRequest> requests(flags.warmup_requests + flags.requests);
  int64_t prompt_tokens = 0;  // of the timed requests
  for (size_t i = 0; i < requests.size(); ++i) {
    GenerationRequest& r = requests[i];
    const int timed = static_cast<int>(i) - flags.warmup_requests;
    const int length = flags.prompt_len + std::max(0, timed) % flags.prompt_len_spread;
    for (int k = 0; k < length; ++k) r.prompt.push_back(token(rng));
    if (timed >= 0) prompt_tokens += length;
    r.sampling.temperature = flags.temperature;
    r.sampling.seed = flags.seed;
    r.max_new_tokens = flags.max_new_tokens;
    r.ignore_eos = true;
    if (const absl::Status problem = engine.validate(r); !problem.ok()) {
      throw std::invalid_argument("bench engine: " + std::string(problem.message()));
    }
  }

  std::vector<StepEvent> events;
  for (int i = 0; i < flags.warmup_requests; ++i) engine.add_request(requests[i]);
  while (engine.has_work()) {
    events.clear();
    engine.step(events);
  }

  using Clock = std::chrono::steady_clock;
  // Wall time of the timed steps by kind, so that a slow run says which steps were slow: steps
  // with prompt tokens, and decode-only steps that replayed a CUDA graph, captured one, or ran
  // eagerly (no graphs, or a step whose quantization error was sampled).
  struct StepTimes {
    int64_t steps = 0;
    double seconds = 0.0;
  };
  std::map<std::string, StepTimes> step_times;
  GraphCounters graphs_before = engine.backend().graph_counters();
  const Clock::time_point start = Clock::now();
  int queued = 0, in_flight = 0, finished = 0, failed = 0, steps = 0;
  int64_t output_tokens = 0, preemptions = 0, recomputed_tokens = 0;
  KvQuantizationErrors kv_errors;
  while (finished < flags.requests) {
    for (; in_flight < flags.concurrency && queued < flags.requests; ++queued, ++in_flight) {
      engine.add_request(requests[flags.warmup_requests + queued]);
    }
    events.clear();
    const Clock::time_point step_start = Clock::now();
    const StepStats stats = engine.step(events);
    const GraphCounters graphs_after = engine.backend().graph_counters();
    const char* kind = stats.prefill_tokens == 0  ? "decode_eager"
                       : stats.decode_tokens == 0 ? "prefill"
                                                  : "mixed";
    if (stats.prefill_tokens == 0 && graphs_after.captured > graphs_before.captured) {
      kind = "decode_captured";
    } else if (stats.prefill_tokens == 0 && graphs_after.replayed > graphs_before.replayed) {
      kind = "decode_replayed";
    }
    graphs_before = graphs_after;
    StepTimes& times = step_times[kind];
    ++times.steps;
    times.seconds += std::chrono::duration<double>(Clock::now() - step_start).count();
    ++steps;
    preemptions += stats.preemptions;
    recomputed_tokens += stats.recomputed_tokens;
    kv_errors.append(stats.kv_errors);
    for (const StepEvent& event : events) {
      if (event.has_token) ++output_tokens;
      if (event.finish == FinishReason::kNone) continue;
      --in_flight;
      ++finished;
      if (event.finish != FinishReason::kLength) ++failed;
    }
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const GraphCounters graphs = engine.backend().graph_counters();
  // The sampled quantization error of the timed part, as the metric's buckets give it.
  auto summary = [](const std::vector<float>& single, KvErrorBins bins) {
    bins.add(bin_errors(single));
    const uint64_t n = bins.total();
    return nlohmann::json{{"samples", n},
                          {"mean", n > 0 ? bins.sum / static_cast<double>(n) : 0.0},
                          {"p50", histogram_quantile(bins, 0.5)},
                          {"p99", histogram_quantile(bins, 0.99)}};
  };
  nlohmann::json step_times_json = nlohmann::json::object();
  for (const auto& [kind, times] : step_times) {
    step_times_json[kind] = {{"steps", times.steps},
                             {"seconds", times.seconds},
                             {"mean_ms", 1e3 * times.seconds / static_cast<double>(times.steps)}};
  }
  const nlohmann::json out = {{"bench", "engine"},
                              {"model", spec.model},
                              {"device", device},
                              {"cuda_graphs", spec.backend.cuda_graphs},
                              {"graph_replays", graphs.replayed},
                              {"graph_captures", graphs.captured},
                              {"kv", flags.kv.format},
                              {"decode_attention", flags.model.decode_attention},
                              {"prefill_attention", flags.model.prefill_attention},
                              {"requests", flags.requests},
                              {"concurrency", flags.concurrency},
                              {"prompt_len", flags.prompt_len},
                              {"prompt_len_spread", flags.prompt_len_spread},
                              {"prompt_tokens", prompt_tokens},
                              {"max_new_tokens", flags.max_new_tokens},
                              {"temperature", flags.temperature},
                              {"warmup_requests", flags.warmup_requests},
                              {"max_num_seqs", engine.options().max_num_seqs},
                              {"max_batch_tokens", engine.options().max_batch_tokens},
                              {"admission", to_string(engine.options().admission)},
                              {"preemptions", preemptions},
                              {"recomputed_tokens", recomputed_tokens},
                              {"failed", failed},
                              {"steps", steps},
                              {"step_times", step_times_json},
                              {"duration_s", seconds},
                              {"output_tokens", output_tokens},
                              {"output_throughput", output_tokens / seconds},
                              {"prompt_throughput", static_cast<double>(prompt_tokens) / seconds},
                              {"request_throughput", flags.requests / seconds},
                              {"kv_error_sample_rate", spec.engine.kv_error_sample_rate},
                              {"kv_quantization_error",
                               {{"key", summary(kv_errors.key, kv_errors.key_bins)},
                                {"value", summary(kv_errors.value, kv_errors.value_bins)}}}};
  std::cout << out.dump() << std::endl;
  return failed == 0 ? 0 : 1;
}

}  // namespace kvserve
