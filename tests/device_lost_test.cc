// Backend failures on the CPU, injected by a backend that wraps the CPU backend: a plain exception
// fails only the step it happened in, a DeviceLostError ends the engine (every request fails, the
// loss is reported), the engine loop (INTERNAL for every request in flight, submissions refused,
// the loss reported once) and `kvserve serve` (exit status 3). The CUDA backend's own probe, which
// decides between the two, runs only on a GPU (tests/gpu_fault_test.cc).
#include <gtest/gtest.h>
#include <prometheus/text_serializer.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "engine/cpu_backend.h"
#include "engine/engine.h"
#include "server/cli_flags.h"
#include "server/engine_loop.h"
#include "server/metrics.h"
#include "server/serve.h"
#include "tests/reference_fixture.h"
#include "tests/server_harness.h"
#include "tests/test_support.h"

namespace kvserve {
namespace {

using testing::shared_weights;

constexpr char kInjectedLoss[] = "injected: cudaErrorIllegalAddress";
constexpr char kInjectedStepError[] = "injected: cudaErrorMemoryAllocation";

// The CPU backend, with `before_forward(call)` run first on every forward (call counts from 1):
// it may throw to fail the step as a device would.
class HookedBackend : public Backend {
 public:
  HookedBackend(std::unique_ptr<Backend> inner, std::function<void(int)> before_forward)
      : inner_(std::move(inner)), before_forward_(std::move(before_forward)) {}
  std::string name() const override { return "hooked-" + inner_->name(); }
  void copy_blocks(const std::vector<BlockCopy>& copies) override { inner_->copy_blocks(copies); }
  void forward(const std::vector<ForwardItem>& items, std::vector<float>& logits) override {
    before_forward_(++calls_);
    inner_->forward(items, logits);
  }

