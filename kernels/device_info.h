// What GPUs the process can see; `--device auto` asks this before choosing a backend.
#pragma once

#include <cstddef>
#include <string>

namespace kvserve::cuda {

struct DeviceInfo {
  std::string name;
  int compute_capability_major = 0;
  int compute_capability_minor = 0;
  size_t total_memory_bytes = 0;
  size_t free_memory_bytes = 0;
};

// Number of usable CUDA devices; 0 when there is no driver or no GPU (never throws).
int visible_device_count();
// Properties and free memory of device `index`; throws with file and line on a CUDA error.
DeviceInfo device_info(int index);
// Device-to-device copy bandwidth of the current device in bytes per second, counting the bytes
// read plus the bytes written (2 * size per copy): the best of several copies of `bytes` bytes.
// The roofline's memory rate: a kernel that only reads moves data no faster than this.
double copy_bandwidth(size_t bytes);
// Lets `kernel` launch on the current device with up to `bytes` of dynamic shared memory. Above
// the 48 KiB any kernel may take, it opts in, once per device and kernel, to all the device
// allows it (its largest block's less the kernel's static shared memory): a launcher that set
// the limit to its own launch's size could lower it under another thread's launch of a larger
// size (the GPU tests run their cases on several threads), which then fails. Throws
// std::invalid_argument, naming `op` and ending with `remedy` (what the user can change), where
// the device has less.
void allow_dynamic_shared_memory(const char* op, const void* kernel, size_t bytes,
                                 const std::string& remedy = "");

}  // namespace kvserve::cuda
