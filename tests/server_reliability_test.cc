// Failures a hostile client found in kvserve serve (issue 13), each against the real binary on
// loopback: cancelled streams that kept their slot, a second server sharing a port, log
// injection through request_id, deadlines counted as cancellations, clients that never read.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <functional>
#include <future>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "engine/tokenizer.h"
#include "server/generation_service.h"
#include "server/logging.h"
#include "tests/server_harness.h"
#include "tests/test_support.h"

namespace kvserve {
namespace {

using namespace std::chrono_literals;
using testing::ServerProcess;
using testing::StreamResult;

v1::GenerateRequest long_generation(int max_new_tokens) {
  v1::GenerateRequest request;
  request.set_prompt("The kernel");
  request.mutable_stopping()->set_max_new_tokens(max_new_tokens);
  request.mutable_stopping()->set_ignore_eos(true);
  return request;
}

// Reads `chunks` messages, then cancels and reads the stream to its end.
grpc::Status cancel_after(v1::Generation::Stub& stub, int chunks) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 60s);
  auto reader = stub.Generate(&context, long_generation(200));
  v1::GenerateResponse response;
  for (int i = 0; i < chunks && reader->Read(&response); ++i) continue;
  context.TryCancel();
  while (reader->Read(&response)) continue;
  return reader->Finish();
}

double metric(const ServerProcess& server, const std::string& name) {
  return testing::metric_value(server.metrics_text(), name);
}

