// The engine thread's host work per generated token, with a backend that computes nothing: what
// a step costs besides the model on any device. Two loops over the same requests:
//   EngineStep: Engine::step alone (scheduling, the KV block tables, sampling bookkeeping), as
//               `kvserve bench engine` drives it;
//   EngineLoop: the server's engine thread on top (detokenising, stop strings, metrics, the
//               per-stream channels), with a StreamWriter thread poking listeners that drain the
//               channels as the gRPC reactors do. It also reports the engine thread's own CPU
//               time per token (engine_thread_us_per_token): what the loop adds between two device
//               steps, apart from the wall clock's waits for the writer thread.
// Between two GPU decode steps this time is idle GPU: at B = 256 the H200 step is about 2 ms.
// Usage: kvserve_host_bench [--benchmark_format=json] (Google Benchmark flags); the model
// directory (tokenizer and config) is found as `kvserve` finds one without --model:
// $KVSERVE_MODEL, then ../shared/models/gpt2-tiny-docs.
#include <benchmark/benchmark.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "engine/engine.h"
#include "server/cli_flags.h"
#include "server/engine_loop.h"
#include "server/metrics.h"
#include "server/stream_channel.h"
#include "server/stream_writer.h"

namespace kvserve {
namespace {

constexpr int kPromptTokens = 64;
constexpr int kNewTokens = 64;

// Picks ordinary word-piece ids at once, so that detokenising does real work.
class InstantBackend : public Backend {
 public:
  std::string name() const override { return "instant"; }
  void copy_blocks(const std::vector<BlockCopy>&) override {}  // it has no pool to copy in
  void forward(const std::vector<ForwardItem>&, std::vector<float>&) override {
    throw std::logic_error("InstantBackend has no logits");
  }
  void forward_sample(const std::vector<ForwardItem>& items, const std::vector<SampleRequest>&,
                      std::vector<SampleResult>& results) override {
    results.assign(items.size(), SampleResult{});
    for (SampleResult& result : results) {
      result.token = {static_cast<int32_t>(300 + (next_++ * 7919) % 20000), -1.0f};
    }
  }

