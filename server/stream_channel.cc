#include "server/stream_channel.h"

namespace kvserve {

void StreamPokes::add(StreamWriter* writer, std::weak_ptr<StreamListener> listener) {
  pokes_.emplace_back(writer, std::move(listener));
}

void StreamPokes::deliver() {
  for (size_t i = 0; i < pokes_.size(); ++i) {
    auto& [writer, listener] = pokes_[i];
    if (writer == nullptr) {
      if (std::shared_ptr<StreamListener> live = listener.lock()) live->on_message_ready();
      continue;
    }
    batch_.push_back(std::move(listener));
    // A run of pokes for one writer (usually all of them: the server has one) goes in one post.
    if (i + 1 == pokes_.size() || pokes_[i + 1].first != writer) {
      writer->post(batch_);
      batch_.clear();
    }
  }
  pokes_.clear();
}

void StreamChannel::push_chunk(std::vector<int32_t> ids, std::string text,
                               std::vector<float> logprobs, StreamPokes* pokes) {
  std::shared_ptr<StreamListener> listener;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (queue_.size() >= capacity_ && queue_.back().kind == StreamMessage::Kind::kChunk) {
      StreamMessage& last = queue_.back();
      last.token_ids.insert(last.token_ids.end(), ids.begin(), ids.end());
      last.text += text;
      last.logprobs.insert(last.logprobs.end(), logprobs.begin(), logprobs.end());
    } else {
      StreamMessage& message = queue_.emplace_back();
      message.token_ids = std::move(ids);
      message.text = std::move(text);
      message.logprobs = std::move(logprobs);
    }
    listener = poke_locked(pokes);
  }
  notify(std::move(listener));
}

void StreamChannel::push_final(const StreamFinal& final, StreamPokes* pokes) {
  std::shared_ptr<StreamListener> listener;
  {
    std::lock_guard<std::mutex> lock(mu_);
    StreamMessage message;
    message.kind = StreamMessage::Kind::kFinal;
    message.final = final;
    queue_.push_back(std::move(message));
    listener = poke_locked(pokes);
  }
  notify(std::move(listener));
}

void StreamChannel::push_error(StreamError error, std::string text, StreamPokes* pokes) {
  std::shared_ptr<StreamListener> listener;
  {
    std::lock_guard<std::mutex> lock(mu_);
    StreamMessage message;
    message.kind = StreamMessage::Kind::kError;
    message.error = error;
    message.error_message = std::move(text);
    queue_.push_back(std::move(message));
    listener = poke_locked(pokes);
  }
  notify(std::move(listener));
}

bool StreamChannel::pop(StreamMessage& out) {
  std::lock_guard<std::mutex> lock(mu_);
  if (queue_.empty()) return false;
  out = std::move(queue_.front());
  queue_.pop_front();
  return true;
}

std::shared_ptr<StreamListener> StreamChannel::poke_locked(StreamPokes* pokes) {
  if (pokes != nullptr) {
    pokes->add(writer_, listener_);
    return nullptr;
  }
  return listener_.lock();
}

void StreamChannel::notify(std::shared_ptr<StreamListener> listener) {
  if (!listener) return;
  if (writer_ != nullptr) {
    writer_->post(std::move(listener));
  } else {
    listener->on_message_ready();  // outside mu_: the listener pops from this channel
  }
}

}  // namespace kvserve
