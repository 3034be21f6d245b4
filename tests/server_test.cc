// kvserve serve end to end: the real binary on loopback, the generated gRPC stub as the client,
// the shared test model on the CPU backend.
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <fstream>
#include <future>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "client/generation_client.h"
#include "common/text_io.h"
#include "engine/engine_builder.h"
#include "engine/tokenizer.h"
#include "server/stream_channel.h"
#include "server/stream_writer.h"
#include "tests/server_harness.h"
#include "tests/test_support.h"

namespace kvserve {
namespace {

using namespace std::chrono_literals;
using grpc::health::v1::HealthCheckResponse;
using testing::ServerProcess;
using testing::StreamResult;

v1::GenerateRequest text_request(const std::string& prompt, int max_new_tokens) {
  v1::GenerateRequest request;
  request.set_prompt(prompt);
  request.mutable_stopping()->set_max_new_tokens(max_new_tokens);
  return request;
}

// A request that runs for a long time: ignore EOS, most of the context.
v1::GenerateRequest long_request() {
  v1::GenerateRequest request = text_request("The kernel", 1000);
  request.mutable_stopping()->set_ignore_eos(true);
  return request;
}

// Polls until the pool is empty again (blocks free at the engine's next step).
void expect_cache_drains(const ServerProcess& server) {
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  v1::CacheStats stats = server.cache_stats();
  while ((stats.used_bytes() != 0 || stats.blocks_used() != 0) &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(5ms);
    stats = server.cache_stats();
  }
  EXPECT_EQ(stats.used_bytes(), 0);
  EXPECT_EQ(stats.blocks_used(), 0);
  EXPECT_EQ(stats.sequences(), 0);
}

std::vector<int32_t> parse_ids(const std::string& text) {
  std::istringstream in(text);
  std::vector<int32_t> ids;
  for (int32_t id; in >> id;) ids.push_back(id);
  return ids;
}

std::string run_generate_cli(const std::string& args) {
  const std::string dir = testing::make_temp_dir("kvserve-gen");
  const std::string command = kvserve::testing::kvserve_binary() + " generate --model " +
                              testing::shared_model_dir() + " " + args + " >" + dir + "/out 2>" +
                              dir + "/err";
  EXPECT_EQ(std::system(command.c_str()), 0) << read_file(dir + "/err");
  return read_file(dir + "/out");
}

class Server : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = new ServerProcess({"--model", testing::shared_model_dir(), "--kv", "kivi2",
                                 "--max-new-tokens-limit", "1000", "--max-prompt-tokens", "600"});
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  static ServerProcess* server_;
};
ServerProcess* Server::server_ = nullptr;

TEST_F(Server, SampledStreamEqualsGenerateCommand) {
  v1::GenerateRequest request = text_request("The kernel schedules", 40);
  request.mutable_sampling()->set_temperature(0.9f);
  request.mutable_sampling()->set_top_k(50);
  request.mutable_sampling()->set_top_p(0.95f);
  request.mutable_sampling()->set_seed(1234);
  request.mutable_stopping()->set_ignore_eos(true);
  request.set_return_logprobs(true);
  const StreamResult got = testing::generate(*server_->stub(), request);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  const std::vector<int32_t> expected = parse_ids(run_generate_cli(
      "--kv kivi2 --ids --ignore-eos --max-new-tokens 40 --temperature 0.9 --top-k 50 "
      "--top-p 0.95 --seed 1234 --prompt 'The kernel schedules'"));
  EXPECT_EQ(got.ids, expected);
  ASSERT_TRUE(got.has_final);
  EXPECT_EQ(got.final.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(got.final.completion_tokens(), 40u);
  EXPECT_EQ(got.final.prompt_tokens(), 3u);
  EXPECT_EQ(got.logprobs.size(), got.ids.size());
  EXPECT_GE(got.final.total_seconds(), got.final.time_to_first_token_seconds());
  EXPECT_GE(got.final.time_to_first_token_seconds(), got.final.queue_seconds());
  // The text is the detokenized ids (valid UTF-8 by construction of the decoder).
  const Tokenizer tokenizer = Tokenizer::from_model_dir(testing::shared_model_dir());
  EXPECT_EQ(got.text, tokenizer.decode(got.ids));
}

TEST_F(Server, GreedyTextEqualsGenerateCommand) {
  v1::GenerateRequest request = text_request("Memory is", 24);
  request.mutable_sampling()->set_temperature(0.0f);
  const StreamResult got = testing::generate(*server_->stub(), request);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  std::string expected =
      run_generate_cli("--kv kivi2 --greedy --max-new-tokens 24 --prompt 'Memory is'");
  expected.pop_back();  // the newline generate ends with
  EXPECT_EQ(got.text, expected);
}

TEST_F(Server, ClientLibraryAndCliSeeWhatTheStubSees) {
  v1::GenerateRequest request = text_request("Memory is", 24);
  request.mutable_sampling()->set_temperature(0.0f);
  const StreamResult raw = testing::generate(*server_->stub(), request);
  ASSERT_TRUE(raw.status.ok()) << raw.status.error_message();

  const std::string address = "127.0.0.1:" + std::to_string(server_->port());
  client::GenerationClient library(address);
  std::string text;
  std::vector<int32_t> ids;
  const client::GenerateOutcome outcome =
      library.Generate(request, 60, [&](const v1::TokenChunk& chunk, client::Clock::time_point) {
        text += chunk.text();
        ids.insert(ids.end(), chunk.token_ids().begin(), chunk.token_ids().end());
      });
  ASSERT_TRUE(outcome.status.ok()) << client::describe(outcome.status);
  EXPECT_EQ(ids, raw.ids);
  EXPECT_EQ(text, raw.text);
  ASSERT_TRUE(outcome.final.has_value());
  EXPECT_EQ(outcome.final->completion_tokens(), raw.final.completion_tokens());
  client::ServingStatus status;
  ASSERT_TRUE(library.CheckHealth("", 10, &status).ok());
  EXPECT_EQ(status, HealthCheckResponse::SERVING);

  const std::string cli = testing::kvserve_cli_binary();
  const std::string dir = testing::make_temp_dir("kvserve-cli-real");
  EXPECT_EQ(std::system((cli + " generate --addr " + address +
                         " --prompt 'Memory is' --max-new-tokens 24 --temperature 0 >" + dir +
                         "/out 2>" + dir + "/err")
                            .c_str()),
            0)
      << read_file(dir + "/err");
  EXPECT_EQ(read_file(dir + "/out"), raw.text);
  EXPECT_EQ(std::system((cli + " health --addr " + address + " >/dev/null").c_str()), 0);
}

TEST_F(Server, StopStringAcrossTokenBoundariesEndsTheStream) {
  const Tokenizer tokenizer = Tokenizer::from_model_dir(testing::shared_model_dir());
  v1::GenerateRequest request = text_request("The kernel", 40);
  request.mutable_stopping()->set_ignore_eos(true);
  const StreamResult full = testing::generate(*server_->stub(), request);
  ASSERT_TRUE(full.status.ok());
  // A stop string from the middle of one multi-byte token into the middle of the next.
  size_t offset = 0, begin = std::string::npos, end = 0;
  for (size_t i = 0; i + 1 < full.ids.size() && begin == std::string::npos; ++i) {
    const std::string a = tokenizer.token_bytes(full.ids[i]);
    const std::string b = tokenizer.token_bytes(full.ids[i + 1]);
    const bool ascii = std::all_of(a.begin(), a.end(), [](char c) { return c > 0; }) &&
                       std::all_of(b.begin(), b.end(), [](char c) { return c > 0; });
    if (i >= 3 && a.size() >= 2 && b.size() >= 2 && ascii) {
      begin = offset + 1;
      end = offset + a.size() + b.size() - 1;
    }
    offset += a.size();
  }
  ASSERT_NE(begin, std::string::npos) << full.text;
  const std::string stop = full.text.substr(begin, end - begin);
  const size_t first = full.text.find(stop);
  request.mutable_stopping()->add_stop(stop);
  request.mutable_stopping()->add_stop("no such text \xe2\x82\xac");
  const StreamResult stopped = testing::generate(*server_->stub(), request);
  ASSERT_TRUE(stopped.status.ok()) << stopped.status.error_message();
  EXPECT_EQ(stopped.text, full.text.substr(0, first)) << "stop: '" << stop << "'";
  EXPECT_EQ(stopped.final.finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(stopped.final.matched_stop(), stop);
  EXPECT_LT(stopped.ids.size(), full.ids.size());
  expect_cache_drains(*server_);
}

TEST_F(Server, CancelMidStreamFreesTheBlocks) {
  auto stub = server_->stub();
  grpc::ClientContext context;
  auto reader = stub->Generate(&context, long_request());
  v1::GenerateResponse response;
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(reader->Read(&response));
  EXPECT_GT(server_->cache_stats().used_bytes(), 0);
  context.TryCancel();
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  expect_cache_drains(*server_);
}

TEST_F(Server, DeadlineExceededMidStreamFreesTheBlocks) {
  const StreamResult got = testing::generate(*server_->stub(), long_request(), 300ms);
  EXPECT_EQ(got.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_FALSE(got.has_final);
  expect_cache_drains(*server_);
}

TEST_F(Server, ReaderThatStopsDoesNotStallOthers) {
  auto stub = server_->stub();
  grpc::ClientContext idle_context;
  v1::GenerateRequest idle_request = text_request("The kernel", 150);
  idle_request.mutable_stopping()->set_ignore_eos(true);
  auto idle = stub->Generate(&idle_context, idle_request);  // not read until the end
  const auto start = std::chrono::steady_clock::now();
  const StreamResult other = testing::generate(*stub, text_request("Memory is", 16), 60s);
  ASSERT_TRUE(other.status.ok()) << other.status.error_message();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 30s);
  // The idle stream still gets every token (merged into fewer messages when its buffer filled).
  std::vector<int32_t> ids;
  v1::GenerateResponse response;
  while (idle->Read(&response)) {
    if (response.has_chunk()) {
      ids.insert(ids.end(), response.chunk().token_ids().begin(),
                 response.chunk().token_ids().end());
    }
  }
  ASSERT_TRUE(idle->Finish().ok());
  EXPECT_EQ(ids.size(), 150u);
}

struct BadInput {
  std::string name;
  std::function<void(v1::GenerateRequest&)> edit;
  std::string message;  // a word the message must contain
};

TEST_F(Server, EveryBadInputIsInvalidArgumentWithAReason) {
  const std::vector<BadInput> cases = {
      {"empty prompt", [](v1::GenerateRequest& r) { r.set_prompt(""); }, "empty"},
      {"no prompt", [](v1::GenerateRequest& r) { r.clear_input(); }, "prompt"},
      {"empty ids", [](v1::GenerateRequest& r) { r.mutable_prompt_token_ids(); }, "empty"},
      {"id out of range",
       [](v1::GenerateRequest& r) { r.mutable_prompt_token_ids()->add_ids(50257); }, "vocabulary"},
      {"negative id", [](v1::GenerateRequest& r) { r.mutable_prompt_token_ids()->add_ids(-1); },
       "vocabulary"},
      {"beyond the context",
       [](v1::GenerateRequest& r) {
         for (int i = 0; i < 500; ++i) r.mutable_prompt_token_ids()->add_ids(464);
         r.mutable_stopping()->set_max_new_tokens(600);
       },
       "context"},
      {"temperature", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_temperature(-1); },
       "temperature"},
      {"top_p", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_top_p(0); }, "top_p"},
      {"top_k", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_top_k(-3); }, "top_k"},
      {"repetition_penalty",
       [](v1::GenerateRequest& r) { r.mutable_sampling()->set_repetition_penalty(0); },
       "repetition_penalty"},
      {"max_new_tokens 0",
       [](v1::GenerateRequest& r) { r.mutable_stopping()->set_max_new_tokens(0); },
       "max_new_tokens"},
      {"max_new_tokens over the limit",
       [](v1::GenerateRequest& r) { r.mutable_stopping()->set_max_new_tokens(1001); },
       "--max-new-tokens-limit"},
      {"prompt over the limit",
       [](v1::GenerateRequest& r) {
         for (int i = 0; i < 601; ++i) r.mutable_prompt_token_ids()->add_ids(464);
       },
       "--max-prompt-tokens"},
      {"empty stop string", [](v1::GenerateRequest& r) { r.mutable_stopping()->add_stop(""); },
       "stop"},
      {"stop token out of range",
       [](v1::GenerateRequest& r) { r.mutable_stopping()->add_stop_token_ids(1 << 20); },
       "stop token"},
  };
  auto stub = server_->stub();
  for (const BadInput& bad : cases) {
    v1::GenerateRequest request = text_request("Hello", 4);
    bad.edit(request);
    const StreamResult got = testing::generate(*stub, request);
    EXPECT_EQ(got.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad.name;
    EXPECT_NE(got.status.error_message().find(bad.message), std::string::npos)
        << bad.name << ": " << got.status.error_message();
    EXPECT_TRUE(got.ids.empty()) << bad.name;
  }
  // The server is fine afterwards.
  EXPECT_TRUE(testing::generate(*stub, text_request("Hello", 2)).status.ok());
}

TEST_F(Server, ModelInfoDescribesTheModelAndCache) {
  grpc::ClientContext context;
  v1::ModelInfo info;
  ASSERT_TRUE(server_->stub()->GetModelInfo(&context, {}, &info).ok());
  EXPECT_EQ(info.architecture(), "gpt2");
  EXPECT_EQ(info.n_layer(), 6);
  EXPECT_EQ(info.context_length(), 1024);
  EXPECT_EQ(info.vocab_size(), 50257);
  EXPECT_EQ(info.kv_format(), "kivi2");
  EXPECT_EQ(info.kv_bits(), 2);
  EXPECT_EQ(info.kv_key_group(), 32);
  EXPECT_EQ(info.kv_params(), "fp16");
  EXPECT_EQ(info.kv_residual_format(), "fp16");
  EXPECT_EQ(info.device(), "cpu");
}

// The kivi2c preset end to end: reported in ModelInfo and CacheStats, and a long greedy
// generation (past several flushes of the int8 residual) goes through.
TEST(ServerKvFormat, Kivi2cPresetIsReportedAndServes) {
  ServerProcess server({"--model", testing::shared_model_dir(), "--kv", "kivi2c"});
  grpc::ClientContext context;
  v1::ModelInfo info;
  ASSERT_TRUE(server.stub()->GetModelInfo(&context, {}, &info).ok());
  EXPECT_EQ(info.kv_format(), "kivi2");
  EXPECT_EQ(info.kv_value_group(), 64);
  EXPECT_EQ(info.kv_params(), "fp8");
  EXPECT_EQ(info.kv_residual_format(), "int8");
  v1::GenerateRequest request = text_request("The kernel", 100);
  request.mutable_sampling()->set_temperature(0);
  request.mutable_stopping()->set_ignore_eos(true);
  const StreamResult got = testing::generate(*server.stub(), request);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.ids.size(), 100u);
  const v1::CacheStats stats = server.cache_stats();
  EXPECT_EQ(stats.kv_format(), "kivi2");
  EXPECT_EQ(stats.kv_params(), "fp8");
  EXPECT_EQ(stats.kv_residual_format(), "int8");
}

