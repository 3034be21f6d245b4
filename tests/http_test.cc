// The HTTP port of `kvserve serve` end to end: the OpenAI completions API against the gRPC API,
// and the port's robustness against slow and malformed clients (issue 13, item 4). The OpenAI SDK
// itself drives the API in tests/http (CTest http_openai_sdk).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <future>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "client/http_client.h"
#include "client/load_generator.h"
#include "tests/server_harness.h"
#include "tests/test_support.h"

namespace kvserve {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;
using testing::ServerProcess;

// A TCP connection to 127.0.0.1:port, closed when it goes; receives time out after `timeout`.
class RawConnection {
 public:
  RawConnection(int port, std::chrono::seconds timeout = 5s)
      : fd_(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
      throw std::runtime_error("cannot connect to port " + std::to_string(port));
    }
    const timeval tv{static_cast<time_t>(timeout.count()), 0};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  ~RawConnection() { close(fd_); }
  RawConnection(const RawConnection&) = delete;
  RawConnection& operator=(const RawConnection&) = delete;

  bool send_bytes(const std::string& data) {
    return send(fd_, data.data(), data.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(data.size());
  }
  // What arrives until the peer closes, the timeout passes, or `enough` bytes came.
  std::string receive(size_t enough = 1 << 20) {
    std::string out;
    char buffer[4096];
    while (out.size() < enough) {
      const ssize_t n = recv(fd_, buffer, sizeof buffer, 0);
      if (n <= 0) break;
      out.append(buffer, static_cast<size_t>(n));
    }
    return out;
  }

 private:
  int fd_;
};

// "HTTP/1.1 400" of a response.
std::string status_line(const std::string& response) {
  return response.substr(0, 12);
}

// The events of a completed SSE body: the JSON of each `data:` line, without the final [DONE].
std::vector<json> sse_events(const std::string& body, bool& saw_done) {
  std::vector<json> events;
  saw_done = false;
  size_t start = 0;
  while (start < body.size()) {
    const size_t end = body.find("\n\n", start);
    EXPECT_NE(end, std::string::npos) << "an unterminated event";
    if (end == std::string::npos) break;
    const std::string frame = body.substr(start, end - start);
    EXPECT_EQ(frame.rfind("data: ", 0), 0u) << frame;
    const std::string data = frame.substr(6);
    EXPECT_FALSE(saw_done) << "an event after [DONE]";
    if (data == "[DONE]") {
      saw_done = true;
    } else {
      events.push_back(json::parse(data));
    }
    start = end + 2;
  }
  return events;
}

class HttpApi : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = new ServerProcess({"--model", testing::shared_model_dir(), "--kv", "kivi2"});
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  static httplib::Client client() {
    httplib::Client http("127.0.0.1", server_->metrics_port());
    http.set_read_timeout(60, 0);
    return http;
  }
  static ServerProcess* server_;
};
ServerProcess* HttpApi::server_ = nullptr;

TEST_F(HttpApi, StreamedGreedyCompletionEqualsTheGrpcStreamTokenForToken) {
  const std::vector<int32_t> prompt = {464, 12940, 318, 257};
  constexpr int kTokens = 48;
  v1::GenerateRequest grpc_request;
  grpc_request.mutable_prompt_token_ids()->mutable_ids()->Add(prompt.begin(), prompt.end());
  grpc_request.mutable_sampling()->set_temperature(0);
  grpc_request.mutable_stopping()->set_max_new_tokens(kTokens);
  grpc_request.mutable_stopping()->set_ignore_eos(true);
  grpc_request.set_return_logprobs(true);
  const testing::StreamResult grpc_result = testing::generate(*server_->stub(), grpc_request);
  ASSERT_TRUE(grpc_result.status.ok()) << grpc_result.status.error_message();
  ASSERT_EQ(grpc_result.ids.size(), static_cast<size_t>(kTokens));

  const json request = {{"model", "gpt2-tiny-docs"},
                        {"prompt", prompt},
                        {"max_tokens", kTokens},
                        {"temperature", 0},
                        {"ignore_eos", true},
                        {"logprobs", 0},
                        {"return_tokens_as_token_ids", true},
                        {"stream", true}};
  const httplib::Result response =
      client().Post("/v1/completions", request.dump(), "application/json");
  ASSERT_TRUE(response) << httplib::to_string(response.error());
  ASSERT_EQ(response->status, 200) << response->body;
  EXPECT_EQ(response->get_header_value("Content-Type"), "text/event-stream");
  bool saw_done = false;
  const std::vector<json> events = sse_events(response->body, saw_done);
  EXPECT_TRUE(saw_done);
  std::vector<int32_t> ids;
  std::vector<float> logprobs;
  std::string text;
  for (const json& event : events) {
    const json& choice = event.at("choices").at(0);
    text += choice.at("text").get<std::string>();
    if (choice.at("logprobs").is_null()) continue;
    for (const json& token : choice.at("logprobs").at("tokens")) {
      ids.push_back(std::stoi(token.get<std::string>().substr(std::string("token_id:").size())));
    }
    for (const json& logprob : choice.at("logprobs").at("token_logprobs")) {
      logprobs.push_back(logprob.get<float>());
    }
  }
  EXPECT_EQ(ids, grpc_result.ids);
  EXPECT_EQ(text, grpc_result.text);
  ASSERT_EQ(logprobs.size(), grpc_result.logprobs.size());
  for (size_t i = 0; i < logprobs.size(); ++i)
    EXPECT_FLOAT_EQ(logprobs[i], grpc_result.logprobs[i]);
  EXPECT_EQ(events.back().at("choices").at(0).at("finish_reason"), "length");
}

TEST_F(HttpApi, RejectsWhatGrpcRejectsWithTheSameReason) {
  // max_new_tokens beyond the context: convert_request's message, through either API.
  v1::GenerateRequest grpc_request;
  grpc_request.set_prompt("x");
  grpc_request.mutable_stopping()->set_max_new_tokens(5000);
  const testing::StreamResult grpc_result = testing::generate(*server_->stub(), grpc_request);
  ASSERT_EQ(grpc_result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  const httplib::Result response =
      client().Post("/v1/completions",
                    json{{"model", "gpt2-tiny-docs"}, {"prompt", "x"}, {"max_tokens", 5000}}.dump(),
                    "application/json");
  ASSERT_TRUE(response);
  EXPECT_EQ(response->status, 400);
  const json error = json::parse(response->body).at("error");
  EXPECT_EQ(error.at("message"), grpc_result.status.error_message());
  EXPECT_EQ(error.at("type"), "invalid_request_error");
}

TEST_F(HttpApi, HealthAndModelsAnswerWhileServing) {
  httplib::Client http = client();
  const httplib::Result health = http.Get("/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  EXPECT_EQ(json::parse(health->body).at("status"), "SERVING");
  const httplib::Result models = http.Get("/v1/models");
  ASSERT_TRUE(models);
  EXPECT_EQ(json::parse(models->body).at("data").at(0).at("kvserve").at("kv_format"), "kivi2");
}

// kvserve-cli load --api http: the HTTP client counts what the server counted, chunk by chunk.
TEST_F(HttpApi, LoadThroughTheHttpClientCountsEveryToken) {
  client::HttpGenerationClient http("127.0.0.1:" + std::to_string(server_->metrics_port()), "");
  client::LoadOptions options;
  options.requests = 6;
  options.concurrency = 3;
  options.prompt_len = 8;
  options.max_new_tokens = 5;
  const json result = client::run_load(http, options);
  EXPECT_EQ(result.at("completed"), 6);
  EXPECT_EQ(result.at("failed"), 0) << result.dump();
  EXPECT_EQ(result.at("total_input_tokens"), 48);
  EXPECT_EQ(result.at("total_output_tokens"), 30);
  EXPECT_EQ(result.at("model").at("vocab_size"), 50257);
  EXPECT_EQ(result.at("model").at("kv_format"), "kivi2");

  // The chunks' token counts (from their ids) add up to the server's count.
  v1::GenerateRequest request;
  request.set_prompt("The cache");
  request.mutable_stopping()->set_max_new_tokens(7);
  request.mutable_stopping()->set_ignore_eos(true);
  std::promise<client::GenerateOutcome> done;
  http.StartGenerate(request, 60, nullptr,
                     [&](client::GenerateOutcome outcome) { done.set_value(std::move(outcome)); });
  const client::GenerateOutcome outcome = done.get_future().get();
  ASSERT_TRUE(outcome.status.ok()) << outcome.status.error_message();
  ASSERT_TRUE(outcome.final.has_value());
  EXPECT_EQ(outcome.final->completion_tokens(), 7u);
  EXPECT_EQ(outcome.final->finish_reason(), v1::FINISH_REASON_LENGTH);
  int chunk_tokens = 0;
  for (const client::ChunkArrival& chunk : outcome.timing.chunks) chunk_tokens += chunk.tokens;
  EXPECT_EQ(chunk_tokens, 7);
}

// Issue 13, item 4: a client that sends its request one byte every 3 s, and idle connections,
// must not delay scrapes. The old single-threaded server made every scrape wait behind them.
TEST(HttpPort, SlowAndIdleClientsDoNotStallScrapes) {
  const ServerProcess server({"--model", testing::shared_model_dir()});
  std::vector<std::unique_ptr<RawConnection>> idle;
  for (int i = 0; i < 4; ++i)
    idle.push_back(std::make_unique<RawConnection>(server.metrics_port()));
  std::atomic<bool> stop{false};
  std::vector<std::thread> slow_clients;
  for (int i = 0; i < 3; ++i) {
    slow_clients.emplace_back([&] {
      RawConnection connection(server.metrics_port());
      for (const char byte : std::string("GET /metrics HTTP/1.1\r\nHost: kvserve\r\n\r\n")) {
        if (!connection.send_bytes(std::string(1, byte))) return;
        for (int tick = 0; tick < 30 && !stop.load(); ++tick) std::this_thread::sleep_for(100ms);
        if (stop.load()) return;
      }
    });
  }
  // Each scrape must answer within 2 s, less than one slow client's gap between bytes.
  httplib::Client scraper("127.0.0.1", server.metrics_port());
  scraper.set_connection_timeout(2, 0);
  scraper.set_read_timeout(2, 0);
  for (int scrape = 0; scrape < 5; ++scrape) {
    const httplib::Result response = scraper.Get("/metrics");
    ASSERT_TRUE(response) << "scrape " << scrape << ": " << httplib::to_string(response.error());
    EXPECT_EQ(response->status, 200);
    EXPECT_NE(response->body.find("kvserve_kv_blocks_total"), std::string::npos);
    std::this_thread::sleep_for(1s);
  }
  stop.store(true);
  for (std::thread& thread : slow_clients) thread.join();
}

TEST(HttpPort, GarbageGets400AndOversizedHeaders431InsteadOfAReset) {
  const ServerProcess server({"--model", testing::shared_model_dir()});
  const auto exchange = [&](const std::string& request) {
    RawConnection connection(server.metrics_port());
    connection.send_bytes(request);
    return connection.receive(12);
  };
  EXPECT_EQ(status_line(exchange("garbage\r\n\r\n")), "HTTP/1.1 400");
  EXPECT_EQ(status_line(exchange(std::string("\x16\x03\x01\x02\x00\x01\x00\r\n\r\n", 11))),
            "HTTP/1.1 400");
  std::string many_headers = "GET /metrics HTTP/1.1\r\n";
  for (int i = 0; i < 5000; ++i) many_headers += "X-Filler-" + std::to_string(i) + ": abcdefgh\r\n";
  EXPECT_EQ(status_line(exchange(many_headers + "\r\n")), "HTTP/1.1 431");
  EXPECT_EQ(status_line(exchange("GET /metrics HTTP/1.1\r\nX-Long: " + std::string(20000, 'a') +
                                 "\r\n\r\n")),
            "HTTP/1.1 400");
  EXPECT_EQ(status_line(exchange("GET /" + std::string(10000, 'a') + " HTTP/1.1\r\n\r\n")),
            "HTTP/1.1 414");
  // The port still serves.
  EXPECT_NE(testing::http_get(server.metrics_port(), "/metrics").find("kvserve_build_info"),
            std::string::npos);
}

// A client that trickles its request in must not keep a draining server from exiting.
TEST(HttpPort, SigtermExitsWhileAClientTricklesItsRequest) {
  ServerProcess server({"--model", testing::shared_model_dir()});
  RawConnection connection(server.metrics_port());
  std::atomic<bool> stop{false};
  std::thread trickle([&] {
    const std::string request = "GET /metrics HTTP/1.1\r\nX-Slow: " + std::string(200, 'a');
    for (size_t i = 0; i < request.size() && !stop.load(); ++i) {
      if (!connection.send_bytes(request.substr(i, 1))) return;
      std::this_thread::sleep_for(500ms);
    }
  });
  std::this_thread::sleep_for(1s);
  server.process().signal(SIGTERM);
  const int status = server.process().wait(30s);
  stop.store(true);
  trickle.join();
  EXPECT_EQ(status, 0) << server.process().log();
}

TEST(HttpPort, ASecondServerOnTheSamePortRefusesToStart) {
  const ServerProcess first({"--model", testing::shared_model_dir()});
  testing::ChildProcess second(
      {testing::kvserve_binary(), "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port",
       std::to_string(first.metrics_port()), "--model", testing::shared_model_dir()},
      testing::make_temp_dir("kvserve-second") + "/log");
  EXPECT_EQ(second.wait(30s), 1) << second.log();
  EXPECT_NE(second.log().find("cannot listen"), std::string::npos) << second.log();
}

}  // namespace
}  // namespace kvserve
