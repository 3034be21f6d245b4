// Finds streams whose write has made no progress for too long: a client that stopped reading (or
// advertises an HTTP/2 window it never opens) would otherwise hold its stream slot, and its
// request's buffered output, for as long as its connection lives, since keepalive pings are still
// answered. One thread for the whole service checks every watched stream a few times per timeout.
#pragma once

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kvserve {

// Implemented by the stream (the gRPC reactor).
class WriteStallCheck {
 public:
  virtual ~WriteStallCheck() = default;
  // Watchdog thread. Cancels the call if a write has been in flight for `timeout` or longer;
  // returns false once the stream is over, and the watchdog forgets it.
  virtual bool check_write_stall(std::chrono::steady_clock::time_point now,
                                 std::chrono::steady_clock::duration timeout) = 0;
};

class WriteStallWatchdog {
 public:
  // timeout zero: never cancel (no thread).
  explicit WriteStallWatchdog(std::chrono::steady_clock::duration timeout);
  ~WriteStallWatchdog();  // joins the thread
  WriteStallWatchdog(const WriteStallWatchdog&) = delete;
  WriteStallWatchdog& operator=(const WriteStallWatchdog&) = delete;

  bool enabled() const { return timeout_ > std::chrono::steady_clock::duration::zero(); }
  // Any thread: check `stream` until it reports itself over. Held weakly.
  void watch(std::weak_ptr<WriteStallCheck> stream);

 private:
  void run();

  const std::chrono::steady_clock::duration timeout_;
  std::mutex mu_;
  std::condition_variable wake_;
  std::vector<std::weak_ptr<WriteStallCheck>> watched_;
  bool stop_ = false;
  std::thread thread_;  // last: starts once the members above exist
};

}  // namespace kvserve
