// Prefix caching on the CUDA backend (issue 20): a request that starts on cached pages, read by the
// kernels through its block table (KIVI: and a device copy of the residual snapshot), gets the
// same greedy tokens as without the hit. Skipped when no
// GPU is visible; run on the GPU machine (scripts/gpu-check.sh).
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/cuda/cuda_backend.h"
#include "engine/engine.h"
#include "kernels/device_info.h"
#include "tests/reference_fixture.h"

namespace kvserve {
namespace {

using testing::fixture_format;
using testing::ids_of;
using testing::shared_weights;

#define SKIP_WITHOUT_GPU() \
  if (cuda::visible_device_count() == 0) GTEST_SKIP() << "no CUDA GPU visible"

std::unique_ptr<Engine> cuda_engine(const std::string& format, bool prefix_cache) {
  const ModelConfig& model = shared_weights().config;
  auto cache = std::make_unique<KvCacheManager>(fixture_format(format), model, 1024);
  auto backend =
      std::make_unique<CudaBackend>(shared_weights(), cache->config(), cache->num_blocks());
  EngineOptions options;
  options.prefix_cache = prefix_cache;
  return std::make_unique<Engine>(model, std::move(cache), std::move(backend), options);
}

GenerationRequest greedy(std::vector<int32_t> prompt, int tokens) {
  GenerationRequest r;
  r.prompt = std::move(prompt);
  r.max_new_tokens = tokens;
  r.ignore_eos = true;
  r.sampling.temperature = 0.0f;
  return r;
}

// Runs `requests` together; each one's greedy tokens, and the prompt tokens found in the cache.
std::vector<std::vector<int32_t>> run(Engine& engine,
                                      const std::vector<GenerationRequest>& requests, int* hits) {
  std::map<RequestId, size_t> index;
  for (size_t i = 0; i < requests.size(); ++i) index[engine.add_request(requests[i])] = i;
  std::vector<std::vector<int32_t>> out(requests.size());
  std::vector<StepEvent> events;
  while (engine.has_work()) {
    events.clear();
    *hits += engine.step(events).prefix_cache_hits;
    for (const StepEvent& e : events) {
      EXPECT_NE(e.finish, FinishReason::kError) << e.error;
      if (e.has_token) out[index[e.request]].push_back(e.token);
    }
  }
  return out;
}

// Every fixture prompt behind the first 128 tokens of the longest one: after that long prompt has
// run, each starts on its 4 cached pages (fp16, int8), or for KIVI on 3 pages and the residual
// snapshot at 128, copied into its residual blocks on the device (cudaMemcpy2DAsync).
TEST(GpuPrefixCache, GreedyTokensAreTheSameWithAndWithoutAHit) {
  SKIP_WITHOUT_GPU();
  const nlohmann::json& prompts = testing::logits_fixture()["prompts"];
  const std::vector<int32_t> base = ids_of(prompts[4]["prompt_ids"]);
  ASSERT_GE(base.size(), 160u);
  std::vector<GenerationRequest> requests;
  for (const nlohmann::json& prompt : prompts) {
    std::vector<int32_t> ids(base.begin(), base.begin() + 128);
    const std::vector<int32_t> own = ids_of(prompt["prompt_ids"]);
    ids.insert(ids.end(), own.begin(), own.end());
    requests.push_back(greedy(ids, 32));
  }
  for (const std::string format : {"fp16", "int8", "kivi2", "kivi4"}) {
    int hits = 0;
    std::vector<std::vector<int32_t>> without;
    for (const GenerationRequest& r : requests) {
      without.push_back(run(*cuda_engine(format, false), {r}, &hits)[0]);
    }
    ASSERT_EQ(hits, 0);
    auto engine = cuda_engine(format, true);
    run(*engine, {greedy(base, 8)}, &hits);
    for (size_t i = 0; i < requests.size(); ++i) {
      EXPECT_EQ(run(*engine, {requests[i]}, &hits)[0], without[i])
          << format << " prompt " << i << " alone";
    }
    const std::vector<std::vector<int32_t>> together = run(*engine, requests, &hits);
    for (size_t i = 0; i < requests.size(); ++i) {
      EXPECT_EQ(together[i], without[i]) << format << " prompt " << i << " in a batch";
    }
    const int n = static_cast<int>(requests.size());
    if (is_kivi(fixture_format(format).format)) {
      // A hit needs a snapshot at 128 (3 pages + 32 residual tokens): the first request of the
      // one-at-a-time round leaves it (the long prompt, whose first page nothing had cached, left
      // none), every later one starts there.
      EXPECT_GE(hits, (2 * n - 1) * 128) << format;
    } else {
      EXPECT_GE(hits, 2 * 128 * n) << format;
    }
    EXPECT_EQ(engine->cache().usage().blocks_used, 0);
  }
}

}  // namespace
}  // namespace kvserve
