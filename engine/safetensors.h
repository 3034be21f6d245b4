// Read-only access to a .safetensors file (https://github.com/huggingface/safetensors): an 8-byte
// little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
// The file is memory-mapped, so a multi-GB checkpoint is paged in once, straight into the fp32
// conversion, without an intermediate copy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace kvserve {

struct SafetensorsTensor {
  std::string name;
  std::string dtype;              // as the header spells it: "F32", "F16", "BF16", "I64", ...
  std::vector<int64_t> shape;     // row-major; [] is a scalar
  const uint8_t* data = nullptr;  // into the mapping; not aligned to the element size
  size_t nbytes = 0;              // numel() * element size, checked when the file is opened

  int64_t numel() const;
};

// Bytes per element of a safetensors dtype name, or 0 for a name the format does not define.
size_t safetensors_dtype_size(const std::string& dtype);

// "[2, 3]", the form every shape in an error message takes.
std::string format_shape(const std::vector<int64_t>& shape);

class SafetensorsFile {
 public:
  // Maps `path` and validates the whole header: every tensor's dtype is one the format defines and
  // its data_offsets lie inside the data section and match shape * element size. Throws
  // std::runtime_error "<path>: <problem>" otherwise. `__metadata__` is ignored.
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // In header order (the JSON object's key order).
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  // nullptr when absent.
  const SafetensorsTensor* find(const std::string& name) const;

  // Converts elements [first, first + count) of `tensor` to fp32 into `out`. F32, F16 and BF16 are
  // converted exactly (every F16/BF16 value is an fp32 value); any other dtype throws, naming the
  // file, the tensor and its dtype. Ranges let a caller compare or stream a huge tensor in chunks.
  void to_fp32(const SafetensorsTensor& tensor, int64_t first, int64_t count, float* out) const;
  std::vector<float> to_fp32(const SafetensorsTensor& tensor) const;

 private:
  std::string path_;
  void* map_ = nullptr;  // the whole file, PROT_READ
  size_t map_size_ = 0;
  std::vector<SafetensorsTensor> tensors_;
  std::unordered_map<std::string, size_t> index_;  // name -> position in tensors_
};

}  // namespace kvserve
