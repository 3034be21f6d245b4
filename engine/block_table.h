// Where one sequence's keys and values live in the pool, as a step's plan hands it to a backend:
// views into the scheduler's block tables, so backends never see the allocator.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvserve {

// A read-only run of block ids (C++17 has no std::span).
struct BlockIdSpan {
  const int32_t* data = nullptr;
  size_t size = 0;

  const int32_t* begin() const { return data; }
  const int32_t* end() const { return data + size; }
  int32_t operator[](size_t i) const { return data[i]; }
};

// A sequence's blocks, reserved for `length` tokens. Valid until the cache manager next grows,
// ends a step of, or removes that sequence, i.e. for the forward of the step that planned it.
struct BlockTableView {
  int length = 0;              // tokens the blocks hold room for
  BlockIdSpan pages;           // logical page i -> block id
  BlockIdSpan residual_slots;  // kivi: residual slot ids [keys 0, values 0, keys 1, values 1, ...]
};

}  // namespace kvserve
