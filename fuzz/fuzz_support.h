// What the fuzz targets share: the test model's tokenizer, a scratch file, a UTF-8 check.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "engine/tokenizer.h"

namespace kvserve::fuzz {

// $KVSERVE_FUZZ_MODEL, else ../shared/models/gpt2-tiny-docs beside the source tree.
std::string model_dir();
// Loaded once per process.
const Tokenizer& tokenizer();
// Overwrites this process's scratch file with `data` and returns its path: the parsers under test
// read files, and a file of exactly these bytes is what a user could hand them.
std::string write_scratch(const std::string& name, const uint8_t* data, size_t size);
// Strict UTF-8 (no overlong forms, surrogates or code points past U+10FFFF).
bool valid_utf8(std::string_view text);

}  // namespace kvserve::fuzz
