// The CPU engine on the trained test model against the PyTorch/transformers dump of
// tests/reference/make_reference.py: logits, greedy continuations, every KV format's view, and
// batching invariance.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "engine/cpu_backend.h"
#include "engine/engine.h"
#include "tests/reference_fixture.h"
#include "tests/test_support.h"

namespace kvserve {
namespace {

using nlohmann::json;
using testing::fixture_format;
using testing::ids_of;
using testing::shared_weights;

const json& fixture() {
  return testing::logits_fixture();
}

std::unique_ptr<Engine> make_engine(const KvCacheConfig& config, EngineOptions options = {}) {
  const ModelConfig& model = shared_weights().config;
  auto cache = std::make_unique<KvCacheManager>(config, model, 4096);
  auto backend =
      std::make_unique<CpuBackend>(shared_weights(), cache->config(), cache->num_blocks());
  return std::make_unique<Engine>(model, std::move(cache), std::move(backend), options);
}

struct LogitDifference {
  double max = 0.0;              // largest |ours - reference|
  double mean = 0.0;             // mean |ours - reference|
  double worst_reference = 0.0;  // the reference logit where the largest difference is
  int64_t count = 0;             // logits compared
};

// Our logits against the dumped ones (a strided vocab sample plus the top 8) at every position of
// prompt + greedy continuation, with the whole sequence prefilled in one step.
LogitDifference logit_difference(const json& prompt, const std::string& format) {
  const int stride = fixture()["vocab_stride"];
  std::vector<int32_t> tokens = ids_of(prompt["prompt_ids"]);
  const std::vector<int32_t> greedy = ids_of(prompt["greedy_ids"]);
  tokens.insert(tokens.end(), greedy.begin(), greedy.end());
  const ModelConfig& model = shared_weights().config;
  KvCacheManager cache(fixture_format(format), model, 4096);
  CpuBackend backend(shared_weights(), cache.config(), cache.num_blocks());
  cache.add_sequence(1);
  EXPECT_TRUE(cache.grow(1, static_cast<int>(tokens.size())));
  std::vector<float> logits;
  backend.forward({{1, 0, tokens, true, cache.block_table(1)}}, logits);
  const json& expected = prompt["formats"][format];
  LogitDifference result;
  auto compare = [&](float ours, double reference) {
    const double diff = std::fabs(ours - reference);
    result.mean += diff;
    ++result.count;
    if (diff > result.max) {
      result.max = diff;
      result.worst_reference = reference;
    }
  };
  for (size_t t = 0; t < tokens.size(); ++t) {
    const float* row = &logits[t * model.vocab_size];
    const std::vector<double> strided = expected[t]["strided"];
    for (size_t i = 0; i < strided.size(); ++i) compare(row[i * stride], strided[i]);
    const std::vector<int32_t> top_ids = ids_of(expected[t]["top_ids"]);
    const std::vector<double> top_values = expected[t]["top_values"];
    for (size_t i = 0; i < top_ids.size(); ++i) compare(row[top_ids[i]], top_values[i]);
  }
  result.mean /= result.count;
  std::printf(
      "%-22s prompt of %3zu tokens: |logit difference| max %.2e (at a logit of %.1f), "
      "mean %.2e\n",
      format.c_str(), prompt["prompt_ids"].size(), result.max, result.worst_reference, result.mean);
  return result;
}

// fp32 on both sides; keys and values pass through fp16 (the cache's storage) on both sides too,
// so a value that lands on an fp16 rounding boundary in one implementation and not the other is
// the largest source of difference.
TEST(Reference, Fp16LogitsMatchPyTorch) {
  for (const json& prompt : fixture()["prompts"]) {
    const LogitDifference d = logit_difference(prompt, "fp16");
    EXPECT_LT(d.max, 1e-3 * std::max(1.0, std::fabs(d.worst_reference))) << prompt["text"];
    EXPECT_LT(d.mean, 2e-4) << prompt["text"];
  }
}

// What the format itself does to the simulation's logits: its strided sample against the fp16
// view's, at the same positions of the same tokens.
LogitDifference format_effect(const json& prompt, const std::string& format) {
  const json& quantized = prompt["formats"][format];
  const json& fp16 = prompt["formats"]["fp16"];
  LogitDifference result;
  for (size_t t = 0; t < quantized.size(); ++t) {
    const std::vector<double> a = quantized[t]["strided"], b = fp16[t]["strided"];
    for (size_t i = 0; i < a.size(); ++i) {
      const double diff = std::fabs(a[i] - b[i]);
      result.mean += diff;
      ++result.count;
      result.max = std::max(result.max, diff);
    }
  }
  result.mean /= result.count;
  return result;
}

// Each quantized format against the PyTorch simulation of the same cache semantics, measured
// against what the format itself does to the simulation's logits (its "effect", against fp16).
//
// Two correct fp32 implementations differ by rounding, a relative delta of about 1e-6 here. A key
// or value within delta of a rounding tie gets the neighbouring code in one of them: one element
// moves by one step s, while the format's own rounding moves every element by up to s/2. So
// - the largest difference a tie flip makes is below the format's largest effect (max bound);
// - a flip happens with probability about delta / s and then moves its element by s: tie flips
//   add about delta per element whatever the step, while the format adds about s / 4. Their share
//   of the format's effect grows as 1 / s, i.e. as 2^bits - 1, so the mean over all prompts may be
//   1% of the effect per code level: 3% for kivi2, 15% for kivi4, capped at half for int8, where
//   flips are frequent and small (int8's semantics are checked code by code by CpuKvCache.*).
// A bug in grouping, packing or the residual rule reads tokens through a different form than the
// simulation does, an error of the format's own size wherever it acts: from the dump alone, kivi2
// with value groups of 64 against the simulation's 32 scores 0.67, keys per token 1.6, no
// quantization at all 1.0 (this machine's own share: int8 0.20, kivi4 0.022, kivi2 <= 0.012).
TEST(Reference, QuantizedFormatsMatchTheSimulation) {
  for (const std::string format :
       {"int8", "kivi4", "kivi2", "kivi2_gv64", "kivi2_per_token_keys"}) {
    const int levels = (1 << kv_bits(fixture_format(format).format)) - 1;
    double ours_sum = 0.0, effect_sum = 0.0;
    for (const json& prompt : fixture()["prompts"]) {
      const LogitDifference d = logit_difference(prompt, format);
      const LogitDifference effect = format_effect(prompt, format);
      EXPECT_LT(d.max, effect.max) << format << " " << prompt["text"];
      ours_sum += d.mean * d.count;
      effect_sum += effect.mean * d.count;
    }
    const double share = std::min(0.5, 0.01 * levels);
    std::printf("%-22s mean |ours - simulation| / mean |format effect| = %.4f (bound %.2f)\n",
                format.c_str(), ours_sum / effect_sum, share);
    EXPECT_LT(ours_sum, share * effect_sum) << format;
  }
}

// Bitwise: a sequence's logits do not depend on how many other sequences share the step.
TEST(Reference, LogitsDoNotDependOnTheBatch) {
  const ModelConfig& model = shared_weights().config;
  const std::vector<int32_t> prompt = ids_of(fixture()["prompts"][1]["prompt_ids"]);
  auto logits_with_company = [&](int company) {
    KvCacheManager cache(fixture_format("kivi2"), model, 4096);
    CpuBackend backend(shared_weights(), cache.config(), cache.num_blocks());
    std::vector<ForwardItem> prefill, decode;
    for (int s = 0; s <= company; ++s) {
      cache.add_sequence(s);
      EXPECT_TRUE(cache.grow(s, static_cast<int>(prompt.size()) + 1));
      prefill.push_back({s, 0, prompt, false, cache.block_table(s)});
      decode.push_back(
          {s, static_cast<int>(prompt.size()), {prompt.front()}, false, cache.block_table(s)});
    }
    std::vector<float> logits;
    backend.forward(prefill, logits);
    backend.forward(decode, logits);
    logits.resize(model.vocab_size);  // the first sequence's row
    return logits;
  };
  const std::vector<float> alone = logits_with_company(0);
  for (int company : {1, 2, 6, 20}) {
    EXPECT_TRUE(logits_with_company(company) == alone) << "with " << company << " other sequences";
  }
}

std::vector<int32_t> generate_alone(const KvCacheConfig& config, const GenerationRequest& r) {
  auto engine = make_engine(config);
  engine->add_request(r);
  std::vector<int32_t> out;
  std::vector<StepEvent> events;
  while (engine->has_work()) {
    events.clear();
    engine->step(events);
    for (const StepEvent& e : events) {
      EXPECT_NE(e.finish, FinishReason::kError) << e.error;
      if (e.has_token) out.push_back(e.token);
    }
  }
  EXPECT_EQ(engine->cache().usage().used_bytes, 0);
  return out;
}

GenerationRequest greedy_request(const json& prompt, int tokens) {
  GenerationRequest r;
  r.prompt = ids_of(prompt["prompt_ids"]);
  r.max_new_tokens = tokens;
  r.ignore_eos = true;
  r.sampling.temperature = 0.0f;
  return r;
}

TEST(Reference, GreedyContinuationsMatchTransformers) {
  for (const json& prompt : fixture()["prompts"]) {
    ASSERT_EQ(prompt["greedy_ids"], prompt["transformers_greedy_ids"]);
    EXPECT_EQ(generate_alone(fixture_format("fp16"), greedy_request(prompt, 64)),
              ids_of(prompt["greedy_ids"]))
        << prompt["text"];
  }
}

TEST(Reference, BatchingInvariance) {
  for (const std::string format : {"fp16", "kivi2", "int8"}) {
    std::vector<GenerationRequest> requests;
    for (const json& prompt : fixture()["prompts"]) {
      requests.push_back(greedy_request(prompt, 40));
      GenerationRequest sampled = greedy_request(prompt, 24);
      sampled.sampling = SamplingParams{0.8f, 40, 0.95f, 1.0f, 1234};
      requests.push_back(sampled);
    }
    std::vector<std::vector<int32_t>> alone;
    for (const auto& r : requests) alone.push_back(generate_alone(fixture_format(format), r));

    // A small token budget forces chunked prefill interleaved with other sequences' decodes.
    EngineOptions options;
    options.max_batch_tokens = 48;
    auto engine = make_engine(fixture_format(format), options);
    std::map<RequestId, size_t> index;
    for (size_t i = 0; i < requests.size(); ++i) index[engine->add_request(requests[i])] = i;
    std::vector<std::vector<int32_t>> together(requests.size());
    std::vector<StepEvent> events;
    while (engine->has_work()) {
      events.clear();
      engine->step(events);
      for (const StepEvent& e : events) {
        if (e.has_token) together[index[e.request]].push_back(e.token);
      }
    }
    for (size_t i = 0; i < requests.size(); ++i) {
      EXPECT_EQ(together[i], alone[i]) << format << " request " << i;
    }
    EXPECT_EQ(engine->cache().usage().used_bytes, 0);
  }
}

// The API's promise (proto/kvserve/v1/generation.proto, `seed`): on the CPU backend the same seed
// and input give the same tokens and log-probabilities whatever runs beside the request. Plain
// temperature-1 sampling keeps the whole distribution, so the smallest change in a logit moves
// the sampled token sooner or later (issue 13, item 3: one other request was enough). The
// log-probabilities show such a change at once; with OpenBLAS they differed from the fourth digit.
TEST(Reference, SeededSamplingDoesNotDependOnTheBatch) {
  GenerationRequest seeded = greedy_request(fixture()["prompts"][2], 48);
  seeded.sampling = SamplingParams{1.0f, 0, 1.0f, 1.0f, 1007};
  struct Generated {
    std::vector<int32_t> tokens;
    std::vector<float> logprobs;
  };
  auto generate = [&](int company) {
    EngineOptions options;
    options.max_batch_tokens = 40;  // the seeded prompt's prefill shares steps with decodes
    auto engine = make_engine(fixture_format("kivi2"), options);
    for (int i = 0; i < company; ++i) {
      const json& other = fixture()["prompts"][i % fixture()["prompts"].size()];
      GenerationRequest r = greedy_request(other, 16 + 8 * (i % 5));
      if (i % 2 == 1) r.sampling = SamplingParams{1.0f, 0, 1.0f, 1.0f, static_cast<uint64_t>(i)};
      engine->add_request(r);
    }
    const RequestId id = engine->add_request(seeded);
    Generated out;
    std::vector<StepEvent> events;
    while (engine->has_work()) {
      events.clear();
      engine->step(events);
      for (const StepEvent& e : events) {
        EXPECT_NE(e.finish, FinishReason::kError) << e.error;
        if (e.request == id && e.has_token) {
          out.tokens.push_back(e.token);
          out.logprobs.push_back(e.logprob);
        }
      }
    }
    return out;
  };
  const Generated alone = generate(0);
  ASSERT_EQ(alone.tokens.size(), 48u);
  for (int company : {1, 15}) {
    const Generated together = generate(company);
    EXPECT_EQ(together.tokens, alone.tokens) << "with " << company << " other requests";
    EXPECT_EQ(together.logprobs, alone.logprobs) << "with " << company << " other requests";
  }
}

TEST(Reference, PreemptionRecomputesWithoutChangingResults) {
  GenerationRequest r = greedy_request(fixture()["prompts"][0], 150);
  const std::vector<int32_t> expected = generate_alone(fixture_format("kivi2"), r);
  // Admitted on their prompts alone (vLLM's rule), four short prompts all start, but as they grow
  // the pool cannot hold all four (up to 15 blocks each): the newest are preempted and recomputed.
  const ModelConfig& model = shared_weights().config;
  auto cache = std::make_unique<KvCacheManager>(fixture_format("kivi2"), model, 36);
  auto backend =
      std::make_unique<CpuBackend>(shared_weights(), cache->config(), cache->num_blocks());
  EngineOptions options;
  options.admission = AdmissionPolicy::kPrompt;
  Engine engine(model, std::move(cache), std::move(backend), options);
  std::map<RequestId, std::vector<int32_t>> out;
  for (int i = 0; i < 4; ++i) out[engine.add_request(r)];
  std::vector<StepEvent> events;
  int preemptions = 0;
  while (engine.has_work()) {
    events.clear();
    preemptions += engine.step(events).preemptions;
    for (const StepEvent& e : events) {
      ASSERT_NE(e.finish, FinishReason::kError) << e.error;
      if (e.has_token) out[e.request].push_back(e.token);
    }
  }
  EXPECT_GT(preemptions, 0);
  for (const auto& [id, tokens] : out) EXPECT_EQ(tokens, expected) << "request " << id;
  EXPECT_EQ(engine.cache().usage().used_bytes, 0);
}

TEST(Reference, CancelFreesBlocksAtTheNextStep) {
  auto engine = make_engine(fixture_format("kivi2"));
  const RequestId id = engine->add_request(greedy_request(fixture()["prompts"][4], 100));
  std::vector<StepEvent> events;
  engine->step(events);
  engine->step(events);
  EXPECT_GT(engine->cache().usage().used_bytes, 0);
  engine->cancel(id);
  events.clear();
  engine->step(events);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].finish, FinishReason::kCancelled);
  EXPECT_FALSE(engine->has_work());
  EXPECT_EQ(engine->cache().usage().used_bytes, 0);
}

TEST(Reference, InvalidRequestsAreRejectedWithReasons) {
  auto engine = make_engine(fixture_format("fp16"));
  GenerationRequest r;
  EXPECT_NE(engine->validate(r).message().find("empty"), std::string::npos);
  r.prompt = {1, 2, 50257};
  EXPECT_NE(engine->validate(r).message().find("outside the vocabulary"), std::string::npos);
  r.prompt = std::vector<int32_t>(1000, 5);
  r.max_new_tokens = 100;
  EXPECT_NE(engine->validate(r).message().find("context"), std::string::npos);
  r.prompt = {1, 2};
  r.sampling.temperature = -1.0f;
  EXPECT_NE(engine->validate(r).message().find("temperature"), std::string::npos);
  EXPECT_THROW(engine->add_request(r), std::invalid_argument);
}

}  // namespace
}  // namespace kvserve
