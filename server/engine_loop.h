// The engine thread: the one thread that owns the Engine (scheduler, KV pool, device).
//
// Any thread may submit() a request or cancel() one; both only append to the inbox (a mutex and a
// condition variable) and return at once. The engine thread drains the inbox, runs Engine::step(),
// turns each request's tokens into text (IncrementalDecoder: always valid UTF-8), applies stop
// strings across token boundaries, keeps the request's timings and pushes messages into the
// request's StreamChannel, whose listeners it pokes together once per pass (StreamPokes). When
// there is nothing to do it sleeps on the condition variable. Text and stop strings go through
// TextStream, as in `kvserve generate`. See engine/README.md for the whole contract.
//
// When the engine reports the device lost (Engine::device_lost), every request in flight ends
// with INTERNAL "device lost: ...", queued ones included, later submissions are refused
// (kDeviceLost), the thread calls EngineLoopOptions::on_device_lost once and ends: the process
// must restart.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <variant>
#include <vector>

#include "engine/engine.h"
#include "engine/text_stream.h"
#include "engine/tokenizer.h"
#include "server/metrics.h"
#include "server/stream_channel.h"

namespace kvserve {

using Clock = std::chrono::steady_clock;

// A request as the server hands it to the engine thread (no protobuf types).
struct ServeRequest {
  std::string id;  // the client's request_id, or one the server made up; for logs
  GenerationRequest generation;
  std::vector<std::string> stop;  // non-empty stop strings
  bool return_logprobs = false;
  Clock::time_point arrival;
  std::optional<Clock::time_point> deadline;
};

// What the engine thread publishes after every step, for handlers to read without touching it.
struct EngineSnapshot {
  CacheUsage cache;
  size_t running = 0;
  size_t waiting = 0;
};

// The engine thread's name (at most 15 characters, Linux's limit).
inline constexpr char kEngineThreadName[] = "kvserve-engine";

struct EngineLoopOptions {
  size_t max_queued_requests = 256;  // inbox + engine waiting queue; beyond: RESOURCE_EXHAUSTED
  // Called once on the engine thread when the device is lost, after every request in flight has
  // been told, with Engine::device_lost()'s message. Must not block or call back into the loop.
  std::function<void(const std::string&)> on_device_lost;
  // Test hook (`kvserve serve --test-engine-pause-ms`, hidden): the engine thread pauses this long
  // after each step's messages, before it reads its inbox again, so that the tests of timing races
  // see them every time; zero in production.
  std::chrono::milliseconds pause_after_step{0};
};

class EngineLoop {
 public:
  EngineLoop(std::unique_ptr<Engine> engine, Tokenizer tokenizer, EngineLoopOptions options,
             Metrics& metrics);
  ~EngineLoop();  // stops the thread

  // Starts the engine thread, which first runs one tiny generation (warm-up: first-touch of the
  // weights and the pool, lazy initialisation in the backend), then serves the inbox.
  void start();
  // Blocks until the warm-up is done; throws what the warm-up threw.
  void wait_until_warm();
  // Finishes the thread; requests still in flight get nothing more (call cancel_all() first).
  void stop();

  using Ticket = uint64_t;
  enum class SubmitResult { kAccepted, kQueueFull, kDeviceLost };
  // Any thread; never blocks on the engine. On kAccepted, `ticket` names the request for cancel().
  SubmitResult submit(ServeRequest request, std::shared_ptr<StreamChannel> channel, Ticket& ticket);
  // Any thread: the client went away (or its deadline passed: `deadline`). The request leaves
  // the batch at the next step and its blocks return to the pool; a client that went away gets
  // nothing more, an expired one a kDeadlineExceeded error.
  void cancel(Ticket ticket, bool deadline = false);
  // Any thread: ends every request with finish reason CANCELLED (the drain deadline passed).
  void cancel_all();

  // Requests submitted and not yet finished. It drops before a request's last message goes to its
  // channel, so a client that has read the end of its stream never sees itself still counted.
  size_t in_flight() const { return in_flight_.load(); }
  EngineSnapshot snapshot() const;
  // Any thread: why the device was lost, or "" while it works.
  std::string device_lost() const;

 private:
  struct Submission {
    Ticket ticket = 0;
    ServeRequest request;
    std::shared_ptr<StreamChannel> channel;
  };
  struct Cancellation {
    Ticket ticket = 0;
    bool deadline = false;  // the deadline passed, rather than the client going away
  };
  struct CancelAll {};
  using InboxItem = std::variant<Submission, Cancellation, CancelAll>;

  // Why the server, rather than the engine, ended a request: decides what the stream is told once
  // the engine has freed the request's blocks. A matched stop string needs none: the request's
  // TextStream knows it.
  enum class Cancelled { kNo, kClientGone, kDeadline, kDrain };

  struct Active {
    Active(const Tokenizer& tokenizer, Ticket ticket, ServeRequest request,
           std::shared_ptr<StreamChannel> channel);
    Ticket ticket = 0;
    ServeRequest request;
    std::shared_ptr<StreamChannel> channel;
    TextStream text;
    int completion_tokens = 0;
    std::optional<Clock::time_point> admitted, first_token, last_token;
    Cancelled cancelled = Cancelled::kNo;
    bool ending = false;  // the engine has been asked to end it (stop string or cancellation)
  };

  void run();
  void warm_up();
  void process_inbox(std::deque<InboxItem>& items);
  void admit(Submission& submission);
  void end_in_engine(RequestId id, Active& active, Cancelled why);
  void expire_deadlines(Clock::time_point now);
  void step();
  void on_token(RequestId id, Active& active, const StepEvent& event, Clock::time_point now);
  void on_finish(Active& active, const StepEvent& event, Clock::time_point now);
  // Tells the stream how `active` ended and counts it; returns the outcome for the log line.
  std::string report_end(Active& active, const StepEvent& event, const StreamFinal& timings);
  void publish_snapshot();
  void update_throughput(Clock::time_point now);
  // The engine has lost the device (in the step that just ran): refuses new submissions and
  // reports the loss, before any message of that step goes out.
  void close_after_device_lost();
  // Then, as the thread ends: fails the submissions still in the inbox.
  void fail_inbox_after_device_lost();

  std::unique_ptr<Engine> engine_;
  Tokenizer tokenizer_;
  EngineLoopOptions options_;
  Metrics& metrics_;

  // guards inbox_, stop_, warm_*, queued_in_engine_, snapshot_, device_lost_
  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::condition_variable warm_cv_;
  std::deque<InboxItem> inbox_;
  bool stop_ = false;
  bool warm_ = false;
  std::string warm_error_;
  size_t queued_in_engine_ = 0;
  EngineSnapshot snapshot_;
  std::string device_lost_;
  std::atomic<size_t> in_flight_{0};
  Ticket next_ticket_ = 1;

  // Engine thread only.
  std::unordered_map<RequestId, Active> active_;
  std::unordered_map<Ticket, RequestId> by_ticket_;
  std::deque<std::pair<Clock::time_point, int>> recent_tokens_;  // the throughput window
  std::vector<StepEvent> events_;
  StreamPokes pokes_;  // every push of the engine thread pokes through it; delivered once a pass
  std::thread thread_;
};

}  // namespace kvserve