// Where two runs of one request part, and how far apart their logprobs were up to there.
std::string describe_divergence(const StreamResult& a, const StreamResult& b) {
  size_t i = 0;
  double worst = 0;
  while (i < a.ids.size() && i < b.ids.size() && a.ids[i] == b.ids[i]) {
    if (i < a.logprobs.size() && i < b.logprobs.size()) {
      worst = std::max(worst, std::abs(double{a.logprobs[i]} - b.logprobs[i]));
    }
    ++i;
  }
  return " (same for " + std::to_string(i) +
         " tokens; largest logprob difference before: " + std::to_string(worst) + ")";
}

// Runs `requests` concurrently (one thread each) on their servers.
std::vector<StreamResult> run_concurrently(const std::vector<const ServerProcess*>& servers,
                                           const std::vector<v1::GenerateRequest>& requests) {
  std::vector<std::future<StreamResult>> futures;
  for (size_t i = 0; i < requests.size(); ++i) {
    futures.push_back(std::async(std::launch::async, [&, i] {
      return testing::generate(*servers[i]->stub(), requests[i]);
    }));
  }
  std::vector<StreamResult> results;
  for (auto& future : futures) results.push_back(future.get());
  return results;
}

TEST(ServerConcurrency, ThirtyTwoMixedRequestsOnTwoKvFormatsEqualTheirSoloRuns) {
  const ServerProcess kivi(
      {"--model", testing::shared_model_dir(), "--kv", "kivi2", "--max-batch-tokens", "512"});
  const ServerProcess int8({"--model", testing::shared_model_dir(), "--kv", "int8"});
  const std::vector<std::string> prompts = {"The kernel", "Memory is allocated when",
                                            "A process",  "In the beginning the scheduler",
                                            "Files are",  "The cache"};
  std::vector<v1::GenerateRequest> requests;
  std::vector<const ServerProcess*> servers;
  for (int i = 0; i < 32; ++i) {
    v1::GenerateRequest request = text_request(prompts[i % prompts.size()], 8 + (i * 7) % 33);
    request.set_request_id("mixed-" + std::to_string(i));
    if (i % 3 != 0) {
      request.mutable_sampling()->set_temperature(0.8f);
      request.mutable_sampling()->set_seed(100 + i);
    } else {
      request.mutable_sampling()->set_temperature(0.0f);
    }
    if (i % 4 == 0) request.mutable_stopping()->set_ignore_eos(true);
    request.set_return_logprobs(true);
    requests.push_back(request);
    servers.push_back(i % 2 ? &int8 : &kivi);
  }
  const std::vector<StreamResult> together = run_concurrently(servers, requests);
  for (size_t i = 0; i < requests.size(); ++i) {
    const StreamResult alone = testing::generate(*servers[i]->stub(), requests[i]);
    ASSERT_TRUE(alone.status.ok()) << alone.status.error_message();
    ASSERT_TRUE(together[i].status.ok()) << i << ": " << together[i].status.error_message();
    EXPECT_EQ(together[i].ids, alone.ids)
        << "request " << i << describe_divergence(together[i], alone);
    EXPECT_EQ(together[i].text, alone.text) << "request " << i;
    EXPECT_EQ(together[i].final.finish_reason(), alone.final.finish_reason()) << i;
  }
  for (const ServerProcess* server : {&kivi, &int8}) {
    const v1::CacheStats stats = server->cache_stats();
    EXPECT_EQ(stats.used_bytes(), 0);
    EXPECT_EQ(stats.blocks_used(), 0);
    EXPECT_EQ(stats.tokens(), 0);
  }
}

