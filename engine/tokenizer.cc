#include "engine/tokenizer.h"

#include <pcre2.h>

#include <algorithm>
#include <array>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <unordered_map>
#include <utility>

#include "common/text_io.h"

namespace kvserve {
namespace {

constexpr std::string_view kEndOfText = "<|endoftext|>";

// The Unicode White_Space set, which is what Python's regex module (slow tokenizer) and Oniguruma
// (fast tokenizer) mean by \s. PCRE2 10.42's \s under UCP also matches U+180E, which GPT-2 treats
// as punctuation, so \s and \S are spelled out with this set.
constexpr std::string_view kWhiteSpace =
    "\\t-\\r \\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}"
    "\\x{3000}";

// GPT-2's pre-tokenizer: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
std::string pretokenizer_pattern() {
  const std::string ws(kWhiteSpace);
  return "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" + ws + "\\p{L}\\p{N}]+|[" + ws +
         "]+(?![^" + ws + "])|[" + ws + "]+";
}

std::string pcre2_message(int code) {
  std::array<PCRE2_UCHAR, 256> buffer{};
  pcre2_get_error_message(code, buffer.data(), buffer.size());
  return reinterpret_cast<const char*>(buffer.data());
}

struct CodeDeleter {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};
struct MatchDataDeleter {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};

// GPT-2's bytes_to_unicode(): printable bytes stand for themselves and the others are moved to
// U+0100 and up, so that every vocab.json key is printable text. Returns the inverse, code point ->
// byte (-1 where no byte maps), which is what loading needs.
std::array<int, 0x144> unicode_to_bytes() {
  std::array<int, 0x144> inverse;
  inverse.fill(-1);
  int shifted = 0x100;
  for (int byte = 0; byte < 256; ++byte) {
    const bool printable = (byte >= '!' && byte <= '~') || (byte >= 0xA1 && byte <= 0xAC) ||
                           (byte >= 0xAE && byte <= 0xFF);
    inverse[printable ? byte : shifted++] = byte;
  }
  return inverse;
}

std::string encode_utf8(int code_point) {
  if (code_point < 0x80) return std::string(1, static_cast<char>(code_point));
  return {static_cast<char>(0xC0 | (code_point >> 6)),
          static_cast<char>(0x80 | (code_point & 0x3F))};
}

// The raw bytes a vocab.json key stands for. Every character of the byte alphabet is below U+0800,
// so one- and two-byte UTF-8 sequences are all there is to decode.
std::string unmap_token(const std::string& key, const std::array<int, 0x144>& inverse,
                        const std::string& vocab_path) {
  std::string bytes;
  for (size_t i = 0; i < key.size();) {
    const auto lead = static_cast<unsigned char>(key[i]);
    int code_point = -1;
    if (lead < 0x80) {
      code_point = lead;
      i += 1;
    } else if ((lead & 0xE0) == 0xC0 && i + 1 < key.size()) {
      code_point = ((lead & 0x1F) << 6) | (static_cast<unsigned char>(key[i + 1]) & 0x3F);
      i += 2;
    }
    if (code_point < 0 || code_point >= static_cast<int>(inverse.size()) ||
        inverse[code_point] < 0) {
      throw std::runtime_error(vocab_path + ": token \"" + key +
                               "\" has a character outside GPT-2's byte alphabet");
    }
    bytes.push_back(static_cast<char>(inverse[code_point]));
  }
  return bytes;
}

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// Appends the UTF-8 in `in` to `out`, each maximal invalid subpart replaced by one U+FFFD, as
// Python's bytes.decode(errors="replace") does. Unless `final`, stops before a trailing incomplete
// character that later bytes could still complete. Returns the number of bytes consumed.
size_t append_utf8_replacing(std::string_view in, bool final, std::string& out) {
  static constexpr std::string_view kReplacement = "\xEF\xBF\xBD";
  size_t i = 0;
  while (i < in.size()) {
    const auto lead = static_cast<unsigned char>(in[i]);
    if (lead < 0x80) {  // a run of ASCII, appended at once
      size_t end = i + 1;
      while (end < in.size() && static_cast<unsigned char>(in[end]) < 0x80) ++end;
      out.append(in.substr(i, end - i));
      i = end;
      continue;
    }
    // Continuation bytes needed and the range allowed for the first one, which is what excludes
    // overlong forms, surrogates and code points above U+10FFFF (Unicode table 3-7).
    int needed = 0;
    unsigned char low = 0x80, high = 0xBF;
    if (lead >= 0xC2 && lead <= 0xDF) {
      needed = 1;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      needed = 2;
      if (lead == 0xE0) low = 0xA0;
      if (lead == 0xED) high = 0x9F;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      needed = 3;
      if (lead == 0xF0) low = 0x90;
      if (lead == 0xF4) high = 0x8F;
    }
    int seen = 0;
    while (seen < needed && i + 1 + seen < in.size()) {
      const auto next = static_cast<unsigned char>(in[i + 1 + seen]);
      if (next < low || next > high) break;
      low = 0x80;
      high = 0xBF;
      ++seen;
    }
    if (seen == needed && needed > 0) {
      out.append(in.substr(i, 1 + needed));
    } else if (i + 1 + seen == in.size() && needed > 0 && !final) {
      break;
    } else {
      out.append(kReplacement);
    }
    i += 1 + seen;
  }
  return i;
}

}  // namespace

struct Tokenizer::Tables {
  struct Merge {
    int32_t rank;
    int32_t merged;
  };
  struct Symbol {
    int32_t id;
    int32_t prev;  // index into the word's symbols, -1 at the start
    int32_t next;  // -1 at the end
    bool alive;
  };
  // A possible merge of symbols[left] with its right neighbour; stale once either side changed.
  struct Candidate {
    int32_t rank;
    int32_t left;
    int32_t left_id;
    int32_t right_id;
    int32_t merged;
  };
  struct Scratch {
    std::vector<Symbol> symbols;
    std::vector<Candidate> heap;
  };

