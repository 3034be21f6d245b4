// A .safetensors file of arbitrary bytes: SafetensorsFile either rejects it with std::runtime_error
// or accepts a header whose every tensor lies inside the file, which converting each F32/F16/BF16
// tensor to fp32 then reads end to end (ASan catches any read outside the mapping).
#include <stdexcept>
#include <vector>

#include "engine/safetensors.h"
#include "fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = kvserve::fuzz::write_scratch("model.safetensors", data, size);
  try {
    const kvserve::SafetensorsFile file(path);
    for (const kvserve::SafetensorsTensor& tensor : file.tensors()) {
      if (tensor.dtype != "F32" && tensor.dtype != "F16" && tensor.dtype != "BF16") continue;
      std::vector<float> out(static_cast<size_t>(tensor.numel()));
      file.to_fp32(tensor, 0, tensor.numel(), out.data());
    }
  } catch (const std::runtime_error&) {
    // Rejected with a message: what the loader is for.
  }
  return 0;
}
