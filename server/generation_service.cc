#include "server/generation_service.h"
#include <absl/status/status.h>

#include <spdlog/spdlog.h>

#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "engine/sampler.h"

namespace kvserve {

grpc::StatusCode to_code(StreamError error) {
  switch (error) {
    case StreamError::kInvalidArgument:
      return grpc::StatusCode::INVALID_ARGUMENT;
    case StreamError::kDeadlineExceeded:
      return grpc::StatusCode::DEADLINE_EXCEEDED;
    default:
      return grpc::StatusCode::INTERNAL;
  }
}

std::string status_code_name(grpc::StatusCode code) {
  // gRPC's status codes are absl's, number for number.
  const std::string name = absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  return name.empty() ? "CODE_" + std::to_string(static_cast<int>(code)) : name;
}

namespace {

v1::FinishReason to_proto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case FinishReason::kEos:
      return v1::FINISH_REASON_EOS;
    case FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    default:
      return v1::FINISH_REASON_UNSPECIFIED;
  }
}

}  // namespace

bool cancel_is_deadline(std::chrono::system_clock::time_point arrival,
                        std::chrono::system_clock::time_point deadline,
                        std::chrono::system_clock::time_point now) {
  if (deadline == std::chrono::system_clock::time_point::max()) return false;
  // The client's deadline passes before the server's: the server counts its timeout from when the
  // request arrived, and gRPC rounds a timeout up on the wire (to 3 significant digits). The
  // client's cancellation then arrives just before the server's own deadline.
  const auto slack = std::chrono::milliseconds(100) + (deadline - arrival) / 50;
  return now + slack >= deadline;
}

namespace {

// A stream that ends before it starts (rejected request).
class RejectedStream final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  explicit RejectedStream(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

}  // namespace

// One Generate call. Owned by a shared_ptr to itself until OnDone, so that the writer thread,
// which holds it weakly through the channel, can still poke it safely while gRPC finishes.
//
// Every path ends in exactly one Finish (or StartWriteAndFinish), and gRPC then calls OnDone, which
// gives the stream slot back: a cancellation before the first write or between writes finishes at
// once; one that comes while a write is in flight finishes when that write is done, whether gRPC
// reports it failed or (it was already on its way) succeeded; after the final message there is
// nothing left to finish.
class GenerationService::Stream final : public grpc::ServerWriteReactor<grpc::ByteBuffer>,
                                        public StreamListener,
                                        public WriteStallCheck {
 public:
  Stream(GenerationService& service, grpc::CallbackServerContext& context, size_t buffer)
      : service_(service),
        context_(context),
        arrival_(std::chrono::system_clock::now()),
        channel_(std::make_shared<StreamChannel>(buffer, &service.writer_)) {}

  // Called once, right after construction, with the owning pointer.
  void start(std::shared_ptr<Stream> self, ServeRequest request) {
    self_ = self;
    id_ = request.id;
    channel_->set_listener(self);
    const auto result = service_.loop_->submit(std::move(request), channel_, ticket_);
    std::lock_guard<std::mutex> lock(mu_);
    if (result == EngineLoop::SubmitResult::kQueueFull) {
      finish_locked(service_.reject(
          id_, grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                            "the request queue is full (--max-queued-requests); retry with "
                            "backoff or add replicas")));
      return;
    }
    if (result == EngineLoop::SubmitResult::kDeviceLost) {
      finish_locked(service_.reject(
          id_, grpc::Status(grpc::StatusCode::UNAVAILABLE,
                            "the device failed (device lost) and this server is restarting; "
                            "retry on another replica")));
      return;
    }
    submitted_ = true;
    pump_locked();
    service_.stall_watchdog_.watch(self);
  }

  void on_message_ready() override {
    std::lock_guard<std::mutex> lock(mu_);
    pump_locked();
  }

  void OnWriteDone(bool ok) override {
    if (service_.write_done_delay_.count() > 0) {
      std::this_thread::sleep_for(service_.write_done_delay_);
    }
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    write_started_.reset();
    // A write already on its way when the call was cancelled can still succeed; then no OnCancel
    // is left to finish the stream, and the engine sends nothing more to a cancelled request.
    if (!ok || cancelled_) {  // OnCancel tells the engine
      finish_locked(grpc::Status::CANCELLED);
      return;
    }
    pump_locked();
  }

