#include "common/text_io.h"

#include <lzma.h>

#include <fstream>
#include <sstream>
#include <stdexcept>

namespace kvserve {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string decompress_xz(const std::string& compressed, const std::string& path) {
  lzma_stream stream = LZMA_STREAM_INIT;
  if (lzma_stream_decoder(&stream, UINT64_MAX, LZMA_CONCATENATED) != LZMA_OK) {
    throw std::runtime_error(path + ": cannot start the xz decoder");
  }
  std::string out;
  char buffer[1 << 16];
  stream.next_in = reinterpret_cast<const uint8_t*>(compressed.data());
  stream.avail_in = compressed.size();
  lzma_ret ret = LZMA_OK;
  while (ret == LZMA_OK) {
    stream.next_out = reinterpret_cast<uint8_t*>(buffer);
    stream.avail_out = sizeof(buffer);
    ret = lzma_code(&stream, LZMA_FINISH);
    out.append(buffer, sizeof(buffer) - stream.avail_out);
  }
  lzma_end(&stream);
  if (ret != LZMA_STREAM_END) {
    throw std::runtime_error(path + ": not a valid xz file (liblzma error " + std::to_string(ret) +
                             ")");
  }
  return out;
}

}  // namespace

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open file");
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (in.bad()) throw std::runtime_error(path + ": read error");
  return ends_with(path, ".xz") ? decompress_xz(bytes.str(), path) : bytes.str();
}

}  // namespace kvserve
