#include "engine/kv_cache_manager.h"

#include <gtest/gtest.h>

#include <algorithm>

#include "kernels/residual_order.h"
#include "tests/kv_test_models.h"

namespace kvserve {
namespace {

using testing::gpt2_small;

KvCacheConfig kivi(KvFormat format, int value_group = 32) {
  KvCacheConfig c;
  c.format = format;
  c.value_group = value_group;
  return c;
}

KvCacheConfig plain(KvFormat format) {
  KvCacheConfig c;
  c.format = format;
  return c;
}

CacheUsage usage_at(const KvCacheConfig& config, int tokens) {
  KvCacheManager m(config, gpt2_small(), 1000);
  m.add_sequence(1);
  EXPECT_TRUE(m.grow(1, tokens));
  m.finish_step();
  return m.usage();
}

TEST(KvFormat, ValidatesCombinations) {
  const ModelConfig model = gpt2_small();
  EXPECT_TRUE(validate(kivi(KvFormat::kKivi2), model).ok());
  KvCacheConfig c = kivi(KvFormat::kKivi2);
  c.residual = 48;
  EXPECT_NE(validate(c, model).message().find("--kv-residual"), std::string::npos);
  c = kivi(KvFormat::kKivi2);
  c.page_tokens = 48;
  EXPECT_NE(validate(c, model).message().find("--kv-page-tokens"), std::string::npos);
  c = kivi(KvFormat::kKivi2, 48);
  EXPECT_NE(validate(c, model).message().find("--kv-value-group"), std::string::npos);
  c = kivi(KvFormat::kKivi2);
  c.key_group = 8;  // 2-bit codes pack 16 to a word
  EXPECT_NE(validate(c, model).message().find("--kv-group"), std::string::npos);
  EXPECT_THROW(parse_kv_format("int4"), std::invalid_argument);
  EXPECT_EQ(parse_kv_format("kivi4"), KvFormat::kKivi4);
}

TEST(KvFormat, PagedTokenCountFollowsTheResidualRule) {
  const KvCacheConfig c = kivi(KvFormat::kKivi2);  // G = R = 32
  EXPECT_EQ(paged_token_count(c, 0), 0);
  EXPECT_EQ(paged_token_count(c, 63), 0);   // R + G - 1: all residual
  EXPECT_EQ(paged_token_count(c, 64), 32);  // R + G: the oldest group flushes
  EXPECT_EQ(paged_token_count(c, 95), 32);
  EXPECT_EQ(paged_token_count(c, 96), 64);
  EXPECT_EQ(paged_token_count(c, 1024), 992);
  for (int n = 1; n < 1100; ++n) {
    const int residual = n - paged_token_count(c, n);
    if (n >= 32) {
      EXPECT_GE(residual, 32);
    }
    EXPECT_LT(residual, 64);
  }
  EXPECT_EQ(paged_token_count(plain(KvFormat::kInt8), 77), 77);
}

TEST(KvCacheManager, PageLayoutBytes) {
  // GPT-2 small, one layer: 12 heads x 64 channels x 32 tokens.
  EXPECT_EQ(make_page_layout(plain(KvFormat::kFp16), gpt2_small()).block_bytes, 12u * 32 * 64 * 4);
  const KvPageLayout l = make_page_layout(kivi(KvFormat::kKivi2), gpt2_small());
  // codes 2 bits x 64 x 32 (K) + same (V); key params 64 channels x 1 group x 4 B; value params
  // 32 tokens x 2 groups x 4 B.
  EXPECT_EQ(l.block_bytes, 12u * (512 + 256 + 512 + 256));
  EXPECT_EQ(l.residual_tokens_per_block, 12);
}

// The memory targets of the KIVI pool issue, every byte of the pool counted.
TEST(KvCacheManager, CompressionAt1024TokensMeetsTargets) {
  EXPECT_DOUBLE_EQ(usage_at(plain(KvFormat::kFp16), 1024).compression_ratio(), 1.0);
  EXPECT_GE(usage_at(kivi(KvFormat::kKivi2), 1024).compression_ratio(), 4.5);
  EXPECT_GE(usage_at(kivi(KvFormat::kKivi2, 64), 1024).compression_ratio(), 4.9);
  EXPECT_GE(usage_at(kivi(KvFormat::kKivi4), 1024).compression_ratio(), 2.9);
  EXPECT_GE(usage_at(plain(KvFormat::kInt8), 1024).compression_ratio(), 1.8);
}

TEST(KvCacheManager, EveryByteIsAttributed) {
  for (KvFormat f : {KvFormat::kFp16, KvFormat::kInt8, KvFormat::kKivi4, KvFormat::kKivi2}) {
    for (int tokens : {1, 31, 63, 64, 100, 1024}) {
      const CacheUsage u = usage_at(kivi(f), tokens);
      EXPECT_EQ(u.used_bytes, u.code_bytes + u.param_bytes + u.residual_bytes + u.slack_bytes);
      EXPECT_GE(u.slack_bytes, 0) << to_string(f) << " " << tokens;
      EXPECT_EQ(u.fp16_equivalent_bytes, int64_t{tokens} * 36864);
    }
  }
  // kivi2 at 1024: 992 quantized tokens fill 31 pages exactly; the residual (32 tokens) uses
  // 3 key/value block pairs of 12 tokens: 4 slots of slack in each.
  const CacheUsage u = usage_at(kivi(KvFormat::kKivi2), 1024);
  EXPECT_EQ(u.blocks_used, 31 + 6);
  EXPECT_EQ(u.residual_bytes, 32 * 36864);
  EXPECT_EQ(u.slack_bytes, int64_t{2} * 4 * 768 * 2 * 12);  // K and V, 4 slots, 12 layers
}

KvCacheConfig kivi2c() {
  KvCacheConfig c;
  EXPECT_TRUE(apply_kv_preset("kivi2c", c));
  return c;
}

TEST(KvFormat, ParsesTheParameterAndResidualChoicesAndThePreset) {
  EXPECT_EQ(parse_kv_params("fp8"), KvParamFormat::kFp8);
  EXPECT_EQ(parse_kv_residual_format("int8"), KvResidualFormat::kInt8);
  EXPECT_THROW(parse_kv_params("fp4"), std::invalid_argument);
  EXPECT_THROW(parse_kv_residual_format("int4"), std::invalid_argument);
  const KvCacheConfig c = kivi2c();
  EXPECT_EQ(c.format, KvFormat::kKivi2);
  EXPECT_EQ(c.value_group, 64);
  EXPECT_EQ(c.params, KvParamFormat::kFp8);
  EXPECT_EQ(c.residual_format, KvResidualFormat::kInt8);
  EXPECT_EQ(describe(c), "kivi2 (G32 GV64 R32, fp8 params, int8 residual, pages of 32)");
  KvCacheConfig untouched;
  EXPECT_FALSE(apply_kv_preset("kivi2", untouched));
  EXPECT_TRUE(validate(c, gpt2_small()).ok());
  KvCacheConfig int8_fp8 = plain(KvFormat::kInt8);
  int8_fp8.params = KvParamFormat::kFp8;
  EXPECT_NE(validate(int8_fp8, gpt2_small()).message().find("kivi4 and kivi2 only"),
            std::string::npos);
}

TEST(KvCacheManager, Fp8ParamsAndInt8ResidualLayout) {
  // GPT-2 small, one layer, kivi2c: codes 12 x (512 + 512) B; key params 12 x 64 channels x 1
  // group x 2 B; value params 12 x 32 tokens x 1 group x 2 B.
  const KvPageLayout l = make_page_layout(kivi2c(), gpt2_small());
  EXPECT_EQ(l.param_pair_bytes, 2u);
  EXPECT_EQ(l.block_bytes, 12u * (512 + 128 + 512 + 64));
  // An int8 residual token: 12 heads x (64 codes + a 4-byte fp16 pair).
  EXPECT_EQ(l.residual_token_bytes, 12u * 68);
  EXPECT_EQ(l.residual_slot_bytes, 816u);      // a multiple of 16 already
  EXPECT_EQ(l.residual_tokens_per_block, 17);  // 14592 / 816
  EXPECT_EQ(l.residual_params, 12u * 64);      // the pairs follow the codes inside a slot
  EXPECT_EQ(l.residual_params + 12u * 4, l.residual_token_bytes);
  // gpt2-xl's 25 heads: 25 x 68 = 1700 bytes, padded to 1712 so every slot starts 16-aligned.
  ModelConfig xl = gpt2_small();
  xl.n_head = 25;
  xl.n_embd = 25 * 64;
  const KvPageLayout x = make_page_layout(kivi2c(), xl);
  EXPECT_EQ(x.residual_token_bytes, 1700u);
  EXPECT_EQ(x.residual_slot_bytes, 1712u);
  EXPECT_EQ(x.residual_tokens_per_block, static_cast<int>(x.block_bytes / 1712));
}

// kivi2c at 1024 tokens, every byte counted. One sequence alone: 31 pages + 64 residual slots
// (32 int8 tokens' keys and values) in 4 blocks of 17 slots, 4 of them empty.
TEST(KvCacheManager, Kivi2cAccountingAt1024Tokens) {
  const CacheUsage u = usage_at(kivi2c(), 1024);
  EXPECT_EQ(u.blocks_used, 31 + 4);
  EXPECT_EQ(u.used_bytes, int64_t{35} * 14592 * 12);
  EXPECT_EQ(u.code_bytes, int64_t{992} * 12 * 12 * 32);        // 2 x 64 x 2 bits = 32 B/head
  EXPECT_EQ(u.param_bytes, int64_t{992} * 12 * 12 * (4 + 2));  // K: 64 x 2 B / 32; V: 2 B
  EXPECT_EQ(u.residual_bytes, int64_t{32} * 2 * 816 * 12);
  EXPECT_EQ(u.used_bytes, u.code_bytes + u.param_bytes + u.residual_bytes + u.slack_bytes);
  EXPECT_EQ(u.slack_bytes, int64_t{12} * (4 * 14592 - 32 * 2 * 816));
  // 6.16x alone: above kivi2's 4.61x and GV64's 5.03x.
  EXPECT_GT(u.compression_ratio(), 6.15);
  // 17 sequences share their residual blocks: 17 x 64 slots fill 64 blocks exactly, 6.20x.
  KvCacheManager pool(kivi2c(), gpt2_small(), 1000);
  for (int id = 0; id < 17; ++id) {
    pool.add_sequence(id);
    ASSERT_TRUE(pool.grow(id, 1024));
  }
  pool.finish_step();
  const CacheUsage shared = pool.usage();
  EXPECT_EQ(shared.blocks_used, 17 * 31 + 64);
  EXPECT_EQ(shared.used_bytes,
            shared.code_bytes + shared.param_bytes + shared.residual_bytes + shared.slack_bytes);
  EXPECT_EQ(shared.slack_bytes, int64_t{12} * 64 * (14592 - 17 * 816));  // 720 B a block
  EXPECT_GE(shared.compression_ratio(), 6.2);
  for (int tokens : {1, 17, 18, 63, 64, 100, 2048}) {
    const CacheUsage v = usage_at(kivi2c(), tokens);
    EXPECT_EQ(v.used_bytes, v.code_bytes + v.param_bytes + v.residual_bytes + v.slack_bytes);
    EXPECT_GE(v.slack_bytes, 0) << tokens;
  }
}

TEST(KvCacheManager, OneGibPoolAdmitsFourAndAHalfTimesMoreSequences) {
  auto sequences_that_fit = [](const KvCacheConfig& config) {
    const int32_t blocks = KvCacheManager::blocks_in_budget(int64_t{1} << 30, config, gpt2_small());
    KvCacheManager m(config, gpt2_small(), blocks);
    int count = 0;
    while (m.can_admit(1024)) {
      m.add_sequence(count);
      EXPECT_TRUE(m.grow(count, 1024));
      m.finish_step();
      ++count;
    }
    return count;
  };
  const int fp16 = sequences_that_fit(plain(KvFormat::kFp16));
  const int kivi2 = sequences_that_fit(kivi(KvFormat::kKivi2));
  EXPECT_EQ(fp16, 28);
  EXPECT_GE(kivi2, 4.4 * fp16);
}

TEST(KvCacheManager, ResidualSlotsFreedOnlyAfterTheStep) {
  KvCacheManager m(kivi(KvFormat::kKivi2), gpt2_small(), 100);
  m.add_sequence(7);
  ASSERT_TRUE(m.grow(7, 63));  // 63 residual tokens: 126 slots, 11 blocks of 12
  m.finish_step();
  EXPECT_EQ(m.sequence(7).residual_slots.size(), 126u);
  EXPECT_EQ(m.residual_blocks_in_use(), 11);
  ASSERT_TRUE(m.grow(7, 64));  // flush: 32 left in the residual, 64 slots suffice
  EXPECT_EQ(m.sequence(7).residual_slots.size(), 126u) << "old residual readable during the step";
  EXPECT_EQ(m.sequence(7).pages.size(), 1u);
  m.finish_step();
  EXPECT_EQ(m.sequence(7).residual_slots.size(), 64u);
  EXPECT_EQ(m.residual_blocks_in_use(), 6);
  EXPECT_EQ(m.num_free_blocks(), 100 - 7);
}

// kernels/residual_order.h: where a step's rows go in the residual slot list (R = G = 32).
TEST(ResidualOrder, NoRowMovesAndNewRowsTakeTheNewestFlushedEntries) {
  // A decode step that flushes: 63 old rows, 32 flushed, the new token into entry 31.
  ResidualStep step = ResidualStep::of(63, 64, 0, 32);
  EXPECT_EQ(step.old_rows, 63);
  EXPECT_EQ(step.kept, 31);
  EXPECT_EQ(step.new_rows, 1);
  EXPECT_EQ(step.flushed_old_rows(), 32);
  EXPECT_EQ(step.new_row_entry(0), 31);
  // A decode step that flushes nothing: the next entry.
  step = ResidualStep::of(40, 41, 0, 0);
  EXPECT_EQ(step.kept, 40);
  EXPECT_EQ(step.new_row_entry(0), 40);
  // A prompt chunk from 40 to 140: paged 0 -> 96; old rows 0..39 all flushed, 44 new rows stay;
  // they take the 40 flushed entries, then 4 the grow added.
  step = ResidualStep::of(40, 140, 0, 96);
  EXPECT_EQ(step.kept, 0);
  EXPECT_EQ(step.new_rows, 44);
  EXPECT_EQ(step.new_row_entry(0), 0);
  EXPECT_EQ(step.new_row_entry(39), 39);
  EXPECT_EQ(step.new_row_entry(43), 43);
  // A chunk of 8 from 60 that flushes one group: 28 old rows kept (entries 32..59), the 8 new rows
  // take the newest 8 flushed entries (24..31).
  step = ResidualStep::of(60, 68, 0, 32);
  EXPECT_EQ(step.kept, 28);
  EXPECT_EQ(step.new_rows, 8);
  EXPECT_EQ(step.new_row_entry(0), 24);
  EXPECT_EQ(step.new_row_entry(7), 31);
  // A chunk that flushes nothing appends after the old rows.
  step = ResidualStep::of(10, 20, 0, 0);
  EXPECT_EQ(step.new_row_entry(0), 10);
  EXPECT_EQ(step.new_row_entry(9), 19);
}

// finish_step lists the slots in window order without moving a row: the kept rows' slots, then
// the slots the step's new rows were written to; the others are released.
TEST(KvCacheManager, FlushKeepsEveryRowInItsSlot) {
  KvCacheManager m(kivi(KvFormat::kKivi2), gpt2_small(), 100);
  m.add_sequence(7);
  ASSERT_TRUE(m.grow(7, 63));
  m.finish_step();
  const std::vector<int32_t> before = m.sequence(7).residual_slots;  // entries 0..62
  ASSERT_TRUE(m.grow(7, 64));  // flushes tokens 0..31; token 63 goes to entry 31
  m.finish_step();
  std::vector<int32_t> expected(before.begin() + 2 * 32, before.end());  // tokens 32..62
  expected.push_back(before[2 * 31]);
  expected.push_back(before[2 * 31 + 1]);
  EXPECT_EQ(m.sequence(7).residual_slots, expected);
  // The released entries were allocated together: whole blocks went back to the pool.
  EXPECT_EQ(m.residual_blocks_in_use(), 6);
  // A chunk from 64 to 100 (paged 32 -> 64): rows 32..63 flushed, tokens 64..99 stay; tokens
  // 64..95 take the flushed entries 0..31, 96..99 the four entries the grow added.
  const std::vector<int32_t> window = m.sequence(7).residual_slots;
  ASSERT_TRUE(m.grow(7, 100));
  const std::vector<int32_t> grown = m.sequence(7).residual_slots;
  ASSERT_EQ(grown.size(), 2u * 36);
  m.finish_step();
  EXPECT_EQ(m.sequence(7).residual_slots, grown) << "every entry taken in order";
  EXPECT_TRUE(std::equal(window.begin(), window.end(), grown.begin()));
}

TEST(KvCacheManager, SequencesShareResidualBlocks) {
  // kivi2 (12 slots a block): 70 tokens = 32 paged + 38 residual, 76 slots each. Alone a sequence
  // takes 7 residual blocks (84 slots); three take 19 (228 slots), not 21.
  KvCacheManager m(kivi(KvFormat::kKivi2), gpt2_small(), 100);
  EXPECT_EQ(m.blocks_needed(70), 1 + 7);
  for (int id = 0; id < 3; ++id) {
    EXPECT_TRUE(m.can_admit(70));
    m.add_sequence(id);
    ASSERT_TRUE(m.grow(id, 70));
    m.finish_step();
  }
  EXPECT_EQ(m.residual_blocks_in_use(), 19);
  EXPECT_EQ(m.usage().blocks_used, 3 + 19);
  // Every slot is held once.
  std::vector<int32_t> slots;
  for (int id = 0; id < 3; ++id) {
    const auto& own = m.sequence(id).residual_slots;
    slots.insert(slots.end(), own.begin(), own.end());
  }
  std::sort(slots.begin(), slots.end());
  EXPECT_EQ(std::adjacent_find(slots.begin(), slots.end()), slots.end());
  // A block goes back to the pool once its last slot is free: sequence 2's 76 slots are left in
  // 7 blocks.
  m.remove_sequence(0);
  m.remove_sequence(1);
  EXPECT_EQ(m.residual_blocks_in_use(), 7);
  m.remove_sequence(2);
  EXPECT_EQ(m.residual_blocks_in_use(), 0);
  EXPECT_EQ(m.num_free_blocks(), 100);
}

// Sequences that grow in lockstep interleave their slots in the same blocks; when all but one
// end, the survivor's few slots keep many blocks in use. What admission reserves for the residual
// must count those blocks, not only ceil(reserved slots / c) (engine/residual_slots.h).
TEST(KvCacheManager, ResidualReservationCountsBlocksThatEndedSequencesLeftShared) {
  KvCacheManager m(kivi(KvFormat::kKivi2), gpt2_small(), 200);
  const int sequences = 12, tokens = 40;  // 40 tokens: all residual, 80 slots each
  for (int id = 0; id < sequences; ++id) m.add_sequence(id);
  for (int length = 1; length <= tokens; ++length) {
    for (int id = 0; id < sequences; ++id) ASSERT_TRUE(m.grow(id, length));
    m.finish_step();
  }
  EXPECT_EQ(m.residual_blocks_in_use(), sequences * 2 * tokens / 12);
  for (int id = 1; id < sequences; ++id) m.remove_sequence(id);
  const int32_t survivor_peak = m.peak_residual_slots(tokens);
  const int32_t own_blocks = (survivor_peak + 11) / 12;
  EXPECT_GT(m.residual_blocks_in_use(), own_blocks) << "the survivor's slots span more blocks";
  EXPECT_EQ(m.residual_blocks_reserved(survivor_peak), m.residual_blocks_in_use());
  m.remove_sequence(0);
  EXPECT_EQ(m.residual_blocks_in_use(), 0);
  EXPECT_EQ(m.residual_blocks_reserved(0), 0);
}

TEST(KvCacheManager, ExhaustionIsAStatusAndSequencesReturnEverything) {
  KvCacheManager m(plain(KvFormat::kFp16), gpt2_small(), 10);
  m.add_sequence(1);
  m.add_sequence(2);
  ASSERT_TRUE(m.grow(1, 32 * 6));
  EXPECT_FALSE(m.can_admit(32 * 5));
  EXPECT_TRUE(m.can_admit(32 * 4));
  EXPECT_FALSE(m.grow(2, 32 * 5));
  EXPECT_EQ(m.sequence(2).length, 0) << "a refused grow changes nothing";
  ASSERT_TRUE(m.grow(2, 32 * 4));
  m.finish_step();
  EXPECT_EQ(m.num_free_blocks(), 0);
  m.remove_sequence(1);
  m.remove_sequence(2);
  EXPECT_EQ(m.num_free_blocks(), 10);
  EXPECT_EQ(m.usage().used_bytes, 0);
  EXPECT_THROW(m.remove_sequence(1), std::logic_error);
}

}  // namespace
}  // namespace kvserve
