// The client library, the load generator and kvserve-cli against an in-process fake Generation
// server whose timings are known: first token 50 ms after the request arrives, then one token
// every 10 ms. Tolerances are sized for a loaded 2-core CI machine: the server cannot send early,
// so lower bounds are tight and only the upper bounds are generous.
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "client/generation_client.h"
#include "client/latency_stats.h"
#include "client/load_generator.h"
#include "common/text_io.h"
#include "tests/test_support.h"

namespace kvserve::client {
namespace {

using std::chrono::milliseconds;

constexpr double kFirstTokenMs = 200;
constexpr double kTokenGapMs = 40;
// How late a loaded machine may deliver a timed event.
constexpr double kSlackMs = 120;
constexpr int kVocab = 50257;

std::string fake_text(int i) {
  return " w" + std::to_string(i);
}

// Streams max_new_tokens (default 16) one-token chunks on a fixed schedule measured from the
// request's arrival, then the final message. With reject_every = k, every k-th request (the k-th,
// 2k-th, ...) fails with RESOURCE_EXHAUSTED instead.
class FakeGeneration final : public v1::Generation::Service {
 public:
  explicit FakeGeneration(int reject_every) : reject_every_(reject_every) {}

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    const Clock::time_point arrival = Clock::now();
    int index;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      index = static_cast<int>(arrivals_.size());
      arrivals_.push_back(arrival);
      last_request_ = *request;
      max_in_flight_ = std::max(max_in_flight_, ++in_flight_);
    }
    // Leaves the in-flight count before the status goes out, so a client that starts its next
    // request on completion can never be seen above its concurrency cap.
    struct Leave {
      FakeGeneration* self;
      ~Leave() {
        std::lock_guard<std::mutex> lock(self->mutex_);
        --self->in_flight_;
      }
    } leave{this};
    if (reject_every_ > 0 && index % reject_every_ == reject_every_ - 1) {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "fake queue is full");
    }
    const int n = static_cast<int>(
        request->stopping().has_max_new_tokens() ? request->stopping().max_new_tokens() : 16);
    for (int i = 0; i < n; ++i) {
      std::this_thread::sleep_until(arrival + std::chrono::duration_cast<Clock::duration>(
                                                  std::chrono::duration<double, std::milli>(
                                                      kFirstTokenMs + i * kTokenGapMs)));
      if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
      v1::GenerateResponse response;
      v1::TokenChunk& chunk = *response.mutable_chunk();
      chunk.add_token_ids(1000 + i);
      chunk.set_text(fake_text(i));
      if (request->return_logprobs()) chunk.add_logprobs(0.0f - 0.5f * static_cast<float>(i));
      writer->Write(response);
    }
    v1::GenerateResponse response;
    v1::GenerateFinal& final = *response.mutable_final();
    final.set_finish_reason(v1::FINISH_REASON_LENGTH);
    final.set_prompt_tokens(request->has_prompt_token_ids()
                                ? request->prompt_token_ids().ids_size()
                                : static_cast<int>(request->prompt().size()));
    final.set_completion_tokens(n);
    final.set_time_to_first_token_seconds(kFirstTokenMs / 1e3);
    writer->Write(response);
    return grpc::Status::OK;
  }

  grpc::Status GetModelInfo(grpc::ServerContext*, const v1::GetModelInfoRequest*,
                            v1::ModelInfo* info) override {
    info->set_model("fake");
    info->set_architecture("gpt2");
    info->set_vocab_size(kVocab);
    info->set_kv_format("kivi2");
    return grpc::Status::OK;
  }

  grpc::Status GetCacheStats(grpc::ServerContext*, const v1::GetCacheStatsRequest*,
                             v1::CacheStats* stats) override {
    stats->set_blocks_total(64);
    stats->set_compression_ratio(4.5);
    return grpc::Status::OK;
  }

  std::vector<Clock::time_point> arrivals() {
    std::lock_guard<std::mutex> lock(mutex_);
    return arrivals_;
  }
  int max_in_flight() {
    std::lock_guard<std::mutex> lock(mutex_);
    return max_in_flight_;
  }
  v1::GenerateRequest last_request() {
    std::lock_guard<std::mutex> lock(mutex_);
    return last_request_;
  }

 private:
  const int reject_every_;
  std::mutex mutex_;
  std::vector<Clock::time_point> arrivals_;
  v1::GenerateRequest last_request_;
  int in_flight_ = 0, max_in_flight_ = 0;
};

