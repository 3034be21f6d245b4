// Device faults during a step, caused for real: another allocation takes nearly all free GPU
// memory, so the step that needs bigger activation buffers gets cudaErrorMemoryAllocation. The
// requests of that step fail (the engine with kError, the server with INTERNAL), nothing leaks, and
// once memory is back the same requests give the tokens a fault-free run gives. Skipped when no GPU
// is visible; run on the GPU machine by scripts/gpu-check.sh.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <memory>
#include <regex>
#include <string>
#include <vector>

#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_kv_cache.h"
#include "engine/engine.h"
#include "kernels/device_info.h"
#include "server/serve.h"
#include "tests/reference_fixture.h"
#include "tests/server_harness.h"
#include "tests/test_support.h"

namespace kvserve {
namespace {

using testing::shared_weights;

#define SKIP_WITHOUT_GPU() \
  if (cuda::visible_device_count() == 0) GTEST_SKIP() << "no CUDA GPU visible"

// Holds all the device memory it can get, in chunks that halve each time an allocation fails, down
// to 64 KiB pieces (allocations that small come out of the driver's 2 MiB pages, so the free
// figure alone cannot say when nothing is left), and gives it back when destroyed.
class DeviceMemoryHog {
 public:
  DeviceMemoryHog() {
    size_t chunk = free_bytes();
    while (chunk >= kSmallest) {
      void* block = nullptr;
      if (cudaMalloc(&block, chunk) == cudaSuccess) {
        blocks_.push_back(block);
      } else {
        cudaGetLastError();  // the failed allocation's error is not sticky; clear it
        chunk /= 2;
      }
    }
  }
  ~DeviceMemoryHog() {
    for (void* block : blocks_) cudaFree(block);
  }
  DeviceMemoryHog(const DeviceMemoryHog&) = delete;
  DeviceMemoryHog& operator=(const DeviceMemoryHog&) = delete;

  static size_t free_bytes() {
    size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) return 0;
    return free;
  }

 private:
  static constexpr size_t kSmallest = size_t{1} << 16;
  std::vector<void*> blocks_;
};

// Two prompts that fill a 2048-token step, so the step needs activation buffers that the short
// warm-up request never grew.
std::vector<GenerationRequest> long_requests() {
  std::vector<GenerationRequest> requests(2);
  for (size_t r = 0; r < requests.size(); ++r) {
    for (int t = 0; t < 1000; ++t) {
      requests[r].prompt.push_back(static_cast<int32_t>((t * 7919 + r * 104729) % 50000));
    }
    requests[r].max_new_tokens = 8;
    requests[r].ignore_eos = true;
    requests[r].sampling.temperature = 0.0f;
  }
  return requests;
}

struct Outcome {
  std::vector<int32_t> tokens;
  FinishReason finish = FinishReason::kNone;
  std::string error;
};

// Runs `requests` together to the end.
std::vector<Outcome> run(Engine& engine, const std::vector<GenerationRequest>& requests) {
  std::vector<RequestId> ids;
  for (const GenerationRequest& r : requests) ids.push_back(engine.add_request(r));
  std::vector<Outcome> outcomes(requests.size());
  std::vector<StepEvent> events;
  while (engine.has_work()) {
    events.clear();
    engine.step(events);
    for (const StepEvent& event : events) {
      const size_t i = static_cast<size_t>(event.request - ids.front());
      if (event.has_token) outcomes[i].tokens.push_back(event.token);
      if (event.finish != FinishReason::kNone) {
        outcomes[i].finish = event.finish;
        outcomes[i].error = event.error;
      }
    }
  }
  return outcomes;
}

std::unique_ptr<Engine> make_engine() {
  const ModelConfig& model = shared_weights().config;
  auto cache = std::make_unique<KvCacheManager>(testing::fixture_format("kivi2"), model, 4096);
  auto backend =
      std::make_unique<CudaBackend>(shared_weights(), cache->config(), cache->num_blocks());
  return std::make_unique<Engine>(model, std::move(cache), std::move(backend), EngineOptions{});
}

TEST(GpuFault, OutOfMemoryInAStepFailsItsRequestsAndTheEngineRecovers) {
  SKIP_WITHOUT_GPU();
  const std::vector<GenerationRequest> requests = long_requests();
  std::vector<Outcome> expected;
  {
    std::unique_ptr<Engine> reference = make_engine();
    expected = run(*reference, requests);
  }
  ASSERT_EQ(expected[0].finish, FinishReason::kLength) << expected[0].error;

  std::unique_ptr<Engine> engine = make_engine();
  GenerationRequest warm = requests[0];
  warm.prompt.resize(8);
  const std::vector<Outcome> warm_alone = run(*engine, {warm});
  ASSERT_EQ(warm_alone[0].finish, FinishReason::kLength) << warm_alone[0].error;

  std::vector<Outcome> failed;
  {
    DeviceMemoryHog hog;
    // Far less than the 2000-token step's new activation buffers (about 10 MB).
    ASSERT_LE(DeviceMemoryHog::free_bytes(), size_t{4} << 20);
    failed = run(*engine, requests);
  }
  for (const Outcome& outcome : failed) {
    EXPECT_EQ(outcome.finish, FinishReason::kError);
    EXPECT_NE(outcome.error.find("out of memory"), std::string::npos) << outcome.error;
    EXPECT_TRUE(std::regex_search(outcome.error, std::regex(R"(\.(h|cc|cu):\d+: )")))
        << "no file:line in: " << outcome.error;
  }
  EXPECT_EQ(engine->cache().num_free_blocks(), engine->cache().num_blocks());

  // Memory is back: the same requests, and the warm one, as if nothing had happened.
  const std::vector<Outcome> again = run(*engine, requests);
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(again[i].finish, FinishReason::kLength) << again[i].error;
    EXPECT_EQ(again[i].tokens, expected[i].tokens) << "request " << i;
  }
  EXPECT_EQ(run(*engine, {warm})[0].tokens, warm_alone[0].tokens);
  EXPECT_EQ(engine->cache().num_free_blocks(), engine->cache().num_blocks());
}

