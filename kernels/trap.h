// A kernel that stops at a trap instruction: fault injection for the tests of device loss.
#pragma once

#include <cuda_runtime.h>

namespace kvserve::cuda {

// Enqueues one thread that executes `trap`. The kernel aborts with cudaErrorLaunchFailure, a
// sticky error: the CUDA context of the process can run nothing more, as after a kernel that
// faults in production (illegal address, device-side assert). Only the launch is checked here;
// the fault surfaces at a later call on the context.
void trap(cudaStream_t stream);

}  // namespace kvserve::cuda
