// Hopper's (sm_90a) asynchronous copy and matrix machinery, as the few wrappers our kernels
// use: inline PTX under nvcc, the emulation's models otherwise (kernels/emu/sm90.h, from the
// PTX ISA's definitions). Every wrapper is named after the instruction it issues.
//
//   shared_u32(p)                          shared-window address of a pointer into shared memory
//   mbar_init(bar, count)                  mbarrier.init (one thread), then fence_mbar_init()
//   mbar_arrive_expect_tx(bar, bytes)      mbarrier.arrive.expect_tx: expect `bytes`, arrive once
//   mbar_arrive(bar)                       mbarrier.arrive
//   mbar_wait(bar, parity)                 mbarrier.try_wait.parity until the phase of that
//                                          parity has completed
//   tma_load_2d(dst, map, c0, c1, bar)     cp.async.bulk.tensor.2d global → shared, box at
//                                          (inner c0, outer c1), completing on bar
//   cp_async_16_shared(dst, src, valid)    cp.async.cg 16 bytes global → shared address dst
//                                          (zero fill when !valid: src-size 0)
//   cp_async_mbar_arrive_noinc(bar)        cp.async.mbarrier.arrive.noinc: one arrival on bar
//                                          once the thread's earlier cp.async have landed
//   wgmma_fence(), wgmma_commit(), wgmma_wait<N>()   the warpgroup's ordering instructions
//   wgmma_m64n128k16(d, desc_a, desc_b, scale_d)     D (64 × 128, f32 fragments) = A·B (+ D)
//   smem_desc_sw128(addr, sbo)             matrix descriptor: K-major, 128-byte swizzle
//   elect_one()                            elect.sync over the full warp
//   fence_proxy_async()                    fence.proxy.async.shared::cta
//   warpgroup_sync<ID>()                   bar.sync ID, 128: the calling warpgroup's 128
//                                          threads only (ID 1–15; 0 is __syncthreads')
//   setmaxnreg_inc<R>(), setmaxnreg_dec<R>()
// The tensor map is CUtensorMap on a GPU and icdit_emu::TensorMapEmu in the emulation (both
// 128 bytes, 64-byte aligned), passed to kernels by value as a __grid_constant__ parameter.
#pragma once

#include "device.cuh"

#include <stdint.h>

// Matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address, leading- and
// stride-dimension byte offsets (each >> 4, 14 bits), swizzle mode in bits 62–63 (1: 128-byte).
// K-major with the 128-byte swizzle: rows of 64 halves, atoms of 8 rows, `sbo` bytes between
// atoms (1024 when atoms are packed); the leading offset is unused there (set to 1 by
// convention).
__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t addr, uint32_t sbo) {
    return (uint64_t(addr >> 4) & 0x3fff) | (uint64_t(1) << 16) |
           ((uint64_t(sbo >> 4) & 0x3fff) << 32) | (uint64_t(1) << 62);
}

// Loops over register arrays must be unrolled (a run-time index moves the array to local
// memory); the emulation's compiler needs no hint.
#ifdef __CUDACC__
#define SM90_UNROLL _Pragma("unroll")
#else
#define SM90_UNROLL
#endif

#ifdef __CUDACC__

#include <cuda.h>

using TensorMap = CUtensorMap;