// Waits until the server reports `waiting` requests in its queue (the metric is updated by the
// engine thread after each step), so a probe sent afterwards meets a known state.
void wait_for_waiting(const ServerProcess& server, double waiting) {
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (testing::metric_value(server.metrics_text(), "kvserve_requests_waiting") != waiting) {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "queue never reached " << waiting;
    std::this_thread::sleep_for(20ms);
  }
}

void cancel_and_drain(
    std::vector<std::pair<grpc::ClientContext*, grpc::ClientReaderInterface<v1::GenerateResponse>*>>
        streams) {
  v1::GenerateResponse response;
  for (auto& [context, reader] : streams) context->TryCancel();
  for (auto& [context, reader] : streams) {
    while (reader->Read(&response)) {
    }
    reader->Finish();
  }
}

// With one request running and one waiting (--max-num-seqs 1), a third one is refused with
// RESOURCE_EXHAUSTED naming `limit`; the server counts the failure and frees everything.
void expect_third_request_refused(std::vector<std::string> limit_flags, const std::string& limit) {
  std::vector<std::string> flags = {"--model", testing::shared_model_dir(), "--max-num-seqs", "1"};
  flags.insert(flags.end(), limit_flags.begin(), limit_flags.end());
  ServerProcess server(flags);
  auto stub = server.stub();
  v1::GenerateResponse response;
  grpc::ClientContext running_context, waiting_context;
  auto running = stub->Generate(&running_context, long_request());
  ASSERT_TRUE(running->Read(&response));
  auto waiting = stub->Generate(&waiting_context, long_request());
  wait_for_waiting(server, 1);
  const StreamResult refused = testing::generate(*stub, text_request("Hi", 2));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(refused.status.error_message().find(limit), std::string::npos)
      << refused.status.error_message();
  cancel_and_drain({{&running_context, running.get()}, {&waiting_context, waiting.get()}});
  expect_cache_drains(server);
  EXPECT_GE(testing::metric_value(server.metrics_text(),
                                  R"(kvserve_request_failure_total{code="RESOURCE_EXHAUSTED"})"),
            1);
}

