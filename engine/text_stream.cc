#include "engine/text_stream.h"

#include <algorithm>
#include <utility>

namespace kvserve {
namespace {

// The earliest occurrence of any stop string in `text`; on a tie the longest string wins.
bool find_stop(const std::string& text, const std::vector<std::string>& stops, size_t& position,
               std::string& matched) {
  bool found = false;
  for (const std::string& stop : stops) {
    const size_t at = text.find(stop);
    if (at == std::string::npos) continue;
    if (!found || at < position || (at == position && stop.size() > matched.size())) {
      position = at;
      matched = stop;
      found = true;
    }
  }
  return found;
}

// How many trailing bytes of `text` could still be the start of a stop string. A proper prefix of
// a valid UTF-8 stop string starts at a character boundary, so the text before it is valid UTF-8.
size_t stop_prefix_length(const std::string& text, const std::vector<std::string>& stops) {
  size_t longest = 0;
  for (const std::string& stop : stops) {
    for (size_t k = std::min(stop.size() - 1, text.size()); k > longest; --k) {
      if (text.compare(text.size() - k, k, stop, 0, k) == 0) {
        longest = k;
        break;
      }
    }
  }
  return longest;
}

}  // namespace

TextStream::TextStream(const Tokenizer& tokenizer, std::vector<std::string> stops)
    : decoder_(tokenizer), stops_(std::move(stops)) {}

std::string TextStream::push(const StepEvent& event) {
  if (stopped_ || !event.has_token) return "";
  const bool ending_token =
      event.finish == FinishReason::kEos || event.finish == FinishReason::kStop;
  const bool last = event.finish != FinishReason::kNone;
  if (stops_.empty()) {  // nothing is ever held back: the decoded text is final
    std::string text = ending_token ? std::string() : decoder_.push(event.token);
    if (last) text += decoder_.finish();
    return text;
  }
  if (!ending_token) held_ += decoder_.push(event.token);
  if (last) held_ += decoder_.finish();

  std::string text;
  size_t position = 0;
  if (find_stop(held_, stops_, position, matched_stop_)) {
    text = held_.substr(0, position);
    held_.clear();
    stopped_ = true;
    return text;
  }
  const size_t keep = last ? 0 : stop_prefix_length(held_, stops_);
  text = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return text;
}

std::string TextStream::flush() {
  std::string rest = std::move(held_) + decoder_.finish();
  held_.clear();
  return rest;
}

}  // namespace kvserve