__device__ __forceinline__ uint32_t shared_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void fence_mbar_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, unsigned parity) {
    asm volatile(
        "{\n.reg .pred done;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

__device__ __forceinline__ void tma_load_2d(uint32_t dst, const TensorMap* map, int c0, int c1,
                                            uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
        : "memory");
}

__device__ __forceinline__ void cp_async_16_shared(uint32_t dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_mbar_arrive_noinc(uint32_t bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// D (64 × 128) = A (64 × 16) · B (16 × 128) + (scale_d ? D : 0); A and B K-major in shared
// memory (descriptors), f16 in, f32 accumulators: thread t of the warpgroup holds
// d[4j + i] = D[16·(t/32) + (t%32)/4 + 8·(i/2)][8j + 2·(t%4) + i%2], j = 0 .. 15.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

__device__ __forceinline__ bool elect_one() {
    uint32_t pred = 0;
    asm volatile(
        "{\n.reg .pred p;\n.reg .b32 lane;\n"
        "elect.sync lane|p, 0xffffffff;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(pred));
    return pred != 0;
}

__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

template <int ID>
__device__ __forceinline__ void warpgroup_sync() {
    static_assert(ID > 0 && ID < 16, "named barriers 1-15 (0 is __syncthreads')");
    asm volatile("bar.sync %0, 128;\n" ::"n"(ID) : "memory");
}

template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}

#else  // CPU emulation

using TensorMap = icdit_emu::TensorMapEmu;

inline uint32_t shared_u32(const void* p) { return icdit_emu::shared_addr(p); }
inline void mbar_init(uint32_t bar, unsigned count) { icdit_emu::mbar_init(bar, count); }
inline void fence_mbar_init() {}
inline void mbar_arrive_expect_tx(uint32_t bar, unsigned bytes) {
    icdit_emu::mbar_expect_tx(bar, bytes);
    icdit_emu::mbar_arrive(bar);
}
inline void mbar_arrive(uint32_t bar) { icdit_emu::mbar_arrive(bar); }
inline void mbar_wait(uint32_t bar, unsigned parity) { icdit_emu::mbar_wait(bar, parity); }
inline void tma_load_2d(uint32_t dst, const TensorMap* map, int c0, int c1, uint32_t bar) {
    icdit_emu::bulk_tensor_load_2d(dst, map, c0, c1, bar);
}
inline void cp_async_16_shared(uint32_t dst, const void* src, bool valid) {
    icdit_emu::gather_16(dst, src, valid);
}
inline void cp_async_mbar_arrive_noinc(uint32_t bar) { icdit_emu::gather_arrive_noinc(bar); }
inline void wgmma_fence() {}
inline void wgmma_commit() { icdit_emu::wgmma_commit(); }
template <int N>
inline void wgmma_wait() {
    icdit_emu::wgmma_wait(N);
}
inline void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    icdit_emu::wgmma_issue(d, 128, desc_a, desc_b, scale_d);
}
inline bool elect_one() { return __ballot_sync(0xffffffffu, 1) && icdit_emu::lane_id() == 0; }
inline void fence_proxy_async() {}
template <int ID>
inline void warpgroup_sync() {
    static_assert(ID > 0 && ID < 16, "named barriers 1-15 (0 is __syncthreads')");
    icdit_emu::warpgroup_barrier();
}
template <int R>
inline void setmaxnreg_inc() {}
template <int R>
inline void setmaxnreg_dec() {}

#endif

// ---- Built on the wrappers: what both Hopper kernels (gemm_sm90.cu, conv_sm90.cu) do alike ----

// The stage ring's barriers (one thread, before a __syncthreads): per stage a full barrier
// expecting `full_count` arrivals and an empty one expecting `empty_count`, 8 bytes apart.
__device__ __forceinline__ void init_stage_barriers(uint32_t full0, uint32_t empty0, int stages,
                                                    unsigned full_count, unsigned empty_count) {
    for (int s = 0; s < stages; ++s) {
        mbar_init(full0 + 8 * s, full_count);
        mbar_init(empty0 + 8 * s, empty_count);
    }
    fence_mbar_init();
}

// A position in the stage ring: the stage and the parity of its current use.
struct RingPos {
    int stage = 0;
    unsigned phase = 0;
    __device__ __forceinline__ void advance(int stages) {
        if (++stage == stages) {
            stage = 0;
            phase ^= 1;
        }
    }
};

// One 64-wide k step of a consumer warpgroup, issued and committed as one group:
// D (64 × 128) (+)= A (64 rows × 64 at a_s) · B (128 rows × 64 at w_s)ᵀ, both K-major with
// the 128-byte swizzle in packed 1024-byte atoms; four wgmma m64n128k16, the descriptors'
// start moving 32 bytes per 16 k (the swizzle is a function of the address). `accumulate`
// false: the first k step of a tile (D is overwritten).
__device__ __forceinline__ void wgmma_k64_sw128(float (&d)[64], uint32_t a_s, uint32_t w_s, bool accumulate) {
    wgmma_fence();
    SM90_UNROLL
    for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n128k16(d, smem_desc_sw128(a_s + 32 * kk, 1024), smem_desc_sw128(w_s + 32 * kk, 1024),
                         accumulate || kk > 0);
    wgmma_commit();
}