TEST(ServerLimits, FullQueueIsResourceExhausted) {
  // The running and the waiting request fill the queue.
  expect_third_request_refused({"--max-queued-requests", "1"}, "queue");
}

// Issue 13, item 2: with --kv-pool-mb 1 (28 kivi2 blocks of the test model), prompt [464] + 739
// new tokens was accepted, stopped at 604 tokens and froze the engine in a preemption loop. It is
// INVALID_ARGUMENT up front now, and what does fit is served.
TEST(ServerLimits, RequestThatCanNeverFitThePoolIsInvalidArgument) {
  ServerProcess server(
      {"--model", testing::shared_model_dir(), "--kv", "kivi2", "--kv-pool-mb", "1"});
  auto stub = server.stub();
  v1::GenerateRequest request;
  request.mutable_prompt_token_ids()->add_ids(464);
  request.mutable_stopping()->set_max_new_tokens(739);
  request.mutable_stopping()->set_ignore_eos(true);
  const StreamResult refused = testing::generate(*stub, request);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(refused.status.error_message().find("--kv-pool-mb"), std::string::npos)
      << refused.status.error_message();
  request.mutable_stopping()->set_max_new_tokens(400);  // peaks at 23 blocks
  const StreamResult served = testing::generate(*stub, request);
  ASSERT_TRUE(served.status.ok()) << served.status.error_message();
  EXPECT_EQ(served.ids.size(), 400u);
  expect_cache_drains(server);
}