 private:
  std::unique_ptr<Backend> inner_;
  std::function<void(int)> before_forward_;
  int calls_ = 0;
};

std::unique_ptr<Engine> make_engine(std::function<void(int)> before_forward,
                                    int max_num_seqs = 256) {
  const ModelConfig& model = shared_weights().config;
  auto cache = std::make_unique<KvCacheManager>(testing::fixture_format("kivi2"), model, 512);
  auto backend = std::make_unique<HookedBackend>(
      std::make_unique<CpuBackend>(shared_weights(), cache->config(), cache->num_blocks()),
      std::move(before_forward));
  EngineOptions options;
  options.max_num_seqs = max_num_seqs;
  return std::make_unique<Engine>(model, std::move(cache), std::move(backend), options);
}

GenerationRequest greedy(std::vector<int32_t> prompt, int max_new_tokens) {
  GenerationRequest request;
  request.prompt = std::move(prompt);
  request.max_new_tokens = max_new_tokens;
  request.ignore_eos = true;
  request.sampling.temperature = 0.0f;
  return request;
}

struct Outcome {
  std::vector<int32_t> tokens;
  FinishReason finish = FinishReason::kNone;
  std::string error;
};

// Steps until the engine has no work (or has lost its device); outcomes by request id.
std::map<RequestId, Outcome> run(Engine& engine) {
  std::map<RequestId, Outcome> outcomes;
  std::vector<StepEvent> events;
  while (engine.has_work()) {
    events.clear();
    engine.step(events);
    for (const StepEvent& event : events) {
      Outcome& outcome = outcomes[event.request];
      if (event.has_token) outcome.tokens.push_back(event.token);
      if (event.finish != FinishReason::kNone) {
        EXPECT_EQ(outcome.finish, FinishReason::kNone) << "request " << event.request;
        outcome.finish = event.finish;
        outcome.error = event.error;
      }
    }
  }
  return outcomes;
}

TEST(DeviceLost, EngineFailsEveryRequestAndReportsTheLoss) {
  // One running sequence at a time: the first request decodes while the second waits.
  auto engine = make_engine(
      [](int call) {
        if (call == 3) throw DeviceLostError(kInjectedLoss);
      },
      1);
  const RequestId running = engine->add_request(greedy({464, 2068, 7586}, 8));
  const RequestId waiting = engine->add_request(greedy({318, 257}, 8));
  const std::map<RequestId, Outcome> outcomes = run(*engine);

  // Calls 1 and 2: the prefill and the first decode of `running`; call 3 loses the device.
  EXPECT_EQ(outcomes.at(running).tokens.size(), 2u);
  EXPECT_TRUE(outcomes.at(waiting).tokens.empty());
  for (RequestId id : {running, waiting}) {
    EXPECT_EQ(outcomes.at(id).finish, FinishReason::kError) << "request " << id;
    EXPECT_EQ(outcomes.at(id).error, std::string("device lost: ") + kInjectedLoss);
  }
  EXPECT_EQ(engine->device_lost(), kInjectedLoss);
  EXPECT_FALSE(engine->has_work());
  EXPECT_EQ(engine->cache().num_free_blocks(), engine->cache().num_blocks());
  EXPECT_THROW(engine->add_request(greedy({464}, 1)), DeviceLostError);
}

TEST(DeviceLost, PlainBackendErrorFailsOnlyItsStepAndTheEngineGoesOn) {
  const GenerationRequest first = greedy({464, 2068, 7586}, 6);
  const GenerationRequest second = greedy({318, 257}, 6);
  auto reference = make_engine([](int) {});
  reference->add_request(second);
  const std::vector<int32_t> expected = run(*reference).begin()->second.tokens;

  auto engine = make_engine(
      [](int call) {
        if (call == 2) throw std::runtime_error(kInjectedStepError);
      },
      1);
  const RequestId failed = engine->add_request(first);
  const RequestId survivor = engine->add_request(second);
  const std::map<RequestId, Outcome> outcomes = run(*engine);

  EXPECT_EQ(outcomes.at(failed).finish, FinishReason::kError);
  EXPECT_EQ(outcomes.at(failed).error, kInjectedStepError);
  EXPECT_EQ(outcomes.at(survivor).finish, FinishReason::kLength) << outcomes.at(survivor).error;
  EXPECT_EQ(outcomes.at(survivor).tokens, expected);
  EXPECT_EQ(engine->device_lost(), "");
  EXPECT_EQ(engine->cache().num_free_blocks(), engine->cache().num_blocks());
}

// Holds forward calls at a gate the test opens: while `hold` is on, each call waits until the test
// says whether it passes, fails its step or loses the device. Lets a test place requests exactly
// (running in the step, waiting in the engine, still in the loop's inbox) when a fault happens.
class ForwardGate {
 public:
  enum class Verdict { kNone, kPass, kFailStep, kLoseDevice };

  // Engine thread, at every forward call.
  void at_forward() {
    std::unique_lock<std::mutex> lock(mu_);
    if (!hold_) return;
    ++arrivals_;
    cv_.notify_all();
    cv_.wait(lock, [this] { return verdict_ != Verdict::kNone; });
    const Verdict verdict = verdict_;
    verdict_ = Verdict::kNone;
    if (verdict == Verdict::kFailStep) throw std::runtime_error(kInjectedStepError);
    if (verdict == Verdict::kLoseDevice) throw DeviceLostError(kInjectedLoss);
  }

