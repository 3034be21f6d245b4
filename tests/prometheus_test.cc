// Integration with a real Prometheus server (Debian's `prometheus`): it scrapes kvserve's
// /metrics and answers queries for kvserve's series through its HTTP API.
#include <gtest/gtest.h>

#include <atomic>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "tests/server_harness.h"
#include "tests/test_support.h"

namespace kvserve {
namespace {

using namespace std::chrono_literals;

// The value of an instant query, or nullopt while Prometheus has no sample yet.
std::optional<double> query(int port, const std::string& expression) {
  std::string body;
  try {
    body = testing::http_get(port, "/api/v1/query?query=" + expression);
  } catch (const std::exception&) {
    return std::nullopt;  // not up yet
  }
  const nlohmann::json reply = nlohmann::json::parse(body);
  if (reply.at("status") != "success" || reply["data"]["result"].empty()) return std::nullopt;
  return std::stod(reply["data"]["result"][0]["value"][1].get<std::string>());
}

TEST(Prometheus, ScrapesCompressionRatioAndGeneratedTokens) {
  const testing::ServerProcess server(
      {"--model", testing::shared_model_dir(), "--kv", "kivi2", "--kv-pool-mb", "64"});
  const std::string dir = testing::make_temp_dir("kvserve-prometheus");
  const int prometheus_port = testing::free_port();
  std::ofstream(dir + "/prometheus.yml")
      << "global:\n  scrape_interval: 1s\n"
      << "scrape_configs:\n  - job_name: kvserve\n    static_configs:\n"
      << "      - targets: ['127.0.0.1:" << server.metrics_port() << "']\n";
  testing::ChildProcess prometheus(
      {"/usr/bin/prometheus", "--config.file=" + dir + "/prometheus.yml",
       "--storage.tsdb.path=" + dir + "/data",
       "--web.listen-address=127.0.0.1:" + std::to_string(prometheus_port)},
      dir + "/prometheus.log");

  // Keep requests running so that the cache holds tokens while Prometheus scrapes (the ratio is
  // 0 for an empty cache, and below 1 while a sequence is shorter than R + G: all fp16 residual).
  std::atomic<bool> done{false};
  std::atomic<int> streamed{0};
  std::thread load([&] {
    auto stub = server.stub();
    while (!done) {
      // A long prompt (prefilled fast, mostly quantized) and a short completion: the cache
      // holds hundreds of tokens for most of each request.
      kvserve::v1::GenerateRequest request;
      for (int i = 0; i < 600; ++i) request.mutable_prompt_token_ids()->add_ids(464 + i % 50);
      request.mutable_stopping()->set_max_new_tokens(64);
      request.mutable_stopping()->set_ignore_eos(true);
      const testing::StreamResult got = testing::generate(*stub, request, 60s);
      streamed += static_cast<int>(got.ids.size());
    }
  });
  std::optional<double> ratio, tokens;
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (std::chrono::steady_clock::now() < deadline && !(ratio && *ratio > 1 && tokens)) {
    ratio = query(prometheus_port, "kvserve_kv_compression_ratio");
    tokens = query(prometheus_port, "kvserve_generation_tokens_total");
    std::this_thread::sleep_for(200ms);
  }
  done = true;
  load.join();
  ASSERT_TRUE(ratio.has_value()) << prometheus.log();
  ASSERT_TRUE(tokens.has_value()) << prometheus.log();
  // kivi2 with a 32-token fp16 residual: well above 1 and below the 2-bit limit of 8.
  EXPECT_GT(*ratio, 1.0);
  EXPECT_LT(*ratio, 8.0);
  EXPECT_GT(*tokens, 0);
  EXPECT_LE(*tokens, streamed.load());
  // What Prometheus stored agrees with what kvserve exports now (the counter only grows).
  EXPECT_LE(*tokens,
            testing::metric_value(server.metrics_text(), "kvserve_generation_tokens_total"));
}

}  // namespace
}  // namespace kvserve
