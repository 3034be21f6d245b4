// A client of kvserve's gRPC API (proto/kvserve/v1/generation.proto) plus the standard health
// check, with the client-side timing a latency benchmark needs. Depends only on proto/.
#pragma once

#include <grpcpp/grpcpp.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "kvserve/v1/generation.grpc.pb.h"

namespace kvserve::client {

using Clock = std::chrono::steady_clock;
using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

struct ChunkArrival {
  Clock::time_point time;
  int tokens = 0;  // token ids the chunk carried
};

// The client-side timeline of one Generate call.
struct StreamTiming {
  Clock::time_point start;           // just before the call was started
  std::vector<ChunkArrival> chunks;  // in arrival order
  Clock::time_point end;             // when the call's status arrived
};

struct GenerateOutcome {
  // The server's status; a stream that ends OK without its final message is reported as INTERNAL
  // so callers can rely on `final` whenever the status is OK.
  grpc::Status status;
  std::optional<v1::GenerateFinal> final;
  StreamTiming timing;
};

// Runs on a gRPC thread, once per chunk, in stream order, before the next read is started: keep it
// short (writing to stdout is fine), because it delays the reading of this stream.
using ChunkCallback = std::function<void(const v1::TokenChunk& chunk, Clock::time_point arrival)>;
// Runs on a gRPC thread once the call is over.
using DoneCallback = std::function<void(GenerateOutcome outcome)>;

// PEM files of a TLS connection. No ca: plaintext. ca: TLS, the server's certificate checked
// against it. cert + key as well: the client's certificate, for servers that require mutual TLS.
struct TlsFiles {
  std::string ca;
  std::string cert;
  std::string key;
};

// A channel to "HOST:PORT", plaintext or TLS as `tls` says; throws when a file cannot be read.
std::shared_ptr<grpc::Channel> make_channel(const std::string& address, const TlsFiles& tls = {});

// What `kvserve-cli load` drives: a Generate stream and the model's description, through gRPC
// (GenerationClient) or the OpenAI HTTP API (HttpGenerationClient, client/http_client.h).
class GenerateApi {
 public:
  virtual ~GenerateApi() = default;
  // Starts a Generate call and returns at once; on_done runs once it is over.
  virtual void StartGenerate(v1::GenerateRequest request, double timeout_s, ChunkCallback on_chunk,
                             DoneCallback on_done) = 0;
  virtual grpc::Status GetModelInfo(double timeout_s, v1::ModelInfo* info) = 0;
};

// timeout_s <= 0 means no deadline.
class GenerationClient final : public GenerateApi {
 public:
  explicit GenerationClient(const std::string& address, const TlsFiles& tls = {});
  explicit GenerationClient(std::shared_ptr<grpc::Channel> channel);

  // Starts a Generate stream and returns at once. It uses gRPC's callback API, so an open stream
  // holds no thread: hundreds of concurrent streams cost only their buffers. The client must
  // outlive every call it started (wait for on_done).
  void StartGenerate(v1::GenerateRequest request, double timeout_s, ChunkCallback on_chunk,
                     DoneCallback on_done) override;
  // StartGenerate, waiting for the outcome.
  GenerateOutcome Generate(v1::GenerateRequest request, double timeout_s,
                           ChunkCallback on_chunk = nullptr);

  // grpc.health.v1.Health/Check; service "" asks about the server as a whole.
  grpc::Status CheckHealth(const std::string& service, double timeout_s, ServingStatus* status);
  grpc::Status GetModelInfo(double timeout_s, v1::ModelInfo* info) override;
  grpc::Status GetCacheStats(double timeout_s, v1::CacheStats* stats);

 private:
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Generation::Stub> generation_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

// The code's name as the gRPC spec spells it, e.g. "RESOURCE_EXHAUSTED".
std::string status_code_name(grpc::StatusCode code);
// "CODE: message", for people.
std::string describe(const grpc::Status& status);
// For a call that failed to connect (UNAVAILABLE), which side refused the connection and why,
// from gRPC's TLS error text: the client refused the server's certificate (untrusted CA, name
// mismatch), the server refused the client (no client certificate, an untrusted one), or one
// side speaks TLS and the other plaintext. "" when the failure is not one of these. `tls`: whether
// this client connected with TLS (--tls-ca).
std::string explain_connection_failure(const grpc::Status& status, bool tls);
// A reply as JSON with the proto's field names, zero values included (so every field is there).
nlohmann::json to_json(const google::protobuf::Message& message);

}  // namespace kvserve::client
