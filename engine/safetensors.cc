#include "engine/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace kvserve {
namespace {

// The format is little-endian and elements are copied as host integers/floats.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors reading assumes little-endian");

[[noreturn]] void fail(const std::string& path, const std::string& problem) {
  throw std::runtime_error(path + ": " + problem);
}

float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// IEEE binary16 -> binary32. Every half value is representable, so this is exact, including
// subnormals (renormalized), signed zeros, infinities and NaN payloads.
float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24, a product with a single exact result.
  const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
  return sign ? -magnitude : magnitude;
}

template <typename Convert>
void convert(const uint8_t* src, size_t element_size, int64_t count, float* out, Convert f) {
  for (int64_t i = 0; i < count; ++i) out[i] = f(src + i * element_size);
}

int64_t json_non_negative(const nlohmann::ordered_json& value, const std::string& path,
                          const std::string& what) {
  if (!value.is_number_integer() || value.get<int64_t>() < 0) {
    fail(path, "corrupt header: " + what + " must be a non-negative integer, got " + value.dump());
  }
  return value.get<int64_t>();
}

}  // namespace

int64_t SafetensorsTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

size_t safetensors_dtype_size(const std::string& dtype) {
  static const std::unordered_map<std::string, size_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"F64", 8}, {"I64", 8},     {"U64", 8}};
  const auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

std::string format_shape(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  map_size_ = static_cast<size_t>(st.st_size);
  if (map_size_ == 0) {
    ::close(fd);
    fail(path, "empty file (0 bytes): not a safetensors file");
  }
  map_ = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    fail(path, std::string("cannot map: ") + std::strerror(map_errno));
  }
  // From here on the destructor will not run if we throw, so unmap by hand on failure.
  try {
    const auto* bytes = static_cast<const uint8_t*>(map_);
    if (map_size_ < 8) {
      fail(path, "truncated: " + std::to_string(map_size_) +
                     " bytes, shorter than the 8-byte header length");
    }
    uint64_t header_size = 0;
    for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | bytes[i];
    if (header_size > map_size_ - 8) {
      fail(path, "truncated: header length " + std::to_string(header_size) +
                     " runs past the end of the " + std::to_string(map_size_) + "-byte file");
    }
    const char* header_begin = reinterpret_cast<const char*>(bytes + 8);
    const nlohmann::ordered_json header =
        nlohmann::ordered_json::parse(header_begin, header_begin + header_size, nullptr, false);
    if (header.is_discarded()) fail(path, "corrupt header: not valid JSON");
    if (!header.is_object()) fail(path, "corrupt header: not a JSON object");

    const uint8_t* data = bytes + 8 + header_size;
    const uint64_t data_size = map_size_ - 8 - header_size;
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") continue;
      const std::string where = "tensor " + name;
      if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
          !entry.contains("data_offsets")) {
        fail(path, "corrupt header: " + where + " needs dtype, shape and data_offsets");
      }
      SafetensorsTensor t;
      t.name = name;
      if (!entry["dtype"].is_string())
        fail(path, "corrupt header: " + where + " dtype is not a string");
      t.dtype = entry["dtype"].get<std::string>();
      const size_t element_size = safetensors_dtype_size(t.dtype);
      if (element_size == 0) fail(path, where + " has unknown dtype " + t.dtype);
      if (!entry["shape"].is_array())
        fail(path, "corrupt header: " + where + " shape is not an array");
      // The element count is bounded by the data section, which also rules out overflow below.
      uint64_t numel = 1;
      bool too_big = false, empty = false;
      for (const auto& d : entry["shape"]) {
        const auto dim = static_cast<uint64_t>(json_non_negative(d, path, where + " shape"));
        t.shape.push_back(static_cast<int64_t>(dim));
        if (dim != 0 && numel > data_size / dim) too_big = true;
        empty = empty || dim == 0;
        numel *= dim;
      }
      // Any zero dimension makes the tensor empty: [2, 0] with no data is not "too big".
      if (empty) {
        numel = 0;
        too_big = false;
      }
      const auto& offsets = entry["data_offsets"];
      if (!offsets.is_array() || offsets.size() != 2) {
        fail(path, "corrupt header: " + where + " data_offsets must be [begin, end]");
      }
      const auto begin =
          static_cast<uint64_t>(json_non_negative(offsets[0], path, where + " data_offsets"));
      const auto end =
          static_cast<uint64_t>(json_non_negative(offsets[1], path, where + " data_offsets"));
      if (begin > end || end > data_size) {
        fail(path, where + " data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                       "] lie outside the " + std::to_string(data_size) + "-byte data section");
      }
      if (too_big || numel * element_size != end - begin) {
        fail(path,
             where + " data_offsets span " + std::to_string(end - begin) + " bytes but " + t.dtype +
                 " " + format_shape(t.shape) + " needs " +
                 (too_big ? "more than the file holds" : std::to_string(numel * element_size)));
      }
      t.data = data + begin;
      t.nbytes = end - begin;
      index_.emplace(name, tensors_.size());
      tensors_.push_back(std::move(t));
    }
  } catch (...) {
    ::munmap(map_, map_size_);
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  ::munmap(map_, map_size_);
}

const SafetensorsTensor* SafetensorsFile::find(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

void SafetensorsFile::to_fp32(const SafetensorsTensor& tensor, int64_t first, int64_t count,
                              float* out) const {
  if (first < 0 || count < 0 || first + count > tensor.numel()) {
    fail(path_, "tensor " + tensor.name + ": element range [" + std::to_string(first) + ", " +
                    std::to_string(first + count) + ") outside its " +
                    std::to_string(tensor.numel()) + " elements");
  }
  if (tensor.dtype == "F32") {
    // An empty tensor's output may be null (an empty vector's data()), and memcpy with a null
    // pointer is undefined even for 0 bytes (found by fuzz/safetensors_fuzzer).
    if (count > 0) std::memcpy(out, tensor.data + first * 4, count * 4);
  } else if (tensor.dtype == "F16") {
    convert(tensor.data + first * 2, 2, count, out, [](const uint8_t* p) {
      uint16_t h;
      std::memcpy(&h, p, 2);
      return half_to_float(h);
    });
  } else if (tensor.dtype == "BF16") {
    // bfloat16 is the upper half of a binary32.
    convert(tensor.data + first * 2, 2, count, out, [](const uint8_t* p) {
      uint16_t h;
      std::memcpy(&h, p, 2);
      return bits_to_float(uint32_t{h} << 16);
    });
  } else {
    fail(path_, "tensor " + tensor.name + " has dtype " + tensor.dtype +
                    "; only F32, F16 and BF16 weights are supported");
  }
}

std::vector<float> SafetensorsFile::to_fp32(const SafetensorsTensor& tensor) const {
  std::vector<float> out(static_cast<size_t>(tensor.numel()));
  to_fp32(tensor, 0, tensor.numel(), out.data());
  return out;
}

}  // namespace kvserve
