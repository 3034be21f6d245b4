// The kvserve executable end to end: exact command lines of DESIGN.md section 7.
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/text_io.h"
#include "tests/test_support.h"

namespace kvserve {
namespace {

using testing::CommandResult;

CommandResult run_kvserve(const std::string& args, const std::string& stdin_text = "",
                          const std::string& env = "") {
  return testing::run_command(env + " " + testing::kvserve_binary() + " " + args, stdin_text);
}

const nlohmann::json& logits_fixture() {
  static const nlohmann::json data =
      nlohmann::json::parse(read_file(testing::source_path("tests/fixtures/logits.json.xz")));
  return data;
}

std::string model_flag() {
  return "--model " + testing::shared_model_dir();
}

TEST(Cli, GenerateIdsMatchesTheReference) {
  const auto& prompt = logits_fixture()["prompts"][2];
  const CommandResult r = run_kvserve("generate " + model_flag() +
                                      " --kv fp16 --greedy --ids --max-new-tokens 16 --prompt '" +
                                      prompt["text"].get<std::string>() + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  std::vector<int32_t> expected = prompt["greedy_ids"];
  expected.resize(16);
  std::istringstream in(r.out);
  std::vector<int32_t> got;
  for (int32_t id; in >> id;) got.push_back(id);
  EXPECT_EQ(got, expected);
}

TEST(Cli, GenerateTextUsesTheDefaultModel) {
  // No --model: $KVSERVE_MODEL, then ../shared/models/gpt2-tiny-docs.
  const CommandResult r = run_kvserve("generate --greedy --max-new-tokens 8 --prompt 'The kernel'",
                                      "", "KVSERVE_MODEL=" + testing::shared_model_dir());
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_GT(r.out.size(), 1u);
  EXPECT_NE(r.err.find("kv cache: kivi2"), std::string::npos) << r.err;
}

TEST(Cli, TokenizeMatchesTheReference) {
  const CommandResult r = run_kvserve("tokenize " + model_flag(), "Hello, world! I'm here.\n");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "15496 11 995 0 314 1101 994 13 198\n");
}

TEST(Cli, EvalPplPrintsJson) {
  const CommandResult r =
      run_kvserve("eval-ppl " + model_flag() + " --text " + testing::shared_eval_text() +
                  " --windows 1 --seq 128 --kv kivi4");
  ASSERT_EQ(r.status, 0) << r.err;
  const nlohmann::json out = nlohmann::json::parse(r.out);
  EXPECT_EQ(out["kv"], "kivi4");
  EXPECT_EQ(out["tokens"], 127);
  EXPECT_GT(out["ppl"].get<double>(), 1.0);
  EXPECT_NEAR(std::log(out["ppl"].get<double>()), out["nll"].get<double>(), 1e-9);
}

TEST(Cli, MissingModelExplainsHowToGetOne) {
  const CommandResult r = run_kvserve("generate --model /nonexistent/gpt2 --prompt hi");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("/nonexistent/gpt2"), std::string::npos) << r.err;
}

TEST(Cli, BadKvCombinationIsAUsageError) {
  const CommandResult r =
      run_kvserve("generate " + model_flag() + " --kv kivi2 --kv-residual 40 --prompt hi");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("--kv-residual"), std::string::npos) << r.err;
}

// --decode-attention picks a CUDA kernel: every command that takes --device accepts the three
// names (a CPU run ignores them) and refuses any other.
TEST(Cli, DecodeAttentionFlagTakesTheKernelNames) {
  const CommandResult ok = run_kvserve("generate " + model_flag() +
                                       " --device cpu --decode-attention online --greedy "
                                       "--max-new-tokens 2 --prompt hi");
  EXPECT_EQ(ok.status, 0) << ok.err;
  const CommandResult bad =
      run_kvserve("generate " + model_flag() + " --decode-attention fast --prompt hi");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.err.find("--decode-attention"), std::string::npos) << bad.err;
}

TEST(Cli, PromptBeyondTheContextIsRejected) {
  const CommandResult r =
      run_kvserve("generate " + model_flag() + " --prompt hi --max-new-tokens 5000");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("context"), std::string::npos) << r.err;
}

// The KIVI pool's memory targets through the command that reports them (docs/memory.md).
TEST(Cli, BenchMemoryReportsTheTargets) {
  const CommandResult r = run_kvserve("bench memory --models dummy:gpt2 --lengths 128,1024");
  ASSERT_EQ(r.status, 0) << r.err;
  const nlohmann::json out = nlohmann::json::parse(r.out);
  std::map<std::string, nlohmann::json> by_format;
  for (const auto& result : out["results"]) by_format[result["format"]] = result;
  ASSERT_EQ(by_format.size(), 5u);
  auto ratio_at_1024 = [&](const std::string& f) {
    return by_format[f]["lengths"][1]["compression_ratio"].get<double>();
  };
  EXPECT_DOUBLE_EQ(ratio_at_1024("fp16"), 1.0);
  EXPECT_GE(ratio_at_1024("kivi2"), 4.5);
  EXPECT_GE(ratio_at_1024("kivi2-gv64"), 4.9);
  EXPECT_GE(ratio_at_1024("kivi4"), 2.9);
  EXPECT_GE(by_format["kivi2"]["capacity_vs_fp16"].get<double>(), 4.4);
  EXPECT_EQ(by_format["fp16"]["lengths"][0]["bytes_per_token"].get<double>(), 36864.0);
}

// The in-process counterpart of kvserve-cli load: every request makes exactly max_new_tokens
// (end-of-text ignored), more requests than slots go through in turn, warm-up ones are not counted.
TEST(Cli, BenchEngineRunsEveryRequestToItsLength) {
  const CommandResult r = run_kvserve("bench engine " + model_flag() +
                                      " --device cpu --kv kivi2 --requests 5 --concurrency 2 "
                                      "--prompt-len 40 --max-new-tokens 6 --warmup-requests 1");
  ASSERT_EQ(r.status, 0) << r.err;
  const nlohmann::json out = nlohmann::json::parse(r.out);
  EXPECT_EQ(out["failed"].get<int>(), 0);
  EXPECT_EQ(out["output_tokens"].get<int>(), 5 * 6);
  EXPECT_GT(out["steps"].get<int>(), 6);  // two slots for five requests: more than one wave
  EXPECT_GT(out["output_throughput"].get<double>(), 0.0);
  EXPECT_EQ(out["warmup_requests"].get<int>(), 1);
}

}  // namespace
}  // namespace kvserve
