// Warp and block sums in f32, shared by the kernels that reduce a row per block (LayerNorm,
// later softmax). Every thread of the block must call block_sum (it holds two barriers).
#pragma once

#include "device.cuh"

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum of v over the block, returned to every thread. WARPS = blockDim.x / 32.
template <int WARPS>
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[WARPS];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < WARPS; ++w) total += partial[w];  // same order in every thread
    __syncthreads();  // partial is reused by the next call
    return total;
}
