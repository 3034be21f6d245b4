// Probe: do mma.m16n8k16 (fp16 in, fp32 accumulate) and ldmatrix keep fp16 subnormal inputs?
#include <cstdio>
#include <cstdint>
#include <cuda_fp16.h>
__global__ void probe(float* out) {
  const int lane = threadIdx.x;
  // A = code * 2^-24 (subnormal bits 0x0001..0x0003 << 2j), B = 1.0 in every element
  uint32_t a = ((lane % 3) + 1) * 0x00010001u;  // subnormal halves: 1, 2 or 3 * 2^-24
  const uint32_t one = 0x3C003C00u;
  float d0 = 0, d1 = 0, d2 = 0, d3 = 0;
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3) : "r"(a), "r"(a), "r"(a), "r"(a), "r"(one), "r"(one));
  out[lane] = d0 * 16777216.0f;  // exact if subnormals are kept: a sum of small integers
}
int main() {
  float* d; cudaMalloc(&d, 32 * sizeof(float)); probe<<<1, 32>>>(d);
  float h[32]; cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
  // row g of A: lanes 4g..4g+3 give k pairs; each lane's 4 regs hold 2 halves of value v_l = (l%3)+1
  // D[g][n] = sum over k of A[g][k] = 2 * sum_{t} (v_{4g+t}) [a0 pair] + 2 * sum_t v_{4g+t} [a2 pair]
  int ok = 1;
  for (int g = 0; g < 8; ++g) {
    float expect = 0; for (int t = 0; t < 4; ++t) expect += 4 * (((4 * g + t) % 3) + 1);
    if (h[4 * g] != expect) ok = 0;
    printf("row %d: got %g expect %g\n", g, h[4 * g], expect);
  }
  printf("subnormal fp16 mma inputs: %s (%s)\n", ok ? "KEPT" : "NOT KEPT", cudaGetErrorString(cudaGetLastError()));
  return 0;
}
