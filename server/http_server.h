// kvserve's HTTP port (default 9464): Prometheus /metrics, /health, and OpenAI's legacy
// completions API (/v1/models, /v1/completions) beside the gRPC API. server/README.md documents
// the endpoints, their errors and the API key.
//
// Served by cpp-httplib (Debian's libcpp-httplib-dev): a listening thread hands each connection to
// a fixed pool of worker threads with normal stacks (the reason prometheus::Exposer's civetweb,
// whose 100 KiB worker stacks overflow on kvserve's static TLS, is not used). Every connection has
// read and write timeouts, requests have bounded header and body sizes, and garbage gets 400.
//
// /v1/completions builds the same v1::GenerateRequest a gRPC client sends and goes through the
// same convert_request() and EngineLoop: one set of validation rules, sampling and stop strings.
// A completion occupies its worker thread while it runs; the thread waits on the request's
// StreamChannel (the engine thread only pushes and pokes), so the engine thread never waits on a
// socket. A few workers stay reserved for scrapes and probes: completions beyond the others get
// 429.
#pragma once

#include <httplib.h>

#include <atomic>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "engine/tokenizer.h"
#include "kvserve/v1/generation.pb.h"
#include "server/engine_loop.h"
#include "server/generation_service.h"
#include "server/metrics.h"

namespace kvserve {

struct HttpOptions {
  std::string host = "0.0.0.0";
  int port = 9464;  // 0: pick a free one
  // Non-empty: /v1/* requests need "Authorization: Bearer <api_key>" (else 401); /health and
  // /metrics stay open.
  std::string api_key;
  // Worker threads: connections served at once. kReservedHttpThreads of them are kept for
  // /metrics, /health and /v1/models; completions beyond the rest get 429.
  int threads = 128;
  int read_timeout_s = 5;   // per read: a client silent this long is disconnected
  int write_timeout_s = 5;  // per write: a client that stops reading this long is disconnected
  size_t max_body_bytes = 4 << 20;
  ServiceLimits limits;
};

constexpr int kReservedHttpThreads = 4;

class HttpServer {
 public:
  // Listens on host:port and serves /metrics at once (the rest answers 503 until start_serving);
  // throws when it cannot listen.
  HttpServer(const HttpOptions& options, Metrics& metrics);
  ~HttpServer();  // shutdown()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  int port() const { return port_; }

  // As GenerationService::start_serving: `loop` and `tokenizer` must outlive shutdown().
  void start_serving(EngineLoop& loop, const Tokenizer& tokenizer, v1::ModelInfo info);
  // New completions get 503, /health 503; completions in flight go on.
  void start_draining() { state_.store(State::kDraining); }
  // Completions whose response is not yet written to the end.
  int open_completions() const { return open_completions_.load(); }
  // Waits up to `timeout` for the open completions to end, then stops serving and joins every
  // thread; completions still open, and connections still open 1 s later (a client trickling
  // its request), are cut off. Call before the EngineLoop stops.
  void shutdown(std::chrono::milliseconds timeout = std::chrono::seconds(5));

 private:
  class Completion;
  enum class State { kLoading, kServing, kDraining };

  void route();
  void handle_completions(const httplib::Request& request, httplib::Response& response);
  void handle_models(httplib::Response& response) const;
  void stream_response(std::shared_ptr<Completion> completion, httplib::Response& response);
  void whole_response(Completion& completion, httplib::Response& response);
  // OpenAI's logprobs object: the tokens (text, or "token_id:N" when asked) and their logprobs.
  nlohmann::json logprobs_json(const Completion& completion, const std::vector<int32_t>& ids,
                               const std::vector<float>& logprobs) const;

  const HttpOptions options_;
  Metrics& metrics_;
  httplib::Server server_;
  int port_ = 0;
  int listen_socket_ = -1;
  std::thread thread_;
  std::atomic<State> state_{State::kLoading};
  std::atomic<bool> stopping_{false};
  std::atomic<bool> listener_done_{false};  // listen_after_bind returned: every worker is done
  // Set before state_ becomes kServing (release) and read after it is seen (acquire).
  EngineLoop* loop_ = nullptr;
  const Tokenizer* tokenizer_ = nullptr;
  v1::ModelInfo info_;
  std::string model_id_;  // the last part of the model's path, as OpenAI clients name it
  int64_t created_ = 0;   // Unix time at start_serving
  std::atomic<int> open_completions_{0};
  std::atomic<uint64_t> next_request_number_{1};
};

}  // namespace kvserve
