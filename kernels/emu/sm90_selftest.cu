// Emulation-only kernels that test the Hopper primitives of kernels/emu/sm90.h against layouts
// worked out by hand from the PTX ISA's figures (src/gpu/emu_sm90_selftest.rs), some wrong on
// purpose (`mode`).

#include "../sm90.cuh"

// The shared address of 1024-byte aligned scratch inside dynamic shared memory, and its pointer.
static uint32_t aligned_base(unsigned char** ptr) {
    unsigned char* raw = dynamic_shared<unsigned char>();
    const uint32_t s = shared_u32(raw);
    const uint32_t base = (s + 1023) / 1024 * 1024;
    *ptr = raw + (base - s);
    return base;
}

// One box copy of box_rows × 64 halves at (c0, c1) of `map` (128-byte swizzle), completing on
// an mbarrier; then the block copies the raw shared memory (swizzled as it lies) to
// out[block][box_rows × 64]. mode 1: the block reads before waiting on the mbarrier (and
// waits after a barrier, so the copy is accounted for).
extern "C" __global__ void emu_selftest_tma(const __grid_constant__ TensorMap map, half* out,
                                            int c0, int c1, int box_rows, int mode) {
    unsigned char* smem;
    const uint32_t base = aligned_base(&smem);
    const uint32_t bar = base + box_rows * 128;
    if (threadIdx.x == 0) {
        mbar_init(bar, 1);
        fence_mbar_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbar_arrive_expect_tx(bar, box_rows * 128);
        tma_load_2d(base, &map, c0, c1, bar);
    }
    if (mode != 1) mbar_wait(bar, 0);
    const half* s = reinterpret_cast<const half*>(smem);
    for (int i = threadIdx.x; i < box_rows * 64; i += blockDim.x)
        out[blockIdx.x * box_rows * 64 + i] = s[i];
    if (mode == 1) {
        __syncthreads();  // every thread has read before any waits
        mbar_wait(bar, 0);
    }
}

// A (64 × 64) and B (128 × 64), K-major, loaded by box copies with the 128-byte swizzle; one
// warpgroup issues wgmma m64n128k16 on k slice kk (descriptors advanced 32·kk bytes), and with
// mode 2 a second one on slice kk + 1 accumulating (scale-d 1); each thread writes its 64
// accumulators to out[block][thread][64]. mode 1: the accumulators are read before
// wgmma.wait_group (then waited for, so the group is retired).
extern "C" __global__ void emu_selftest_wgmma(const __grid_constant__ TensorMap map_a,
                                              const __grid_constant__ TensorMap map_b, float* out,
                                              int kk, int mode) {
    unsigned char* smem;
    const uint32_t base = aligned_base(&smem);
    const uint32_t a_s = base, b_s = base + 64 * 128, bar = b_s + 128 * 128;
    if (threadIdx.x == 0) {
        mbar_init(bar, 1);
        fence_mbar_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbar_arrive_expect_tx(bar, (64 + 128) * 128);
        tma_load_2d(a_s, &map_a, 0, 0, bar);
        tma_load_2d(b_s, &map_b, 0, 0, bar);
    }
    mbar_wait(bar, 0);
    float d[64];
    for (int i = 0; i < 64; ++i) d[i] = -1.f;
    wgmma_fence();
    wgmma_m64n128k16(d, smem_desc_sw128(a_s + 32 * kk, 1024), smem_desc_sw128(b_s + 32 * kk, 1024), 0);
    if (mode == 2)
        wgmma_m64n128k16(d, smem_desc_sw128(a_s + 32 * (kk + 1), 1024),
                         smem_desc_sw128(b_s + 32 * (kk + 1), 1024), 1);
    wgmma_commit();
    float early[64];
    for (int i = 0; i < 64; ++i) early[i] = d[i];
    wgmma_wait<0>();
    float* o = out + ((size_t)blockIdx.x * 128 + threadIdx.x) * 64;
    for (int i = 0; i < 64; ++i) o[i] = mode == 1 ? early[i] : d[i];
}

// Misuses the emulation must report instead of hanging or computing garbage.
extern "C" __global__ void emu_selftest_sm90_broken(int mode) {
    unsigned char* smem;
    const uint32_t base = aligned_base(&smem);
    float d[64] = {};
    switch (mode) {
        case 0:  // waiting on a phase nothing will complete
            if (threadIdx.x == 0) mbar_init(base, 2);
            __syncthreads();
            if (threadIdx.x == 0) mbar_arrive(base);
            mbar_wait(base, 0);
            break;
        case 1:  // an mbarrier used without init
            mbar_arrive(base + 64);
            break;
        case 2:  // wgmma issued by part of a warpgroup
            if (threadIdx.x < 64) wgmma_m64n128k16(d, smem_desc_sw128(base, 1024), smem_desc_sw128(base, 1024), 0);
            break;
        case 3:  // wgmma left in flight when the block ends
            wgmma_m64n128k16(d, smem_desc_sw128(base, 1024), smem_desc_sw128(base, 1024), 0);
            wgmma_commit();
            break;
        case 4:  // a descriptor reading past shared memory
            wgmma_m64n128k16(d, smem_desc_sw128(base + 4096, 1024), smem_desc_sw128(base, 1024), 0);
            wgmma_commit();
            wgmma_wait<0>();
            break;
        case 5:  // an arrival beyond the count while the phase still waits for bytes
            if (threadIdx.x == 0) {
                mbar_init(base, 1);
                mbar_arrive_expect_tx(base, 128);
                mbar_arrive(base);
            }
            break;
    }
    (void)d;
}
