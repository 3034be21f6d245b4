#include "server/stream_channel.h"

namespace kvserve {

void StreamChannel::push_chunk(std::vector<int32_t> ids, std::string text,
                               std::vector<float> logprobs) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (queue_.size() >= capacity_ && queue_.back().kind == StreamMessage::Kind::kChunk) {
      StreamMessage& last = queue_.back();
      last.token_ids.insert(last.token_ids.end(), ids.begin(), ids.end());
      last.text += text;
      last.logprobs.insert(last.logprobs.end(), logprobs.begin(), logprobs.end());
    } else {
      StreamMessage message;
      message.token_ids = std::move(ids);
      message.text = std::move(text);
      message.logprobs = std::move(logprobs);
      queue_.push_back(std::move(message));
    }
  }
  notify();
}

void StreamChannel::push_final(const StreamFinal& final) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    StreamMessage message;
    message.kind = StreamMessage::Kind::kFinal;
    message.final = final;
    queue_.push_back(std::move(message));
  }
  notify();
}

void StreamChannel::push_error(StreamError error, std::string text) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    StreamMessage message;
    message.kind = StreamMessage::Kind::kError;
    message.error = error;
    message.error_message = std::move(text);
    queue_.push_back(std::move(message));
  }
  notify();
}

bool StreamChannel::pop(StreamMessage& out) {
  std::lock_guard<std::mutex> lock(mu_);
  if (queue_.empty()) return false;
  out = std::move(queue_.front());
  queue_.pop_front();
  return true;
}

void StreamChannel::notify() {
  std::shared_ptr<StreamListener> listener;
  {
    std::lock_guard<std::mutex> lock(mu_);
    listener = listener_.lock();
  }
  if (!listener) return;
  if (writer_ != nullptr) {
    writer_->post(std::move(listener));
  } else {
    listener->on_message_ready();  // outside mu_: the listener pops from this channel
  }
}

}  // namespace kvserve