// Polls `name` until it is `value` (gauges move after the stream or the engine step ends).
void expect_metric_reaches(const ServerProcess& server, const std::string& name, double value) {
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (metric(server, name) != value && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(metric(server, name), value) << name;
}

// The race of issue 13, made to happen every time (the test hooks of server/serve.h): OnWriteDone
// waits 30 ms, as when gRPC's threads wait for a core, and the engine pauses 100 ms after each
// step. The client's cancellation then reaches the server while the write of the chunk it has just
// read is still "in flight", and the engine takes the cancellation before it produces anything
// more: the write reports success and no message is left to finish the stream. The stream kept its
// slot, and SIGTERM then waited forever in grpc::Server::Shutdown.
TEST(ServerReliability, CancelWhileAWriteIsInFlightStillFinishesTheStream) {
  constexpr int kSlots = 4;
  ServerProcess server({"--model", testing::shared_model_dir(), "--max-concurrent-streams",
                        std::to_string(kSlots), "--drain-timeout-s", "1",
                        "--test-write-done-delay-ms", "30", "--test-engine-pause-ms", "100"});
  auto stub = server.stub();
  for (int chunks = 1; chunks <= 6; ++chunks) {
    EXPECT_EQ(cancel_after(*stub, chunks).error_code(), grpc::StatusCode::CANCELLED);
  }
  expect_metric_reaches(server, "kvserve_streams_open", 0);
  expect_metric_reaches(server, "kvserve_kv_blocks_used", 0);
  expect_metric_reaches(server, "kvserve_requests_running", 0);
  expect_metric_reaches(server, "kvserve_requests_waiting", 0);

  // Every slot is free again: kSlots streams at once are all served.
  std::vector<std::future<StreamResult>> calls;
  for (int i = 0; i < kSlots; ++i) {
    calls.push_back(std::async(std::launch::async, [&] {
      return testing::generate(*server.stub(), long_generation(3), 60s);
    }));
  }
  for (auto& call : calls) {
    const StreamResult result = call.get();
    EXPECT_TRUE(result.status.ok()) << result.status.error_message();
  }

  server.process().signal(SIGTERM);
  EXPECT_EQ(server.process().wait(30s), 0) << server.process().log();
}

TEST(ServerReliability, SecondServerOnAPortInUseRefusesToStart) {
  const ServerProcess first({"--model", testing::shared_model_dir()});
  const std::string address = "127.0.0.1:" + std::to_string(first.port());
  testing::ChildProcess second(
      {testing::kvserve_binary(), "serve", "--model", testing::shared_model_dir(), "--host",
       "127.0.0.1", "--port", std::to_string(first.port()), "--metrics-port", "0"},
      testing::make_temp_dir("kvserve-second") + "/log");
  // Status 1, as for a metrics port in use: a startup error.
  EXPECT_EQ(second.wait(30s), 1) << second.log();
  EXPECT_NE(second.log().find("cannot listen on " + address + ": the port is in use"),
            std::string::npos)
      << second.log();
  // The first server still has the port to itself.
  EXPECT_TRUE(testing::generate(*first.stub(), long_generation(2)).status.ok());
}

TEST(ServerReliability, RequestIdIsBoundedAndCannotForgeLogLines) {
  for (const bool json : {false, true}) {
    std::vector<std::string> flags = {"--model", testing::shared_model_dir()};
    if (json) flags.push_back("--log-json");
    ServerProcess server(flags);
    auto stub = server.stub();

    v1::GenerateRequest request = long_generation(2);
    request.set_request_id(std::string(256, 'a'));
    EXPECT_TRUE(testing::generate(*stub, request).status.ok());
    request.set_request_id(std::string(257, 'b'));
    StreamResult refused = testing::generate(*stub, request);
    EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(refused.status.error_message().find("request_id has 257 bytes"), std::string::npos)
        << refused.status.error_message();
    request.set_request_id(std::string(1 << 20, 'c'));
    refused = testing::generate(*stub, request);
    EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);

    // A newline and an escape sequence in the id, then what a forged line would look like.
    const std::string forged = "[2001-01-01 00:00:00.000] [kvserve] [info] forged";
    request.set_request_id("evil\n" + forged + "\r\x1b[2J");
    EXPECT_TRUE(testing::generate(*stub, request).status.ok());

    // The engine thread logs a request's end after its final message.
    std::string log = server.process().log();
    for (const auto deadline = std::chrono::steady_clock::now() + 20s;
         log.find("request evil") == std::string::npos &&
         std::chrono::steady_clock::now() < deadline;
         log = server.process().log()) {
      std::this_thread::sleep_for(10ms);
    }
    EXPECT_LT(log.size(), 64u * 1024) << "the 1 MiB request_id was logged";
    std::istringstream lines(log);
    bool logged = false;
    for (std::string line; std::getline(lines, line);) {
      EXPECT_NE(line.rfind(forged, 0), 0u) << "forged line: " << line;
      EXPECT_EQ(line.find('\x1b'), std::string::npos) << line;
      if (json) {
        nlohmann::json parsed;
        ASSERT_NO_THROW(parsed = nlohmann::json::parse(line)) << line;
        if (parsed["msg"].get<std::string>().find("evil\n" + forged) != std::string::npos) {
          logged = true;
        }
      } else if (line.find("evil\\n" + forged + "\\r\\x1b[2J") != std::string::npos) {
        logged = true;
      }
    }
    EXPECT_TRUE(logged) << "the request's lines name it, escaped:\n" << log;
  }
}

TEST(ServerReliability, ControlCharactersAreEscaped) {
  EXPECT_EQ(escape_control_characters("plain text, caf\xc3\xa9"), "plain text, caf\xc3\xa9");
  EXPECT_EQ(escape_control_characters(std::string("a\nb\rc\td\x1b\x7f\0e", 11)),
            "a\\nb\\rc\\td\\x1b\\x7f\\x00e");
}

