// Owning device and pinned-host allocations that grow on demand (never shrink), so activation
// buffers are allocated only when a step is larger than every step before it. A buffer counts its
// moves, so that a CUDA graph which baked its address in can tell that it must be captured again.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "kernels/cuda_check.h"

namespace kvserve::cuda {

template <typename T, bool kPinnedHost = false>
class GrowingBuffer {
 public:
  GrowingBuffer() = default;
  GrowingBuffer(const GrowingBuffer&) = delete;
  GrowingBuffer& operator=(const GrowingBuffer&) = delete;
  GrowingBuffer(GrowingBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)),
        capacity_(std::exchange(other.capacity_, 0)),
        moves_(std::exchange(other.moves_, 0)) {}
  ~GrowingBuffer() { release(); }

  // Makes room for `count` elements; the old contents are not kept.
  T* reserve(size_t count) {
    if (count > capacity_) {
      release();
      void* p = nullptr;
      if (kPinnedHost) {
        KVSERVE_CUDA_CHECK(cudaMallocHost(&p, count * sizeof(T)));
      } else {
        KVSERVE_CUDA_CHECK(cudaMalloc(&p, count * sizeof(T)));
      }
      data_ = static_cast<T*>(p);
      capacity_ = count;
      ++moves_;
    }
    return data_;
  }
  T* get() const { return data_; }
  size_t capacity() const { return capacity_; }
  // How many times reserve() has (re)allocated the storage.
  uint64_t moves() const { return moves_; }

 private:
  void release() {
    if (data_ == nullptr) return;
    if (kPinnedHost) {
      cudaFreeHost(data_);
    } else {
      cudaFree(data_);
    }
    data_ = nullptr;
    capacity_ = 0;
  }

  T* data_ = nullptr;
  size_t capacity_ = 0;
  uint64_t moves_ = 0;
};

template <typename T>
using DeviceBuffer = GrowingBuffer<T, false>;
template <typename T>
using PinnedBuffer = GrowingBuffer<T, true>;

}  // namespace kvserve::cuda
