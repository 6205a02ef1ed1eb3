// Gated residual add of a DiT block (reference doc A.6):
//   x[r, c] += gate[b, c] · y[r, c],   b = r / tokens
// x, y: (rows, C) f16, x updated in place; gate is a chunk of the modulation vector, one row
// of C values per batch item, rows `gate_stride` elements apart.
// Elementwise on half2 pairs with one fused multiply-add per element (__hfma2: a single
// rounding to f16). Launch: 256 threads per block, grid-stride loop over rows·C/2 pairs.
// Requires C even and 4-byte aligned pointers (the launcher checks).
// `gated_residual_add_f32_stream`: the same with x in f32 (the GPU pipeline's residual stream):
// x += f32(gate)·f32(y) in f32 (one multiply and one add; nvcc may fuse them), on pairs.

#include "device.cuh"

extern "C" __global__ void __launch_bounds__(256)
    gated_residual_add_f16(half* __restrict__ x, const half* __restrict__ y,
                           const half* __restrict__ gate, int rows, int tokens, int channels,
                           int gate_stride) {
    const long long pairs_per_row = channels / 2;
    const long long total = rows * pairs_per_row;
    half2* x2 = reinterpret_cast<half2*>(x);
    const half2* y2 = reinterpret_cast<const half2*>(y);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / pairs_per_row, p = i % pairs_per_row;
        const half2 g = reinterpret_cast<const half2*>(gate + (r / tokens) * gate_stride)[p];
        x2[i] = __hfma2(g, y2[i], x2[i]);
    }
}

extern "C" __global__ void __launch_bounds__(256)
    gated_residual_add_f32_stream(float* __restrict__ x, const half* __restrict__ y,
                            const half* __restrict__ gate, int rows, int tokens, int channels,
                            int gate_stride) {
    const long long pairs_per_row = channels / 2;
    const long long total = rows * pairs_per_row;
    float2* x2 = reinterpret_cast<float2*>(x);
    const half2* y2 = reinterpret_cast<const half2*>(y);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / pairs_per_row, p = i % pairs_per_row;
        const float2 g =
            __half22float2(reinterpret_cast<const half2*>(gate + (r / tokens) * gate_stride)[p]);
        const float2 v = __half22float2(y2[i]);
        float2 xv = x2[i];
        xv.x = xv.x + g.x * v.x;
        xv.y = xv.y + g.y * v.y;
        x2[i] = xv;
    }
}
