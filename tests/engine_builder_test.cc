// engine/engine_builder: the one path from settings to an engine that every command takes.
#include "engine/engine_builder.h"

#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

#include "engine/checkpoint.h"
#include "tests/test_support.h"

namespace kvserve {
namespace {

EngineSpec tiny_cpu_spec() {
  EngineSpec spec;
  spec.model = testing::shared_model_dir();
  spec.device = "cpu";
  spec.kv.format = KvFormat::kKivi2;
  return spec;
}

TEST(EngineBuilder, ReadsTheGeometryWithoutTheWeights) {
  const ModelConfig config = read_model_config(testing::shared_model_dir());
  const ModelConfig loaded = load_model(testing::shared_model_dir()).config;
  EXPECT_EQ(config.n_layer, loaded.n_layer);
  EXPECT_EQ(config.n_embd, loaded.n_embd);
  EXPECT_EQ(config.n_positions, loaded.n_positions);
  EXPECT_EQ(config.vocab_size, loaded.vocab_size);
  EXPECT_EQ(read_model_config("dummy:gpt2-xl").n_layer, 48);
}

TEST(EngineBuilder, ChecksTheSpecAgainstTheModelGeometry) {
  EXPECT_TRUE(check(tiny_cpu_spec()).ok()) << check(tiny_cpu_spec());
  EngineSpec bad_group = tiny_cpu_spec();
  bad_group.kv.value_group = 48;  // does not divide the head dimension
  EXPECT_EQ(check(bad_group).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(check(bad_group).message().find("--kv-value-group"), std::string::npos)
      << check(bad_group);
  EXPECT_THROW(build_backend(bad_group), std::invalid_argument);
  EngineSpec bad_device = tiny_cpu_spec();
  bad_device.device = "tpu";
  EXPECT_NE(check(bad_device).message().find("tpu"), std::string::npos);
  EngineSpec no_pool = tiny_cpu_spec();
  no_pool.kv_pool_bytes = 0;
  EXPECT_FALSE(check(no_pool).ok());
  EngineSpec pool_below_one_block = tiny_cpu_spec();
  pool_below_one_block.kv_pool_bytes = 1;
  EXPECT_NE(check(pool_below_one_block).message().find("holds no block"), std::string::npos);
}

TEST(EngineBuilder, BuildsThePoolTheSpecAsksFor) {
  EngineSpec by_blocks = tiny_cpu_spec();
  by_blocks.kv_pool_blocks = 37;
  const BuiltBackend built = build_backend(by_blocks);
  EXPECT_EQ(built.device, "cpu");
  EXPECT_EQ(built.cache->num_blocks(), 37);
  EXPECT_EQ(built.kv.format, KvFormat::kKivi2);
  EXPECT_EQ(built.backend->name(), "cpu");

  EngineSpec by_bytes = tiny_cpu_spec();
  by_bytes.kv_pool_bytes = int64_t{3} << 20;
  const std::unique_ptr<Engine> engine = build_engine(by_bytes);
  EXPECT_EQ(engine->cache().num_blocks(),
            KvCacheManager::blocks_in_budget(int64_t{3} << 20, by_bytes.kv, engine->model()));
}

}  // namespace
}  // namespace kvserve