class FakeServer {
 public:
  explicit FakeServer(int reject_every = 0) : service_(reject_every) {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    if (!server_ || port_ == 0) throw std::runtime_error("the fake server did not start");
  }
  ~FakeServer() { server_->Shutdown(std::chrono::system_clock::now()); }

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  FakeGeneration& service() { return service_; }
  void set_serving(bool serving) { server_->GetHealthCheckService()->SetServingStatus(serving); }

 private:
  FakeGeneration service_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

double ms_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double, std::milli>(to - from).count();
}

// ---------------------------------------------------------------- latency_stats

TEST(ClientLatencyStats, PercentilesInterpolateLinearlyAsNumpy) {
  // Values from numpy.percentile (method="linear", the default).
  const std::vector<double> five = {15, 20, 35, 40, 50};
  EXPECT_DOUBLE_EQ(*percentile(five, 40), 29);  // rank 1.6: 20 + 0.6 * 15
  EXPECT_DOUBLE_EQ(*percentile(five, 0), 15);
  EXPECT_DOUBLE_EQ(*percentile(five, 100), 50);
  const std::vector<double> four = {1, 2, 3, 4};
  EXPECT_DOUBLE_EQ(*percentile(four, 50), 2.5);
  EXPECT_DOUBLE_EQ(*percentile(four, 90), 3.7);
  EXPECT_DOUBLE_EQ(*percentile(four, 99), 3.97);
  EXPECT_DOUBLE_EQ(*percentile({7}, 99), 7);
  EXPECT_THROW(percentile(four, 101), std::invalid_argument);
}

TEST(ClientLatencyStats, SummarySortsAndUsesPopulationStd) {
  const std::optional<Summary> s = summarize({4, 1, 3, 2});
  ASSERT_TRUE(s);
  EXPECT_EQ(s->count, 4u);
  EXPECT_DOUBLE_EQ(s->mean, 2.5);
  EXPECT_DOUBLE_EQ(s->stddev, std::sqrt(1.25));  // numpy.std, ddof=0
  EXPECT_DOUBLE_EQ(s->p50, 2.5);
  EXPECT_DOUBLE_EQ(s->p90, 3.7);
  EXPECT_DOUBLE_EQ(s->p99, 3.97);
}

TEST(ClientLatencyStats, EmptyInputHasNoValue) {
  EXPECT_FALSE(percentile({}, 50));
  EXPECT_FALSE(summarize({}));
}

// ---------------------------------------------------------------- per-request measures

TEST(ClientMeasure, FollowsVllmDefinitionsAndSplitsMultiTokenChunks) {
  GenerateOutcome o;
  o.final.emplace();
  o.final->set_prompt_tokens(7);
  o.final->set_completion_tokens(6);
  const Clock::time_point t0 = Clock::now();
  o.timing.start = t0;
  o.timing.chunks = {
      {t0 + milliseconds(100), 2}, {t0 + milliseconds(130), 1}, {t0 + milliseconds(190), 3}};
  o.timing.end = t0 + milliseconds(200);
  const RequestMeasures m = measure(o);
  ASSERT_TRUE(m.ttft);
  EXPECT_NEAR(*m.ttft, 0.100, 1e-9);
  EXPECT_NEAR(m.e2e, 0.200, 1e-9);
  ASSERT_TRUE(m.tpot);
  EXPECT_NEAR(*m.tpot, (0.200 - 0.100) / 5, 1e-9);
  ASSERT_EQ(m.itl.size(), 4u);  // one for the 1-token chunk, three for the 3-token chunk
  EXPECT_NEAR(m.itl[0], 0.030, 1e-9);
  for (int i = 1; i < 4; ++i) EXPECT_NEAR(m.itl[i], 0.020, 1e-9);
  EXPECT_EQ(m.prompt_tokens, 7u);
  EXPECT_EQ(m.output_tokens, 6u);

  o.final->set_completion_tokens(1);  // one token: TPOT is undefined
  o.timing.chunks.resize(1);
  EXPECT_FALSE(measure(o).tpot);
  EXPECT_TRUE(measure(o).itl.empty());
}

