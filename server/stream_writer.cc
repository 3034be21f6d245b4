#include "server/stream_writer.h"

#include <utility>

#include "server/stream_channel.h"

namespace kvserve {

StreamWriter::StreamWriter() : thread_([this] { run(); }) {}

StreamWriter::~StreamWriter() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_one();
  thread_.join();
}

void StreamWriter::post(std::weak_ptr<StreamListener> listener) {
  bool was_empty = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    was_empty = pending_.empty();
    pending_.push_back(std::move(listener));
  }
  // A batch already pending will be taken whole; only the first poke needs to wake the thread.
  if (was_empty) wake_.notify_one();
}

void StreamWriter::post(const std::vector<std::weak_ptr<StreamListener>>& listeners) {
  if (listeners.empty()) return;
  bool was_empty = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    was_empty = pending_.empty();
    pending_.insert(pending_.end(), listeners.begin(), listeners.end());
  }
  if (was_empty) wake_.notify_one();
}

void StreamWriter::run() {
  std::vector<std::weak_ptr<StreamListener>> batch;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [this] { return stop_ || !pending_.empty(); });
      if (pending_.empty()) return;  // stopping, nothing left to deliver
      batch.swap(pending_);
    }
    // A stream poked twice in a batch (a chunk, then its final message) just pumps twice; the
    // second finds the write in flight or nothing waiting.
    for (const std::weak_ptr<StreamListener>& poked : batch) {
      if (std::shared_ptr<StreamListener> listener = poked.lock()) listener->on_message_ready();
    }
    batch.clear();
  }
}

}  // namespace kvserve
