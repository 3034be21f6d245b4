// The CUDA backend's sampled KV quantization error (kernels/kv_quantization_error.cu) against the
// CPU backend's (engine/cpu_kv_cache.cc) for the same prompts: at rate 1 both measure every
// flushed group, so the counts agree exactly and the distributions within the difference of the
// two backends' keys and values (fp16 GEMMs on the GPU, fp32 on the CPU). Skipped when no GPU is
// visible.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <memory>
#include <vector>

#include "engine/engine_builder.h"
#include "kernels/device_info.h"
#include "tests/test_support.h"

namespace kvserve {
namespace {

struct Served {
  KvQuantizationErrors errors;
  std::map<RequestId, std::vector<int32_t>> tokens;
};

Served serve(const std::string& device, const KvCacheConfig& kv, double rate) {
  EngineSpec spec;
  spec.model = testing::shared_model_dir();
  spec.device = device;
  spec.kv = kv;
  spec.kv_pool_bytes = int64_t{64} << 20;
  spec.engine.max_batch_tokens = 2048;  // the same steps on both backends
  spec.engine.kv_error_sample_rate = rate;
  const std::unique_ptr<Engine> engine = build_engine(spec);
  Served served;
  for (int r = 0; r < 4; ++r) {
    GenerationRequest request;
    for (int i = 0; i < 90 + 70 * r; ++i) request.prompt.push_back((464 + 31 * i + 7 * r) % 20000);
    request.max_new_tokens = 48;
    request.ignore_eos = true;
    served.tokens[engine->add_request(request)];
  }
  std::vector<StepEvent> events;
  while (engine->has_work()) {
    events.clear();
    served.errors.append(engine->step(events).kv_errors);
    for (const StepEvent& e : events) {
      if (e.has_token) served.tokens.at(e.request).push_back(e.token);
    }
  }
  return served;
}

Served serve(const std::string& device, KvFormat format, double rate) {
  KvCacheConfig kv;
  kv.format = format;
  return serve(device, kv, rate);
}

void expect_close(const KvErrorBins& gpu, const KvErrorBins& cpu, const char* what) {
  ASSERT_GT(cpu.total(), 0u) << what;
  EXPECT_EQ(gpu.total(), cpu.total()) << what;
  EXPECT_NEAR(gpu.sum / gpu.total(), cpu.sum / cpu.total(), 0.01 * cpu.sum / cpu.total()) << what;
  // Cumulative counts (what histogram_quantile reads) within 2% of the samples at every bound.
  uint64_t gpu_below = 0, cpu_below = 0;
  for (int k = 0; k <= kKvErrorBuckets; ++k) {
    gpu_below += gpu.counts[k];
    cpu_below += cpu.counts[k];
    EXPECT_NEAR(static_cast<double>(gpu_below), static_cast<double>(cpu_below),
                0.02 * cpu.total() + 2)
        << what << " bucket " << k;
  }
}

TEST(GpuKvQuantizationError, MatchesTheCpuBackendForTheSamePrompts) {
  if (cuda::visible_device_count() == 0) GTEST_SKIP() << "no CUDA GPU visible";
  std::vector<KvCacheConfig> formats(3);
  formats[0].format = KvFormat::kKivi2;
  formats[1].format = KvFormat::kKivi4;
  formats[2].format = KvFormat::kInt8;
  // kivi2c: fp8 group parameters, flushed from an int8 residual's dequantized values.
  ASSERT_TRUE(apply_kv_preset("kivi2c", formats.emplace_back()));
  for (const KvCacheConfig& format : formats) {
    const Served cpu = serve("cpu", format, 1.0);
    const Served gpu = serve("cuda", format, 1.0);
    const std::string name = describe(format);
    // The CPU reports each error, the GPU bins them on the device.
    EXPECT_EQ(gpu.errors.key.size() + gpu.errors.value.size(), 0u) << name;
    expect_close(gpu.errors.key_bins, bin_errors(cpu.errors.key), (name + " keys").c_str());
    expect_close(gpu.errors.value_bins, bin_errors(cpu.errors.value), (name + " values").c_str());
  }
}

TEST(GpuKvQuantizationError, SamplingChangesNoTokenAndRateZeroMeasuresNothing) {
  if (cuda::visible_device_count() == 0) GTEST_SKIP() << "no CUDA GPU visible";
  const Served off = serve("cuda", KvFormat::kKivi2, 0.0);
  // About 49 steps: at 0.25 some measure (and run eagerly, outside the decode graphs), not all.
  const Served some = serve("cuda", KvFormat::kKivi2, 0.25);
  const Served all = serve("cuda", KvFormat::kKivi2, 1.0);
  EXPECT_TRUE(off.errors.empty());
  EXPECT_EQ(some.tokens, off.tokens);
  EXPECT_EQ(all.tokens, off.tokens);
  EXPECT_GT(some.errors.key_bins.total(), 0u);
  EXPECT_LT(some.errors.key_bins.total(), all.errors.key_bins.total());
}

}  // namespace
}  // namespace kvserve
