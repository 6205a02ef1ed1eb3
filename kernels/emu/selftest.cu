// Kernels that test the emulator itself (src/gpu/emu_selftest.rs); compiled for the emulation
// only (build.rs), never by nvcc: some are wrong on purpose.
//   emu_selftest_warp:   indices, shuffles of every kind and width, votes     (block 8×4×2)
//   emu_selftest_shared: static/dynamic shared memory, barriers, atomics, partial-mask
//                        collectives                                          (block 64)
//   emu_selftest_wmma:   one 16×16×16 mma with every layout combination       (block 32)
//   emu_selftest_broken: one deliberate misuse per `mode`; each must be reported (block 64)

#include "../device.cuh"

using namespace nvcuda;

extern "C" __global__ void emu_selftest_warp(int* out) {
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int lane = t % 32;
    int* o = out + (b * blockDim.x * blockDim.y * blockDim.z + t) * 8;
    o[0] = t;
    o[1] = b;
    o[2] = __shfl_sync(0xffffffffu, t, (lane + 5) % 32);
    o[3] = __shfl_xor_sync(0xffffffffu, t, 3);
    o[4] = __shfl_down_sync(0xffffffffu, t, 4, 16);
    o[5] = __shfl_up_sync(0xffffffffu, t, 2, 8);
    o[6] = int(__ballot_sync(0xffffffffu, t % 3 == 0));
    o[7] = __any_sync(0xffffffffu, t == 7) + 2 * __all_sync(0xffffffffu, t < 1000) +
           4 * __all_sync(0xffffffffu, lane != 9);
}

extern "C" __global__ void emu_selftest_shared(int* out, int* counter, float* sum) {
    __shared__ int s[64];
    int* dyn = dynamic_shared<int>();
    const int t = threadIdx.x, lane = t % 32;
    const int fresh = dyn[t];  // dynamic shared memory starts as all ones in every block
    s[t] = t * (int(blockIdx.x) + 1);
    dyn[t] = 1000 + t;
    __syncthreads();
    int* o = out + (blockIdx.x * 64 + t) * 3;
    o[0] = s[63 - t] + dyn[(t + 1) % 64];
    o[1] = fresh;
    atomicAdd(counter, 1);
    atomicAdd(sum, 0.5f);
    // Two disjoint half-warp groups, side by side.
    if (lane < 16) {
        __syncwarp(0x0000ffffu);
        o[2] = __shfl_xor_sync(0x0000ffffu, t, 1);
    } else {
        __syncwarp(0xffff0000u);
        o[2] = __shfl_xor_sync(0xffff0000u, t, 2);
    }
}

// d = a·b + c for one tile; `layout` bit 0: a column-major, bit 1: b column-major,
// bit 2: c column-major. d is stored row-major. All matrices 16×16 with ldm 16.
extern "C" __global__ void emu_selftest_wmma(float* d, const half* a, const half* b,
                                             const float* c, int layout) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, c, 16, (layout & 4) ? wmma::mem_col_major : wmma::mem_row_major);
    if (layout & 1) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::col_major> fa;
        wmma::load_matrix_sync(fa, a, 16);
        if (layout & 2) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb;
            wmma::load_matrix_sync(fb, b, 16);
            wmma::mma_sync(acc, fa, fb, acc);
        } else {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major> fb;
            wmma::load_matrix_sync(fb, b, 16);
            wmma::mma_sync(acc, fa, fb, acc);
        }
    } else {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, a, 16);
        if (layout & 2) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb;
            wmma::load_matrix_sync(fb, b, 16);
            wmma::mma_sync(acc, fa, fb, acc);
        } else {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major> fb;
            wmma::load_matrix_sync(fb, b, 16);
            wmma::mma_sync(acc, fa, fb, acc);
        }
    }
    for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= 2.f;  // elementwise: any ownership
    wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

extern "C" __global__ void emu_selftest_broken(float* out, int mode) {
    __shared__ __align__(128) half tile[16 * 24];
    const int t = threadIdx.x, lane = t % 32;
    float v = float(t);
    switch (mode) {
        case 0:  // barrier inside a branch only some threads take
            if (t < 32) __syncthreads();
            break;
        case 1:  // early return, then a barrier
            if (t >= 40) return;
            __syncthreads();
            break;
        case 2:  // lanes of one warp disagree on the mask
            v = __shfl_xor_sync(lane < 16 ? 0xffffffffu : 0xffff0000u, v, 1);
            break;
        case 3:  // reading a lane outside the mask
            if (lane < 16) v = __shfl_sync(0x0000ffffu, v, 20);
            break;
        case 4:  // one lane waits in a warp collective, everyone else at a barrier
            if (t == 0)
                __syncwarp();
            else
                __syncthreads();
            break;
        case 5: {  // wmma from a pointer that is not 256-bit aligned
            wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
            wmma::load_matrix_sync(fa, tile + 1, 24);
            break;
        }
        case 6:  // a lane named in the mask has returned
            if (lane == 31) return;
            v = __shfl_xor_sync(0xffffffffu, v, 1);
            break;
        case 7:  // the calling lane is not in its own mask
            v = __shfl_sync(0x1u, v, 0);
            break;
    }
    out[blockIdx.x * blockDim.x + t] = v;
}
