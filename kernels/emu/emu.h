// CPU emulation of the CUDA execution model: the part of the CUDA device surface icdit's
// kernels use, so that every kernels/*.cu compiles as ordinary C++ and runs on the CPU.
//
// Model (design and limits: docs/gpu-emulation.md):
//   - A launch runs its blocks on a few OS threads; a block's threads run as fibers on one OS
//     thread, each until it blocks (barrier, warp collective) or returns. One warp runs as far
//     ahead of the others as the barriers let it, lanes in index order (odd blocks: last warp
//     and last lane first), so a missing barrier shows as wrong data in either direction.
//   - Static __shared__ variables are `static __thread`: one copy per OS thread, i.e. per block
//     being run. Dynamic shared memory comes from dynamic_shared<T>() (device.cuh) and is
//     filled with 0xFF (NaN for f16/f32) before every block, like uninitialised memory.
//   - __syncthreads() is a real barrier over the block's fibers; a barrier some thread of the
//     block never reaches (it returned, or waits elsewhere) is reported as an error.
//   - Warp intrinsics (__shfl_*_sync, votes, __syncwarp, wmma::*_sync) rendezvous the lanes in
//     `mask`; the last lane to arrive carries out the operation for all. A mask that differs
//     between lanes, a lane outside the mask, or reading a lane outside the mask is an error.
//   - Errors stop the launch and come back to the caller as a message (icdit_emu_launch).
#pragma once

#include <math.h>
#include <cstddef>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ static __thread
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

// ---- built-in vector types (the subset our kernels use) ------------------------------------

struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// Set by the emulator for the fiber running now (threadIdx) and the block it belongs to.
extern __thread uint3 threadIdx;
extern __thread uint3 blockIdx;
extern __thread dim3 blockDim;
extern __thread dim3 gridDim;
constexpr int warpSize = 32;

// ---- the emulator's interface to the headers ----------------------------------------------

namespace icdit_emu {

// Stops the launch with a message naming the block and thread; never returns.
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Block-wide barrier of the fiber running now.
void syncthreads();

// Lane of the fiber running now within its warp.
unsigned lane_id();

// Start of this block's dynamic shared memory (bytes given at launch).
void* dynamic_shared();

// One lane's part in a warp collective. Every lane of `mask` passes its own WarpOp with the
// same `name` and `mask`; when the last one arrives, `complete` runs once with lanes[i]
// pointing at lane i's WarpOp (nullptr for lanes outside the mask), writes each lane's result
// into its WarpOp, and every lane returns.
struct WarpOp {
    const char* name;
    uint32_t mask;
    void (*complete)(WarpOp* const* lanes);
};
void warp_collective(WarpOp* op);

}  // namespace icdit_emu

// ---- block and warp synchronisation --------------------------------------------------------

inline void __syncthreads() { icdit_emu::syncthreads(); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

namespace icdit_emu {

inline void complete_nothing(WarpOp* const*) {}

// Shuffles move any 4- or 8-byte value; `mode` says how the source lane is found.
enum ShflMode { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR };
struct ShflOp : WarpOp {
    uint64_t value;
    int arg;  // source lane, delta or lane mask
    int width;
    int mode;
};

inline void complete_shfl(WarpOp* const* lanes) {
    uint64_t in[32];
    for (int i = 0; i < 32; ++i)
        if (lanes[i]) in[i] = static_cast<ShflOp*>(lanes[i])->value;
    for (int i = 0; i < 32; ++i) {
        if (!lanes[i]) continue;
        auto* op = static_cast<ShflOp*>(lanes[i]);
        int w = op->width;
        if (w < 1 || w > 32 || (w & (w - 1)))
            fail("%s: width %d is not a power of two in [1, 32]", op->name, w);
        int base = i & ~(w - 1), src = i;
        switch (op->mode) {
            case SHFL_IDX: src = base + (op->arg & (w - 1)); break;
            case SHFL_UP: src = (i - base - op->arg >= 0) ? i - op->arg : i; break;
            case SHFL_DOWN: src = (i - base + op->arg < w) ? i + op->arg : i; break;
            case SHFL_XOR: src = i ^ op->arg; if (src >= base + w) src = i; break;
        }
        if (src < 0 || src > 31 || !lanes[src])
            fail("%s: lane %d reads lane %d, which is not in mask 0x%08x", op->name, i, src,
                 op->mask);
        op->value = in[src];
    }
}

template <class T>
inline T shfl(const char* name, unsigned mask, T v, int arg, int width, int mode) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 4- or 8-byte values");
    ShflOp op;
    op.name = name;
    op.mask = mask;
    op.complete = complete_shfl;
    op.value = 0;
    std::memcpy(&op.value, &v, sizeof(T));
    op.arg = arg;
    op.width = width;
    op.mode = mode;
    warp_collective(&op);
    T out;
    std::memcpy(&out, &op.value, sizeof(T));
    return out;
}

struct VoteOp : WarpOp {
    int pred;
    uint32_t ballot;
};
inline void complete_vote(WarpOp* const* lanes) {
    uint32_t b = 0;
    for (int i = 0; i < 32; ++i)
        if (lanes[i] && static_cast<VoteOp*>(lanes[i])->pred) b |= 1u << i;
    for (int i = 0; i < 32; ++i)
        if (lanes[i]) static_cast<VoteOp*>(lanes[i])->ballot = b;
}
inline uint32_t vote(const char* name, unsigned mask, int pred) {
    VoteOp op;
    op.name = name;
    op.mask = mask;
    op.complete = complete_vote;
    op.pred = pred != 0;
    warp_collective(&op);
    return op.ballot;
}

}  // namespace icdit_emu

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    icdit_emu::WarpOp op{"__syncwarp", mask, icdit_emu::complete_nothing};
    icdit_emu::warp_collective(&op);
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
    return icdit_emu::shfl("__shfl_sync", mask, v, src, width, icdit_emu::SHFL_IDX);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
    return icdit_emu::shfl("__shfl_up_sync", mask, v, int(delta), width, icdit_emu::SHFL_UP);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
    return icdit_emu::shfl("__shfl_down_sync", mask, v, int(delta), width,
                           icdit_emu::SHFL_DOWN);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
    return icdit_emu::shfl("__shfl_xor_sync", mask, v, lane_mask, width, icdit_emu::SHFL_XOR);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return icdit_emu::vote("__ballot_sync", mask, pred);
}
inline int __any_sync(unsigned mask, int pred) {
    return icdit_emu::vote("__any_sync", mask, pred) != 0;
}
inline int __all_sync(unsigned mask, int pred) {
    return (icdit_emu::vote("__all_sync", mask, pred) & mask) == mask;
}

// ---- atomics: real atomics, since blocks run concurrently on several OS threads ----------

inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline float atomicAdd(float* p, float v) {
    uint32_t old = __atomic_load_n(reinterpret_cast<uint32_t*>(p), __ATOMIC_RELAXED), next;
    float f;
    do {
        std::memcpy(&f, &old, 4);
        f += v;
        std::memcpy(&next, &f, 4);
    } while (!__atomic_compare_exchange_n(reinterpret_cast<uint32_t*>(p), &old, next, true,
                                          __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    std::memcpy(&f, &old, 4);
    return f;
}
inline int atomicMax(int* p, int v) {
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v &&
           !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline int atomicCAS(int* p, int cmp, int v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return cmp;
}
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }

// ---- math: CUDA's device functions, computed by the C library ------------------------------

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

#include "half.h"
#include "wmma.h"
#include "sm90.h"
