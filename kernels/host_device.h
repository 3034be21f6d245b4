// KVSERVE_HOST_DEVICE: marks a function that plain C++ host code and CUDA device code both call
// (rint_quotient.h, e4m3_rounding.h: the device quantizers' arithmetic, checked by host tests).
#pragma once

#ifndef KVSERVE_HOST_DEVICE
#if defined(__CUDACC__)
#define KVSERVE_HOST_DEVICE __host__ __device__
#else
#define KVSERVE_HOST_DEVICE
#endif
#endif
