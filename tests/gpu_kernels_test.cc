// The CUDA kernels against the CPU reference on random inputs: the KV cache (write path and
// attention) against CpuKvCache byte for byte over many steps in every format, and the
// element-wise kernels against plain loops. Skipped when no GPU is visible.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "engine/cpu_kv_cache.h"
#include "engine/cuda/cuda_kv_cache.h"
#include "engine/cuda/device_buffer.h"
#include "engine/fp16.h"
#include "kernels/bias_activation.h"
#include "kernels/cuda_check.h"
#include "kernels/decode_attention.h"
#include "kernels/decode_attention_variant.h"
#include "kernels/device_info.h"
#include "kernels/embedding.h"
#include "kernels/gemm.h"
#include "kernels/kv_dequantize_pages.h"
#include "kernels/kv_quantize_pages.h"
#include "kernels/kv_quantize_residual.h"
#include "kernels/kv_store_residual.h"
#include "kernels/layer_norm.h"
#include "kernels/paged_attention.h"
#include "kernels/prefill_attention.h"
#include "kernels/prefill_attention_variant.h"
#include "tests/block_tables.h"

namespace kvserve {
namespace {

using testing::with_block_tables;

#define SKIP_WITHOUT_GPU() \
  if (cuda::visible_device_count() == 0) GTEST_SKIP() << "no CUDA GPU visible"

std::vector<uint16_t> to_half(const std::vector<float>& v) {
  std::vector<uint16_t> h(v.size());
  for (size_t i = 0; i < v.size(); ++i) h[i] = float_to_half(v[i]);
  return h;
}

template <typename T>
T* upload(cuda::DeviceBuffer<T>& buffer, const void* data, size_t count) {
  T* p = buffer.reserve(count);
  KVSERVE_CUDA_CHECK(cudaMemcpy(p, data, count * sizeof(T), cudaMemcpyHostToDevice));
  // From pageable memory cudaMemcpy may return before the data lands, and kernels on a
  // non-blocking stream are not ordered after it: wait until it has.
  KVSERVE_CUDA_CHECK(cudaDeviceSynchronize());
  return p;
}

template <typename T>
std::vector<T> download(const T* p, size_t count) {
  std::vector<T> out(count);
  KVSERVE_CUDA_CHECK(cudaMemcpy(out.data(), p, count * sizeof(T), cudaMemcpyDeviceToHost));
  return out;
}

ModelConfig cache_test_model() {
  ModelConfig m;
  m.n_layer = 2;
  m.n_head = 3;
  m.n_embd = 192;  // head_dim 64
  m.n_inner = 768;
  m.n_positions = 1024;
  m.vocab_size = 100;
  return m;
}

struct CacheCase {
  const char* name;
  KvCacheConfig config;
};

std::vector<CacheCase> cache_cases() {
  auto kivi = [](KvFormat f, int g, int gv, int r, int p, bool per_token_keys,
                 KvParamFormat params = KvParamFormat::kFp16,
                 KvResidualFormat residual = KvResidualFormat::kFp16) {
    KvCacheConfig c;
    c.format = f;
    c.key_group = g;
    c.value_group = gv;
    c.residual = r;
    c.page_tokens = p;
    c.per_token_keys = per_token_keys;
    c.params = params;
    c.residual_format = residual;
    return c;
  };
  constexpr KvParamFormat kFp8 = KvParamFormat::kFp8;
  constexpr KvResidualFormat kInt8Residual = KvResidualFormat::kInt8;
  KvCacheConfig kivi2c;
  EXPECT_TRUE(apply_kv_preset("kivi2c", kivi2c));
  KvCacheConfig fp16, fp16_p32, int8;
  fp16.format = KvFormat::kFp16;
  fp16.page_tokens = 16;
  fp16_p32.format = KvFormat::kFp16;  // the geometry decode_attention handles
  int8.format = KvFormat::kInt8;
  int8.page_tokens = 16;
  return {{"fp16", fp16},
          {"fp16_p32", fp16_p32},
          {"int8", int8},
          {"kivi4", kivi(KvFormat::kKivi4, 32, 32, 32, 32, false)},
          {"kivi2", kivi(KvFormat::kKivi2, 32, 32, 32, 32, false)},
          {"kivi2_gv16", kivi(KvFormat::kKivi2, 32, 16, 32, 32, false)},
          {"kivi4_gv8_r64", kivi(KvFormat::kKivi4, 32, 8, 64, 32, false)},
          {"kivi2_gv64_r64_p64", kivi(KvFormat::kKivi2, 32, 64, 64, 64, false)},
          {"kivi2_per_token_keys", kivi(KvFormat::kKivi2, 32, 32, 32, 32, true)},
          {"kivi4_g16_gv16_r16_p48", kivi(KvFormat::kKivi4, 16, 16, 16, 48, false)},
          {"kivi2_g16_r48_p32", kivi(KvFormat::kKivi2, 16, 32, 48, 32, false)},
          // fp8 group parameters and the int8 residual (issue 16), alone and together.
          {"kivi2c", kivi2c},
          {"kivi2_fp8", kivi(KvFormat::kKivi2, 32, 32, 32, 32, false, kFp8)},
          {"kivi2_gv64", kivi(KvFormat::kKivi2, 32, 64, 32, 32, false)},
          {"kivi4_fp8", kivi(KvFormat::kKivi4, 32, 32, 32, 32, false, kFp8)},
          {"kivi2_int8_residual",
           kivi(KvFormat::kKivi2, 32, 32, 32, 32, false, KvParamFormat::kFp16, kInt8Residual)},
          {"kivi2_per_token_keys_fp8", kivi(KvFormat::kKivi2, 32, 32, 32, 32, true, kFp8)},
          {"kivi4_g16_gv16_r16_p48_fp8_int8",
           kivi(KvFormat::kKivi4, 16, 16, 16, 48, false, kFp8, kInt8Residual)},
          // An int8 window under the online kernel's 4-bit lanes (8 codes a lane) in decode steps.
          {"kivi4_fp8_int8", kivi(KvFormat::kKivi4, 32, 32, 32, 32, false, kFp8, kInt8Residual)}};
}

using cuda::DecodeAttentionVariant;
using cuda::PrefillAttentionVariant;

// The decode_attention kernels a format runs under: the variant picks the KIVI one; "tensor" and
// "packed" differ from "online" for 2-bit pages only, and fp16 has a single kernel. Every one
// must match the CPU cache.
std::vector<DecodeAttentionVariant> decode_variants(const KvCacheConfig& config) {
  if (config.format == KvFormat::kKivi2) {
    return {DecodeAttentionVariant::kPacked, DecodeAttentionVariant::kOnline,
            DecodeAttentionVariant::kTensor};
  }
  if (config.format == KvFormat::kKivi4) return {DecodeAttentionVariant::kOnline};
  return {DecodeAttentionVariant::kPacked};  // the default, which fp16 ignores
}

// Every cache case once per decode_attention variant, named "kivi2 online" or "fp16".
struct VariantCase {
  std::string name;
  std::string cache;  // the cache case's name
  KvCacheConfig config;
  DecodeAttentionVariant variant;
};

std::vector<VariantCase> variant_cases(const std::vector<CacheCase>& cases) {
  std::vector<VariantCase> out;
  for (const CacheCase& c : cases) {
    for (DecodeAttentionVariant variant : decode_variants(c.config)) {
      const bool kivi = c.config.format == KvFormat::kKivi2 || c.config.format == KvFormat::kKivi4;
      out.push_back({kivi ? std::string(c.name) + " " + cuda::decode_attention_variant_name(variant)
                          : std::string(c.name),
                     c.name, c.config, variant});
    }
  }
  return out;
}

// Per-channel scales of random q | k | v ([3C]), with a few outlier key channels as in GPT-2.
// Streaming multiprocessors of the current device (decode_attention_split sizes its splits by it).
int multiprocessor_count() {
  int device = 0, count = 0;
  KVSERVE_CUDA_CHECK(cudaGetDevice(&device));
  KVSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// A decode step's items: each sequence of `ids` grown by one token, in order.
void grow_one_token(KvCacheManager& manager, const std::vector<int64_t>& ids,
                    std::vector<ForwardItem>& items) {
  for (int64_t id : ids) {
    const int length = manager.sequence(id).length;
    ASSERT_TRUE(manager.grow(id, length + 1));
    items.push_back({id, length, {0}, false, {}});
  }
}

// Runs body(0) .. body(n - 1) on up to one thread per core. The decode tests' cases are
// independent (each its own caches and stream) and spend their time in the CPU reference and in
// copying pools of hundreds of MB: one after the other they took minutes of a GPU call.
// Assertions in body report from its thread (googletest is thread-safe with pthreads).
template <typename Body>
void for_each_case_in_parallel(size_t n, Body body) {
  const size_t threads =
      std::max<size_t>(1, std::min<size_t>(n, std::thread::hardware_concurrency()));
  std::atomic<size_t> next{0};
  std::vector<std::thread> pool;
  for (size_t t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      for (size_t i = next++; i < n; i = next++) body(i);
    });
  }
  for (std::thread& thread : pool) thread.join();
}

std::vector<float> random_channel_scale(int C, std::mt19937& rng) {
  std::vector<float> channel_scale(3 * C);
  for (float& s : channel_scale) s = std::uniform_real_distribution<float>(0.2f, 2.0f)(rng);
  for (int i = 0; i < 6; ++i) channel_scale[C + rng() % C] = 12.0f;
  return channel_scale;
}

// A decode step of a KIVI cache hands decode_attention the new rows' write path: it quantizes an
// int8 residual's rows and stores every item's row into its slot (kv_store_residual does not
// launch), kv_quantize_pages running for the items that move tokens into pages alone (none: it
// does not launch). Other caches keep it. Returns the step's flushing items.
int check_decode_new_rows(const KvCacheConfig& config, const CudaKvCache& gpu,
                          const std::vector<ForwardItem>& items, int step) {
  int flushing = 0;
  for (const ForwardItem& item : items) {
    flushing +=
        paged_token_count(config, item.start + 1) > paged_token_count(config, item.start) ? 1 : 0;
  }
  const bool kivi = is_kivi(config.format);
  EXPECT_EQ(gpu.decode_new_rows().quantize,
            kivi && config.residual_format == KvResidualFormat::kInt8)
      << "step " << step;
  EXPECT_EQ(gpu.decode_new_rows().store, kivi) << "step " << step;
  EXPECT_EQ(gpu.flushing_items(), flushing) << "step " << step;
  return flushing;
}

// One step of `items` (sequences already grown) through both caches with random fp16 q/k/v in
// every layer: the attention outputs must agree and the pools be equal byte for byte.
void check_step(const KvCacheManager& manager, CpuKvCache& cpu, CudaKvCache& gpu,
                const std::vector<ForwardItem>& items, const std::vector<float>& channel_scale,
                std::mt19937& rng, cudaStream_t stream, int steps, double& worst) {
  const ModelConfig model = cache_test_model();
  const int C = model.n_embd, H = model.n_head;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  cuda::DeviceBuffer<__half> qkv_device, out_device;
  int rows = 0;
  for (const ForwardItem& item : items) rows += static_cast<int>(item.tokens.size());
  gpu.prepare(with_block_tables(items, manager), stream);
  for (int layer = 0; layer < model.n_layer; ++layer) {
    std::vector<float> qkv(static_cast<size_t>(rows) * 3 * C);  // [rows][3C], fp16 values
    for (size_t i = 0; i < qkv.size(); ++i) {
      qkv[i] = round_to_half(normal(rng) * channel_scale[i % (3 * C)]);
    }
    std::vector<float> expected(static_cast<size_t>(rows) * C);  // [rows][C]
    int row = 0;
    for (const ForwardItem& item : items) {
      const int count = static_cast<int>(item.tokens.size());
      for (int head = 0; head < H; ++head) {
        cpu.append_and_attend(layer, head, manager.block_table(item.sequence_id), item.start, count,
                              &qkv[static_cast<size_t>(row) * 3 * C], 3 * C,
                              &expected[static_cast<size_t>(row) * C], C);
      }
      row += count;
    }
    const std::vector<uint16_t> qkv_half = to_half(qkv);
    const __half* qkv_d = upload(qkv_device, qkv_half.data(), qkv_half.size());
    __half* out_d = out_device.reserve(expected.size());
    KVSERVE_CUDA_CHECK(cudaMemset(out_d, 0xff, expected.size() * sizeof(__half)));  // NaN
    gpu.append_and_attend(layer, qkv_d, out_d, stream);
    KVSERVE_CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::vector<__half> got = download(out_d, expected.size());
    for (size_t i = 0; i < expected.size(); ++i) {
      const float g = __half2float(got[i]);
      const double diff = std::fabs(g - expected[i]);
      worst = std::max(worst, diff);
      ASSERT_LE(diff, 2e-3 + 2e-3 * std::fabs(expected[i]))
          << "step " << steps << " layer " << layer << " row " << i / C << " channel " << i % C
          << ": " << g << " vs " << expected[i];
    }
  }
  // Pools of the decode tests reach hundreds of MB: compared by memcmp, not an assertion a byte
  // (which took most of those tests' minutes on the GPU machine).
  const std::vector<uint8_t> pool = gpu.download(stream);
  ASSERT_EQ(pool.size(), cpu.bytes());
  const uint8_t* expected_pool = cpu.data();
  if (std::memcmp(pool.data(), expected_pool, pool.size()) == 0) return;
  const size_t b = static_cast<size_t>(
      std::mismatch(pool.begin(), pool.end(), expected_pool).first - pool.begin());
  FAIL() << "step " << steps << ": first pool byte that differs at " << b << " (layer "
         << b / (manager.layout().block_bytes * manager.num_blocks()) << ", block "
         << (b / manager.layout().block_bytes) % manager.num_blocks() << ", byte "
         << b % manager.layout().block_bytes << "): " << int{pool[b]} << " vs "
         << int{expected_pool[b]};
}

// Several sequences grow step by step in one batch (prompt chunks of random length and single-
// token decodes, so steps cross page, group and residual boundaries, and flushes happen inside
// chunks); finished sequences free their blocks and new ones reuse them. After every step the
// CUDA pool must equal the CPU pool byte for byte and the attention outputs must agree.
TEST(GpuKvCache, MatchesTheCpuCacheInEveryFormat) {
  SKIP_WITHOUT_GPU();
  const ModelConfig model = cache_test_model();
  const int C = model.n_embd;
  for (const VariantCase& test : variant_cases(cache_cases())) {
    SCOPED_TRACE(test.name);
    std::mt19937 rng(1234);
    KvCacheManager manager(test.config, model, 400);
    CpuKvCache cpu(manager.config(), manager.num_blocks(), model);
    CudaKvCache gpu(manager.config(), manager.num_blocks(), model, test.variant);
    ASSERT_EQ(cpu.bytes(), gpu.bytes());
    cudaStream_t stream = nullptr;
    KVSERVE_CUDA_CHECK(cudaStreamCreate(&stream));
    const std::vector<float> channel_scale = random_channel_scale(C, rng);

    struct Live {
      int64_t id;
      int target;
    };
    std::vector<Live> live;
    int64_t next_id = 0;
    int sequences_done = 0, steps = 0;
    double worst = 0.0;
    while (sequences_done < 6) {
      while (live.size() < 3) {
        manager.add_sequence(next_id);
        live.push_back({next_id++, 150 + static_cast<int>(rng() % 300)});
      }
      std::vector<ForwardItem> items;
      for (const Live& s : live) {
        const int length = manager.sequence(s.id).length;
        int count = 1;
        if (length == 0 || rng() % 4 == 0) count = 1 + static_cast<int>(rng() % 90);
        count = std::min(count, s.target - length);
        ASSERT_TRUE(manager.grow(s.id, length + count));
        items.push_back({s.id, length, std::vector<int32_t>(count, 0), false, {}});
      }
      ASSERT_NO_FATAL_FAILURE(
          check_step(manager, cpu, gpu, items, channel_scale, rng, stream, steps, worst));
      manager.finish_step();
      for (size_t i = 0; i < live.size();) {
        if (manager.sequence(live[i].id).length == live[i].target) {
          manager.remove_sequence(live[i].id);
          live.erase(live.begin() + i);
          ++sequences_done;
        } else {
          ++i;
        }
      }
      ++steps;
    }
    std::printf("%-34s %3d steps, pools equal, worst |attention difference| %.2e\n",
                test.name.c_str(), steps, worst);
    KVSERVE_CUDA_CHECK(cudaStreamDestroy(stream));
  }
}

// The device's compute capability (major), which decides whether prefill_attention can run.
int compute_capability_major() {
  int device = 0, major = 0;
  KVSERVE_CUDA_CHECK(cudaGetDevice(&device));
  KVSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major;
}

// Runs `steps` ((start, count) of sequences 0, 1, 2 in each step) through a CPU cache and a CUDA
// cache with the `prefill` kernel: each step must leave the pool equal to the CPU's byte for byte
// and give the CPU's attention within the GPU tests' tolerance.
void check_prefill_steps(const CacheCase& c, PrefillAttentionVariant prefill,
                         const std::vector<std::vector<std::pair<int, int>>>& steps) {
  const ModelConfig model = cache_test_model();
  const std::string name =
      std::string(c.name) + " " + cuda::prefill_attention_variant_name(prefill);
  SCOPED_TRACE(name);
  std::mt19937 rng(77);
  KvCacheManager manager(c.config, model, 200);
  CpuKvCache cpu(manager.config(), manager.num_blocks(), model);
  CudaKvCache gpu(manager.config(), manager.num_blocks(), model, DecodeAttentionVariant::kPacked,
                  prefill);
  // The tensor-core kernel must really run where the device allows it (every cache case here has
  // head_dim 64 and aligned blocks), not fall back to the tiled one unnoticed.
  if (prefill == PrefillAttentionVariant::kTensor && compute_capability_major() >= 8) {
    ASSERT_EQ(gpu.prefill_attention_variant(), PrefillAttentionVariant::kTensor);
  } else {
    ASSERT_EQ(gpu.prefill_attention_variant(), PrefillAttentionVariant::kTiled);
  }
  cudaStream_t stream = nullptr;
  KVSERVE_CUDA_CHECK(cudaStreamCreate(&stream));
  const std::vector<float> channel_scale = random_channel_scale(model.n_embd, rng);
  for (int id = 0; id < 3; ++id) manager.add_sequence(id);
  // Failures reported so far in this test: this case stops at its first own one.
  auto failures = [] {
    return ::testing::UnitTest::GetInstance()->current_test_info()->result()->total_part_count();
  };
  const int failures_before = failures();
  double worst = 0.0;
  for (size_t step = 0; step < steps.size(); ++step) {
    std::vector<ForwardItem> items;
    for (int id = 0; id < 3; ++id) {
      const auto [start, count] = steps[step][id];
      ASSERT_EQ(manager.sequence(id).length, start);
      ASSERT_TRUE(manager.grow(id, start + count));
      items.push_back({id, start, std::vector<int32_t>(count, 0), false, {}});
    }
    check_step(manager, cpu, gpu, items, channel_scale, rng, stream, static_cast<int>(step), worst);
    // The single-token items of a step that also carries prompt chunks go to the decode kernel.
    int single_token_items = 0;
    for (const ForwardItem& item : items) single_token_items += item.tokens.size() == 1 ? 1 : 0;
    EXPECT_EQ(gpu.decode_items(), gpu.decode_attention_supported() ? single_token_items : 0)
        << "step " << step;
    // Steps with prompt chunks run the whole write path (kv_quantize_residual included).
    EXPECT_FALSE(gpu.decode_new_rows().quantize) << "step " << step;
    EXPECT_FALSE(gpu.decode_new_rows().store) << "step " << step;
    if (failures() != failures_before) break;
    manager.finish_step();
  }
  KVSERVE_CUDA_CHECK(cudaStreamDestroy(stream));
  if (failures() == failures_before) {
    std::printf("%-34s prefill steps agree, worst |attention difference| %.2e\n", name.c_str(),
                worst);
  }
}

// Prefill and mixed steps under both prefill kernels, chunks chosen to hit every case of the
// prefill contract: several sequences of different lengths per step; chunks longer than one
// 64-query tile and shorter; single-token items beside prompt chunks; chunks that cross a page
// boundary and a KIVI flush (keys read in page form by the chunk's later queries and in fp16 by
// its earlier ones); chunks after a context already in pages. Every cache case runs, whatever an
// earlier one did, so that one call of the GPU machine reports them all.
TEST(GpuKvCache, PrefillStepsMatchTheCpuCacheWithEitherKernel) {
  SKIP_WITHOUT_GPU();
  const std::vector<std::vector<std::pair<int, int>>> steps = {
      {{0, 100}, {0, 37}, {0, 1}},       {{100, 70}, {37, 1}, {1, 129}},
      {{170, 1}, {38, 162}, {130, 1}},   {{171, 129}, {200, 65}, {131, 64}},
      {{300, 3}, {265, 200}, {195, 33}}, {{303, 1}, {465, 40}, {228, 2}},
      {{304, 150}, {505, 1}, {230, 70}}};
  // Items of more than 64 queries read int8/KIVI pages from kv_dequantize_pages' scratch, the
  // others dequantize in the attention kernel: steps mix both, the scratch grows (steps 1 to 5),
  // goes unused (step 6) and is reused (step 7).
  for (const CacheCase& c : cache_cases()) {
    for (PrefillAttentionVariant prefill :
         {PrefillAttentionVariant::kTensor, PrefillAttentionVariant::kTiled}) {
      check_prefill_steps(c, prefill, steps);
    }
  }
}

// Decode steps alone (decode_attention): first enough sequences that the batch fills the GPU
// without splitting the context, then few enough that every context is split and merged.
TEST(GpuKvCache, DecodeStepsMatchTheCpuCacheSplitAndUnsplit) {
  SKIP_WITHOUT_GPU();
  const ModelConfig model = cache_test_model();
  const int sm_count = multiprocessor_count();
  // decode_attention_split leaves the context whole from 8 blocks per SM on.
  const int many = (8 * sm_count + model.n_head - 1) / model.n_head;
  const std::vector<VariantCase> cases = variant_cases(cache_cases());
  for_each_case_in_parallel(cases.size(), [&](size_t case_index) {
    const VariantCase& test = cases[case_index];
    KvCacheManager manager(test.config, model, many * 16);
    CudaKvCache gpu(manager.config(), manager.num_blocks(), model, test.variant);
    if (!gpu.decode_attention_supported()) return;
    SCOPED_TRACE(test.name);
    std::mt19937 rng(99);
    CpuKvCache cpu(manager.config(), manager.num_blocks(), model);
    cudaStream_t stream = nullptr;
    KVSERVE_CUDA_CHECK(cudaStreamCreate(&stream));
    const std::vector<float> channel_scale = random_channel_scale(model.n_embd, rng);
    double worst = 0.0;
    int mixed_steps = 0, quiet_steps = 0;
    std::vector<int64_t> ids;
    std::vector<ForwardItem> prefill;
    for (int i = 0; i < many; ++i) {
      ids.push_back(i);
      manager.add_sequence(i);
      const int length = 1 + static_cast<int>(rng() % 150);
      ASSERT_TRUE(manager.grow(i, length));
      prefill.push_back({i, 0, std::vector<int32_t>(length, 0), false, {}});
    }
    ASSERT_NO_FATAL_FAILURE(
        check_step(manager, cpu, gpu, prefill, channel_scale, rng, stream, 0, worst));
    manager.finish_step();
    for (int step = 1; step <= 80; ++step) {
      if (step == 41) {  // keep 3 sequences: each context is now split 32 tokens at a time
        for (size_t i = 3; i < ids.size(); ++i) manager.remove_sequence(ids[i]);
        ids.resize(3);
      }
      std::vector<ForwardItem> items;
      ASSERT_NO_FATAL_FAILURE(grow_one_token(manager, ids, items));
      ASSERT_NO_FATAL_FAILURE(
          check_step(manager, cpu, gpu, items, channel_scale, rng, stream, step, worst));
      const int flushing = check_decode_new_rows(manager.config(), gpu, items, step);
      quiet_steps += flushing == 0 ? 1 : 0;
      mixed_steps += flushing > 0 && flushing < static_cast<int>(items.size()) ? 1 : 0;
      manager.finish_step();
    }
    // The steps of many sequences of random lengths mostly flush some of them and not others (the
    // write path runs for those alone); the split steps of 3 sequences mostly flush none
    // (decode_attention stored their rows, no write path ran).
    if (is_kivi(test.config.format)) {
      EXPECT_GT(mixed_steps, 20);
      EXPECT_GT(quiet_steps, 20);
    }
    std::printf(
        "%-34s decode steps agree (%d flushed some items, %d none), worst |attention "
        "difference| %.2e\n",
        test.name.c_str(), mixed_steps, quiet_steps, worst);
    KVSERVE_CUDA_CHECK(cudaStreamDestroy(stream));
  });
}

// The packed kernel in every 2-bit layout decode_attention takes (kivi2; issue 16's fp8 pairs,
// int8 residual and value groups of 64, alone and together as kivi2c; value groups of 16), where
// it really runs (asserted: it falls back to online for chunks of fewer than 8 pages): decode
// steps of enough sequences to leave every context whole (33 steps: a page's worth, so that
// each sequence past R + G tokens flushes one), then 8 of half as many, one of them about 600
// tokens long, so that each context is cut in two chunks of 320 and the splits are merged (the
// second chunk empty for the others).
// Each layout runs twice: sequences of random lengths, so that nearly every step flushes some of
// them; and lengths of 1 more than a multiple of the group, so that they all flush in one step of
// 32 and run no write path in the others, decode_attention storing the new rows
// (DecodeNewRows::store).
// Pools byte-identical to the CPU's and attention within the GPU tests' tolerance after each.
TEST(GpuKvCache, PackedDecodeMatchesTheCpuCacheInEveryTwoBitLayout) {
  SKIP_WITHOUT_GPU();
  const ModelConfig model = cache_test_model();
  const int H = model.n_head;
  const int sm_count = multiprocessor_count();
  // decode_attention_split: one split from 8 blocks per SM on, two from 4 (contexts permitting).
  const int many = (8 * sm_count + H - 1) / H, half = (4 * sm_count + H - 1) / H;
  std::vector<std::pair<CacheCase, bool>> runs;  // (layout, lengths aligned to the group)
  for (const CacheCase& c : cache_cases()) {
    const KvCacheConfig& config = c.config;
    if (config.format == KvFormat::kKivi2 && config.page_tokens == 32 && config.key_group == 32 &&
        !config.per_token_keys) {
      for (bool aligned : {false, true}) runs.push_back({c, aligned});
    }
  }
  ASSERT_EQ(runs.size(), 12u);  // kivi2, gv16, kivi2c, fp8, gv64, int8 residual; twice each
  for_each_case_in_parallel(runs.size(), [&](size_t run) {
    const CacheCase& c = runs[run].first;
    const bool aligned = runs[run].second;
    const std::string name = std::string(c.name) + (aligned ? " aligned" : "");
    SCOPED_TRACE(name);
    // 24 blocks a sequence: kivi2_fp8's small blocks hold 10 fp16 residual slots each, and an
    // aligned window of up to 63 tokens takes 13 of them for its keys and values.
    // Aligned runs take twice as many sequences: when they all flush, the write path's kernels,
    // which walk the flushing items from a grid of 8 blocks an SM, run several items a block.
    const int sequences = aligned ? 2 * many : many;
    KvCacheManager manager(c.config, model, sequences * 24 + 64);
    CudaKvCache gpu(manager.config(), manager.num_blocks(), model, DecodeAttentionVariant::kPacked);
    ASSERT_TRUE(gpu.decode_attention_supported());
    std::mt19937 rng(5);
    CpuKvCache cpu(manager.config(), manager.num_blocks(), model);
    cudaStream_t stream = nullptr;
    KVSERVE_CUDA_CHECK(cudaStreamCreate(&stream));
    const std::vector<float> channel_scale = random_channel_scale(model.n_embd, rng);
    double worst = 0.0;
    std::vector<int64_t> ids;
    std::vector<ForwardItem> prefill;
    for (int i = 0; i < sequences; ++i) {
      ids.push_back(i);
      manager.add_sequence(i);
      // Aligned: 65 .. 193 and 545, each 1 past a multiple of G = 32, so that step s flushes
      // (position 32 k + 31 entering) at s = 31 only.
      const int length = aligned ? (i == 0 ? 545 : 65 + 32 * static_cast<int>(rng() % 5))
                                 : (i == 0 ? 560 : 1 + static_cast<int>(rng() % 150));
      ASSERT_TRUE(manager.grow(i, length));
      prefill.push_back({i, 0, std::vector<int32_t>(length, 0), false, {}});
    }
    ASSERT_NO_FATAL_FAILURE(
        check_step(manager, cpu, gpu, prefill, channel_scale, rng, stream, 0, worst));
    manager.finish_step();
    int split_steps = 0, mixed_steps = 0, quiet_steps = 0;
    for (int step = 1; step <= 41; ++step) {
      if (step == 34) {
        for (size_t i = half; i < ids.size(); ++i) manager.remove_sequence(ids[i]);
        ids.resize(half);
      }
      std::vector<ForwardItem> items;
      ASSERT_NO_FATAL_FAILURE(grow_one_token(manager, ids, items));
      ASSERT_NO_FATAL_FAILURE(
          check_step(manager, cpu, gpu, items, channel_scale, rng, stream, step, worst));
      ASSERT_EQ(gpu.decode_attention_kernel(), DecodeAttentionVariant::kPacked) << "step " << step;
      const int flushing = check_decode_new_rows(manager.config(), gpu, items, step);
      ASSERT_EQ(gpu.decode_split().splits, step < 34 ? 1 : 2) << "step " << step;
      split_steps += gpu.decode_split().splits > 1 ? 1 : 0;
      quiet_steps += flushing == 0 ? 1 : 0;
      mixed_steps += flushing > 0 && flushing < static_cast<int>(items.size()) ? 1 : 0;
      manager.finish_step();
    }
    if (aligned) {
      EXPECT_EQ(quiet_steps, 40);  // every step but the 31st, split ones too
    } else {
      EXPECT_GT(mixed_steps, 30);
    }
    std::printf(
        "%-34s packed decode steps agree (%d of them split; %d flushed some items, %d none), "
        "worst |attention difference| %.2e\n",
        name.c_str(), split_steps, mixed_steps, quiet_steps, worst);
    KVSERVE_CUDA_CHECK(cudaStreamDestroy(stream));
  });
}

// Median of `repeats` timings (events around each call) of `run` on `stream`, in seconds.
template <typename Run>
double median_seconds(cudaStream_t stream, int repeats, Run run) {
  cudaEvent_t start, stop;
  KVSERVE_CUDA_CHECK(cudaEventCreate(&start));
  KVSERVE_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> seconds;
  for (int r = 0; r < repeats; ++r) {
    KVSERVE_CUDA_CHECK(cudaEventRecord(start, stream));
    run();
    KVSERVE_CUDA_CHECK(cudaEventRecord(stop, stream));
    KVSERVE_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    KVSERVE_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    seconds.push_back(ms * 1e-3);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(seconds.begin(), seconds.end());
  return seconds[seconds.size() / 2];
}

// The kernel micro-benchmark of docs/gpu.md, every decode_attention variant in one process: one
// GPT-2 layer (12 heads of 64) of a decode step at B = 256 and a context of 1001 (no KIVI flush in
// that step), for fp16, kivi4, kivi2 and kivi2c (issue 16: value groups of 64, fp8 pairs, int8
// residual). It times the attention alone (decode_attention, median of 50 launches) and the
// whole layer of the cache (the write path too), and prints the KV bytes the attention must
// read over its time, against the device-to-device copy bandwidth measured here; one JSON line
// per variant, with the kernel that really ran. Its checks: "packed" runs as asked for both
// 2-bit formats, and every variant of kivi2 (of kivi2c) gives the same attention output as that
// format's first (within the GPU tests' tolerance) at this size, which the small-model tests do
// not reach.
TEST(GpuKvCache, DecodeAttentionThroughput) {
  SKIP_WITHOUT_GPU();
  ModelConfig model = cache_test_model();
  model.n_layer = 1;
  model.n_head = 12;
  model.n_embd = 768;
  const int batch = 256, context = 1000, C = model.n_embd;
  KvCacheConfig fp16, kivi4, kivi2, kivi2c;
  fp16.format = KvFormat::kFp16;
  kivi4.format = KvFormat::kKivi4;
  ASSERT_TRUE(apply_kv_preset("kivi2c", kivi2c));
  const double copy_bytes_per_second = cuda::copy_bandwidth(size_t{1} << 30);
  std::map<std::string, std::vector<float>> first_out;  // per 2-bit cache case
  for (const VariantCase& test :
       variant_cases({{"fp16", fp16}, {"kivi4", kivi4}, {"kivi2", kivi2}, {"kivi2c", kivi2c}})) {
    const KvCacheConfig& config = test.config;
    KvCacheManager manager(config, model, batch * 48);
    CudaKvCache gpu(manager.config(), manager.num_blocks(), model, test.variant);
    cudaStream_t stream = nullptr;
    KVSERVE_CUDA_CHECK(cudaStreamCreate(&stream));
    // Random q | k | v rows, reused by every prefill chunk and the decode step.
    const int chunk_items = 16, rows = chunk_items * context;
    std::mt19937 rng(3);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<uint16_t> qkv(static_cast<size_t>(rows) * 3 * C);
    for (uint16_t& h : qkv) h = float_to_half(normal(rng));
    cuda::DeviceBuffer<__half> qkv_device, out_device;
    const __half* qkv_d = upload(qkv_device, qkv.data(), qkv.size());
    __half* out_d = out_device.reserve(static_cast<size_t>(rows) * C);
    for (int first = 0; first < batch; first += chunk_items) {
      std::vector<ForwardItem> items;
      for (int i = first; i < first + chunk_items; ++i) {
        manager.add_sequence(i);
        ASSERT_TRUE(manager.grow(i, context));
        items.push_back({i, 0, std::vector<int32_t>(context, 0), false, {}});
      }
      gpu.prepare(with_block_tables(items, manager), stream);
      gpu.append_and_attend(0, qkv_d, out_d, stream);
      manager.finish_step();
    }
    std::vector<ForwardItem> items;
    for (int i = 0; i < batch; ++i) {
      ASSERT_TRUE(manager.grow(i, context + 1));
      items.push_back({i, context, {0}, false, {}});
    }
    gpu.prepare(with_block_tables(items, manager), stream);
    gpu.append_and_attend(0, qkv_d, out_d, stream);  // writes the step's pages; warm-up
    const double layer_seconds =
        median_seconds(stream, 20, [&] { gpu.append_and_attend(0, qkv_d, out_d, stream); });
    const double seconds = median_seconds(stream, 50, [&] { gpu.attend(0, qkv_d, out_d, stream); });
    const KvPageLayout& layout = manager.layout();
    const int len = context + 1, paged = paged_token_count(config, len);
    // A window token: fp16 keys and values, or int8 ones with an fp16 pair per head each.
    const double window_bytes =
        config.residual_format == KvResidualFormat::kInt8 ? 2.0 * (C + 4 * model.n_head) : 4.0 * C;
    const double bytes =
        batch *
        (paged * static_cast<double>(layout.code_bytes_per_page + layout.param_bytes_per_page) /
             config.page_tokens +
         (len - paged) * window_bytes);
    const char* kernel = cuda::decode_attention_variant_name(gpu.decode_attention_kernel());
    if (config.format == KvFormat::kKivi2 && test.variant == DecodeAttentionVariant::kPacked) {
      EXPECT_STREQ(kernel, "packed") << test.name;
    }
    const double bandwidth = bytes / seconds;
    std::printf(
        "%-16s B=%d context %d, one layer: attention %.1f us (write path + attention %.1f us), "
        "%.1f MB of KV read, %.0f GB/s = %.0f%% of the copy bandwidth (%.0f GB/s)\n",
        test.name.c_str(), batch, len, seconds * 1e6, layer_seconds * 1e6, bytes * 1e-6,
        bandwidth * 1e-9, 100.0 * bandwidth / copy_bytes_per_second, copy_bytes_per_second * 1e-9);
    std::printf(
        "{\"bench\": \"decode_attention\", \"case\": \"%s\", \"kernel\": \"%s\", \"batch\": %d, "
        "\"context\": %d, \"attention_us\": %.2f, \"layer_us\": %.2f, \"kv_mb\": %.2f, "
        "\"gb_per_second\": %.1f, \"copy_gb_per_second\": %.1f, \"fraction_of_copy\": %.3f}\n",
        test.name.c_str(), kernel, batch, len, seconds * 1e6, layer_seconds * 1e6, bytes * 1e-6,
        bandwidth * 1e-9, copy_bytes_per_second * 1e-9, bandwidth / copy_bytes_per_second);
    EXPECT_GT(seconds, 0.0);
    if (config.format == KvFormat::kKivi2) {
      const std::vector<__half> got = download(out_d, static_cast<size_t>(batch) * C);
      std::vector<float> out(got.size());
      for (size_t i = 0; i < got.size(); ++i) out[i] = __half2float(got[i]);
      std::vector<float>& first = first_out[test.cache];
      if (first.empty()) {
        first = out;
      } else {
        for (size_t i = 0; i < out.size(); ++i) {
          ASSERT_LE(std::fabs(out[i] - first[i]), 2e-3 + 2e-3 * std::fabs(out[i]))
              << test.name << ": row " << i / C << " channel " << i % C;
        }
      }
    }
    KVSERVE_CUDA_CHECK(cudaStreamDestroy(stream));
  }
}

// The prefill kernel micro-benchmark of docs/gpu.md, both prefill kernels in one process: one
// GPT-2 layer (12 heads of 64) of a prefill step of 16 sequences, either a whole 512-token prompt
// each (8,192 queries over their own keys) or a second 512-token chunk after a first one (the
// first chunk's keys then come from pages, dequantized for KIVI and int8). It times the attention
// alone (attend, median of 20 launches) and prints one JSON line per format, kernel and case. Its
// check: the tensor-core kernel gives the tiled kernel's output within the GPU tests' tolerance
// at this size, which the small-model tests do not reach.
TEST(GpuKvCache, PrefillAttentionThroughput) {
  SKIP_WITHOUT_GPU();
  ModelConfig model = cache_test_model();
  model.n_layer = 1;
  model.n_head = 12;
  model.n_embd = 768;
  const int sequences = 16, chunk = 512, C = model.n_embd, rows = sequences * chunk;
  KvCacheConfig fp16, int8, kivi4, kivi2, kivi2c;
  fp16.format = KvFormat::kFp16;
  int8.format = KvFormat::kInt8;
  kivi4.format = KvFormat::kKivi4;
  ASSERT_TRUE(apply_kv_preset("kivi2c", kivi2c));  // its int8 window: key codes and their pairs
  const std::vector<CacheCase> formats = {
      {"fp16", fp16}, {"int8", int8}, {"kivi4", kivi4}, {"kivi2", kivi2}, {"kivi2c", kivi2c}};
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint16_t> qkv(static_cast<size_t>(rows) * 3 * C);
  for (uint16_t& h : qkv) h = float_to_half(normal(rng));
  cuda::DeviceBuffer<__half> qkv_device, out_device;
  const __half* qkv_d = upload(qkv_device, qkv.data(), qkv.size());
  __half* out_d = out_device.reserve(static_cast<size_t>(rows) * C);
  for (const CacheCase& format : formats) {
    for (const int chunks : {1, 2}) {
      std::vector<float> tiled_out;
      for (PrefillAttentionVariant prefill :
           {PrefillAttentionVariant::kTiled, PrefillAttentionVariant::kTensor}) {
        KvCacheManager manager(format.config, model, sequences * 48);
        CudaKvCache gpu(manager.config(), manager.num_blocks(), model,
                        DecodeAttentionVariant::kPacked, prefill);
        cudaStream_t stream = nullptr;
        KVSERVE_CUDA_CHECK(cudaStreamCreate(&stream));
        for (int i = 0; i < sequences; ++i) manager.add_sequence(i);
        for (int c = 0; c < chunks; ++c) {
          std::vector<ForwardItem> items;
          for (int i = 0; i < sequences; ++i) {
            ASSERT_TRUE(manager.grow(i, (c + 1) * chunk));
            items.push_back({i, c * chunk, std::vector<int32_t>(chunk, 0), false, {}});
          }
          gpu.prepare(with_block_tables(items, manager), stream);
          gpu.append_and_attend(0, qkv_d, out_d, stream);  // the last one: warm-up
          if (c + 1 < chunks) manager.finish_step();
        }
        const double seconds =
            median_seconds(stream, 20, [&] { gpu.attend(0, qkv_d, out_d, stream); });
        const char* kernel = cuda::prefill_attention_variant_name(gpu.prefill_attention_variant());
        const double queries_per_second = rows / seconds;
        std::printf(
            "{\"bench\": \"prefill_attention\", \"case\": \"%s\", \"kernel\": \"%s\", "
            "\"sequences\": %d, \"chunk\": %d, \"context\": %d, \"attention_us\": %.2f, "
            "\"queries_per_second\": %.4g}\n",
            format.name, kernel, sequences, chunk, chunks * chunk, seconds * 1e6,
            queries_per_second);
        const std::vector<__half> got = download(out_d, static_cast<size_t>(rows) * C);
        std::vector<float> out(got.size());
        for (size_t i = 0; i < got.size(); ++i) out[i] = __half2float(got[i]);
        if (prefill == PrefillAttentionVariant::kTiled) {
          tiled_out = out;
        } else {
          for (size_t i = 0; i < out.size(); ++i) {
            ASSERT_LE(std::fabs(out[i] - tiled_out[i]), 2e-3 + 2e-3 * std::fabs(tiled_out[i]))
                << format.name << " context " << chunks * chunk << ": row " << i / C << " channel "
                << i % C;
          }
        }
        KVSERVE_CUDA_CHECK(cudaStreamDestroy(stream));
      }
    }
  }
}

// The page write micro-benchmark of docs/gpu.md (issue 15 target 5): kv_quantize_pages alone for
// one GPT-2 layer (12 heads of 64) of a prefill step of 32 prompts of 512 tokens, kivi2 and
// kivi2c, in the chunks append_and_attend runs it with and in one chunk per (item, head), the grid
// before the split (median of 20 launches each); one JSON line per format. Its checks: the step
// really splits, and after either grid the pool equals the CPU cache's byte for byte.
TEST(GpuKvCache, QuantizePagesThroughput) {
  SKIP_WITHOUT_GPU();
  ModelConfig model = cache_test_model();
  model.n_layer = 1;
  model.n_head = 12;
  model.n_embd = 768;
  const int sequences = 32, prompt = 512, C = model.n_embd, H = model.n_head;
  const int rows = sequences * prompt;
  KvCacheConfig kivi2, kivi2c;
  ASSERT_TRUE(apply_kv_preset("kivi2c", kivi2c));
  std::mt19937 rng(11);
  const std::vector<float> channel_scale = random_channel_scale(C, rng);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> qkv(static_cast<size_t>(rows) * 3 * C);  // [rows][3C], fp16 values
  for (size_t i = 0; i < qkv.size(); ++i) {
    qkv[i] = round_to_half(normal(rng) * channel_scale[i % (3 * C)]);
  }
  const std::vector<uint16_t> qkv_half = to_half(qkv);
  cuda::DeviceBuffer<__half> qkv_device, out_device;
  const __half* qkv_d = upload(qkv_device, qkv_half.data(), qkv_half.size());
  __half* out_d = out_device.reserve(static_cast<size_t>(rows) * C);
  for (const CacheCase& format : std::vector<CacheCase>{{"kivi2", kivi2}, {"kivi2c", kivi2c}}) {
    SCOPED_TRACE(format.name);
    KvCacheManager manager(format.config, model, sequences * 24);
    CpuKvCache cpu(manager.config(), manager.num_blocks(), model);
    CudaKvCache gpu(manager.config(), manager.num_blocks(), model);
    std::vector<ForwardItem> items;
    for (int i = 0; i < sequences; ++i) {
      manager.add_sequence(i);
      ASSERT_TRUE(manager.grow(i, prompt));
      items.push_back({i, 0, std::vector<int32_t>(prompt, 0), false, {}});
    }
    // The CPU reference, (item, head) pairs spread over the host's cores.
    std::vector<float> expected(static_cast<size_t>(rows) * C);
    std::atomic<int> next{0};
    std::vector<std::thread> workers(std::max(1u, std::thread::hardware_concurrency()));
    for (std::thread& worker : workers) {
      worker = std::thread([&] {
        for (int task = next++; task < sequences * H; task = next++) {
          const int item = task / H, head = task % H;
          const size_t row = static_cast<size_t>(item) * prompt;
          cpu.append_and_attend(0, head, manager.block_table(item), 0, prompt, &qkv[row * 3 * C],
                                3 * C, &expected[row * C], C);
        }
      });
    }
    for (std::thread& worker : workers) worker.join();

    cudaStream_t stream = nullptr;
    KVSERVE_CUDA_CHECK(cudaStreamCreate(&stream));
    gpu.prepare(with_block_tables(items, manager), stream);
    const int paged = gpu.max_paged_tokens();
    ASSERT_EQ(paged, paged_token_count(format.config, prompt));
    gpu.append_and_attend(0, qkv_d, out_d, stream);  // the whole layer once, as a step runs it
    auto expect_cpu_pool = [&](const char* grid) {
      const std::vector<uint8_t> pool = gpu.download(stream);
      ASSERT_EQ(pool.size(), cpu.bytes());
      for (size_t b = 0; b < pool.size(); ++b) {
        ASSERT_EQ(pool[b], cpu.data()[b]) << grid << ": first pool byte that differs at " << b;
      }
    };
    ASSERT_NO_FATAL_FAILURE(expect_cpu_pool("split"));
    const double unsplit_seconds =
        median_seconds(stream, 20, [&] { gpu.quantize_pages(0, qkv_d, stream, paged); });
    ASSERT_NO_FATAL_FAILURE(expect_cpu_pool("one chunk per (item, head)"));
    const double split_seconds =
        median_seconds(stream, 20, [&] { gpu.quantize_pages(0, qkv_d, stream); });
    ASSERT_NO_FATAL_FAILURE(expect_cpu_pool("split"));
    std::printf(
        "{\"bench\": \"kv_quantize_pages\", \"case\": \"%s\", \"sequences\": %d, \"prompt\": %d, "
        "\"paged_tokens\": %d, \"heads\": %d, \"split_us\": %.2f, \"one_chunk_us\": %.2f, "
        "\"speedup\": %.2f}\n",
        format.name, sequences, prompt, paged, H, split_seconds * 1e6, unsplit_seconds * 1e6,
        unsplit_seconds / split_seconds);
    KVSERVE_CUDA_CHECK(cudaStreamDestroy(stream));
  }
}

TEST(GpuKernels, EmbeddingLayerNormAndBiasGeluMatchPlainLoops) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int rows = 37, C = 320, V = 50, P = 64;
  auto random_half = [&](size_t n, float scale) {
    std::vector<float> v(n);
    for (float& x : v) x = round_to_half(normal(rng) * scale);
    return v;
  };
  const std::vector<float> wte = random_half(static_cast<size_t>(V) * C, 0.5f);
  const std::vector<float> wpe = random_half(static_cast<size_t>(P) * C, 0.1f);
  std::vector<int32_t> tokens(rows), positions(rows);
  for (int t = 0; t < rows; ++t) {
    tokens[t] = static_cast<int32_t>(rng() % V);
    positions[t] = static_cast<int32_t>(rng() % P);
  }
  cuda::DeviceBuffer<__half> wte_d, wpe_d, weight_d, bias_d, residual_bias_d, out_d, y_d;
  cuda::DeviceBuffer<int32_t> tokens_d, positions_d, index_d;
  cuda::DeviceBuffer<float> x_d;
  upload(wte_d, to_half(wte).data(), wte.size());
  upload(wpe_d, to_half(wpe).data(), wpe.size());
  upload(tokens_d, tokens.data(), rows);
  upload(positions_d, positions.data(), rows);
  float* x = x_d.reserve(static_cast<size_t>(rows) * C);
  cuda::embedding_forward(x, tokens_d.get(), positions_d.get(), wte_d.get(), wpe_d.get(), rows, C,
                          nullptr);
  std::vector<float> x_host = download(x, static_cast<size_t>(rows) * C);
  for (int t = 0; t < rows; ++t) {
    for (int c = 0; c < C; ++c) {
      ASSERT_EQ(x_host[t * C + c], wte[tokens[t] * C + c] + wpe[positions[t] * C + c]);
    }
  }

  // Layer norm of a subset of rows (the final layer norm's case), with a residual bias.
  const std::vector<float> weight = random_half(C, 1.0f), bias = random_half(C, 0.3f);
  const std::vector<float> residual_bias = random_half(C, 0.5f);
  const std::vector<int32_t> index = {3, 0, 36, 17};
  upload(weight_d, to_half(weight).data(), C);
  upload(bias_d, to_half(bias).data(), C);
  upload(residual_bias_d, to_half(residual_bias).data(), C);
  upload(index_d, index.data(), index.size());
  __half* out = out_d.reserve(index.size() * C);
  cuda::layer_norm_forward(out, x, index_d.get(), residual_bias_d.get(), weight_d.get(),
                           bias_d.get(), static_cast<int>(index.size()), C, 1e-5f, nullptr);
  const std::vector<__half> normed = download(out, index.size() * C);
  for (size_t r = 0; r < index.size(); ++r) {
    std::vector<double> v(C);
    double mean = 0.0, var = 0.0;
    for (int c = 0; c < C; ++c) mean += v[c] = x_host[index[r] * C + c] + residual_bias[c];
    mean /= C;
    for (int c = 0; c < C; ++c) var += (v[c] - mean) * (v[c] - mean);
    const double inv_std = 1.0 / std::sqrt(var / C + 1e-5);
    for (int c = 0; c < C; ++c) {
      const double want = (v[c] - mean) * inv_std * weight[c] + bias[c];
      ASSERT_NEAR(__half2float(normed[r * C + c]), want, 2e-3 + 1e-3 * std::fabs(want))
          << "row " << r << " channel " << c;
    }
  }

  // Bias + GELU (tanh), in place on fp16.
  const std::vector<float> y = random_half(static_cast<size_t>(rows) * C, 2.0f);
  __half* y_dev = upload(y_d, to_half(y).data(), y.size());
  cuda::bias_activation_forward(y_dev, bias_d.get(), rows, C, cuda::BiasActivation::kGeluTanh,
                                nullptr);
  const std::vector<__half> activated = download(y_dev, y.size());
  for (size_t i = 0; i < y.size(); ++i) {
    const double v = y[i] + bias[i % C];
    const double want =
        0.5 * v * (1.0 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
    ASSERT_NEAR(__half2float(activated[i]), want, 1e-3 + 1e-3 * std::fabs(want)) << i;
  }
}

// Seconds per call of `run` when `launches` calls are replayed as one CUDA graph (as a decode
// step runs them), median of 20 replays: the launch gaps of an eager loop stay out.
template <typename Run>
double graph_seconds_per_call(cudaStream_t stream, int launches, Run run) {
  KVSERVE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < launches; ++i) run();
  cudaGraph_t graph = nullptr;
  KVSERVE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec = nullptr;
  KVSERVE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  KVSERVE_CUDA_CHECK(cudaGraphDestroy(graph));
  KVSERVE_CUDA_CHECK(cudaGraphLaunch(exec, stream));  // warm-up
  const double seconds =
      median_seconds(stream, 20, [&] { KVSERVE_CUDA_CHECK(cudaGraphLaunch(exec, stream)); });
  KVSERVE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  return seconds / launches;
}

double gelu_tanh(double v) {
  return 0.5 * v * (1.0 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
}

double gelu_erf(double v) {
  return 0.5 * v * (1.0 + std::erf(v * 0.7071067811865476));
}

// The cuBLASLt GEMMs with a bias (+ GELU) epilogue against a double-precision loop, at an odd row
// count, and twice in a row (the second call reuses the first's plan).
TEST(GpuKernels, BiasGemmMatchesPlainLoops) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int m = 37, n = 320, k = 96;
  auto random_half = [&](size_t count, float scale) {
    std::vector<float> v(count);
    for (float& x : v) x = round_to_half(normal(rng) * scale);
    return v;
  };
  // a: [m][k]   b: [k][n]   bias: [n]; pre-activations of about unit spread
  const std::vector<float> a = random_half(static_cast<size_t>(m) * k, 1.0f);
  const std::vector<float> b = random_half(static_cast<size_t>(k) * n, 0.15f);
  const std::vector<float> bias = random_half(n, 0.5f);
  cuda::DeviceBuffer<__half> a_d, b_d, bias_d, c_d;
  cuda::DeviceBuffer<uint8_t> workspace;
  upload(a_d, to_half(a).data(), a.size());
  upload(b_d, to_half(b).data(), b.size());
  upload(bias_d, to_half(bias).data(), bias.size());
  __half* c = c_d.reserve(static_cast<size_t>(m) * n);
  const size_t workspace_bytes = size_t{4} << 20;
  cuda::BiasGemm gemm(workspace.reserve(workspace_bytes), workspace_bytes);
  for (const cuda::GemmEpilogue epilogue :
       {cuda::GemmEpilogue::kBias, cuda::GemmEpilogue::kBiasGeluTanh}) {
    for (int call = 0; call < 2; ++call) {
      KVSERVE_CUDA_CHECK(cudaMemset(c, 0xff, static_cast<size_t>(m) * n * sizeof(__half)));
      gemm.run(nullptr, a_d.get(), b_d.get(), bias_d.get(), c, m, n, k, epilogue);
      const std::vector<__half> got = download(c, static_cast<size_t>(m) * n);
      double worst_tanh = 0.0, worst_erf = 0.0;
      for (int r = 0; r < m; ++r) {
        for (int j = 0; j < n; ++j) {
          double v = bias[j];
          for (int i = 0; i < k; ++i) v += static_cast<double>(a[r * k + i]) * b[i * n + j];
          const double want = epilogue == cuda::GemmEpilogue::kBias ? v : gelu_tanh(v);
          const double value = __half2float(got[r * n + j]);
          ASSERT_NEAR(value, want, 1e-3 + 2e-3 * std::fabs(want))
              << "epilogue " << static_cast<int>(epilogue) << " row " << r << " column " << j
              << " pre-activation " << v;
          worst_tanh = std::max(worst_tanh, std::fabs(value - want));
          worst_erf = std::max(worst_erf, std::fabs(value - gelu_erf(v)));
        }
      }
      if (epilogue == cuda::GemmEpilogue::kBiasGeluTanh && call == 0) {
        std::printf(
            "bias + GELU epilogue: worst |difference| %.2e from the tanh form, %.2e from "
            "the erf form\n",
            worst_tanh, worst_erf);
      }
    }
  }
  EXPECT_EQ(gemm.plans(), 2u);
  EXPECT_THROW(gemm.run(nullptr, a_d.get() + 1, b_d.get(), bias_d.get(), c, m, n, k,
                        cuda::GemmEpilogue::kBias),
               std::invalid_argument);  // not 16-byte aligned
  EXPECT_THROW(
      gemm.run(nullptr, a_d.get(), b_d.get(), nullptr, c, m, n, k, cuda::GemmEpilogue::kBias),
      std::invalid_argument);
}

// The micro-benchmark of the GEMMs with a bias of a GPT-2 layer (768 channels): QKV (bias) and FC
// (bias + GELU) at a decode step's 256 rows and a prefill step's 16,384, as cuBLAS's GEMM followed
// by bias_activation_forward (the step before issue 15) and as one cuBLASLt GEMM with the
// epilogue, each call replayed from a CUDA graph; one JSON line per case. Its check: both give
// the same result within fp16 rounding (the epilogue adds the bias before rounding, the old
// path after).
TEST(GpuKernels, BiasGemmThroughput) {
  SKIP_WITHOUT_GPU();
  const int C = 768;
  std::mt19937 rng(13);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  cudaStream_t stream = nullptr;
  KVSERVE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cublasHandle_t cublas = nullptr;
  KVSERVE_CUBLAS_CHECK(cublasCreate(&cublas));
  const size_t workspace_bytes = size_t{32} << 20;
  cuda::DeviceBuffer<uint8_t> workspace;
  void* workspace_d = workspace.reserve(workspace_bytes);
  KVSERVE_CUBLAS_CHECK(cublasSetStream(cublas, stream));
  KVSERVE_CUBLAS_CHECK(cublasSetWorkspace(cublas, workspace_d, workspace_bytes));
  cuda::BiasGemm lt(workspace_d, workspace_bytes);
  struct Case {
    const char* name;
    int n;
    cuda::GemmEpilogue epilogue;
    cuda::BiasActivation activation;
  };
  for (const Case& gemm :
       {Case{"qkv", 3 * C, cuda::GemmEpilogue::kBias, cuda::BiasActivation::kNone},
        Case{"fc", 4 * C, cuda::GemmEpilogue::kBiasGeluTanh, cuda::BiasActivation::kGeluTanh}}) {
    for (const int m : {256, 16384}) {
      std::vector<uint16_t> a(static_cast<size_t>(m) * C), b(static_cast<size_t>(C) * gemm.n),
          bias(gemm.n);
      for (uint16_t& h : a) h = float_to_half(normal(rng));
      for (uint16_t& h : b) h = float_to_half(normal(rng) * 0.04f);
      for (uint16_t& h : bias) h = float_to_half(normal(rng) * 0.5f);
      cuda::DeviceBuffer<__half> a_d, b_d, bias_d, old_d, new_d;
      upload(a_d, a.data(), a.size());
      upload(b_d, b.data(), b.size());
      upload(bias_d, bias.data(), bias.size());
      const size_t out = static_cast<size_t>(m) * gemm.n;
      __half* old_out = old_d.reserve(out);
      __half* new_out = new_d.reserve(out);
      auto separate = [&] {
        cuda::gemm(cublas, stream, a_d.get(), b_d.get(), false, old_out, cuda::GemmOutput::kHalf, m,
                   gemm.n, C, 0.0f);
        cuda::bias_activation_forward(old_out, bias_d.get(), m, gemm.n, gemm.activation, stream);
      };
      auto fused = [&] {
        lt.run(stream, a_d.get(), b_d.get(), bias_d.get(), new_out, m, gemm.n, C, gemm.epilogue);
      };
      separate();  // outside capture: settles cuBLAS's choice and plans the shape
      fused();
      const int launches = m <= 256 ? 20 : 4;
      const double separate_seconds = graph_seconds_per_call(stream, launches, separate);
      const double fused_seconds = graph_seconds_per_call(stream, launches, fused);
      std::printf(
          "{\"bench\": \"bias_gemm\", \"case\": \"%s\", \"rows\": %d, \"n\": %d, \"k\": %d, "
          "\"gemm_then_bias_us\": %.2f, \"epilogue_us\": %.2f}\n",
          gemm.name, m, gemm.n, C, separate_seconds * 1e6, fused_seconds * 1e6);
      // One more call of each, compared.
      separate();
      fused();
      KVSERVE_CUDA_CHECK(cudaStreamSynchronize(stream));
      const std::vector<__half> want = download(old_out, out), got = download(new_out, out);
      for (size_t i = 0; i < out; ++i) {
        const float w = __half2float(want[i]), g = __half2float(got[i]);
        ASSERT_NEAR(g, w, 4e-3 + 4e-3 * std::fabs(w)) << gemm.name << " rows " << m << " at " << i;
      }
    }
  }
  cublasDestroy(cublas);
  KVSERVE_CUDA_CHECK(cudaStreamDestroy(stream));
}

// The layer norm micro-benchmark: a GPT-2 layer norm (768 channels, with the pending residual
// bias) at a decode step's 256 rows and a prefill step's 16,384, with 4, 2 and 1 rows (warps) per
// block, each replayed from a CUDA graph; one JSON line per case. Its checks: the first shape
// against a double-precision loop, and every other shape gives its output and residual stream
// bit for bit.
TEST(GpuKernels, LayerNormThroughput) {
  SKIP_WITHOUT_GPU();
  const int C = 768;
  std::mt19937 rng(17);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  cudaStream_t stream = nullptr;
  KVSERVE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::vector<uint16_t> weight(C), bias(C), residual_bias(C);
  for (uint16_t& h : weight) h = float_to_half(1.0f + 0.2f * normal(rng));
  for (uint16_t& h : bias) h = float_to_half(0.2f * normal(rng));
  for (uint16_t& h : residual_bias) h = float_to_half(0.5f * normal(rng));
  cuda::DeviceBuffer<__half> weight_d, bias_d, residual_bias_d, out_d;
  cuda::DeviceBuffer<float> x_d;
  upload(weight_d, weight.data(), C);
  upload(bias_d, bias.data(), C);
  upload(residual_bias_d, residual_bias.data(), C);
  for (const int rows : {256, 16384}) {
    std::vector<float> x(static_cast<size_t>(rows) * C);
    for (float& v : x) v = 3.0f * normal(rng);
    float* x_dev = x_d.reserve(x.size());
    __half* out = out_d.reserve(x.size());
    std::vector<__half> first_out;
    std::vector<float> first_x;
    for (const int rows_per_block : {4, 2, 1}) {
      auto layer_norm = [&] {
        cuda::layer_norm_forward(out, x_dev, nullptr, residual_bias_d.get(), weight_d.get(),
                                 bias_d.get(), rows, C, 1e-5f, stream, rows_per_block);
      };
      // The timed calls add the residual bias again and again; the checked call starts afresh.
      // The copy goes on the kernel's own (non-blocking) stream: a cudaMemcpy from pageable
      // memory may return before its data lands, and the legacy stream does not order it
      // before this stream's kernel (row 125 read half-copied data on the H100).
      const double seconds = graph_seconds_per_call(stream, rows <= 256 ? 20 : 4, layer_norm);
      KVSERVE_CUDA_CHECK(cudaMemcpyAsync(x_dev, x.data(), x.size() * sizeof(float),
                                         cudaMemcpyHostToDevice, stream));
      layer_norm();
      KVSERVE_CUDA_CHECK(cudaStreamSynchronize(stream));
      const double bytes = rows * C * (2.0 * sizeof(float) + sizeof(__half));
      std::printf(
          "{\"bench\": \"layer_norm\", \"rows\": %d, \"channels\": %d, \"rows_per_block\": %d, "
          "\"us\": %.2f, \"gb_per_second\": %.1f}\n",
          rows, C, rows_per_block, seconds * 1e6, bytes / seconds * 1e-9);
      const std::vector<__half> got_out = download(out, x.size());
      const std::vector<float> got_x = download(x_dev, x.size());
      if (first_out.empty()) {  // against a double-precision loop
        for (int r = 0; r < rows; ++r) {
          std::vector<double> v(C);
          double mean = 0.0, var = 0.0;
          for (int c = 0; c < C; ++c) {
            mean += v[c] = x[r * C + c] + static_cast<double>(half_to_float(residual_bias[c]));
          }
          mean /= C;
          for (int c = 0; c < C; ++c) var += (v[c] - mean) * (v[c] - mean);
          const double inv_std = 1.0 / std::sqrt(var / C + 1e-5);
          for (int c = 0; c < C; ++c) {
            const double want =
                (v[c] - mean) * inv_std * half_to_float(weight[c]) + half_to_float(bias[c]);
            ASSERT_NEAR(__half2float(got_out[r * C + c]), want, 2e-3 + 1e-3 * std::fabs(want))
                << "row " << r << " channel " << c;
            ASSERT_EQ(got_x[r * C + c], x[r * C + c] + half_to_float(residual_bias[c]));
          }
        }
        first_out = got_out;
        first_x = got_x;
        continue;
      }
      for (size_t i = 0; i < x.size(); ++i) {
        ASSERT_EQ(std::memcmp(&got_out[i], &first_out[i], sizeof(__half)), 0)
            << rows_per_block << " rows per block: row " << i / C << " channel " << i % C;
        ASSERT_EQ(got_x[i], first_x[i])
            << rows_per_block << " rows per block: residual row " << i / C << " channel " << i % C;
      }
    }
  }
  KVSERVE_CUDA_CHECK(cudaStreamDestroy(stream));
}

// Which KIVI kernel decode_attention runs: `packed` for every 2-bit layout (issue 16's fp8 pairs,
// int8 residual and value groups of 64 too, alone and as kivi2c) once chunks hold 8 pages,
// `online` for shorter chunks and 4-bit pages. A host function: runs without a GPU.
TEST(GpuKernels, DecodeAttentionRunsPackedForEveryTwoBitLayout) {
  auto view_of = [](const KvCacheConfig& c) {
    cuda::KvCacheView v;
    v.kind = cuda::KvKind::kKivi;
    v.bits = kv_bits(c.format);
    v.key_group = c.key_group;
    v.value_group = c.value_group;
    v.params_fp8 = c.params == KvParamFormat::kFp8;
    v.residual_int8 = c.residual_format == KvResidualFormat::kInt8;
    return v;
  };
  const cuda::DecodeSplit whole{1024, 1}, eight_pages{256, 4}, seven_pages{224, 4};
  for (const CacheCase& c : cache_cases()) {
    const KvCacheConfig& config = c.config;
    if (config.format != KvFormat::kKivi2 && config.format != KvFormat::kKivi4) continue;
    SCOPED_TRACE(c.name);
    const cuda::KvCacheView view = view_of(config);
    const bool two_bit = config.format == KvFormat::kKivi2;
    for (cuda::DecodeSplit split : {whole, eight_pages}) {
      EXPECT_EQ(cuda::decode_attention_kernel(view, split, DecodeAttentionVariant::kPacked),
                two_bit ? DecodeAttentionVariant::kPacked : DecodeAttentionVariant::kOnline);
    }
    EXPECT_EQ(cuda::decode_attention_kernel(view, seven_pages, DecodeAttentionVariant::kPacked),
              DecodeAttentionVariant::kOnline);
    EXPECT_EQ(cuda::decode_attention_kernel(view, whole, DecodeAttentionVariant::kOnline),
              DecodeAttentionVariant::kOnline);
    EXPECT_EQ(cuda::decode_attention_kernel(view, seven_pages, DecodeAttentionVariant::kTensor),
              two_bit ? DecodeAttentionVariant::kTensor : DecodeAttentionVariant::kOnline);
  }
}

// kv_quantize_pages' chunks (a host function: runs without a GPU): every KIVI chunk holds whole
// key groups and gives each of a block's 128 threads a value group, so that no thread waits out
// the value phase (kivi2c's value groups of 64 are one per token: 64-token chunks left half of
// them idle; per-token keys as well); int8 and fp16 pages keep 64 positions, and a view without a
// head or whose value groups do not divide it is refused.
TEST(GpuKernels, QuantizePagesChunksHoldWholeKeyGroupsAndAValueGroupPerThread) {
  constexpr int kBlockThreads = 128;
  const ModelConfig model = cache_test_model();
  const int head_dim = model.n_embd / model.n_head;
  for (const CacheCase& c : cache_cases()) {
    const KvCacheConfig& config = c.config;
    SCOPED_TRACE(c.name);
    cuda::KvCacheView view;
    view.head_dim = head_dim;
    if (config.format != KvFormat::kKivi2 && config.format != KvFormat::kKivi4) {
      view.kind = config.format == KvFormat::kInt8 ? cuda::KvKind::kInt8 : cuda::KvKind::kFp16;
      EXPECT_EQ(cuda::kv_quantize_pages_chunk_tokens(view), 64);
      continue;
    }
    view.kind = cuda::KvKind::kKivi;
    view.key_group = config.key_group;
    view.value_group = config.value_group;
    view.per_token_keys = config.per_token_keys;
    const int chunk = cuda::kv_quantize_pages_chunk_tokens(view);
    EXPECT_EQ(chunk % config.key_group, 0);
    EXPECT_GE(chunk, 64);
    EXPECT_GE(chunk * (head_dim / config.value_group), kBlockThreads);
  }
  KvCacheConfig kivi2c;
  ASSERT_TRUE(apply_kv_preset("kivi2c", kivi2c));
  cuda::KvCacheView view;
  view.kind = cuda::KvKind::kKivi;
  view.head_dim = 64;
  view.key_group = kivi2c.key_group;
  view.value_group = kivi2c.value_group;
  EXPECT_EQ(cuda::kv_quantize_pages_chunk_tokens(view), 128);
  view.value_group = 32;  // kivi2: two value groups a token
  EXPECT_EQ(cuda::kv_quantize_pages_chunk_tokens(view), 64);
  view.value_group = 48;
  EXPECT_THROW(cuda::kv_quantize_pages_chunk_tokens(view), std::invalid_argument);
  view.value_group = 32;
  view.head_dim = 0;
  EXPECT_THROW(cuda::kv_quantize_pages_chunk_tokens(view), std::invalid_argument);
}

TEST(GpuKernels, LaunchersRejectBadInputs) {
  SKIP_WITHOUT_GPU();
  cuda::KvCacheView cache;
  cuda::KvBatchView batch;
  EXPECT_THROW(cuda::layer_norm_forward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 4, 0,
                                        1e-5f, nullptr),
               std::invalid_argument);
  for (int channels : {6, 2052}) {  // not a multiple of 4; beyond the registers' 2048
    EXPECT_THROW(cuda::layer_norm_forward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 4,
                                          channels, 1e-5f, nullptr),
                 std::invalid_argument);
  }
  EXPECT_THROW(cuda::layer_norm_forward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 4,
                                        768, 1e-5f, nullptr, 33),
               std::invalid_argument);  // beyond 32 warps per block
  EXPECT_THROW(
      cuda::bias_activation_forward(nullptr, nullptr, 2, 3, cuda::BiasActivation::kNone, nullptr),
      std::invalid_argument);
  // A batch with items but a cache view without a pool.
  int32_t dummy = 0;
  batch.items = 1;
  batch.start = batch.count = batch.row = batch.page_offset = batch.pages = batch.residual_offset =
      &dummy;
  EXPECT_THROW(cuda::paged_attention(cache, batch, &dummy, 1, nullptr, 0, nullptr, 0, nullptr),
               std::invalid_argument);
  EXPECT_THROW(
      cuda::prefill_attention(cache, batch, &dummy, 1, {}, nullptr, 0, nullptr, 0, nullptr),
      std::invalid_argument);
  EXPECT_THROW(cuda::kv_dequantize_pages(cache, batch, &dummy, 1, nullptr, nullptr),
               std::invalid_argument);
  // A consistent KIVI view (nothing is launched): kv_quantize_pages' chunks must be positive
  // multiples of the key group, and kv_dequantize_pages' 16-byte runs need head_dim % 8 == 0.
  uint8_t pool_byte = 0;
  alignas(16) __half halves[8] = {};
  cuda::KvCacheView kivi;
  kivi.blocks = &pool_byte;
  kivi.kind = cuda::KvKind::kKivi;
  kivi.bits = 2;
  kivi.n_head = 1;
  kivi.head_dim = 64;
  kivi.page_tokens = kivi.key_group = kivi.value_group = kivi.residual = 32;
  kivi.residual_tokens_per_block = 64;
  kivi.residual_slot_bytes = 128;
  batch.residual_slots = &dummy;
  for (int chunk_tokens : {0, 48}) {
    EXPECT_THROW(cuda::kv_quantize_pages(kivi, batch, halves, 192, 100, chunk_tokens, nullptr),
                 std::invalid_argument);
  }
  EXPECT_THROW(cuda::kv_quantize_pages(kivi, batch, halves, 192, -1, 64, nullptr),
               std::invalid_argument);
  {  // a step that lists its flushing items is a KIVI decode step: one chunk an item at most
    cuda::KvBatchView listed = batch;
    listed.flushing = &dummy;
    EXPECT_THROW(cuda::kv_quantize_pages(kivi, listed, halves, 192, 100, 64, nullptr),
                 std::invalid_argument);
    cuda::KvCacheView int8 = kivi;  // a valid int8 view: only the listing is wrong
    int8.kind = cuda::KvKind::kInt8;
    int8.bits = 8;
    try {
      cuda::kv_quantize_pages(int8, listed, halves, 192, 32, 64, nullptr);
      ADD_FAILURE() << "kv_quantize_pages took a listed step of int8 pages";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("KIVI decode step"), std::string::npos) << e.what();
    }
  }
  {  // a chunk the device cannot stage fails when a cache is built, naming the remedy
    cuda::KvCacheView widest = kivi;  // groups of 256 tokens of head_dim 256: 265 KB of floats
    widest.head_dim = widest.value_group = 256;
    widest.page_tokens = widest.key_group = widest.residual = 256;
    try {
      cuda::kv_quantize_pages_prepare(widest);
      ADD_FAILURE() << "kv_quantize_pages_prepare took a chunk beyond the device's shared memory";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("use a smaller --kv-group"), std::string::npos)
          << e.what();
    }
    EXPECT_NO_THROW(cuda::kv_quantize_pages_prepare(kivi));
  }
  // The staged window is read in 32-bit words; kv_store_residual copies rows 8 channels at a time
  // (16 bytes of an fp16 row), reading new rows straight from qkv.
  EXPECT_THROW(cuda::kv_quantize_pages(kivi, batch, halves, 193, 100, 64, nullptr),
               std::invalid_argument);
  EXPECT_THROW(cuda::kv_store_residual(kivi, batch, halves, 196, nullptr), std::invalid_argument);
  EXPECT_THROW(cuda::kv_store_residual(kivi, batch, halves + 1, 192, nullptr),
               std::invalid_argument);
  // decode_attention quantizes the new rows of an int8 residual only (checked before any launch).
  // Nothing is launched: an fp16 residual's rows are not quantized, and fp16 pages (decode
  // attention's geometry otherwise) have no residual slots to store rows in.
  alignas(16) __half out_halves[64] = {};
  auto expect_new_rows_refused = [&](const cuda::KvCacheView& view, cuda::DecodeNewRows new_rows,
                                     const std::string& message) {
    try {
      cuda::decode_attention(view, batch, {32, 1}, halves, 192, out_halves, 64, nullptr,
                             DecodeAttentionVariant::kPacked, new_rows, nullptr);
      ADD_FAILURE() << "decode_attention took new rows it cannot write: " << message;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(message), std::string::npos) << e.what();
    }
  };
  expect_new_rows_refused(kivi, {true, false}, "quantizing new rows needs an int8 residual");
  cuda::KvCacheView fp16_pages = kivi;
  fp16_pages.kind = cuda::KvKind::kFp16;
  fp16_pages.bits = 16;
  expect_new_rows_refused(fp16_pages, {false, true}, "storing new rows needs a KIVI residual");
  uint8_t new_code = 0;
  uint32_t new_pair = 0;
  kivi.residual_int8 = true;
  kivi.residual_params = 64;
  batch.new_codes = &new_code;
  batch.new_params = &new_pair;
  EXPECT_THROW(cuda::kv_quantize_residual(kivi, batch, halves, 196, 1, nullptr),
               std::invalid_argument);
  kivi.residual_int8 = false;
  kivi.head_dim = kivi.value_group = 36;
  EXPECT_THROW(cuda::kv_dequantize_pages(kivi, batch, &dummy, 1, halves, nullptr),
               std::invalid_argument);
}

}  // namespace
}  // namespace kvserve