// ---------------------------------------------------------------- schedule and prompts

TEST(ClientArrivals, PoissonScheduleHasTheRequestedRate) {
  const std::vector<double> offsets = arrival_offsets(20000, 50, 3);
  EXPECT_EQ(offsets.front(), 0);
  EXPECT_TRUE(std::is_sorted(offsets.begin(), offsets.end()));
  EXPECT_NEAR(offsets.back() / (offsets.size() - 1), 1.0 / 50, 0.02 / 50);  // 20000 gaps: ~0.7% sd
  EXPECT_EQ(arrival_offsets(100, 50, 3), arrival_offsets(100, 50, 3));
  EXPECT_NE(arrival_offsets(100, 50, 3), arrival_offsets(100, 50, 4));
  const std::vector<double> burst = arrival_offsets(5, std::numeric_limits<double>::infinity(), 3);
  EXPECT_EQ(burst, std::vector<double>(5, 0.0));
}

TEST(ClientRequests, RandomTokenIdsAreSeededAndInRange) {
  LoadOptions o;
  o.requests = 20;
  o.prompt_len = 33;
  o.max_new_tokens = 9;
  o.seed = 5;
  const std::vector<v1::GenerateRequest> a = make_requests(o, kVocab);
  ASSERT_EQ(a.size(), 20u);
  std::set<int32_t> distinct;
  for (const v1::GenerateRequest& r : a) {
    ASSERT_TRUE(r.has_prompt_token_ids());
    ASSERT_EQ(r.prompt_token_ids().ids_size(), 33);
    for (int32_t id : r.prompt_token_ids().ids()) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, kVocab - 1);  // never <|endoftext|>
      distinct.insert(id);
    }
    EXPECT_EQ(r.stopping().max_new_tokens(), 9u);
    EXPECT_TRUE(r.stopping().ignore_eos());
  }
  EXPECT_GT(distinct.size(), 500u);
  const std::vector<v1::GenerateRequest> again = make_requests(o, kVocab);
  EXPECT_EQ(again[7].prompt_token_ids().SerializeAsString(),
            a[7].prompt_token_ids().SerializeAsString());
  o.seed = 6;
  EXPECT_NE(make_requests(o, kVocab)[7].prompt_token_ids().SerializeAsString(),
            a[7].prompt_token_ids().SerializeAsString());
}

// --shared-prefix-len: every prompt starts with the same ids, then has prompt_len of its own.
TEST(ClientRequests, SharedPrefixStartsEveryPrompt) {
  LoadOptions o;
  o.requests = 5;
  o.prompt_len = 16;
  o.shared_prefix_len = 40;
  const std::vector<v1::GenerateRequest> a = make_requests(o, kVocab);
  std::set<std::vector<int32_t>> prefixes, rests;
  for (const v1::GenerateRequest& r : a) {
    const auto& ids = r.prompt_token_ids().ids();
    ASSERT_EQ(ids.size(), 56);
    prefixes.insert(std::vector<int32_t>(ids.begin(), ids.begin() + 40));
    rests.insert(std::vector<int32_t>(ids.begin() + 40, ids.end()));
  }
  EXPECT_EQ(prefixes.size(), 1u);
  EXPECT_EQ(rests.size(), 5u);
}

bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80           ? 1
                     : (c >> 5) == 0x6  ? 2
                     : (c >> 4) == 0xE  ? 3
                     : (c >> 3) == 0x1E ? 4
                                        : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    }
    i += n;
  }
  return true;
}

