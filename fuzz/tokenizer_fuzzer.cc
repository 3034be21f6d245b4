// The tokenizer on arbitrary bytes: decode(encode(bytes)) == bytes (the contract that lets any
// prompt through, valid UTF-8 or not), and the streaming decoder, fed the same bytes read as token
// ids, emits only valid UTF-8 whatever the ids are.
#include <cstdlib>
#include <string>
#include <string_view>

#include "fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using kvserve::fuzz::valid_utf8;
  const kvserve::Tokenizer& tokenizer = kvserve::fuzz::tokenizer();
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  if (tokenizer.decode(tokenizer.encode(text)) != text) std::abort();
  if (tokenizer.decode(tokenizer.encode_ordinary(text)) != text) std::abort();

  kvserve::IncrementalDecoder decoder(tokenizer);
  const auto vocab = static_cast<uint32_t>(tokenizer.vocab_size());
  for (size_t i = 0; i + 1 < size; i += 2) {
    const auto id = static_cast<int32_t>((data[i] | (data[i + 1] << 8)) % vocab);
    if (!valid_utf8(decoder.push(id))) std::abort();
  }
  if (!valid_utf8(decoder.finish())) std::abort();
  return 0;
}