  std::vector<std::string> bytes_of;  // token id -> raw bytes
  std::array<int32_t, 256> byte_token{};
  std::unordered_map<uint64_t, Merge> merges;  // pair_key(left, right) -> rank and result
  int32_t eos = -1;
  std::unique_ptr<pcre2_code, CodeDeleter> pattern;

  void consider(int32_t left, Scratch& scratch) const;
  void bpe(std::string_view word, Scratch& scratch, std::vector<int32_t>& out) const;
};

void Tokenizer::Tables::consider(int32_t left, Scratch& scratch) const {
  const Symbol& symbol = scratch.symbols[left];
  if (symbol.next < 0) return;
  const int32_t right_id = scratch.symbols[symbol.next].id;
  const auto it = merges.find(pair_key(symbol.id, right_id));
  if (it == merges.end()) return;
  scratch.heap.push_back({it->second.rank, left, symbol.id, right_id, it->second.merged});
}

// Merges the lowest-ranked pair first and, among equal ranks, the leftmost, as Hugging Face does.
// A heap keeps long words (a megabyte without a space) at O(n log n) instead of O(n^2).
void Tokenizer::Tables::bpe(std::string_view word, Scratch& scratch,
                            std::vector<int32_t>& out) const {
  if (word.size() == 1) {
    out.push_back(byte_token[static_cast<unsigned char>(word[0])]);
    return;
  }
  const auto later = [](const Candidate& a, const Candidate& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.left > b.left;
  };
  auto& symbols = scratch.symbols;
  auto& heap = scratch.heap;
  symbols.clear();
  heap.clear();
  const auto n = static_cast<int32_t>(word.size());
  for (int32_t i = 0; i < n; ++i) {
    symbols.push_back(
        {byte_token[static_cast<unsigned char>(word[i])], i - 1, i + 1 < n ? i + 1 : -1, true});
  }
  for (int32_t i = 0; i + 1 < n; ++i) consider(i, scratch);
  std::make_heap(heap.begin(), heap.end(), later);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const Candidate candidate = heap.back();
    heap.pop_back();
    Symbol& left = symbols[candidate.left];
    if (!left.alive || left.next < 0 || left.id != candidate.left_id ||
        symbols[left.next].id != candidate.right_id) {
      continue;
    }
    Symbol& right = symbols[left.next];
    left.id = candidate.merged;
    left.next = right.next;
    right.alive = false;
    if (right.next >= 0) symbols[right.next].prev = candidate.left;
    for (const int32_t changed : {left.prev, candidate.left}) {
      if (changed < 0) continue;
      const size_t before = heap.size();
      consider(changed, scratch);
      if (heap.size() > before) std::push_heap(heap.begin(), heap.end(), later);
    }
  }
  // Merges only ever retire the right-hand symbol, so the word still starts at symbol 0.
  for (int32_t i = 0; i >= 0; i = symbols[i].next) out.push_back(symbols[i].id);
}