// A pool beyond the free device memory is refused when the cache is made, naming the flag to
// change, before anything is allocated.
TEST(GpuFault, PoolLargerThanFreeMemoryIsRefusedAtStart) {
  SKIP_WITHOUT_GPU();
  const ModelConfig& model = shared_weights().config;
  const KvCacheConfig config = testing::fixture_format("kivi2");
  const KvCacheManager probe(config, model, 1);
  const size_t per_block = probe.bytes_per_block();
  const size_t free_before = DeviceMemoryHog::free_bytes();
  const auto blocks =
      static_cast<int32_t>(std::min<size_t>(free_before / per_block + 1024, INT32_MAX));
  const KvCacheManager manager(config, model, blocks);
  try {
    CudaKvCache cache(manager.config(), manager.num_blocks(), model);
    FAIL() << "a " << (static_cast<size_t>(blocks) * per_block >> 20) << " MiB pool was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("--kv-pool-mb"), std::string::npos) << e.what();
  }
  EXPECT_GE(DeviceMemoryHog::free_bytes() + (size_t{64} << 20), free_before);
}

v1::GenerateRequest as_proto(const GenerationRequest& r) {
  v1::GenerateRequest proto;
  for (int32_t id : r.prompt) proto.mutable_prompt_token_ids()->add_ids(id);
  proto.mutable_sampling()->set_temperature(0.0f);
  proto.mutable_stopping()->set_max_new_tokens(r.max_new_tokens);
  proto.mutable_stopping()->set_ignore_eos(true);
  return proto;
}

TEST(GpuFault, ServerAnswersInternalOnOutOfMemoryAndKeepsServing) {
  SKIP_WITHOUT_GPU();
  testing::ServerProcess server({"--model", testing::shared_model_dir(), "--device", "cuda", "--kv",
                                 "kivi2", "--kv-pool-mb", "256"});
  auto stub = server.stub();
  const v1::GenerateRequest request = as_proto(long_requests()[0]);
  v1::GenerateRequest warm = request;
  warm.mutable_prompt_token_ids()->mutable_ids()->Truncate(8);
  const testing::StreamResult warm_result = testing::generate(*stub, warm);
  ASSERT_TRUE(warm_result.status.ok()) << warm_result.status.error_message();

  testing::StreamResult failed;
  {
    DeviceMemoryHog hog;
    failed = testing::generate(*stub, request);
  }
  EXPECT_EQ(failed.status.error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_NE(failed.status.error_message().find("out of memory"), std::string::npos)
      << failed.status.error_message();
  EXPECT_EQ(server.health(), grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_EQ(testing::metric_value(server.metrics_text(),
                                  "kvserve_request_failure_total{code=\"INTERNAL\"}"),
            1.0);

  const testing::StreamResult recovered = testing::generate(*stub, request);
  ASSERT_TRUE(recovered.status.ok()) << recovered.status.error_message();
  EXPECT_EQ(recovered.ids.size(), 8u);
  EXPECT_EQ(testing::generate(*stub, warm).ids, warm_result.ids);
  EXPECT_EQ(server.cache_stats().used_bytes(), 0);
}

// A kernel that traps (--test-lose-device-at-forward 4: calls 1 and 2 are the warm-up's, 3 the
// request's prefill, 4 its first decode) poisons the CUDA context for real: the backend's
// probe must call it a device loss, the stream fail INTERNAL and the server exit with status 3.
// A separate process, since the fault would end every later GPU test of this one.
TEST(GpuFault, KernelTrapLosesTheDeviceAndTheServerExits) {
  SKIP_WITHOUT_GPU();
  testing::ServerProcess server({"--model", testing::shared_model_dir(), "--device", "cuda", "--kv",
                                 "kivi2", "--kv-pool-mb", "256", "--test-lose-device-at-forward",
                                 "4"});
  GenerationRequest generation = long_requests()[0];
  generation.prompt.resize(8);
  const testing::StreamResult result = testing::generate(*server.stub(), as_proto(generation));
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INTERNAL);
  const std::string& message = result.status.error_message();
  EXPECT_EQ(message.rfind("device lost: ", 0), 0u) << message;
  EXPECT_NE(message.find("the CUDA context is unusable"), std::string::npos) << message;
  // The probe's error by name (a trap gives cudaErrorLaunchFailure on the GPUs we know).
  EXPECT_TRUE(std::regex_search(message, std::regex(R"(after the failed step: cudaError\w+: )")))
      << message;
  EXPECT_EQ(result.ids.size(), 1u);
  EXPECT_EQ(server.process().wait(std::chrono::seconds(60)), kExitDeviceLost)
      << server.process().log();
}

}  // namespace
}  // namespace kvserve