  void OnCancel() override {
    bool submitted = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_ = true;
      submitted = submitted_;
      if (!writing_) finish_locked(grpc::Status::CANCELLED);
    }
    if (submitted) {
      service_.loop_->cancel(ticket_, cancel_is_deadline(arrival_, context_.deadline(),
                                                         std::chrono::system_clock::now()));
    }
  }

  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;  // context_ is gone now
    }
    service_.release_stream_slot();
    std::shared_ptr<Stream> last = std::move(self_);  // may delete this when `last` goes
  }

  bool check_write_stall(std::chrono::steady_clock::time_point now,
                         std::chrono::steady_clock::duration timeout) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (done_) return false;
    if (write_started_ && now - *write_started_ >= timeout && !stall_cancelled_) {
      stall_cancelled_ = true;
      spdlog::warn(
          "request {}: no write progress for {:.1f} s, the client stopped reading; cancelling its "
          "stream (--write-stall-timeout-s)",
          id_, std::chrono::duration<double>(now - *write_started_).count());
      // gRPC runs OnCancel and the failed write's OnWriteDone on its own threads, not inline.
      context_.TryCancel();
    }
    return true;
  }

 private:
  // Starts the next write if none is in flight and a message waits.
  void pump_locked() {
    if (finished_ || writing_ || cancelled_) return;
    StreamMessage message;
    if (!channel_->pop(message)) return;
    response_.Clear();
    switch (message.kind) {
      case StreamMessage::Kind::kChunk: {
        v1::TokenChunk* chunk = response_.mutable_chunk();
        chunk->mutable_token_ids()->Add(message.token_ids.begin(), message.token_ids.end());
        chunk->set_text(std::move(message.text));
        chunk->mutable_logprobs()->Add(message.logprobs.begin(), message.logprobs.end());
        if (!serialize_response()) break;
        writing_ = true;
        write_started_ = std::chrono::steady_clock::now();
        StartWrite(&wire_);
        break;
      }
      case StreamMessage::Kind::kFinal: {
        const StreamFinal& in = message.final;
        v1::GenerateFinal* final = response_.mutable_final();
        final->set_finish_reason(to_proto(in.reason));
        final->set_prompt_tokens(static_cast<uint32_t>(in.prompt_tokens));
        final->set_completion_tokens(static_cast<uint32_t>(in.completion_tokens));
        final->set_queue_seconds(in.queue_seconds);
        final->set_time_to_first_token_seconds(in.ttft_seconds);
        final->set_total_seconds(in.total_seconds);
        final->set_matched_stop(in.matched_stop);
        if (!serialize_response()) break;
        finished_ = true;
        write_started_ = std::chrono::steady_clock::now();
        StartWriteAndFinish(&wire_, grpc::WriteOptions(), grpc::Status::OK);
        break;
      }
      case StreamMessage::Kind::kError:
        finish_locked(grpc::Status(to_code(message.error), message.error_message));
        break;
    }
  }

  // response_ into wire_, the bytes gRPC writes; on failure (never expected) ends the stream.
  bool serialize_response() {
    bool own_buffer = false;
    wire_.Clear();  // the previous message's; gRPC serializes only into an empty buffer
    if (grpc::SerializationTraits<v1::GenerateResponse>::Serialize(response_, &wire_, &own_buffer)
            .ok()) {
      return true;
    }
    finish_locked(grpc::Status(grpc::StatusCode::INTERNAL, "cannot serialize a response"));
    return false;
  }

  void finish_locked(const grpc::Status& status) {
    if (finished_) return;
    finished_ = true;
    Finish(status);
  }

  GenerationService& service_;
  grpc::CallbackServerContext& context_;  // valid until OnDone
  const std::chrono::system_clock::time_point arrival_;
  std::shared_ptr<StreamChannel> channel_;
  std::shared_ptr<Stream> self_;
  std::string id_;  // the request's, for logs
  EngineLoop::Ticket ticket_ = 0;
  // Reactions, engine-thread pokes (through the writer thread) and the stall watchdog may run
  // concurrently; all of the state below is theirs.
  std::mutex mu_;
  bool submitted_ = false;
  bool writing_ = false;    // a StartWrite not yet done
  bool finished_ = false;   // Finish or StartWriteAndFinish called
  bool cancelled_ = false;  // OnCancel ran
  bool done_ = false;       // OnDone ran
  bool stall_cancelled_ = false;
  std::optional<std::chrono::steady_clock::time_point> write_started_;  // of the write in flight
  v1::GenerateResponse response_;
  grpc::ByteBuffer wire_;  // response_ serialized, alive until its write is done
};

GenerationService::GenerationService(Metrics& metrics, ServiceLimits limits,
                                     std::chrono::milliseconds write_done_delay)
    : metrics_(metrics),
      limits_(limits),
      write_done_delay_(write_done_delay),
      stall_watchdog_(std::chrono::duration_cast<std::chrono::steady_clock::duration>(
          std::chrono::duration<double>(limits.write_stall_timeout_s))) {}