  void hold() {
    std::lock_guard<std::mutex> lock(mu_);
    hold_ = true;
  }
  // Waits until `count` calls in all have arrived at the gate while held.
  void wait_for_arrivals(int count) {
    std::unique_lock<std::mutex> lock(mu_);
    ASSERT_TRUE(cv_.wait_for(lock, std::chrono::seconds(30), [&] { return arrivals_ >= count; }))
        << "forward call " << count << " never came";
  }
  // Lets the waiting call go with `verdict`; `keep_holding` false opens the gate for good.
  void release(Verdict verdict, bool keep_holding) {
    std::lock_guard<std::mutex> lock(mu_);
    verdict_ = verdict;
    hold_ = keep_holding;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool hold_ = false;
  int arrivals_ = 0;
  Verdict verdict_ = Verdict::kNone;
};

// Reads one request's StreamChannel to its end (a final or an error message).
struct StreamEnd {
  int chunks = 0;
  StreamMessage last;
};

StreamEnd read_to_end(StreamChannel& channel) {
  StreamEnd end;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    StreamMessage message;
    if (!channel.pop(message)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      continue;
    }
    if (message.kind == StreamMessage::Kind::kChunk) {
      ++end.chunks;
      continue;
    }
    end.last = std::move(message);
    return end;
  }
  ADD_FAILURE() << "the stream did not end";
  return end;
}

// An EngineLoop over a HookedBackend whose forward calls pass through `gate`, one running
// sequence at a time, counting the device-lost reports.
class EngineLoopFault : public ::testing::Test {
 protected:
  void SetUp() override {
    EngineLoopOptions options;
    options.on_device_lost = [this](const std::string& message) {
      std::lock_guard<std::mutex> lock(mu_);
      reports_.push_back(message);
    };
    loop_ = std::make_unique<EngineLoop>(make_engine([this](int) { gate_.at_forward(); }, 1),
                                         load_tokenizer(testing::shared_model_dir(), ""), options,
                                         metrics_);
    loop_->start();
    loop_->wait_until_warm();
  }
  // A test that failed half-way may leave a forward call at the gate: let it go, or stopping the
  // loop would wait for it forever.
  void TearDown() override { gate_.release(ForwardGate::Verdict::kPass, false); }

  std::shared_ptr<StreamChannel> submit(const GenerationRequest& generation,
                                        EngineLoop::SubmitResult expected) {
    ServeRequest request;
    request.id = "req-" + std::to_string(++submitted_);
    request.generation = generation;
    request.arrival = Clock::now();
    auto channel = std::make_shared<StreamChannel>(64);
    EngineLoop::Ticket ticket = 0;
    EXPECT_EQ(loop_->submit(std::move(request), channel, ticket), expected);
    return channel;
  }

  double failures(const std::string& code) const {
    const std::string text = prometheus::TextSerializer().Serialize(metrics_.registry()->Collect());
    try {
      return testing::metric_value(text, "kvserve_request_failure_total{code=\"" + code + "\"}");
    } catch (const std::runtime_error&) {
      return 0;  // never counted
    }
  }

  std::vector<std::string> reports() {
    std::lock_guard<std::mutex> lock(mu_);
    return reports_;
  }

