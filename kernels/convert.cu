// Precision conversions between host-staged f32 and the f16 the GPU pipeline computes in.
//   convert_f32_to_f16: out[i] = round-to-nearest-even f16 of in[i] (overflow → ±inf)
//   convert_f16_to_f32: out[i] = in[i] (exact)
// n elements, grid-stride loop, 256 threads per block. Their tests also pin down the
// emulation's f16 rounding bit for bit against the `half` crate.

#include "device.cuh"

extern "C" __global__ void __launch_bounds__(256)
    convert_f32_to_f16(half* __restrict__ out, const float* __restrict__ in, int n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = __float2half_rn(in[i]);
}

extern "C" __global__ void __launch_bounds__(256)
    convert_f16_to_f32(float* __restrict__ out, const half* __restrict__ in, int n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = __half2float(in[i]);
}