void GenerationService::start_serving(EngineLoop& loop, const Tokenizer& tokenizer,
                                      v1::ModelInfo info) {
  loop_ = &loop;
  tokenizer_ = &tokenizer;
  info_ = std::move(info);
  state_.store(State::kServing, std::memory_order_release);
}

grpc::Status GenerationService::availability() const {
  switch (state_.load(std::memory_order_acquire)) {
    case State::kLoading:
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "the server is loading the model; retry when health says SERVING");
    case State::kDraining:
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "the server is shutting down; retry on another replica");
    case State::kServing:
      break;
  }
  return grpc::Status::OK;
}

bool GenerationService::acquire_stream_slot() {
  if (open_streams_.fetch_add(1) >= limits_.max_concurrent_streams) {
    --open_streams_;
    return false;
  }
  metrics_.stream_opened();
  return true;
}

void GenerationService::release_stream_slot() {
  --open_streams_;
  metrics_.stream_closed();
}

grpc::Status GenerationService::reject(const std::string& request_id, const grpc::Status& status) {
  spdlog::warn("request {} rejected: {}: {}", request_id, status_code_name(status.error_code()),
               status.error_message());
  metrics_.count_failure(status_code_name(status.error_code()));
  return status;
}

grpc::Status convert_request(const v1::GenerateRequest& in, const Tokenizer& tokenizer,
                             const ServiceLimits& limits, int context_length, ServeRequest& out) {
  const auto invalid = [](const std::string& message) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, message);
  };
  if (in.request_id().size() > kMaxRequestIdBytes) {
    return invalid("request_id has " + std::to_string(in.request_id().size()) +
                   " bytes, more than the limit of " + std::to_string(kMaxRequestIdBytes));
  }
  switch (in.input_case()) {
    case v1::GenerateRequest::kPrompt:
      if (in.prompt().empty()) return invalid("prompt is empty: give at least one character");
      out.generation.prompt = tokenizer.encode(in.prompt());
      break;
    case v1::GenerateRequest::kPromptTokenIds:
      if (in.prompt_token_ids().ids().empty()) {
        return invalid("prompt_token_ids is empty: give at least one token id");
      }
      out.generation.prompt.assign(in.prompt_token_ids().ids().begin(),
                                   in.prompt_token_ids().ids().end());
      break;
    case v1::GenerateRequest::INPUT_NOT_SET:
      return invalid("no prompt: set exactly one of prompt (text) or prompt_token_ids");
  }
  const int max_prompt = limits.max_prompt_tokens > 0 ? limits.max_prompt_tokens : context_length;
  if (out.generation.prompt.size() > static_cast<size_t>(max_prompt)) {
    return invalid("the prompt has " + std::to_string(out.generation.prompt.size()) +
                   " tokens, more than this server's limit of " + std::to_string(max_prompt) +
                   " (--max-prompt-tokens); shorten it");
  }

  const v1::SamplingParams& sampling = in.sampling();
  SamplingParams& params = out.generation.sampling;
  if (sampling.has_temperature()) params.temperature = sampling.temperature();
  if (sampling.has_top_k()) params.top_k = sampling.top_k();
  if (sampling.has_top_p()) params.top_p = sampling.top_p();
  if (sampling.has_repetition_penalty()) params.repetition_penalty = sampling.repetition_penalty();
  if (sampling.has_seed()) params.seed = sampling.seed();
  if (const absl::Status problem = validate(params); !problem.ok()) {
    return invalid(std::string(problem.message()));
  }

  const v1::StoppingCriteria& stopping = in.stopping();
  const int max_new = limits.max_new_tokens > 0 ? limits.max_new_tokens : context_length;
  if (stopping.has_max_new_tokens()) {
    if (stopping.max_new_tokens() == 0) return invalid("max_new_tokens must be at least 1");
    if (stopping.max_new_tokens() > static_cast<uint32_t>(max_new)) {
      return invalid("max_new_tokens " + std::to_string(stopping.max_new_tokens()) +
                     " exceeds this server's limit of " + std::to_string(max_new) +
                     " (--max-new-tokens-limit)");
    }
    out.generation.max_new_tokens = static_cast<int>(stopping.max_new_tokens());
  }
  for (const std::string& stop : stopping.stop()) {
    if (stop.empty()) return invalid("stop strings must not be empty");
    out.stop.push_back(stop);
  }
  out.generation.stop_token_ids.assign(stopping.stop_token_ids().begin(),
                                       stopping.stop_token_ids().end());
  out.generation.ignore_eos = stopping.ignore_eos();
  out.return_logprobs = in.return_logprobs();

  return grpc::Status::OK;
}

