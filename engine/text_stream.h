// The text of one request's generated tokens, as it is streamed: incremental detokenization
// (always valid UTF-8) and stop strings matched across token boundaries. Text that may still be the
// start of a stop string is held back until a later token decides. The server's engine loop and
// `kvserve generate` both stream through it, so they end and print a completion alike.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/tokenizer.h"

namespace kvserve {

class TextStream {
 public:
  // `tokenizer` must outlive the stream; `stops`: non-empty stop strings.
  TextStream(const Tokenizer& tokenizer, std::vector<std::string> stops);

  // The text that is final after `event`'s token (possibly empty). The token that ends generation
  // by itself (EOS, a stop token id) counts as an id but never as text, as a matched stop string
  // does not; when `event` finishes the request, nothing is held back. Once a stop string has
  // matched, returns the text before it and then nothing more: the caller ends the request.
  std::string push(const StepEvent& event);
  // The request ended early (cancelled, drained): the held-back text, which can no longer match.
  std::string flush();

  bool stopped() const { return stopped_; }
  const std::string& matched_stop() const { return matched_stop_; }

 private:
  IncrementalDecoder decoder_;
  std::vector<std::string> stops_;
  std::string held_;  // decoded text that may be the start of a stop string
  bool stopped_ = false;
  std::string matched_stop_;
};

}  // namespace kvserve
