// Delivers StreamChannel pokes on a thread of its own, so that the engine thread never starts a
// gRPC write. ServerWriteReactor::StartWrite can run gRPC's whole write path inline (serialising
// the message, HTTP/2 framing, even the socket write for the connection); on the engine thread
// that cost per token per stream sits between two GPU steps. Here it overlaps them.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kvserve {

class StreamListener;

class StreamWriter {
 public:
  StreamWriter();   // starts the thread
  ~StreamWriter();  // delivers what is pending, then joins the thread
  StreamWriter(const StreamWriter&) = delete;
  StreamWriter& operator=(const StreamWriter&) = delete;

  // Any thread, never blocks on a listener: `listener->on_message_ready()` runs soon on the
  // writer thread, unless the listener is gone by then.
  void post(std::weak_ptr<StreamListener> listener);
  // Same for each of `listeners`, in order, with one lock and at most one wake-up.
  void post(const std::vector<std::weak_ptr<StreamListener>>& listeners);

 private:
  void run();

  std::mutex mu_;
  std::condition_variable wake_;
  std::vector<std::weak_ptr<StreamListener>> pending_;
  bool stop_ = false;
  std::thread thread_;  // last: starts once the members above exist
};

}  // namespace kvserve
