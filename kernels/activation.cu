// Standalone activation for the GPU pipeline's unfused paths:
//   gelu_f16: out[i] = f16_rn(gelu(f32(x[i]))), gelu(x) = 0.5·x·(1 + tanhf(√(2/π)·(x + 0.044715·x³)))
// in f32, the same formula (and order of operations) as gelu_tanh in kernels/gemm.cu.
// n elements, 256 threads per block, grid-stride loop. Precision: tanhf is the C library's in
// the emulation and CUDA's (≤ 2 ulp) on the GPU; one rounding to f16 at the end.

#include "device.cuh"

extern "C" __global__ void __launch_bounds__(256)
    gelu_f16(half* __restrict__ out, const half* __restrict__ x, int n) {
    const float k = 0.7978845608028654f;  // sqrt(2/pi)
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = __half2float(x[i]);
        out[i] = __float2half_rn(0.5f * v * (1.f + tanhf(k * (v + 0.044715f * v * v * v))));
    }
}
