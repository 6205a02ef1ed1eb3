// The one header every kernel includes. Kernels are written as ordinary CUDA; this header
// picks the real toolkit (nvcc) or the CPU emulation (kernels/emu, a C++ compiler), and adds
// the few helpers of our own that need a different body in each:
//   dynamic_shared<T>()            start of the launch's dynamic shared memory
//   cp_async_16(dst, src, valid)   16-byte global→shared copy (zero-filled when !valid);
//   cp_async_commit(), cp_async_wait<N>()   the cp.async group fences (sm_80+)
// In the emulation cp.async copies synchronously, so the fences are no-ops there.
#pragma once

#ifdef __CUDACC__

#include <cuda_fp16.h>
#include <mma.h>

template <class T>
__device__ __forceinline__ T* dynamic_shared() {
    extern __shared__ __align__(128) unsigned char icdit_dynamic_smem[];
    return reinterpret_cast<T*>(icdit_dynamic_smem);
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    const int src_bytes = valid ? 16 : 0;  // 0: read nothing, fill the 16 bytes with zeros
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
                 "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

#else  // CPU emulation

#include "emu/emu.h"

template <class T>
inline T* dynamic_shared() {
    return reinterpret_cast<T*>(icdit_emu::dynamic_shared());
}

inline void cp_async_16(void* smem, const void* gmem, bool valid) {
    if ((reinterpret_cast<uintptr_t>(smem) | reinterpret_cast<uintptr_t>(gmem)) % 16)
        icdit_emu::fail("cp_async_16: %p <- %p is not 16-byte aligned", smem, gmem);
    if (valid)
        std::memcpy(smem, gmem, 16);
    else
        std::memset(smem, 0, 16);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

#endif