Tokenizer::Tokenizer(std::shared_ptr<const Tables> tables) : tables_(std::move(tables)) {}

Tokenizer Tokenizer::load(const std::string& vocab_json_path, const std::string& merges_txt_path) {
  auto tables = std::make_shared<Tables>();

  nlohmann::json vocab;
  try {
    vocab = nlohmann::json::parse(read_file(vocab_json_path));
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(vocab_json_path + ": invalid JSON: " + e.what());
  }
  if (!vocab.is_object() || vocab.empty()) {
    throw std::runtime_error(vocab_json_path + ": expected a non-empty JSON object token -> id");
  }
  const auto inverse = unicode_to_bytes();
  const auto size = static_cast<int64_t>(vocab.size());
  tables->bytes_of.resize(size);
  std::vector<bool> seen(size, false);
  std::unordered_map<std::string, int32_t> id_of;  // vocab.json key -> id, for merges.txt
  id_of.reserve(size);
  for (const auto& [key, value] : vocab.items()) {
    if (!value.is_number_integer()) {
      throw std::runtime_error(vocab_json_path + ": id of token \"" + key + "\" is not an integer");
    }
    const auto id = value.get<int64_t>();
    if (id < 0 || id >= size || seen[id]) {
      throw std::runtime_error(vocab_json_path + ": token \"" + key + "\" has id " +
                               std::to_string(id) + "; ids must be distinct and within 0.." +
                               std::to_string(size - 1));
    }
    seen[id] = true;
    tables->bytes_of[id] = unmap_token(key, inverse, vocab_json_path);
    id_of.emplace(key, static_cast<int32_t>(id));
  }
  for (int code_point = 0; code_point < static_cast<int>(inverse.size()); ++code_point) {
    if (inverse[code_point] < 0) continue;
    const auto it = id_of.find(encode_utf8(code_point));
    if (it == id_of.end()) {
      throw std::runtime_error(vocab_json_path + ": no token for byte " +
                               std::to_string(inverse[code_point]));
    }
    tables->byte_token[inverse[code_point]] = it->second;
  }
  const auto eos = id_of.find(std::string(kEndOfText));
  if (eos == id_of.end()) {
    throw std::runtime_error(vocab_json_path + ": no " + std::string(kEndOfText) + " token");
  }
  tables->eos = eos->second;

  const std::string merges = read_file(merges_txt_path);
  int32_t rank = 0;
  size_t line_number = 0;
  for (size_t start = 0; start < merges.size();) {
    size_t end = merges.find('\n', start);
    if (end == std::string::npos) end = merges.size();
    std::string_view line(merges.data() + start, end - start);
    start = end + 1;
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || (line_number == 1 && line.substr(0, 8) == "#version")) continue;
    const auto where = [&] { return merges_txt_path + ":" + std::to_string(line_number) + ": "; };
    const size_t space = line.find(' ');
    if (space == 0 || space == std::string_view::npos || space + 1 == line.size() ||
        line.find(' ', space + 1) != std::string_view::npos) {
      throw std::runtime_error(where() + "expected two tokens separated by one space, got \"" +
                               std::string(line) + "\"");
    }
    const std::string left(line.substr(0, space));
    const std::string right(line.substr(space + 1));
    const auto lookup = [&](const std::string& token) {
      const auto it = id_of.find(token);
      if (it == id_of.end()) {
        throw std::runtime_error(where() + "token \"" + token + "\" is not in " + vocab_json_path);
      }
      return it->second;
    };
    const int32_t left_id = lookup(left);
    const int32_t right_id = lookup(right);
    const int32_t merged_id = lookup(left + right);
    // A repeated merge keeps its first (lowest) rank.
    tables->merges.emplace(pair_key(left_id, right_id), Tables::Merge{rank++, merged_id});
  }

  int error = 0;
  PCRE2_SIZE error_offset = 0;
  const std::string pattern = pretokenizer_pattern();
  tables->pattern.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                      PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error,
                                      &error_offset, nullptr));
  if (!tables->pattern) {
    throw std::runtime_error("tokenizer: cannot compile the pre-tokenizer pattern at offset " +
                             std::to_string(error_offset) + ": " + pcre2_message(error));
  }
  // Without JIT support (an unusual PCRE2 build) pcre2_match interprets the pattern: slower, same
  // result, so a JIT failure is not an error.
  pcre2_jit_compile(tables->pattern.get(), PCRE2_JIT_COMPLETE);
  return Tokenizer(std::move(tables));
}