TEST(ServerReliability, DeadlinesAreCountedAsDeadlineExceeded) {
  ServerProcess server({"--model", testing::shared_model_dir()});
  auto stub = server.stub();
  constexpr int kRequests = 10;
  for (int i = 0; i < kRequests; ++i) {
    const StreamResult result =
        testing::generate(*stub, long_generation(1000), std::chrono::milliseconds(100 + 20 * i));
    EXPECT_EQ(result.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  expect_metric_reaches(server, R"(kvserve_request_failure_total{code="DEADLINE_EXCEEDED"})",
                        kRequests);
  EXPECT_EQ(metric(server, R"(kvserve_request_failure_total{code="CANCELLED"})"), 0);
  EXPECT_EQ(server.process().log().find("cancelled by the client"), std::string::npos);
  EXPECT_EQ(server.process().log().find("CANCELLED by the client"), std::string::npos);
}

TEST(ServerReliability, ClientThatNeverReadsLosesItsStreamAfterTheWriteStallTimeout) {
  ServerProcess server({"--model", testing::shared_model_dir(), "--write-stall-timeout-s", "1"});
  // A client whose HTTP/2 window stays small: once it is full, the server's writes wait until the
  // client reads, which this one never does.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 1024);
  auto channel = grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(server.port()),
                                           grpc::InsecureChannelCredentials(), args);
  auto stub = v1::Generation::NewStub(channel);
  grpc::ClientContext context;
  v1::GenerateRequest request = long_generation(1000);
  request.set_return_logprobs(true);
  auto reader = stub->Generate(&context, request);
  expect_metric_reaches(server, "kvserve_streams_open", 1);
  // The server gives the slot back, and the request's blocks, without the client doing anything.
  expect_metric_reaches(server, "kvserve_streams_open", 0);
  expect_metric_reaches(server, "kvserve_kv_blocks_used", 0);
  EXPECT_NE(server.process().log().find("stopped reading"), std::string::npos)
      << server.process().log();
  v1::GenerateResponse response;
  while (reader->Read(&response)) continue;
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
}

TEST(ServerReliability, InvalidUtf8InAStringFieldIsInvalidArgumentWithAReason) {
  ServerProcess server({"--model", testing::shared_model_dir()});
  auto stub = server.stub();
  const std::vector<std::function<void(v1::GenerateRequest&)>> edits = {
      [](v1::GenerateRequest& r) { r.set_prompt("caf\xc3"); },
      [](v1::GenerateRequest& r) { r.set_request_id("id-\xff"); },
      [](v1::GenerateRequest& r) { r.mutable_stopping()->add_stop("\xe2\x82"); },
  };
  for (const auto& edit : edits) {
    v1::GenerateRequest request = long_generation(2);
    edit(request);
    const StreamResult result = testing::generate(*stub, request);
    EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << result.status.error_message();
    EXPECT_NE(result.status.error_message().find("UTF-8"), std::string::npos)
        << result.status.error_message();
  }
  // The same bytes as token ids are served.
  v1::GenerateRequest request = long_generation(2);
  const Tokenizer tokenizer = Tokenizer::from_model_dir(testing::shared_model_dir());
  for (const int32_t id : tokenizer.encode("caf\xc3"))
    request.mutable_prompt_token_ids()->add_ids(id);
  EXPECT_TRUE(testing::generate(*stub, request).status.ok());
  EXPECT_EQ(metric(server, R"(kvserve_request_failure_total{code="INVALID_ARGUMENT"})"), 3);
}

TEST(ServerReliability, CancelNearTheDeadlineCountsAsTheDeadline) {
  using std::chrono::system_clock;
  const system_clock::time_point arrival{};
  const system_clock::time_point none = system_clock::time_point::max();
  EXPECT_FALSE(cancel_is_deadline(arrival, none, arrival + 1h));
  // 10 s timeout: 100 ms + 2% (200 ms) of slack before the server's deadline.
  const system_clock::time_point deadline = arrival + 10s;
  EXPECT_TRUE(cancel_is_deadline(arrival, deadline, deadline + 1ms));
  EXPECT_TRUE(cancel_is_deadline(arrival, deadline, deadline - 299ms));
  EXPECT_FALSE(cancel_is_deadline(arrival, deadline, deadline - 301ms));
  EXPECT_FALSE(cancel_is_deadline(arrival, deadline, arrival + 1s));
}

}  // namespace
}  // namespace kvserve