TEST(ClientRequests, TextPromptsAreUtf8SlicesOfTheDocsWithoutSeparators) {
  LoadOptions o;
  o.requests = 50;
  o.prompt_len = 64;
  o.prompts_file = testing::shared_eval_text();  // .xz: decompressed by the client
  const std::string docs = read_file(o.prompts_file);
  for (const v1::GenerateRequest& r : make_requests(o, kVocab)) {
    ASSERT_EQ(r.input_case(), v1::GenerateRequest::kPrompt);
    const std::string& p = r.prompt();
    EXPECT_LE(p.size(), 64u * 4);
    EXPECT_GE(p.size(), 64u * 4 - 6);  // both ends moved by at most 3 bytes onto characters
    EXPECT_TRUE(valid_utf8(p));
    EXPECT_EQ(p.find("<|endoftext|>"), std::string::npos);
    // Inside one document the slice is verbatim text of the file.
    if (p.find('\n') == std::string::npos) {
      EXPECT_NE(docs.find(p), std::string::npos);
    }
  }
  o.chars_per_token = 3;
  EXPECT_LE(make_requests(o, kVocab)[0].prompt().size(), 64u * 3);
}

// ---------------------------------------------------------------- library against the fake

TEST(ClientGenerate, StreamsChunksThenTheFinalMessageWithClientTimings) {
  FakeServer server;
  GenerationClient client(server.address());
  v1::GenerateRequest request;
  request.set_prompt("hello");
  request.mutable_stopping()->set_max_new_tokens(4);
  request.set_return_logprobs(true);
  std::string text;
  std::vector<float> logprobs;
  const GenerateOutcome o =
      client.Generate(request, 10, [&](const v1::TokenChunk& chunk, Clock::time_point) {
        text += chunk.text();
        logprobs.insert(logprobs.end(), chunk.logprobs().begin(), chunk.logprobs().end());
      });
  ASSERT_TRUE(o.status.ok()) << describe(o.status);
  EXPECT_EQ(text, fake_text(0) + fake_text(1) + fake_text(2) + fake_text(3));
  EXPECT_EQ(logprobs, (std::vector<float>{0, -0.5f, -1, -1.5f}));
  ASSERT_TRUE(o.final);
  EXPECT_EQ(o.final->finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(o.final->prompt_tokens(), 5u);
  EXPECT_EQ(o.final->completion_tokens(), 4u);
  ASSERT_EQ(o.timing.chunks.size(), 4u);
  const double ttft = ms_between(o.timing.start, o.timing.chunks[0].time);
  EXPECT_GE(ttft, kFirstTokenMs);
  EXPECT_LE(ttft, kFirstTokenMs + kSlackMs);
  EXPECT_GE(ms_between(o.timing.start, o.timing.end), kFirstTokenMs + 3 * kTokenGapMs);
  EXPECT_EQ(server.service().last_request().prompt(), "hello");
}

TEST(ClientGenerate, ServerErrorsAndDeadlinesSurfaceAsStatus) {
  FakeServer server(/*reject_every=*/1);
  GenerationClient client(server.address());
  v1::GenerateRequest request;
  request.set_prompt("x");
  GenerateOutcome o = client.Generate(request, 10);
  EXPECT_EQ(o.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(o.status.error_message(), "fake queue is full");
  EXPECT_EQ(describe(o.status), "RESOURCE_EXHAUSTED: fake queue is full");

  FakeServer slow;
  o = GenerationClient(slow.address()).Generate(request, 0.02);  // before the first token
  EXPECT_EQ(o.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(o.timing.chunks.empty());
}

TEST(ClientHealth, ReportsServingStatusModelInfoAndCacheStats) {
  FakeServer server;
  GenerationClient client(server.address());
  ServingStatus status = grpc::health::v1::HealthCheckResponse::UNKNOWN;
  ASSERT_TRUE(client.CheckHealth("", 5, &status).ok());
  EXPECT_EQ(status, grpc::health::v1::HealthCheckResponse::SERVING);
  server.set_serving(false);
  ASSERT_TRUE(client.CheckHealth("", 5, &status).ok());
  EXPECT_EQ(status, grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(client.CheckHealth("no.such.Service", 5, &status).error_code(),
            grpc::StatusCode::NOT_FOUND);

  v1::ModelInfo info;
  ASSERT_TRUE(client.GetModelInfo(5, &info).ok());
  EXPECT_EQ(info.vocab_size(), kVocab);
  v1::CacheStats stats;
  ASSERT_TRUE(client.GetCacheStats(5, &stats).ok());
  EXPECT_EQ(stats.blocks_total(), 64);
  EXPECT_EQ(to_json(stats)["compression_ratio"], 4.5);
  EXPECT_EQ(to_json(stats)["blocks_used"], 0);  // zero values are printed, not dropped
}

// ---------------------------------------------------------------- load generator

void expect_between(const nlohmann::json& result, const std::string& key, double lo, double hi) {
  ASSERT_TRUE(result.contains(key)) << key;
  ASSERT_TRUE(result[key].is_number()) << key << " = " << result[key];
  const double v = result[key];
  EXPECT_GE(v, lo) << key;
  EXPECT_LE(v, hi) << key;
}

TEST(LoadClosedLoop, LatenciesAndCountsMatchTheFakeServer) {
  FakeServer server;
  GenerationClient client(server.address());
  LoadOptions o;
  o.requests = 24;
  o.concurrency = 8;
  o.prompt_len = 16;
  o.max_new_tokens = 8;
  std::vector<LoadProgress> progress;
  const nlohmann::json r =
      run_load(client, o, [&](const LoadProgress& p) { progress.push_back(p); });

  EXPECT_EQ(r["completed"], 24);
  EXPECT_EQ(r["failed"], 0);
  EXPECT_EQ(r["total_input_tokens"], 24 * 16);
  EXPECT_EQ(r["total_output_tokens"], 24 * 8);
  EXPECT_EQ(r["errors"], nlohmann::json::object());
  EXPECT_EQ(r["model"]["model"], "fake");
  EXPECT_EQ(r["config"]["request_rate"], "inf");
  EXPECT_EQ(server.service().max_in_flight(), 8);
  EXPECT_EQ(server.service().last_request().stopping().max_new_tokens(), 8u);
  EXPECT_TRUE(server.service().last_request().stopping().ignore_eos());

  const double e2e = kFirstTokenMs + 7 * kTokenGapMs;  // 480 ms
  for (const std::string stat : {"mean", "p50"}) {
    expect_between(r, stat + "_ttft_ms", kFirstTokenMs, kFirstTokenMs + kSlackMs);
    expect_between(r, stat + "_e2el_ms", e2e, e2e + kSlackMs);
    // TPOT and ITL spread a delay over 7 gaps, so a late token moves them by kSlackMs / 7.
    expect_between(r, stat + "_tpot_ms", kTokenGapMs - 5, kTokenGapMs + 5);
    expect_between(r, stat + "_itl_ms", kTokenGapMs - 5, kTokenGapMs + 5);
  }
  expect_between(r, "p99_ttft_ms", kFirstTokenMs, kFirstTokenMs + 3 * kSlackMs);
  expect_between(r, "p99_e2el_ms", e2e, e2e + 3 * kSlackMs);
  EXPECT_DOUBLE_EQ(r["median_ttft_ms"].get<double>(), r["p50_ttft_ms"].get<double>());

  // Three waves of 8: at least 3 * 120 ms.
  expect_between(r, "duration", 3 * e2e / 1e3, 3 * e2e / 1e3 + 0.5);
  const double duration = r["duration"];
  EXPECT_DOUBLE_EQ(r["request_throughput"].get<double>(), 24 / duration);
  EXPECT_DOUBLE_EQ(r["output_throughput"].get<double>(), 24 * 8 / duration);
  EXPECT_DOUBLE_EQ(r["total_token_throughput"].get<double>(), 24 * (8 + 16) / duration);

  ASSERT_EQ(progress.size(), 24u);
  EXPECT_EQ(progress.back().completed, 24);
  EXPECT_EQ(progress.back().started, 24);
}

TEST(LoadOpenLoop, PoissonArrivalsFollowTheSeededSchedule) {
  FakeServer server;
  GenerationClient client(server.address());
  LoadOptions o;
  o.requests = 20;
  o.rate = 40;
  o.concurrency = 64;
  o.prompt_len = 4;
  o.max_new_tokens = 1;
  o.seed = 11;
  const nlohmann::json r = run_load(client, o);
  EXPECT_EQ(r["completed"], 20);
  EXPECT_EQ(r["config"]["request_rate"], 40.0);
  EXPECT_TRUE(r["mean_tpot_ms"].is_null());  // one token per request: TPOT is undefined
  EXPECT_TRUE(r["p99_itl_ms"].is_null());

  const std::vector<double> schedule = arrival_offsets(20, 40, 11);
  std::vector<Clock::time_point> arrivals = server.service().arrivals();
  ASSERT_EQ(arrivals.size(), 20u);
  std::sort(arrivals.begin(), arrivals.end());
  for (size_t i = 1; i < arrivals.size(); ++i) {
    EXPECT_NEAR(ms_between(arrivals[0], arrivals[i]), schedule[i] * 1e3, kSlackMs) << i;
  }
  expect_between(r, "duration", schedule.back() + kFirstTokenMs / 1e3,
                 schedule.back() + (kFirstTokenMs + 3 * kSlackMs) / 1e3);
}

TEST(LoadOpenLoop, InfiniteRateHoldsAll256StreamsInFlightAtOnce) {
  // The callback API holds no thread per stream, so the client keeps 256 streams open on one
  // channel. Each stream lasts 340 ms, long enough for the fake server to start its 256 handler
  // threads on a loaded machine before the first stream ends.
  FakeServer server;
  GenerationClient client(server.address());
  LoadOptions o;
  o.requests = 256;
  o.concurrency = 256;
  o.prompt_len = 4;
  o.max_new_tokens = 30;
  const nlohmann::json r = run_load(client, o);
  EXPECT_EQ(r["completed"], 256);
  EXPECT_EQ(r["total_output_tokens"], 256 * 30);
  EXPECT_EQ(server.service().max_in_flight(), 256);
  // All at once, not one after another (256 stream_s). Not stream_s + 1 s: under ASan on a loaded
  // 2-core CI machine the run took 2.58 s of a 1.36 s stream, in a run whose every stream was in
  // flight at once (max_in_flight above is the check of concurrency; this one bounds stalls).
  const double stream_s = (kFirstTokenMs + 29 * kTokenGapMs) / 1e3;
  expect_between(r, "duration", stream_s, 4 * stream_s);
}

TEST(LoadErrors, FailuresAreCountedByStatusCode) {
  FakeServer server(/*reject_every=*/4);
  GenerationClient client(server.address());
  LoadOptions o;
  o.requests = 20;
  o.concurrency = 4;
  o.prompt_len = 4;
  o.max_new_tokens = 3;
  const nlohmann::json r = run_load(client, o);
  EXPECT_EQ(r["completed"], 15);
  EXPECT_EQ(r["failed"], 5);
  EXPECT_EQ(r["errors"], (nlohmann::json{{"RESOURCE_EXHAUSTED", 5}}));
  EXPECT_EQ(r["total_output_tokens"], 15 * 3);
  EXPECT_EQ(r["total_input_tokens"], 15 * 4);
}

TEST(LoadErrors, AnUnreachableServerStopsBeforeSending) {
  GenerationClient client("127.0.0.1:1");
  LoadOptions o;
  o.requests = 3;
  try {
    run_load(client, o);
    FAIL() << "run_load succeeded without a server";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("UNAVAILABLE"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------- kvserve-cli

using testing::CommandResult;

// Runs kvserve-cli with a shell-quoted argument string.
CommandResult run_cli(const std::string& args) {
  return testing::run_command(testing::kvserve_cli_binary() + " " + args);
}

TEST(ClientCli, GenerateStreamsTheTextAndPassesEveryFlag) {
  FakeServer server;
  const CommandResult r =
      run_cli("generate --addr " + server.address() +
              " --prompt 'Hello there' --max-new-tokens 5 --temperature 0.5 --top-k 3 --top-p 0.9"
              " --repetition-penalty 1.2 --seed 7 --stop END --stop 'the end' --stop-token-id 13"
              " --stop-token-id 198 --ignore-eos --logprobs --timeout-s 10");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, fake_text(0) + fake_text(1) + fake_text(2) + fake_text(3) + fake_text(4));
  EXPECT_NE(r.err.find("finish_reason=LENGTH"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("prompt_tokens=11 completion_tokens=5"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("ttft_ms="), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("logprobs: 1000:0 1001:-0.5 1002:-1"), std::string::npos) << r.err;

  const v1::GenerateRequest q = server.service().last_request();
  EXPECT_EQ(q.prompt(), "Hello there");
  EXPECT_EQ(q.stopping().max_new_tokens(), 5u);
  EXPECT_FLOAT_EQ(q.sampling().temperature(), 0.5f);
  EXPECT_EQ(q.sampling().top_k(), 3);
  EXPECT_FLOAT_EQ(q.sampling().top_p(), 0.9f);
  EXPECT_FLOAT_EQ(q.sampling().repetition_penalty(), 1.2f);
  EXPECT_EQ(q.sampling().seed(), 7u);
  EXPECT_EQ(std::vector<std::string>(q.stopping().stop().begin(), q.stopping().stop().end()),
            (std::vector<std::string>{"END", "the end"}));
  EXPECT_EQ(std::vector<int32_t>(q.stopping().stop_token_ids().begin(),
                                 q.stopping().stop_token_ids().end()),
            (std::vector<int32_t>{13, 198}));
  EXPECT_TRUE(q.stopping().ignore_eos());
  EXPECT_TRUE(q.return_logprobs());
}

TEST(ClientCli, GenerateLeavesUnsetSamplingToTheServerAndTakesTokenIds) {
  FakeServer server;
  const CommandResult r =
      run_cli("generate --addr " + server.address() + " --prompt-ids 464 2068 7586");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("prompt_tokens=3 completion_tokens=16"), std::string::npos) << r.err;
  const v1::GenerateRequest q = server.service().last_request();
  EXPECT_EQ(
      std::vector<int32_t>(q.prompt_token_ids().ids().begin(), q.prompt_token_ids().ids().end()),
      (std::vector<int32_t>{464, 2068, 7586}));
  EXPECT_FALSE(q.sampling().has_temperature());
  EXPECT_FALSE(q.sampling().has_seed());
  EXPECT_FALSE(q.stopping().has_max_new_tokens());
  EXPECT_FALSE(q.stopping().ignore_eos());
}

TEST(ClientCli, GenerateReportsTheServersStatus) {
  FakeServer server(/*reject_every=*/1);
  const CommandResult r = run_cli("generate --addr " + server.address() + " --prompt x");
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(r.out, "");
  EXPECT_NE(r.err.find("RESOURCE_EXHAUSTED: fake queue is full"), std::string::npos) << r.err;
}

TEST(ClientCli, HealthExitCodeIsZeroOnlyWhenServing) {
  FakeServer server;
  CommandResult r = run_cli("health --addr " + server.address());
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "SERVING\n");
  server.set_serving(false);
  r = run_cli("health --addr " + server.address());
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_EQ(r.out, "NOT_SERVING\n");
  r = run_cli("health --addr " + server.address() + " --service no.such.Service");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("NOT_FOUND"), std::string::npos) << r.err;
}

TEST(ClientCli, UnreachableAddressGivesAClearErrorAndNonZeroExit) {
  // Port 1 is privileged and unused: the connection is refused at once.
  for (const std::string command : {"health", "generate --prompt x"}) {
    const CommandResult r = run_cli(command + " --addr 127.0.0.1:1 --timeout-s 5");
    EXPECT_NE(r.status, 0) << command;
    EXPECT_NE(r.err.find("UNAVAILABLE"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("127.0.0.1:1"), std::string::npos) << r.err;
  }
}

TEST(LoadCli, PrintsOneJsonResultAndWritesTheOutputFile) {
  FakeServer server;
  const std::string file = testing::make_temp_dir("kvserve-load") + "/result.json";
  const CommandResult r = run_cli("load --addr " + server.address() +
                                  " --requests 6 --rate 200 --concurrency 3 --prompt-len 4"
                                  " --max-new-tokens 2 --seed 1 --output " +
                                  file);
  ASSERT_EQ(r.status, 0) << r.err;
  const nlohmann::json out = nlohmann::json::parse(r.out);
  EXPECT_EQ(out["completed"], 6);
  EXPECT_EQ(out["total_output_tokens"], 12);
  EXPECT_EQ(out["config"]["max_concurrency"], 3);
  EXPECT_EQ(out, nlohmann::json::parse(read_file(file)));
  EXPECT_EQ(r.err, "");  // no progress bar when stderr is not a terminal
  EXPECT_LE(server.service().max_in_flight(), 3);

  const CommandResult bad = run_cli("load --addr " + server.address() + " --rate fast");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.err.find("--rate"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace kvserve::client
