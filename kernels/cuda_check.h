// Error checking for every CUDA runtime and cuBLAS call: a failure throws std::runtime_error with
// the file, line, the call and the error's name, so the engine can fail the step, not the process.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace kvserve::cuda {

[[noreturn]] inline void throw_cuda_error(const char* call, const char* error, const char* file,
                                          int line) {
  throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + call +
                           " failed: " + error);
}

}  // namespace kvserve::cuda

// A failed call also leaves its error as the thread's "last error", which the next launch check
// (cudaGetLastError) would report as its own: a recoverable error such as an out-of-memory would
// then fail the next, healthy step too. So the failure is taken out of that slot before throwing;
// a sticky error (a faulted context) keeps failing every later call anyway.
#define KVSERVE_CUDA_CHECK(call)                                                              \
  do {                                                                                        \
    const cudaError_t kvserve_status_ = (call);                                               \
    if (kvserve_status_ != cudaSuccess) {                                                     \
      cudaGetLastError();                                                                     \
      ::kvserve::cuda::throw_cuda_error(#call, cudaGetErrorString(kvserve_status_), __FILE__, \
                                        __LINE__);                                            \
    }                                                                                         \
  } while (0)

#define KVSERVE_CUBLAS_CHECK(call)                                                               \
  do {                                                                                           \
    const cublasStatus_t kvserve_status_ = (call);                                               \
    if (kvserve_status_ != CUBLAS_STATUS_SUCCESS) {                                              \
      ::kvserve::cuda::throw_cuda_error(#call, cublasGetStatusString(kvserve_status_), __FILE__, \
                                        __LINE__);                                               \
    }                                                                                            \
  } while (0)