  ForwardGate gate_;
  Metrics metrics_{{"test", "cpu", "kivi2", "test"}};
  std::unique_ptr<EngineLoop> loop_;
  int submitted_ = 0;
  std::mutex mu_;
  std::vector<std::string> reports_;
};

TEST_F(EngineLoopFault, DeviceLostFailsEveryRequestInFlightRefusesNewOnesAndReportsOnce) {
  gate_.hold();
  // `running` is prefilled at call 1 and decodes at call 2, when the device is lost. `queued`,
  // submitted during call 1, enters the engine before the next step (the loop drains its inbox
  // first) and waits there (one running sequence at a time); `in_inbox` reaches the loop while
  // call 2 runs.
  auto running = submit(greedy({464, 2068, 7586}, 32), EngineLoop::SubmitResult::kAccepted);
  gate_.wait_for_arrivals(1);
  auto queued = submit(greedy({318, 257}, 8), EngineLoop::SubmitResult::kAccepted);
  gate_.release(ForwardGate::Verdict::kPass, true);
  gate_.wait_for_arrivals(2);
  auto in_inbox = submit(greedy({1212}, 8), EngineLoop::SubmitResult::kAccepted);
  gate_.release(ForwardGate::Verdict::kLoseDevice, false);

  const std::string message = std::string("device lost: ") + kInjectedLoss;
  const StreamEnd running_end = read_to_end(*running);
  EXPECT_EQ(running_end.chunks, 1);  // the prefill's token
  for (const StreamEnd& end : {running_end, read_to_end(*queued), read_to_end(*in_inbox)}) {
    EXPECT_EQ(end.last.kind, StreamMessage::Kind::kError);
    EXPECT_EQ(end.last.error, StreamError::kInternal);
    EXPECT_EQ(end.last.error_message, message);
  }
  EXPECT_EQ(failures("INTERNAL"), 3);
  EXPECT_EQ(loop_->in_flight(), 0u);
  EXPECT_EQ(loop_->snapshot().cache.blocks_used, 0);

  auto refused = submit(greedy({464}, 4), EngineLoop::SubmitResult::kDeviceLost);
  EXPECT_EQ(refused->size(), 0u);
  EXPECT_EQ(loop_->device_lost(), kInjectedLoss);
  EXPECT_EQ(reports(), std::vector<std::string>{kInjectedLoss});
  EXPECT_EQ(loop_->in_flight(), 0u);
}

TEST_F(EngineLoopFault, PlainBackendErrorFailsItsStepAndTheLoopKeepsServing) {
  gate_.hold();
  auto failed = submit(greedy({464, 2068, 7586}, 32), EngineLoop::SubmitResult::kAccepted);
  gate_.wait_for_arrivals(1);
  auto queued = submit(greedy({318, 257}, 4), EngineLoop::SubmitResult::kAccepted);
  gate_.release(ForwardGate::Verdict::kPass, true);
  gate_.wait_for_arrivals(2);
  // Call 2 is the decode of `failed` alone: `queued` waits in the engine.
  gate_.release(ForwardGate::Verdict::kFailStep, false);

  const StreamEnd failed_end = read_to_end(*failed);
  EXPECT_EQ(failed_end.last.kind, StreamMessage::Kind::kError);
  EXPECT_EQ(failed_end.last.error, StreamError::kInternal);
  EXPECT_EQ(failed_end.last.error_message, std::string("engine error: ") + kInjectedStepError);
  // The request that waited outside the failed step, and one submitted after it, complete.
  for (auto& channel : {queued, submit(greedy({1212}, 4), EngineLoop::SubmitResult::kAccepted)}) {
    const StreamEnd end = read_to_end(*channel);
    ASSERT_EQ(end.last.kind, StreamMessage::Kind::kFinal) << end.last.error_message;
    EXPECT_EQ(end.last.final.reason, FinishReason::kLength);
    EXPECT_EQ(end.last.final.completion_tokens, 4);
  }
  EXPECT_EQ(failures("INTERNAL"), 1);
  EXPECT_EQ(loop_->device_lost(), "");
  EXPECT_TRUE(reports().empty());
  EXPECT_EQ(loop_->in_flight(), 0u);
}

// --test-lose-device-at-forward 4: the warm-up makes calls 1 and 2, the request's prefill call 3
// (its first token) and its first decode call 4, which loses the device.
TEST(DeviceLostServer, StreamFailsInternalAndTheServerExitsWithItsStatus) {
  testing::ServerProcess server({"--model", testing::shared_model_dir(), "--device", "cpu",
                                 "--test-lose-device-at-forward", "4"});

  v1::GenerateRequest request;
  request.set_prompt("The cache");
  request.mutable_sampling()->set_temperature(0.0f);
  request.mutable_stopping()->set_max_new_tokens(16);
  request.mutable_stopping()->set_ignore_eos(true);
  const testing::StreamResult result = testing::generate(*server.stub(), request);
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_EQ(result.status.error_message(),
            "device lost: injected device loss at forward call 4 "
            "(--test-lose-device-at-forward)");
  EXPECT_EQ(result.ids.size(), 1u);

  EXPECT_EQ(server.process().wait(std::chrono::seconds(30)), kExitDeviceLost);
  const std::string log = server.process().log();
  EXPECT_NE(log.find("NOT_SERVING, shutting down and exiting with status 3"), std::string::npos)
      << log;
}

}  // namespace
}  // namespace kvserve
