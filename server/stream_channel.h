// The per-request channel from the engine thread to the gRPC stream that carries the request.
//
// The engine thread pushes; the stream's reactor pops. Pushing never blocks and the queue is
// bounded: once `capacity` messages wait, new tokens are merged into the last waiting chunk, so a
// client that stops reading costs at most one growing chunk (bounded by max_new_tokens), never an
// engine stall. After each push the channel pokes its listener (the reactor), which starts the
// next write if none is in flight: through a StreamWriter's thread when the channel has one (the
// server), else inline on the pushing thread. A pusher that writes to many channels at once (the
// engine thread, once per step) can collect the pokes in a StreamPokes and deliver them together.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "engine/engine.h"
#include "server/stream_writer.h"

namespace kvserve {

// Why a stream ended without a final message; the service maps it to a gRPC status code.
enum class StreamError { kNone, kInvalidArgument, kDeadlineExceeded, kInternal };

struct StreamFinal {
  FinishReason reason = FinishReason::kNone;  // kLength, kEos, kStop or kCancelled
  int prompt_tokens = 0;
  int completion_tokens = 0;
  double queue_seconds = 0;
  double ttft_seconds = 0;
  double total_seconds = 0;
  std::string matched_stop;
};

struct StreamMessage {
  enum class Kind { kChunk, kFinal, kError };
  Kind kind = Kind::kChunk;
  // kChunk
  std::vector<int32_t> token_ids;
  std::string text;  // valid UTF-8
  std::vector<float> logprobs;
  // kFinal
  StreamFinal final;
  // kError
  StreamError error = StreamError::kNone;
  std::string error_message;
};

// Implemented by the stream (the gRPC reactor): called after a push, on the channel's StreamWriter
// thread when it has one, else on the pushing thread.
class StreamListener {
 public:
  virtual ~StreamListener() = default;
  virtual void on_message_ready() = 0;
};

// Pokes collected from pushes and delivered together: all of one StreamWriter's go to its thread in
// one hand-off (one lock, at most one wake-up), rather than one per message, which at B = 256
// streams cost the engine thread a lock and often a futex wake per token. Pokes of channels without
// a writer run inline in deliver(). One thread owns it.
class StreamPokes {
 public:
  void add(StreamWriter* writer, std::weak_ptr<StreamListener> listener);
  // Pokes every listener added since the last call, in the order added.
  void deliver();
  bool empty() const { return pokes_.empty(); }

 private:
  std::vector<std::pair<StreamWriter*, std::weak_ptr<StreamListener>>> pokes_;
  std::vector<std::weak_ptr<StreamListener>> batch_;  // reused: one writer's share of pokes_
};

class StreamChannel {
 public:
  // `writer` (may be null: pokes run inline) must outlive the channel's pushes.
  explicit StreamChannel(size_t capacity, StreamWriter* writer = nullptr)
      : capacity_(capacity < 1 ? 1 : capacity), writer_(writer) {}

  // The listener is held weakly: a stream that is gone is simply not poked.
  void set_listener(std::weak_ptr<StreamListener> listener) {
    std::lock_guard<std::mutex> lock(mu_);
    listener_ = std::move(listener);
  }

  // Each push pokes the listener now, or, given `pokes`, adds the poke there for the caller to
  // deliver (soon: the message waits unseen until then).
  // Engine thread. Tokens of one step for this request; `text` may be empty (held back).
  void push_chunk(std::vector<int32_t> ids, std::string text, std::vector<float> logprobs,
                  StreamPokes* pokes = nullptr);
  // Engine thread. The end of the stream; nothing may be pushed after it.
  void push_final(const StreamFinal& final, StreamPokes* pokes = nullptr);
  void push_error(StreamError error, std::string message, StreamPokes* pokes = nullptr);

  // Any thread (the reactor). Returns false when nothing is waiting.
  bool pop(StreamMessage& out);
  size_t size() const {
    std::lock_guard<std::mutex> lock(mu_);
    return queue_.size();
  }

 private:
  // Called with mu_ held, right after a push: queues the poke in `pokes`, or returns the listener
  // to poke once mu_ is released.
  std::shared_ptr<StreamListener> poke_locked(StreamPokes* pokes);
  void notify(std::shared_ptr<StreamListener> listener);

  const size_t capacity_;
  StreamWriter* const writer_;
  mutable std::mutex mu_;
  std::deque<StreamMessage> queue_;
  std::weak_ptr<StreamListener> listener_;
};

}  // namespace kvserve
