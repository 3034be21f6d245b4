#include "fuzz/fuzz_support.h"

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <stdexcept>

namespace kvserve::fuzz {

std::string model_dir() {
  const char* env = std::getenv("KVSERVE_FUZZ_MODEL");
  return env != nullptr ? env : KVSERVE_FUZZ_DEFAULT_MODEL;
}

const Tokenizer& tokenizer() {
  static const Tokenizer loaded = Tokenizer::from_model_dir(model_dir());
  return loaded;
}

std::string write_scratch(const std::string& name, const uint8_t* data, size_t size) {
  const char* tmp = std::getenv("TMPDIR");
  const std::string path = std::string(tmp != nullptr ? tmp : "/tmp") + "/kvserve-fuzz-" +
                           std::to_string(getpid()) + "-" + name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  if (!out.flush()) throw std::logic_error("cannot write " + path);
  return path;
}

bool valid_utf8(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto byte = [&](size_t k) { return static_cast<uint8_t>(text[k]); };
    const uint8_t b = byte(i);
    int length = 0;
    uint32_t code_point = 0, min = 0;
    if (b < 0x80) {
      length = 1, code_point = b;
    } else if ((b & 0xE0) == 0xC0) {
      length = 2, code_point = b & 0x1F, min = 0x80;
    } else if ((b & 0xF0) == 0xE0) {
      length = 3, code_point = b & 0x0F, min = 0x800;
    } else if ((b & 0xF8) == 0xF0) {
      length = 4, code_point = b & 0x07, min = 0x10000;
    } else {
      return false;
    }
    if (i + length > text.size()) return false;
    for (int k = 1; k < length; ++k) {
      if ((byte(i + k) & 0xC0) != 0x80) return false;
      code_point = (code_point << 6) | (byte(i + k) & 0x3F);
    }
    if (code_point < min || code_point > 0x10FFFF ||
        (code_point >= 0xD800 && code_point <= 0xDFFF)) {
      return false;
    }
    i += length;
  }
  return true;
}

}  // namespace kvserve::fuzz
