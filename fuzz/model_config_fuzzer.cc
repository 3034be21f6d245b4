// A config.json of arbitrary bytes: parse_model_config either throws std::runtime_error or returns
// a configuration the engine can size buffers from (positive dimensions, heads dividing the width).
#include <cstdlib>
#include <stdexcept>

#include "engine/checkpoint.h"
#include "fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = kvserve::fuzz::write_scratch("config.json", data, size);
  try {
    const kvserve::ModelConfig config = kvserve::parse_model_config(path);
    if (config.n_layer <= 0 || config.n_head <= 0 || config.n_embd <= 0 ||
        config.n_positions <= 0 || config.vocab_size <= 0 || config.n_embd % config.n_head != 0) {
      std::abort();
    }
  } catch (const std::runtime_error&) {
    // Rejected with a message naming the file.
  }
  return 0;
}
