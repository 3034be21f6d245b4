// Reading whole files, transparently decompressing .xz (evaluation text, test fixtures, prompts).
#pragma once

#include <string>

namespace kvserve {

// Returns the bytes of `path`; a name ending in ".xz" is decompressed. Throws std::runtime_error
// naming the file when it cannot be read or decoded.
std::string read_file(const std::string& path);

}  // namespace kvserve
