// The kvserve.v1.Generation service on gRPC's callback API.
//
// Handlers never block and never touch the engine: Generate validates and converts the request,
// posts it to the EngineLoop and returns a reactor that drains the request's StreamChannel with
// one write in flight (the route_guide pattern); when the engine thread has pushed a message, the
// service's StreamWriter thread pokes the reactor, so gRPC writes never run on the engine thread.
// No exception crosses into gRPC: every failure is a grpc::Status.
//
// Generate is registered raw (bytes in, bytes out) and parses its request itself: a request gRPC
// cannot parse (invalid UTF-8 in a proto3 string field, malformed bytes) then gets INVALID_ARGUMENT
// with a reason, where gRPC's own parse failure answers UNIMPLEMENTED with an empty message.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

#include "engine/tokenizer.h"
#include "kvserve/v1/generation.grpc.pb.h"
#include "server/engine_loop.h"
#include "server/metrics.h"
#include "server/stream_writer.h"
#include "server/write_stall_watchdog.h"

namespace kvserve {

struct ServiceLimits {
  int max_concurrent_streams = 1024;
  int max_new_tokens = 0;              // 0: up to the model's context
  int max_prompt_tokens = 0;           // 0: up to the model's context
  size_t stream_buffer_messages = 64;  // per stream; beyond it tokens are merged into one chunk
  // A stream whose write has made no progress this long is cancelled (the client stopped
  // reading); 0: never.
  double write_stall_timeout_s = 60;
};

// Longest request_id accepted (bytes): it is echoed in every log line of its request.
constexpr size_t kMaxRequestIdBytes = 256;

// Converts `in` into `out` (all but arrival and deadline) and checks what needs no engine: a
// prompt, limits, sampling values, stop strings, the request_id's length; INVALID_ARGUMENT saying
// why, else OK. The engine thread checks the rest with Engine::validate(). No gRPC call or clock:
// fuzz/ drives it with any bytes.
grpc::Status convert_request(const v1::GenerateRequest& in, const Tokenizer& tokenizer,
                             const ServiceLimits& limits, int context_length, ServeRequest& out);

// Whether a call cancelled at `now` was cancelled because its deadline passed (the client's clock
// runs out a little before the server's, see the definition) rather than by the client.
// `arrival`: when the server got the call; `deadline`: the server's deadline for it (max: none).
bool cancel_is_deadline(std::chrono::system_clock::time_point arrival,
                        std::chrono::system_clock::time_point deadline,
                        std::chrono::system_clock::time_point now);

// The gRPC code's name as Prometheus labels and logs spell it, e.g. "RESOURCE_EXHAUSTED".
std::string status_code_name(grpc::StatusCode code);
// The gRPC status of a stream that ended without a final message (the HTTP API maps the same).
grpc::StatusCode to_code(StreamError error);

class GenerationService final
    : public v1::Generation::WithRawCallbackMethod_Generate<v1::Generation::CallbackService> {
 public:
  // write_done_delay: a test hook (`kvserve serve --test-write-done-delay-ms`, hidden): each
  // stream's OnWriteDone waits this long before it acts, as when gRPC's threads are starved of
  // CPU, so that the tests of cancellation races see them every time; zero in production.
  GenerationService(Metrics& metrics, ServiceLimits limits,
                    std::chrono::milliseconds write_done_delay = std::chrono::milliseconds(0));

  // Once the model is loaded and warm: from now on requests are served. `loop` and `tokenizer`
  // must outlive the server.
  void start_serving(EngineLoop& loop, const Tokenizer& tokenizer, v1::ModelInfo info);
  // New requests get UNAVAILABLE; streams in flight go on.
  void start_draining() { state_.store(State::kDraining); }
  // Generate calls not yet done (their last write may still be in flight).
  int open_streams() const { return open_streams_.load(); }

  // `request`: a serialized v1::GenerateRequest; the reactor writes serialized GenerateResponses.
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* GetCacheStats(grpc::CallbackServerContext* context,
                                          const v1::GetCacheStatsRequest* request,
                                          v1::CacheStats* response) override;

 private:
  class Stream;
  enum class State { kLoading, kServing, kDraining };

  // Why the service is not taking requests now, or OK.
  grpc::Status availability() const;
  // Converts and checks what can be checked without the engine; the engine thread checks the
  // rest (token ids, context length, pool size) with Engine::validate().
  grpc::Status convert(grpc::CallbackServerContext& context, const v1::GenerateRequest& in,
                       ServeRequest& out);
  grpc::Status reject(const std::string& request_id, const grpc::Status& status);
  // One of --max-concurrent-streams; false when all are taken. Every slot acquired is released
  // once: by the stream's OnDone, or by Generate when it fails before a stream exists.
  bool acquire_stream_slot();
  void release_stream_slot();

  Metrics& metrics_;
  const ServiceLimits limits_;
  std::atomic<State> state_{State::kLoading};
  // Set before state_ becomes kServing (release) and read after it is seen (acquire).
  EngineLoop* loop_ = nullptr;
  const Tokenizer* tokenizer_ = nullptr;
  v1::ModelInfo info_;
  std::atomic<int> open_streams_{0};
  std::atomic<uint64_t> next_request_number_{1};
  // The constructor's test hook.
  const std::chrono::milliseconds write_done_delay_;
  WriteStallWatchdog stall_watchdog_;
  StreamWriter writer_;  // outlives every stream: the server is shut down before the service goes
};

}  // namespace kvserve
