// The kvserve executable end to end: exact command lines of docs/design.md section 7.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "common/text_io.h"
#include "tests/server_harness.h"
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

TEST(Cli, GenerateEndsTheTextBeforeAStopString) {
  const std::string base = "generate " + model_flag() +
                           " --kv fp16 --greedy --ignore-eos --max-new-tokens 24 " +
                           "--prompt 'The Linux kernel uses'";
  const CommandResult full = run_kvserve(base);
  ASSERT_EQ(full.status, 0) << full.err;
  ASSERT_GT(full.out.size(), 12u) << full.out;
  // A stop string from the middle of the completion: the text ends right before it.
  const std::string text = full.out.substr(0, full.out.size() - 1);  // without the newline
  const size_t begin = text.size() / 2;
  std::string stop = text.substr(begin, 4);
  ASSERT_EQ(stop.find('\''), std::string::npos) << "quote: pick another test prompt";
  const size_t first = text.find(stop);
  const CommandResult stopped = run_kvserve(base + " --stop '" + stop + "' --stop 'never seen'");
  ASSERT_EQ(stopped.status, 0) << stopped.err;
  EXPECT_EQ(stopped.out, text.substr(0, first) + "\n") << "stop: '" << stop << "'";
  EXPECT_NE(stopped.err.find("finish: stop"), std::string::npos) << stopped.err;
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
  ASSERT_EQ(by_format.size(), 7u);
  auto ratio_at_1024 = [&](const std::string& f) {
    return by_format[f]["lengths"][1]["compression_ratio"].get<double>();
  };
  EXPECT_DOUBLE_EQ(ratio_at_1024("fp16"), 1.0);
  EXPECT_GE(ratio_at_1024("kivi2"), 4.5);
  EXPECT_GE(ratio_at_1024("kivi2-gv64"), 4.9);
  EXPECT_GE(ratio_at_1024("kivi4"), 2.9);
  EXPECT_GE(by_format["kivi2"]["capacity_vs_fp16"].get<double>(), 4.4);
  // Issue 16: kivi2c (GV64, fp8 parameters, int8 residual) 6.20x at 1024 tokens in a pool of
  // sequences whose residual slots share blocks (6.16x for one sequence alone, its 64 slots in 4
  // blocks of 17), and 6.25x as many 1024-token sequences in a 1 GiB pool.
  EXPECT_GE(ratio_at_1024("kivi2c"), 6.2);
  EXPECT_GT(by_format["kivi2c"]["lengths"][1]["alone_compression_ratio"].get<double>(), 6.15);
  EXPECT_GT(ratio_at_1024("kivi2c"), ratio_at_1024("kivi2-gv64-p8"));
  EXPECT_GE(by_format["kivi2c"]["capacity_vs_fp16"].get<double>(), 6.2);
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

// Every command builds its engine through engine/engine_builder, which logs the backend options
// it builds with: `bench engine` used to drop --cuda-graphs and run with graphs regardless.
TEST(Cli, CudaGraphsOffReachesTheBackendOfEveryCommand) {
  const std::string model = model_flag() + " --device cpu --cuda-graphs off";
  const std::vector<std::string> commands = {
      "generate " + model + " --prompt-ids '464 318' --max-new-tokens 2 --ids",
      "eval-ppl " + model + " --text " + testing::shared_eval_text() + " --windows 1 --seq 16",
      "bench engine " + model +
          " --requests 1 --concurrency 1 --prompt-len 4 --max-new-tokens 2 --warmup-requests 0",
      "bench decode " + model + " --batches 1 --context 8 --steps 2 --warmup 0"};
  for (const std::string& command : commands) {
    const CommandResult r = run_kvserve(command);
    ASSERT_EQ(r.status, 0) << command << "\n" << r.err;
    EXPECT_NE(r.err.find("CUDA graphs off"), std::string::npos) << command << "\n" << r.err;
    EXPECT_EQ(r.err.find("CUDA graphs on"), std::string::npos) << command << "\n" << r.err;
  }
  const CommandResult engine = run_kvserve(commands[2]);
  ASSERT_EQ(engine.status, 0) << engine.err;
  EXPECT_EQ(nlohmann::json::parse(engine.out)["cuda_graphs"], false);
}

// bench decode --context-spread: sequence i starts at context + i % spread tokens, so a step of 4
// sequences with spread 3 reads 0 + 1 + 2 + 0 more cached tokens than with every one at the
// context: fp16 keys and values of 256 channels in 6 layers, 6,144 bytes a token.
TEST(Cli, BenchDecodeSpreadsTheContexts) {
  const std::string command =
      "bench decode " + model_flag() +
      " --device cpu --kv fp16 --batches 4 --context 8 --steps 2 --warmup 0";
  const CommandResult equal = run_kvserve(command);
  const CommandResult spread = run_kvserve(command + " --context-spread 3");
  ASSERT_EQ(equal.status, 0) << equal.err;
  ASSERT_EQ(spread.status, 0) << spread.err;
  const nlohmann::json a = nlohmann::json::parse(equal.out), b = nlohmann::json::parse(spread.out);
  EXPECT_EQ(a["context_spread"], 1);
  EXPECT_EQ(b["context_spread"], 3);
  EXPECT_DOUBLE_EQ(b["bytes_per_step"].get<double>() - a["bytes_per_step"].get<double>(),
                   3.0 * 6144.0);
}

// bench engine --prompt-len-spread: request i's prompt has prompt-len + i % spread tokens (the
// warm-up requests prompt-len), counted in prompt_tokens and the prompt throughput.
TEST(Cli, BenchEngineSpreadsThePromptLengths) {
  const std::string command =
      "bench engine " + model_flag() +
      " --device cpu --kv kivi2 --requests 4 --concurrency 4 --prompt-len 4 "
      "--max-new-tokens 2 --warmup-requests 1";
  const CommandResult equal = run_kvserve(command);
  const CommandResult spread = run_kvserve(command + " --prompt-len-spread 3");
  ASSERT_EQ(equal.status, 0) << equal.err;
  ASSERT_EQ(spread.status, 0) << spread.err;
  const nlohmann::json a = nlohmann::json::parse(equal.out), b = nlohmann::json::parse(spread.out);
  EXPECT_EQ(a["prompt_len_spread"], 1);
  EXPECT_EQ(a["prompt_tokens"], 16);
  EXPECT_EQ(b["prompt_len_spread"], 3);
  EXPECT_EQ(b["prompt_tokens"], 4 + 5 + 6 + 4);
  EXPECT_NEAR(b["prompt_throughput"].get<double>() * b["duration_s"].get<double>(), 19.0, 1e-6);
  EXPECT_EQ(b["output_tokens"], 8);
}

CommandResult run_cli(const std::string& args) {
  return testing::run_command(testing::kvserve_cli_binary() + " " + args);
}

// A usage error: exit status 2 and one line on stderr that names `reason`.
void expect_usage_error(const CommandResult& r, const std::string& reason,
                        const std::string& command) {
  EXPECT_EQ(r.status, 2) << command << "\n" << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << command << "\n" << r.err;
  EXPECT_NE(r.err.find(reason), std::string::npos) << command << "\n" << r.err;
}

// Every flag that has a default shows it in --help, in each command's own help.
TEST(Cli, HelpListsTheDefaults) {
  const std::map<std::string, std::vector<std::string>> expected = {
      {"serve",
       {"--host TEXT=0.0.0.0", "--port INT:INT in [0 - 65535]=50051", "=9464",
        "--kv TEXT:{fp16,int8,kivi4,kivi2,kivi2c}=kivi2", "--kv-pool-mb INT:POSITIVE=512",
        "--max-queued-requests UINT:POSITIVE=256", "--device TEXT:{auto,cpu,cuda}=auto",
        "--drain-timeout-s FLOAT:NONNEGATIVE=30", "--max-num-seqs INT:POSITIVE=256",
        "--max-batch-tokens INT:POSITIVE=16384 on cuda, 2048 on cpu",
        "--admission TEXT:{final-length,prompt}=final-length", "--cuda-graphs TEXT:{on,off}=on",
        "--kv-error-sample-rate FLOAT:FLOAT in [0 - 1]=0.01"}},
      {"generate", {"--max-new-tokens INT:POSITIVE=64", "--temperature FLOAT=1", "=kivi2"}},
      {"eval-ppl", {"--windows INT:POSITIVE=64", "]=1024", "=kivi2"}},
      {"bench memory", {"--kv-pool-mb INT:POSITIVE=1024", "--sequences INT:POSITIVE=1000"}},
      {"bench decode",
       {"--kv TEXT:{fp16,int8,kivi4,kivi2,kivi2c}=fp16", "--kv-params TEXT:{fp16,fp8}",
        "--kv-residual-format TEXT:{fp16,int8}", "--kv-group INT=32", "--kv-value-group INT=32",
        "--context INT:POSITIVE=512"}},
      {"bench engine",
       {"--requests INT:POSITIVE=256", "=kivi2",
        "--kv-error-sample-rate FLOAT:FLOAT in [0 - 1]=0.01"}},
      {"tokenize", {"--log-level"}}};
  for (const auto& [command, needles] : expected) {
    const CommandResult r = run_kvserve(command + " --help");
    ASSERT_EQ(r.status, 0) << command << "\n" << r.err;
    for (const std::string& needle : needles) {
      EXPECT_NE(r.out.find(needle), std::string::npos) << command << ": no " << needle << "\n"
                                                       << r.out;
    }
    // Logging flags in every command's own help, not only at the top level.
    EXPECT_NE(r.out.find("--log-level TEXT:{trace,debug,info,warn,error,off}=info"),
              std::string::npos)
        << command << "\n"
        << r.out;
    EXPECT_NE(r.out.find("--log-json"), std::string::npos) << command;
  }
  const CommandResult load = run_cli("load --help");
  ASSERT_EQ(load.status, 0) << load.err;
  for (const std::string needle :
       {"--requests INT:POSITIVE=100", "--concurrency INT:POSITIVE=16", "=inf"}) {
    EXPECT_NE(load.out.find(needle), std::string::npos) << needle << "\n" << load.out;
  }
  const CommandResult generate = run_cli("generate --help");
  ASSERT_EQ(generate.status, 0) << generate.err;
  EXPECT_NE(generate.out.find("--temperature FLOAT=the server's"), std::string::npos)
      << generate.out;
}

// The test hooks of `kvserve serve` (TestHookFlags) are flags, not environment variables: absent
// from --help so that no operator sets them, and checked like every other flag.
TEST(Cli, TestHookFlagsAreHiddenAndValidated) {
  const CommandResult help = run_kvserve("serve --help");
  ASSERT_EQ(help.status, 0) << help.err;
  EXPECT_EQ(help.out.find("--test-"), std::string::npos) << help.out;
  for (const std::string hook :
       {"--test-lose-device-at-forward", "--test-engine-pause-ms", "--test-write-done-delay-ms"}) {
    expect_usage_error(run_kvserve("serve " + hook + " -1"), hook, "kvserve serve " + hook);
  }
}

// KVSERVE_MODEL=dummy:gpt2 used to look for dummy:gpt2/vocab.json as a tokenizer.
TEST(Cli, ModelFromTheEnvironmentMeansWhatTheFlagMeans) {
  const std::string args =
      "generate --device cpu --kv fp16 --greedy --max-new-tokens 2 --prompt 'The kernel'";
  const CommandResult flag = run_kvserve(args + " --model dummy:gpt2", "", "KVSERVE_MODEL=");
  ASSERT_EQ(flag.status, 0) << flag.err;
  const CommandResult env = run_kvserve(args, "", "KVSERVE_MODEL=dummy:gpt2");
  ASSERT_EQ(env.status, 0) << env.err;
  EXPECT_EQ(env.out, flag.out);
  EXPECT_GT(env.out.size(), 1u);
}

TEST(Cli, OneFlagVocabularyAcrossBothBinaries) {
  // --prompt-ids: separate arguments, one quoted argument, or commas; the same ids each way.
  const std::string generate = "generate " + model_flag() + " --greedy --ids --max-new-tokens 4 ";
  const CommandResult separate = run_kvserve(generate + "--prompt-ids 464 318");
  ASSERT_EQ(separate.status, 0) << separate.err;
  EXPECT_EQ(run_kvserve(generate + "--prompt-ids '464 318'").out, separate.out);
  EXPECT_EQ(run_kvserve(generate + "--prompt-ids 464,318").out, separate.out);
  expect_usage_error(run_kvserve(generate + "--prompt-ids 464 x"), "'x' is not a token id",
                     "kvserve --prompt-ids");
  // kvserve-cli takes the same forms (checked before it connects) and --greedy.
  expect_usage_error(run_cli("generate --addr 127.0.0.1:1 --prompt-ids '464 x'"),
                     "'x' is not a token id", "kvserve-cli --prompt-ids");
  expect_usage_error(run_cli("generate --addr 127.0.0.1:1 --prompt-ids 464 --greedy "
                             "--temperature 1"),
                     "--greedy", "kvserve-cli --greedy --temperature");
  // bench memory takes --kv-pool-mb like every other command.
  const CommandResult memory = run_kvserve("bench memory --models dummy:gpt2 --kv-pool-mb 64");
  ASSERT_EQ(memory.status, 0) << memory.err;
  EXPECT_EQ(nlohmann::json::parse(memory.out)["results"][0]["pool_mb"], 64);
  // bench decode: KIVI groups, checked against the geometry before the 6 GB of gpt2-xl load.
  expect_usage_error(run_kvserve("bench decode --model dummy:gpt2-xl --device cpu --kv kivi2 "
                                 "--kv-value-group 48"),
                     "--kv-value-group", "bench decode --kv-value-group 48");
  expect_usage_error(run_kvserve("bench decode --kv kivi3"), "--kv", "bench decode --kv kivi3");
  expect_usage_error(run_kvserve("bench decode --context-spread 0"), "--context-spread",
                     "bench decode --context-spread 0");
  expect_usage_error(run_kvserve("bench engine --prompt-len-spread 0"), "--prompt-len-spread",
                     "bench engine --prompt-len-spread 0");
  // The spread counts toward the model's context (dummy:gpt2's is 1024).
  expect_usage_error(run_kvserve("bench decode --model dummy:gpt2 --device cpu --context 900 "
                                 "--context-spread 64 --steps 64"),
                     "--context-spread", "bench decode past the model's context");
  const CommandResult decode =
      run_kvserve("bench decode " + model_flag() +
                  " --device cpu --kv kivi2 --kv-value-group 64 --batches 1 --context 8 --steps 2 "
                  "--warmup 0");
  ASSERT_EQ(decode.status, 0) << decode.err;
  EXPECT_NE(decode.out.find("GV64"), std::string::npos) << decode.out;
}

// Every usage error exits 2 with a one-line reason; these exited 105 to 109 before.
TEST(Cli, UsageErrorsExitTwoWithOneLine) {
  expect_usage_error(run_kvserve("serve --kv-pool-mb 0"), "must be a positive number (got 0)",
                     "serve --kv-pool-mb 0");
  expect_usage_error(run_kvserve("generate --no-such-flag"), "--no-such-flag", "unknown flag");
  expect_usage_error(run_kvserve("generate --max-new-tokens many"), "--max-new-tokens",
                     "not a number");
  expect_usage_error(run_kvserve("eval-ppl --windows 2"), "--text", "missing --text");
  expect_usage_error(run_kvserve("eval-ppl --text /nonexistent.txt"), "/nonexistent.txt",
                     "missing text file");
  expect_usage_error(run_kvserve("serve --kv-error-sample-rate 1.5"), "--kv-error-sample-rate",
                     "serve --kv-error-sample-rate 1.5");
  expect_usage_error(run_kvserve("bench engine --kv-error-sample-rate -0.5"),
                     "--kv-error-sample-rate", "bench engine --kv-error-sample-rate -0.5");
  expect_usage_error(run_kvserve(""), "subcommand", "no command");
  expect_usage_error(run_cli("load --addr 127.0.0.1:1 --requests 0"),
                     "must be a positive number (got 0)", "kvserve-cli load --requests 0");
  expect_usage_error(run_cli("health"), "--addr", "kvserve-cli health without --addr");
  expect_usage_error(run_cli(""), "subcommand", "kvserve-cli without a command");
}

TEST(Cli, VersionNamesTheBuild) {
  const std::regex version(
      R"(^(kvserve|kvserve-cli) \d+\.\d+\.\d+ \(git [^ ,]+, CUDA (on|off), \w+ build\)\n$)");
  for (const CommandResult& r : {run_kvserve("--version"), run_cli("--version")}) {
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_TRUE(std::regex_match(r.out, version)) << r.out;
  }
}

// grpc.health.v1 answers for the service by name, as the health protocol expects, not only for
// the whole server.
TEST(Cli, HealthAnswersForTheServiceByName) {
  testing::ServerProcess server({"--model", testing::shared_model_dir(), "--device", "cpu"});
  const std::string addr = " --addr 127.0.0.1:" + std::to_string(server.port());
  const CommandResult by_name = run_cli("health" + addr + " --service kvserve.v1.Generation");
  EXPECT_EQ(by_name.status, 0) << by_name.err;
  EXPECT_EQ(by_name.out, "SERVING\n");
  const CommandResult whole = run_cli("health" + addr);
  EXPECT_EQ(whole.status, 0) << whole.err;
  EXPECT_EQ(whole.out, "SERVING\n");
  const CommandResult unknown = run_cli("health" + addr + " --service kvserve.v1.Nothing");
  EXPECT_EQ(unknown.status, 1);
  EXPECT_NE(unknown.err.find("NOT_FOUND"), std::string::npos) << unknown.err;
}

// eval-ppl draws its progress bar on stderr only when stderr is a terminal (a pty from script(1)
// here); stdout holds only the JSON either way.
TEST(Cli, EvalPplShowsProgressOnlyOnATerminal) {
  const std::string dir = testing::make_temp_dir("kvserve-progress");
  const std::string eval = testing::kvserve_binary() + " eval-ppl " + model_flag() + " --text " +
                           testing::shared_eval_text() + " --windows 3 --seq 64 --kv fp16";
  const CommandResult tty =
      testing::run_command("script -qec '" + eval + " >" + dir + "/out.json' /dev/null");
  ASSERT_EQ(tty.status, 0) << tty.out << tty.err;
  EXPECT_NE(tty.out.find("3/3 windows"), std::string::npos) << tty.out;
  EXPECT_NE(tty.out.find("tokens/s, ETA"), std::string::npos) << tty.out;
  EXPECT_EQ(nlohmann::json::parse(read_file(dir + "/out.json"))["windows"], 3);

  const CommandResult pipe = run_kvserve(eval.substr(eval.find(" eval-ppl") + 1));
  ASSERT_EQ(pipe.status, 0) << pipe.err;
  EXPECT_EQ(pipe.err.find("windows,"), std::string::npos) << pipe.err;
  EXPECT_EQ(nlohmann::json::parse(pipe.out)["windows"], 3);
}

}  // namespace
}  // namespace kvserve