TEST(ServerLimits, TooManyStreamsIsResourceExhausted) {
  // The running and the waiting request hold the two streams allowed.
  expect_third_request_refused({"--max-queued-requests", "100", "--max-concurrent-streams", "2"},
                               "streams");
}

TEST(ServerLifecycle, HealthGoesNotServingToServingAndDrainCancelsAtTheDeadline) {
  // A model big enough that loading takes a while on the CPU: health must say NOT_SERVING and
  // Generate UNAVAILABLE until it is loaded and warm.
  ServerProcess server({"--model", "dummy:gpt2", "--tokenizer", testing::shared_model_dir(),
                        "--kv-pool-mb", "64", "--drain-timeout-s", "1", "--log-json"},
                       /*wait_serving=*/false);
  EXPECT_EQ(server.health(), HealthCheckResponse::NOT_SERVING);
  const StreamResult early = testing::generate(*server.stub(), text_request("Hi", 2));
  EXPECT_EQ(early.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(early.status.error_message().find("loading"), std::string::npos);
  server.wait_serving();

  auto stub = server.stub();
  grpc::ClientContext context;
  auto reader = stub->Generate(&context, long_request());
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  server.process().signal(SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (server.health() != HealthCheckResponse::NOT_SERVING &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(5ms);
  }
  EXPECT_EQ(server.health(), HealthCheckResponse::NOT_SERVING);
  const StreamResult late = testing::generate(*stub, text_request("Hi", 2));
  EXPECT_EQ(late.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  // The stream in flight outlives the 1 s drain timeout: it ends with CANCELLED.
  bool cancelled = false;
  while (reader->Read(&response)) {
    if (response.has_final()) {
      cancelled = response.final().finish_reason() == v1::FINISH_REASON_CANCELLED;
    }
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_TRUE(cancelled);
  EXPECT_EQ(server.process().wait(20s), 0) << server.process().log();
  // --log-json: every line is a JSON object.
  std::istringstream log(server.process().log());
  int lines = 0;
  for (std::string line; std::getline(log, line); ++lines) {
    EXPECT_NO_THROW(nlohmann::json::parse(line)) << line;
  }
  EXPECT_GT(lines, 3);
}

TEST(ServerLifecycle, SigtermLetsAStreamInFlightFinish) {
  ServerProcess server({"--model", testing::shared_model_dir()});
  auto stub = server.stub();
  grpc::ClientContext context;
  v1::GenerateRequest request = text_request("The kernel", 100);
  request.mutable_stopping()->set_ignore_eos(true);
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  server.process().signal(SIGTERM);
  int tokens = response.chunk().token_ids_size();
  v1::FinishReason reason = v1::FINISH_REASON_UNSPECIFIED;
  while (reader->Read(&response)) {
    tokens += response.chunk().token_ids_size();
    if (response.has_final()) reason = response.final().finish_reason();
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(reason, v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(tokens, 100);
  EXPECT_EQ(server.process().wait(20s), 0) << server.process().log();
  EXPECT_NE(server.process().log().find("drained"), std::string::npos);
}

const char* const kDesignMetrics[] = {"kvserve_kv_cache_capacity_bytes",
                                      "kvserve_kv_cache_used_bytes",
                                      "kvserve_kv_cache_usage_ratio",
                                      "kvserve_kv_cache_fp16_equivalent_bytes",
                                      "kvserve_kv_compression_ratio",
                                      "kvserve_kv_cache_tokens",
                                      "kvserve_kv_blocks_used",
                                      "kvserve_kv_blocks_total",
                                      "kvserve_requests_running",
                                      "kvserve_requests_waiting",
                                      "kvserve_prompt_tokens_total",
                                      "kvserve_generation_tokens_total",
                                      "kvserve_generation_tokens_per_second",
                                      "kvserve_request_success_total",
                                      "kvserve_request_failure_total",
                                      "kvserve_preemptions_total",
                                      "kvserve_time_to_first_token_seconds",
                                      "kvserve_inter_token_latency_seconds",
                                      "kvserve_e2e_request_latency_seconds",
                                      "kvserve_request_queue_seconds",
                                      "kvserve_batch_tokens",
                                      "kvserve_kv_quantization_relative_error",
                                      "kvserve_build_info"};

TEST(ServerMetrics, ExposesEveryDesignMetricWithValuesThatMatchTheWork) {
  ServerProcess server({"--model", testing::shared_model_dir(), "--kv", "kivi4"});
  auto stub = server.stub();
  int tokens = 0, prompt_tokens = 0;
  for (int i = 0; i < 4; ++i) {
    v1::GenerateRequest request = text_request("The kernel", 10 + i);
    request.mutable_stopping()->set_ignore_eos(true);
    const StreamResult got = testing::generate(*stub, request);
    ASSERT_TRUE(got.status.ok());
    tokens += static_cast<int>(got.ids.size());
    prompt_tokens += static_cast<int>(got.final.prompt_tokens());
  }
  EXPECT_EQ(testing::generate(*stub, text_request("", 1)).status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  const std::string text = server.metrics_text();
  for (const char* name : kDesignMetrics) {
    EXPECT_NE(text.find(std::string("\n# TYPE ") + name + " "), std::string::npos) << name;
  }
  using testing::metric_value;
  EXPECT_EQ(metric_value(text, "kvserve_generation_tokens_total"), tokens);
  EXPECT_EQ(metric_value(text, "kvserve_prompt_tokens_total"), prompt_tokens);
  EXPECT_EQ(metric_value(text, R"(kvserve_request_success_total{finish_reason="length"})"), 4);
  EXPECT_EQ(metric_value(text, R"(kvserve_request_failure_total{code="INVALID_ARGUMENT"})"), 1);
  EXPECT_EQ(metric_value(text, "kvserve_time_to_first_token_seconds_count"), 4);
  EXPECT_EQ(metric_value(text, "kvserve_inter_token_latency_seconds_count"), tokens - 4);
  EXPECT_EQ(metric_value(text, "kvserve_e2e_request_latency_seconds_count"), 4);
  EXPECT_EQ(metric_value(text, "kvserve_request_queue_seconds_count"), 4);
  EXPECT_GT(metric_value(text, "kvserve_generation_tokens_per_second"), 0);
  const v1::CacheStats stats = server.cache_stats();
  EXPECT_EQ(metric_value(text, "kvserve_kv_cache_capacity_bytes"), stats.capacity_bytes());
  EXPECT_EQ(metric_value(text, "kvserve_kv_cache_used_bytes"), stats.used_bytes());
  EXPECT_EQ(metric_value(text, "kvserve_kv_blocks_total"), stats.blocks_total());
  EXPECT_EQ(metric_value(text, "kvserve_kv_blocks_used"), 0);
  EXPECT_EQ(metric_value(text, "kvserve_requests_running"), 0);
  EXPECT_NE(text.find(R"(kvserve_build_info{)"), std::string::npos);
  EXPECT_NE(text.find(R"(kv_format="kivi4")"), std::string::npos);
  EXPECT_NE(text.find(R"(device="cpu")"), std::string::npos);
}

// Every group flushed into the pages at --kv-error-sample-rate 1 reaches the histogram, under both
// kinds, with errors in the range of 2-bit quantization.
TEST(ServerMetrics, SampledQuantizationErrorOfKeysAndValuesAfterARequest) {
  ServerProcess server(
      {"--model", testing::shared_model_dir(), "--kv", "kivi2", "--kv-error-sample-rate", "1"});
  auto stub = server.stub();
  v1::GenerateRequest request;
  for (int i = 0; i < 100; ++i) request.mutable_prompt_token_ids()->add_ids(464 + 7 * i);
  request.mutable_stopping()->set_max_new_tokens(40);
  request.mutable_stopping()->set_ignore_eos(true);
  ASSERT_TRUE(testing::generate(*stub, request).status.ok());
  const std::string text = server.metrics_text();
  // 139 tokens cached (the last one generated is never fed back): kivi2's defaults (G 32, GV 32,
  // R 32) flush 96 into pages; per layer and head that is D channels x 3 key groups and 96 tokens
  // x D/32 value groups.
  const ModelConfig model = read_model_config(testing::shared_model_dir());
  const double groups = 3.0 * model.n_layer * model.n_head * model.head_dim();
  for (const char* kind : {"key", "value"}) {
    const std::string labels = std::string(R"({format="kivi2",kind=")") + kind + R"("})";
    const double count =
        testing::metric_value(text, "kvserve_kv_quantization_relative_error_count" + labels);
    const double sum =
        testing::metric_value(text, "kvserve_kv_quantization_relative_error_sum" + labels);
    EXPECT_EQ(count, groups) << kind;
    EXPECT_GT(sum / count, 0.05) << kind;
    EXPECT_LT(sum / count, 0.6) << kind;
  }
}

TEST(StreamChannel, MergesTokensIntoTheLastChunkWhenFull) {
  StreamChannel channel(2);
  for (int i = 0; i < 5; ++i) channel.push_chunk({i}, std::to_string(i), {-1.0f * i});
  channel.push_final({});
  EXPECT_EQ(channel.size(), 3u);
  StreamMessage message;
  ASSERT_TRUE(channel.pop(message));
  EXPECT_EQ(message.token_ids, std::vector<int32_t>({0}));
  ASSERT_TRUE(channel.pop(message));
  EXPECT_EQ(message.token_ids, std::vector<int32_t>({1, 2, 3, 4}));
  EXPECT_EQ(message.text, "1234");
  EXPECT_EQ(message.logprobs.size(), 4u);
  ASSERT_TRUE(channel.pop(message));
  EXPECT_EQ(message.kind, StreamMessage::Kind::kFinal);
  EXPECT_FALSE(channel.pop(message));
}

// Counts its pokes and the threads they came on.
class CountingListener : public StreamListener {
 public:
  void on_message_ready() override {
    std::lock_guard<std::mutex> lock(mu_);
    ++pokes_;
    threads_.insert(std::this_thread::get_id());
    poked_.notify_all();
  }
  int pokes() {
    std::lock_guard<std::mutex> lock(mu_);
    return pokes_;
  }
  std::set<std::thread::id> threads() {
    std::lock_guard<std::mutex> lock(mu_);
    return threads_;
  }
  bool wait_for_pokes(int count) {
    std::unique_lock<std::mutex> lock(mu_);
    return poked_.wait_for(lock, std::chrono::seconds(10), [&] { return pokes_ >= count; });
  }

 private:
  std::mutex mu_;
  std::condition_variable poked_;
  int pokes_ = 0;
  std::set<std::thread::id> threads_;
};

TEST(StreamPokes, PushesWithPokesReachTheirListenersOnlyAtDeliver) {
  StreamChannel first(8), second(8);
  auto first_listener = std::make_shared<CountingListener>();
  auto second_listener = std::make_shared<CountingListener>();
  first.set_listener(first_listener);
  second.set_listener(second_listener);
  StreamPokes pokes;
  first.push_chunk({1}, "a", {}, &pokes);
  second.push_chunk({2}, "b", {}, &pokes);
  first.push_final({}, &pokes);
  EXPECT_EQ(first_listener->pokes(), 0);
  EXPECT_EQ(second_listener->pokes(), 0);
  EXPECT_EQ(first.size(), 2u) << "the messages wait in the channel meanwhile";

  pokes.deliver();  // no writer: inline, on this thread
  EXPECT_EQ(first_listener->pokes(), 2);
  EXPECT_EQ(second_listener->pokes(), 1);
  EXPECT_EQ(first_listener->threads(), std::set<std::thread::id>{std::this_thread::get_id()});
  EXPECT_TRUE(pokes.empty());
  pokes.deliver();
  EXPECT_EQ(first_listener->pokes(), 2) << "each poke is delivered once";
}

TEST(StreamPokes, DeliveredPokesRunOnTheWriterThreadAndSkipListenersThatAreGone) {
  StreamWriter writer;
  StreamChannel kept(8, &writer), dropped(8, &writer), unwritten(8);
  auto kept_listener = std::make_shared<CountingListener>();
  auto dropped_listener = std::make_shared<CountingListener>();
  auto unwritten_listener = std::make_shared<CountingListener>();
  kept.set_listener(kept_listener);
  dropped.set_listener(dropped_listener);
  unwritten.set_listener(unwritten_listener);
  StreamPokes pokes;
  kept.push_chunk({1}, "a", {}, &pokes);
  dropped.push_chunk({2}, "b", {}, &pokes);
  unwritten.push_error(StreamError::kInternal, "x", &pokes);  // a channel without a writer
  kept.push_final({}, &pokes);
  std::weak_ptr<CountingListener> gone = dropped_listener;
  dropped_listener.reset();
  ASSERT_TRUE(gone.expired());

  pokes.deliver();
  EXPECT_EQ(unwritten_listener->pokes(), 1) << "inline, in deliver()";
  ASSERT_TRUE(kept_listener->wait_for_pokes(2));
  EXPECT_EQ(kept_listener->pokes(), 2);
  EXPECT_EQ(kept_listener->threads().count(std::this_thread::get_id()), 0u);
  StreamMessage message;
  ASSERT_TRUE(kept.pop(message));
  EXPECT_EQ(message.text, "a");
  ASSERT_TRUE(kept.pop(message));
  EXPECT_EQ(message.kind, StreamMessage::Kind::kFinal);
}

}  // namespace
}  // namespace kvserve
