// Tensor-core helpers (PTX mma.sync and ldmatrix, sm_80 or newer; builds for older GPUs trap if
// they run them) and the register layouts they use.
//
// A warp's lane l is written (g, t) = (l / 4, l % 4): g the "group" (0 .. 7), t the "thread in
// group" (0 .. 3). Every register holds two fp16 values (a half2: the lower-numbered element in
// the low 16 bits) or one fp32.
//
// mma.m16n8k16.row.col.f32.f16.f16.f32:  D[16][8] (fp32) = A[16][16] (fp16) * B[16][8] (fp16) + C
//
//   A, 16 x 16 (rows m, columns k), 4 registers      B, 16 x 8 (rows k, columns n), 2 registers
//               k: 0 .. 7        8 .. 15                          n: 0 .. 7
//   m  0 ..  7  a0 = A[g][2t, 2t+1]    a2 = A[g][2t+8, 2t+9]      k  0 ..  7  b0 = B[2t, 2t+1][g]
//   m  8 .. 15  a1 = A[g+8][2t, 2t+1]  a3 = A[g+8][2t+8, 2t+9]    k  8 .. 15  b1 = B[2t+8, 2t+9][g]
//
//   C and D, 16 x 8, 4 fp32 registers
//   m  0 ..  7  d0 = D[g][2t]    d1 = D[g][2t+1]
//   m  8 .. 15  d2 = D[g+8][2t]  d3 = D[g+8][2t+1]
//
// So a register of A or B always pairs two consecutive k (the contracted index), the lane's t
// picks which pairs and its g which row of A or column of B; a lane's D holds rows g and g + 8.
//
// ldmatrix.x4.trans: four 8 x 8 matrices of 16-bit elements, each row 16 contiguous bytes of
// shared memory; lanes 8 i .. 8 i + 7 give the addresses of rows 0 .. 7 of matrix i, and lane
// (g, t) receives in r[i] column g of rows 2t (low half) and 2t + 1 (high half) of matrix i:
//
//   matrix i in shared memory          r[i] of lane (g, t)
//   row 0: e0 e1 .. e7  <- lane 8i     = (row 2t element g, row 2t+1 element g)
//   row 1: e0 e1 .. e7  <- lane 8i+1
//   ...
//   row 7: e0 e1 .. e7  <- lane 8i+7
//
// which is the B (or A) register layout above with k = the row and n (or m) = the column.
//
// ldmatrix.x4 (not transposed): the same addressing, but lane (g, t) receives in r[i] row g,
// elements 2t (low half) and 2t + 1 (high half), of matrix i:
//
//   matrix i in shared memory          r[i] of lane (g, t)
//   row g: e0 e1 .. e7  <- lane 8i+g   = (row g element 2t, row g element 2t+1)
//
// which is the B register layout above for a matrix stored with n as the row and k as the column
// (keys [key][channel] for the scores Q K^T: b0 from the channels 0 .. 7 of a k-step, b1 from
// 8 .. 15).
#pragma once

#include <cstdint>

namespace kvserve::cuda {

// d = A * B + c for one m16n8k16 tile (layouts above).
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1,
                                             const float (&c)[4]) {
#if __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#else
  __trap();
#endif
}

// d += A * B for one m16n8k16 tile.
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// Four 8x8 b16 matrices from shared memory, transposed (layout above); `row` is this lane's row
// address (lane 8 i + j: row j of matrix i), 16-byte aligned.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#if __CUDA_ARCH__ >= 800
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
#else
  __trap();
#endif
}

// Four 8x8 b16 matrices from shared memory, not transposed (layout above); addressing as in
// ldmatrix_x4_trans.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if __CUDA_ARCH__ >= 800
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
#else
  __trap();
#endif
}

}  // namespace kvserve::cuda
