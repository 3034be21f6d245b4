// The GPT-2 byte-level BPE tokenizer, token for token equal to Hugging Face's GPT2TokenizerFast.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace kvserve {

// Immutable after loading; encode/decode are const and safe to call from several threads at once.
// Copies are cheap and share the loaded tables.
//
// Input that is not valid UTF-8 (which Hugging Face cannot even receive) still encodes, so that
// decode(encode(bytes)) == bytes for any bytes: every maximal run of invalid UTF-8 bytes is cut out
// as a word of its own, and the valid text between such runs is pre-tokenized as if the run were
// the end of one text and the start of the next.
class Tokenizer {
 public:
  // Loads vocab.json + merges.txt; throws std::runtime_error naming the file and the problem
  // (missing file, bad JSON, malformed merge line, merge of unknown tokens...).
  static Tokenizer load(const std::string& vocab_json_path, const std::string& merges_txt_path);
  static Tokenizer from_model_dir(const std::string& dir);  // dir/vocab.json, dir/merges.txt

  // Encodes like Hugging Face GPT2TokenizerFast.encode: the literal "<|endoftext|>" becomes the
  // special token id; everything else goes through the GPT-2 pre-tokenizer regex and byte-level
  // BPE.
  std::vector<int32_t> encode(std::string_view text) const;
  // Same without special-token recognition (tiktoken's encode_ordinary).
  std::vector<int32_t> encode_ordinary(std::string_view text) const;
  // Exact bytes; throws std::out_of_range on a bad id.
  std::string decode(const std::vector<int32_t>& ids) const;
  // Raw bytes of one token; throws std::out_of_range on a bad id.
  const std::string& token_bytes(int32_t id) const;
  int32_t vocab_size() const;
  int32_t eos_token_id() const;  // id of "<|endoftext|>" (50256 for GPT-2)

 private:
  struct Tables;

  explicit Tokenizer(std::shared_ptr<const Tables> tables);
  void encode_ordinary_into(std::string_view text, std::vector<int32_t>& out) const;

  std::shared_ptr<const Tables> tables_;
};

// Streaming detokenizer: each push returns only complete, valid UTF-8; bytes of a character split
// across tokens are held until complete. A byte sequence that can never become valid UTF-8 is
// emitted as U+FFFD, one per maximal invalid subpart (as Python's errors="replace"). finish()
// flushes the rest (an incomplete character -> U+FFFD) and leaves the decoder ready for reuse.
class IncrementalDecoder {
 public:
  explicit IncrementalDecoder(const Tokenizer& tokenizer);
  std::string push(int32_t id);
  std::string finish();

 private:
  const Tokenizer* tokenizer_;
  std::string pending_;  // the bytes of a character that may still be completed
};

}  // namespace kvserve