grpc::Status GenerationService::convert(grpc::CallbackServerContext& context,
                                        const v1::GenerateRequest& in, ServeRequest& out) {
  out.arrival = Clock::now();
  const grpc::Status status =
      convert_request(in, *tokenizer_, limits_, info_.context_length(), out);
  if (!status.ok()) return status;
  // gRPC cancels the call at its deadline too; the engine thread also checks it between steps.
  const auto deadline = context.deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    out.deadline = out.arrival + std::chrono::duration_cast<Clock::duration>(
                                     deadline - std::chrono::system_clock::now());
  }
  return grpc::Status::OK;
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* GenerationService::Generate(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* raw_request) {
  metrics_.count_request("grpc");
  v1::GenerateRequest parsed;
  grpc::ByteBuffer bytes(*raw_request);  // a reference to the same slices; parsing consumes it
  if (!grpc::SerializationTraits<v1::GenerateRequest>::Deserialize(&bytes, &parsed).ok()) {
    return new RejectedStream(reject(
        "req-" + std::to_string(next_request_number_++),
        grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                     "the request is not a valid GenerateRequest: malformed, or a string field "
                     "(prompt, request_id, a stop string) is not valid UTF-8; send other bytes "
                     "as prompt_token_ids")));
  }
  const v1::GenerateRequest* request = &parsed;
  std::string id = request->request_id();
  if (id.empty()) id = "req-" + std::to_string(next_request_number_++);
  // Too long to log whole; convert() refuses it below, the log shows its start.
  if (id.size() > kMaxRequestIdBytes) id = id.substr(0, 32) + "...";
  bool slot_to_release = false;  // acquired and not yet owned by a stream
  try {
    if (grpc::Status status = availability(); !status.ok()) {
      return new RejectedStream(reject(id, status));
    }
    if (!acquire_stream_slot()) {
      return new RejectedStream(
          reject(id, grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                  "too many concurrent streams (--max-concurrent-streams " +
                                      std::to_string(limits_.max_concurrent_streams) +
                                      "); retry with backoff")));
    }
    slot_to_release = true;
    ServeRequest serve;
    serve.id = id;
    if (grpc::Status status = convert(*context, *request, serve); !status.ok()) {
      slot_to_release = false;
      release_stream_slot();
      return new RejectedStream(reject(id, status));
    }
    auto stream = std::make_shared<Stream>(*this, *context, limits_.stream_buffer_messages);
    slot_to_release = false;  // the stream's OnDone releases it
    stream->start(stream, std::move(serve));
    return stream.get();
  } catch (const std::exception& e) {  // e.g. bad_alloc: fail this call, keep the server
    if (slot_to_release) release_stream_slot();
    return new RejectedStream(reject(
        id, grpc::Status(grpc::StatusCode::INTERNAL, std::string("internal error: ") + e.what())));
  }
}

grpc::ServerUnaryReactor* GenerationService::GetModelInfo(grpc::CallbackServerContext* context,
                                                          const v1::GetModelInfoRequest*,
                                                          v1::ModelInfo* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (state_.load(std::memory_order_acquire) == State::kLoading) {
    reactor->Finish(availability());
    return reactor;
  }
  *response = info_;
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::GetCacheStats(grpc::CallbackServerContext* context,
                                                           const v1::GetCacheStatsRequest*,
                                                           v1::CacheStats* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (state_.load(std::memory_order_acquire) == State::kLoading) {
    reactor->Finish(availability());
    return reactor;
  }
  const CacheUsage usage = loop_->snapshot().cache;
  response->set_blocks_total(usage.blocks_total);
  response->set_blocks_used(usage.blocks_used);
  response->set_capacity_bytes(usage.capacity_bytes);
  response->set_used_bytes(usage.used_bytes);
  response->set_tokens(usage.tokens);
  response->set_sequences(usage.sequences);
  response->set_fp16_equivalent_bytes(usage.fp16_equivalent_bytes);
  response->set_compression_ratio(usage.compression_ratio());
  response->set_code_bytes(usage.code_bytes);
  response->set_param_bytes(usage.param_bytes);
  response->set_residual_bytes(usage.residual_bytes);
  response->set_slack_bytes(usage.slack_bytes);
  response->set_usage_ratio(usage.usage_ratio());
  response->set_prefix_cache_pages(usage.cached_pages);
  response->set_prefix_cache_evictable_pages(usage.evictable_pages);
  response->set_prefix_cache_queries(usage.prefix_cache_queries);
  response->set_prefix_cache_hits(usage.prefix_cache_hits);
  response->set_kv_format(info_.kv_format());
  response->set_kv_params(info_.kv_params());
  response->set_kv_residual_format(info_.kv_residual_format());
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace kvserve
