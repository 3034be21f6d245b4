// eval-ppl's engine path against transformers and the PyTorch simulation (tests/fixtures/ppl.json).
#include "engine/perplexity.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "common/text_io.h"
#include "engine/checkpoint.h"
#include "engine/cpu_backend.h"
#include "tests/test_support.h"

namespace kvserve {
namespace {

using nlohmann::json;

const std::vector<int32_t>& eval_tokens() {
  static const std::vector<int32_t> tokens =
      evaluation_tokens(Tokenizer::from_model_dir(testing::shared_model_dir()),
                        read_file(testing::shared_eval_text()));
  return tokens;
}

TEST(Perplexity, EvaluationTokensFollowTheConvention) {
  // data/README.md: 451,818 tokens, each of the 150 documents followed by 50256.
  EXPECT_EQ(eval_tokens().size(), 451818u);
  EXPECT_EQ(std::count(eval_tokens().begin(), eval_tokens().end(), 50256), 150);
  EXPECT_EQ(eval_tokens().back(), 50256);
}

TEST(Perplexity, WindowsMatchTransformersAndTheSimulation) {
  const json reference = json::parse(read_file(testing::source_path("tests/fixtures/ppl.json")));
  ModelWeights weights = load_model(testing::shared_model_dir());
  const ModelConfig model = weights.config;
  struct Check {
    const char* name;
    KvFormat format;
    double tolerance;
  };
  for (const Check& check :
       {Check{"fp16", KvFormat::kFp16, 2e-5}, Check{"kivi2", KvFormat::kKivi2, 2e-3}}) {
    KvCacheConfig config;
    config.format = check.format;
    KvCacheManager cache(config, model, 256);
    CpuBackend backend(weights, cache.config(), cache.num_blocks());
    const PerplexityResult r = evaluate_perplexity(backend, cache, eval_tokens(), 2, 1024);
    EXPECT_EQ(r.tokens, 2 * 1023);
    EXPECT_EQ(cache.usage().used_bytes, 0);
    for (int w = 0; w < 2; ++w) {
      const double expected = reference["per_window_mean_nll"][check.name][w];
      EXPECT_NEAR(r.window_nll[w], expected, check.tolerance) << check.name << " window " << w;
      if (check.format == KvFormat::kFp16) {
        // fp16 KV storage moves the NLL of transformers' fp32 model by far less than 0.2%.
        const double hf = reference["per_window_mean_nll"]["transformers_fp32"][w];
        EXPECT_NEAR(r.window_nll[w], hf, 1e-3 * hf);
      }
    }
  }
}

TEST(Perplexity, RejectsTooLittleText) {
  ModelWeights weights = load_model(testing::shared_model_dir());
  KvCacheManager cache(KvCacheConfig{}, weights.config, 64);
  CpuBackend backend(weights, cache.config(), cache.num_blocks());
  EXPECT_THROW(evaluate_perplexity(backend, cache, {1, 2, 3}, 1, 16), std::invalid_argument);
}

}  // namespace
}  // namespace kvserve