Tokenizer Tokenizer::from_model_dir(const std::string& dir) {
  return load(dir + "/vocab.json", dir + "/merges.txt");
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  for (size_t start = 0;;) {
    const size_t special = text.find(kEndOfText, start);
    if (special == std::string_view::npos) {
      encode_ordinary_into(text.substr(start), ids);
      return ids;
    }
    encode_ordinary_into(text.substr(start, special - start), ids);
    ids.push_back(tables_->eos);
    start = special + kEndOfText.size();
  }
}

std::vector<int32_t> Tokenizer::encode_ordinary(std::string_view text) const {
  std::vector<int32_t> ids;
  encode_ordinary_into(text, ids);
  return ids;
}

void Tokenizer::encode_ordinary_into(std::string_view text, std::vector<int32_t>& out) const {
  // Only the whole-match offsets are read; the pattern has no groups.
  const std::unique_ptr<pcre2_match_data, MatchDataDeleter> match(
      pcre2_match_data_create(1, nullptr));
  if (!match) throw std::bad_alloc();
  Tables::Scratch scratch;
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t position = 0;
  while (position < text.size()) {
    const int rc = pcre2_match(tables_->pattern.get(), subject, text.size(), position, 0,
                               match.get(), nullptr);
    size_t start = text.size();
    size_t end = text.size();
    if (rc >= 0) {
      const PCRE2_SIZE* offsets = pcre2_get_ovector_pointer(match.get());
      start = offsets[0];
      end = offsets[1];
    } else if (rc != PCRE2_ERROR_NOMATCH) {
      throw std::runtime_error("tokenizer: pre-tokenizer match failed: " + pcre2_message(rc));
    }
    // The pattern matches at every valid character, so what it skips is invalid UTF-8.
    if (start > position) tables_->bpe(text.substr(position, start - position), scratch, out);
    if (end > start) tables_->bpe(text.substr(start, end - start), scratch, out);
    position = end;
  }
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string text;
  for (const int32_t id : ids) text += token_bytes(id);
  return text;
}

const std::string& Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || id >= vocab_size()) {
    throw std::out_of_range("token id " + std::to_string(id) + " is outside the vocabulary (size " +
                            std::to_string(vocab_size()) + ")");
  }
  return tables_->bytes_of[id];
}

int32_t Tokenizer::vocab_size() const {
  return static_cast<int32_t>(tables_->bytes_of.size());
}

int32_t Tokenizer::eos_token_id() const {
  return tables_->eos;
}

IncrementalDecoder::IncrementalDecoder(const Tokenizer& tokenizer) : tokenizer_(&tokenizer) {}

std::string IncrementalDecoder::push(int32_t id) {
  const std::string& bytes = tokenizer_->token_bytes(id);
  std::string text;
  if (pending_.empty()) {  // usual: no character is split, decode the token's bytes where they are
    pending_.assign(bytes, append_utf8_replacing(bytes, false, text));
    return text;
  }
  pending_ += bytes;
  pending_.erase(0, append_utf8_replacing(pending_, false, text));
  return text;
}

std::string IncrementalDecoder::finish() {
  std::string text;
  append_utf8_replacing(pending_, true, text);
  pending_.clear();
  return text;
}

}  // namespace kvserve
