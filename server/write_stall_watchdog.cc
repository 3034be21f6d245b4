#include "server/write_stall_watchdog.h"

#include <algorithm>
#include <utility>

namespace kvserve {

WriteStallWatchdog::WriteStallWatchdog(std::chrono::steady_clock::duration timeout)
    : timeout_(timeout) {
  if (enabled()) thread_ = std::thread([this] { run(); });
}

WriteStallWatchdog::~WriteStallWatchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_one();
  if (thread_.joinable()) thread_.join();
}

void WriteStallWatchdog::watch(std::weak_ptr<WriteStallCheck> stream) {
  if (!enabled()) return;
  std::lock_guard<std::mutex> lock(mu_);
  watched_.push_back(std::move(stream));
}

void WriteStallWatchdog::run() {
  // A stall is found between 1 and 1.25 timeouts after its write started (at most 1 s late).
  const std::chrono::steady_clock::duration period =
      std::clamp<std::chrono::steady_clock::duration>(timeout_ / 4, std::chrono::milliseconds(10),
                                                      std::chrono::seconds(1));
  std::vector<std::weak_ptr<WriteStallCheck>> checking;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (wake_.wait_for(lock, period, [this] { return stop_; })) return;
      checking.swap(watched_);
    }
    // Outside mu_: a check may cancel a call, and new streams must not wait for that.
    const auto now = std::chrono::steady_clock::now();
    std::vector<std::weak_ptr<WriteStallCheck>> still_open;
    for (std::weak_ptr<WriteStallCheck>& weak : checking) {
      const std::shared_ptr<WriteStallCheck> stream = weak.lock();
      if (stream && stream->check_write_stall(now, timeout_)) still_open.push_back(std::move(weak));
    }
    checking.clear();
    std::lock_guard<std::mutex> lock(mu_);
    watched_.insert(watched_.end(), std::make_move_iterator(still_open.begin()),
                    std::make_move_iterator(still_open.end()));
  }
}

}  // namespace kvserve