 private:
  uint64_t next_ = 0;
};

const ModelConfig& model_config() {
  static const ModelConfig config = read_model_config(resolve_model(""));
  return config;
}

std::unique_ptr<Engine> make_engine(int batch) {
  const ModelConfig& model = model_config();
  KvFlags kv;
  kv.format = "kivi2";
  const KvCacheConfig config = kv_config(kv, model);
  EngineOptions options;
  options.max_num_seqs = batch;
  return std::make_unique<Engine>(
      model,
      std::make_unique<KvCacheManager>(
          config, model, KvCacheManager::blocks_in_budget(int64_t{1024} << 20, config, model)),
      std::make_unique<InstantBackend>(), options);
}

GenerationRequest request(int index) {
  GenerationRequest r;
  for (int k = 0; k < kPromptTokens; ++k) r.prompt.push_back(1000 + (index * 31 + k) % 20000);
  r.max_new_tokens = kNewTokens;
  r.ignore_eos = true;
  r.sampling.temperature = 0.0f;
  return r;
}

// Nanoseconds of CPU the thread named `name` has run so far (Linux's schedstat), or -1 if none is.
int64_t thread_cpu_ns(const std::string& name) {
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(task.path() / "comm");
    std::string task_name;
    if (!std::getline(comm, task_name) || task_name != name) continue;
    std::ifstream schedstat(task.path() / "schedstat");
    int64_t ns = -1;
    schedstat >> ns;
    return ns;
  }
  return -1;
}

void report(benchmark::State& state, int batch) {
  const int64_t tokens = state.iterations() * batch * kNewTokens;
  state.SetItemsProcessed(tokens);
  state.counters["us_per_token"] =
      benchmark::Counter(static_cast<double>(tokens) * 1e-6,
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

void EngineStep(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  std::vector<StepEvent> events;
  for (auto _ : state) {
    state.PauseTiming();
    auto engine = make_engine(batch);
    state.ResumeTiming();
    for (int i = 0; i < batch; ++i) engine->add_request(request(i));
    while (engine->has_work()) {
      events.clear();
      engine->step(events);
    }
    state.PauseTiming();
    engine.reset();
    state.ResumeTiming();
  }
  report(state, batch);
}

// What a gRPC reactor does when poked, minus the write: takes every waiting message.
class DrainingListener : public StreamListener {
 public:
  DrainingListener(StreamChannel& channel, std::atomic<int>& ended)
      : channel_(channel), ended_(ended) {}
  void on_message_ready() override {
    StreamMessage message;
    while (channel_.pop(message)) {
      if (message.kind != StreamMessage::Kind::kChunk) ended_.fetch_add(1);
    }
  }

 private:
  StreamChannel& channel_;
  std::atomic<int>& ended_;
};

// The server's engine thread and writer thread over `batch` fresh streams.
struct ServingPair {
  ServingPair(int batch, const Tokenizer& tokenizer) : metrics({"bench", "instant", "kivi2", "-"}) {
    EngineLoopOptions options;
    options.max_queued_requests = static_cast<size_t>(batch);
    loop = std::make_unique<EngineLoop>(make_engine(batch), tokenizer, options, metrics);
    loop->start();
    loop->wait_until_warm();
    for (int i = 0; i < batch; ++i) {
      channels.push_back(std::make_shared<StreamChannel>(size_t{1} << 12, &writer));
      listeners.push_back(std::make_shared<DrainingListener>(*channels.back(), ended));
      channels.back()->set_listener(listeners.back());
    }
  }
  ~ServingPair() { loop->stop(); }

  Metrics metrics;
  std::unique_ptr<EngineLoop> loop;
  std::atomic<int> ended{0};
  std::vector<std::shared_ptr<StreamChannel>> channels;
  std::vector<std::shared_ptr<DrainingListener>> listeners;
  // Last, so it is destroyed first: its thread may still be running a listener, which reads its
  // channel and `ended`, when the stopped loop has pushed its last message.
  StreamWriter writer;
};

void EngineLoopWithWriter(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  const Tokenizer tokenizer = load_tokenizer(resolve_model(""), "");
  int64_t engine_ns = 0;
  for (auto _ : state) {
    state.PauseTiming();
    auto pair = std::make_unique<ServingPair>(batch, tokenizer);
    const int64_t engine_ns_before = thread_cpu_ns(kEngineThreadName);
    if (engine_ns_before < 0) {
      state.SkipWithError("no engine thread in /proc/self/task");
      return;
    }
    state.ResumeTiming();
    for (int i = 0; i < batch; ++i) {
      ServeRequest served;
      served.id = std::to_string(i);
      served.generation = request(i);
      served.arrival = std::chrono::steady_clock::now();
      EngineLoop::Ticket ticket = 0;
      if (pair->loop->submit(std::move(served), pair->channels[i], ticket) !=
          EngineLoop::SubmitResult::kAccepted) {
        state.SkipWithError("a request was refused");
        return;
      }
    }
    while (pair->ended.load() < batch) std::this_thread::sleep_for(std::chrono::microseconds(50));
    state.PauseTiming();
    // The engine thread has pushed the last message and goes to sleep: schedstat counts a
    // thread's run time up to its last switch, so let it get there.
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    engine_ns += thread_cpu_ns(kEngineThreadName) - engine_ns_before;
    pair.reset();
    state.ResumeTiming();
  }
  report(state, batch);
  state.counters["engine_thread_us_per_token"] =
      static_cast<double>(engine_ns) * 1e-3 /
      static_cast<double>(state.iterations() * batch * kNewTokens);
}

// Both run at the batch sizes of `kvserve bench decode`, timed by the wall clock (the loop's work
// is on other threads).
void batch_sizes(benchmark::internal::Benchmark* bench) {
  for (int batch : {1, 16, 64, 256}) bench->Arg(batch);
  bench->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(EngineStep)->Apply(batch_sizes);
BENCHMARK(EngineLoopWithWriter)->Apply(batch_sizes);

}  // namespace
}  // namespace kvserve

BENCHMARK_MAIN();
