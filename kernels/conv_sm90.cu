// The VAE decoder's 3×3 convolution (stride 1, zero padding 1, the nearest 2× upsample before
// it fused into the input indexing) on Hopper's own path (sm_90a): the implicit GEMM of
// vae_conv.cu,
//   out[p, co] = bias[co] + Σ_{tap, ci} in[tap(p), ci] · w[co, tap·cin + ci] + add[p, co],
// computed by wgmma, with the same shapes, layouts and epilogue (bias then add in f32, each
// output rounded once to f16, or stored f32). The weight is tap-major (cout, 9·cin) (vae_conv.cu's
// w_tap_major = 1) and cin a multiple of 64 (the launcher, src/gpu/launch/vae.rs, checks both and
// keeps vae_conv.cu for anything else: the decoder's conv_in, cin = 4).
// As a GEMM: M = images·h·w pixels (row m of a tile: one output pixel), N = cout, K = 9·cin in
// k steps of 64: one tap and 64 consecutive input channels.
//
// Launch: a persistent grid (at most one CTA per SM), 384 threads, as gemm_sm90.cu:
//   warpgroup 0, the producer, all 128 threads: per k step each waits until the consumers have
//     released the stage (empty[s]); thread 0 sets the weight tile's transaction count (16 KiB)
//     and issues its bulk tensor copy (map_w: box 64 k × 128 rows, 128-byte swizzle, rows past
//     cout zero) completing on full[s]; every thread gathers its 8 chunks of the A tile with
//     16-byte cp.async (thread t: channels 8·(t % 8) .. +7 of rows t/8 + 16i, i = 0 .. 7, 8
//     consecutive threads reading one pixel's 128 contiguous bytes; zero fill for padding taps,
//     rows past M) into the 128-byte swizzled layout the TMA would write (row r's chunk c at
//     byte 128r + 16·(c ⊕ (r mod 8))), then arrives on full[s] once they have landed
//     (cp.async.mbarrier.arrive.noinc). full[s] thus expects 129 arrivals (128 gathers and the
//     expect_tx) and 16 KiB of transactions. A thread's rows and their source pixels are worked
//     out once per tile, the tap's source addresses once per tap.
//   warpgroups 1 and 2, the consumers: rows 0–63 and 64–127 of the 128 × 128 tile; per k step
//     they wait on full[s], fence.proxy.async (the A tile was written by the generic proxy's
//     cp.async, wgmma reads through the async proxy; the acquire of the wait makes the
//     producer's copies visible to this thread, the fence orders them before its wgmma), issue
//     four wgmma m64n128k16, commit, wait, release the stage (one arrival per warpgroup); after
//     the tile's last k step each thread runs the epilogue from its 64 accumulators straight to
//     global memory while the producer already fills the stages with the next tile.
// Work units: tile u = (u mod tiles_m, u / tiles_m): the CTAs running at once share a weight
// column tile (L2) and walk the pixels.
// Shared memory: 4 stages × (A 128 × 64 + W 128 × 64, f16) = 128 KiB at a 1024-byte aligned
// start, 8 mbarriers, 1 KiB of alignment slack: 132,160 bytes (the launcher's CONV_SM90_SMEM).
// Precision: f16 products exact, f32 accumulation (wgmma's order), vae_conv.cu's epilogue.
// Exported: conv3x3_sm90_f16.

#include "sm90.cuh"

namespace {

constexpr int BM = 128, BN = 128, BK = 64, STAGES = 4, CONSUMERS = 2;
constexpr int THREADS = 128 * (1 + CONSUMERS);
constexpr uint32_t A_BYTES = BM * BK * 2, W_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + W_BYTES;
constexpr uint32_t SWIZZLE_ATOM = 8 * 128;
constexpr int ROWS_PER_THREAD = BM * (BK / 8) / 128;  // 8 chunks of 16 bytes per producer thread
static_assert(STAGES * STAGE_BYTES + 8 * 8 + 1024 == 132160, "update CONV_SM90_SMEM in src/gpu/launch/vae.rs");

struct Params {
    half* out;
    float* out_f32;
    const half* __restrict__ in;
    const half* __restrict__ bias;
    const half* add;
    int images, h, w, cin, cout, up2;
    int M, cblocks;  // pixels, cin / 64
};

// The producer thread's view of one output pixel (a row of the tile): the first element of its
// image in `in` and its coordinates; rows past M get coordinates whose every tap is padding.
struct Pixel {
    const half* image;
    int y, x;
};

__device__ __forceinline__ Pixel pixel_of(const Params& p, int gm) {
    if (gm >= p.M) return Pixel{p.in, -4, -4};
    const int hw = p.h * p.w, img = gm / hw, r = gm % hw;
    const size_t src_px = p.up2 ? (size_t)(p.h / 2) * (p.w / 2) : (size_t)hw;
    return Pixel{p.in + (size_t)img * src_px * p.cin, r / p.w, r % p.w};
}

// Channel 0 of the pixel's neighbour (dy, dx) in `in`, or null in the zero padding.
__device__ __forceinline__ const half* tap_source(const Params& p, const Pixel& q, int dy, int dx) {
    const int yy = q.y + dy, xx = q.x + dx;
    if (yy < 0 || xx < 0 || yy >= p.h || xx >= p.w) return nullptr;
    const size_t px = p.up2 ? (size_t)(yy >> 1) * (p.w >> 1) + (xx >> 1) : (size_t)yy * p.w + xx;
    return q.image + px * p.cin;
}

// MUTANT ≠ 0 only in the emulation's mutation tests (emu_mutant_conv_sm90 below): each drops
// one synchronisation the kernel needs, which the tests must see fail.
enum Mutant : int {
    SOUND = 0,
    NO_FULL_WAIT = 1,     // consumers read a stage without waiting for its copies
    NO_EMPTY_WAIT = 2,    // the producer refills a stage without waiting for its release
    EARLY_RELEASE = 3,    // consumers release a stage before their wgmma has read it
    NO_INIT_BARRIER = 4,  // no __syncthreads between the mbarriers' init and their use
};

// One consumer's 64 × 128 accumulators + bias + add, into out (f16) or out_f32. Thread t of the
// warpgroup holds rows r and r + 8 (r = 16·warp + lane/4) of each 8-column group j, columns
// 8j + 2·(lane % 4) and the next: the two are written together when cout is even and the
// pointers allow (the same f32 operations in the same order either way).
__device__ __forceinline__ void epilogue(const Params& p, const float (&d)[64], int row0, int col0, bool pairs) {
    const int t = threadIdx.x % 128;
    const int r = row0 + 16 * (t / 32) + (t % 32) / 4;
    SM90_UNROLL
    for (int j = 0; j < 16; ++j) {
        const int c = col0 + 8 * j + 2 * (t % 4);
        if (c >= p.cout) continue;
        const bool two = c + 1 < p.cout;
        float b0 = 0.f, b1 = 0.f;
        if (p.bias) {
            b0 = __half2float(p.bias[c]);
            if (two) b1 = __half2float(p.bias[c + 1]);
        }
        SM90_UNROLL
        for (int h = 0; h < 2; ++h) {
            const int gm = r + 8 * h;
            if (gm >= p.M) continue;
            const size_t at = (size_t)gm * p.cout + c;
            float v0 = d[4 * j + 2 * h] + b0, v1 = d[4 * j + 2 * h + 1] + b1;
            if (p.add) {
                v0 += __half2float(p.add[at]);
                if (two) v1 += __half2float(p.add[at + 1]);
            }
            if (pairs) {  // cout even: two is true
                if (p.out) {
                    *reinterpret_cast<half2*>(p.out + at) = __floats2half2_rn(v0, v1);
                } else {
                    float2 y;
                    y.x = v0;
                    y.y = v1;
                    *reinterpret_cast<float2*>(p.out_f32 + at) = y;
                }
            } else if (p.out) {
                p.out[at] = __float2half_rn(v0);
                if (two) p.out[at + 1] = __float2half_rn(v1);
            } else {
                p.out_f32[at] = v0;
                if (two) p.out_f32[at + 1] = v1;
            }
        }
    }
}

__device__ __forceinline__ bool aligned(const void* p, size_t bytes) {
    return reinterpret_cast<size_t>(p) % bytes == 0;
}

template <int MUTANT = SOUND>
__device__ __forceinline__ void conv_persistent(const TensorMap* map_w, const Params& p) {
    unsigned char* raw = dynamic_shared<unsigned char>();
    const uint32_t raw_s = shared_u32(raw);
    const uint32_t base = (raw_s + SWIZZLE_ATOM - 1) / SWIZZLE_ATOM * SWIZZLE_ATOM;
    const uint32_t full0 = base + STAGES * STAGE_BYTES, empty0 = full0 + 8 * STAGES;
    const int tiles_m = (p.M + BM - 1) / BM, units = tiles_m * ((p.cout + BN - 1) / BN);
    const int ksteps = 9 * p.cblocks;
    const int wg = threadIdx.x / 128;

    // Full: 128 gathers + the weight tile's expect_tx; empty: one arrival per consumer warpgroup.
    if (threadIdx.x == 0) init_stage_barriers(full0, empty0, STAGES, 128 + 1, CONSUMERS);
    if (MUTANT != NO_INIT_BARRIER) __syncthreads();

    if (wg == 0) {
        const int t = threadIdx.x;
        const int cc = t % 8, r0 = t / 8;  // chunk, first row (rows r0 + 16i)
        // This thread's chunk i lands at a_stage + dst + 2048·i (rows 16 apart: same r mod 8).
        const uint32_t dst = r0 * 128 + ((cc ^ (r0 % 8)) << 4);
        RingPos r;
        for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
            const int m0 = (unit % tiles_m) * BM, n0 = (unit / tiles_m) * BN;
            Pixel rows[ROWS_PER_THREAD];
            SM90_UNROLL
            for (int i = 0; i < ROWS_PER_THREAD; ++i) rows[i] = pixel_of(p, m0 + r0 + 16 * i);
            const half* src[ROWS_PER_THREAD];
            int tap = 0, cb = 0;
            for (int kt = 0; kt < ksteps; ++kt) {
                if (cb == 0) {
                    const int dy = tap / 3 - 1, dx = tap % 3 - 1;
                    SM90_UNROLL
                    for (int i = 0; i < ROWS_PER_THREAD; ++i) src[i] = tap_source(p, rows[i], dy, dx);
                }
                if (MUTANT != NO_EMPTY_WAIT) mbar_wait(empty0 + 8 * r.stage, r.phase ^ 1);  // stage s released
                const uint32_t st = base + r.stage * STAGE_BYTES, full = full0 + 8 * r.stage;
                if (t == 0) {
                    mbar_arrive_expect_tx(full, W_BYTES);
                    tma_load_2d(st + A_BYTES, map_w, tap * p.cin + cb * BK, n0, full);
                }
                const int c0 = cb * BK + 8 * cc;
                SM90_UNROLL
                for (int i = 0; i < ROWS_PER_THREAD; ++i)
                    cp_async_16_shared(st + dst + 2048 * i, src[i] ? src[i] + c0 : p.in, src[i] != nullptr);
                cp_async_mbar_arrive_noinc(full);
                if (++cb == p.cblocks) {
                    cb = 0;
                    ++tap;
                }
                r.advance(STAGES);
            }
        }
        return;
    }

    const int c = wg - 1;  // rows 64c .. 64c + 63 of each tile
    const bool pairs = p.cout % 2 == 0 && aligned(p.bias, 4) && aligned(p.add, 4) && aligned(p.out, 4) &&
                       aligned(p.out_f32, 8);
    RingPos r;
    float d[64];
    for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
        const int m0 = (unit % tiles_m) * BM, n0 = (unit / tiles_m) * BN;
        for (int kt = 0; kt < ksteps; ++kt) {
            if (MUTANT != NO_FULL_WAIT) mbar_wait(full0 + 8 * r.stage, r.phase);
            fence_proxy_async();  // the gathered A tile (generic proxy) before wgmma's reads
            const uint32_t a_s = base + r.stage * STAGE_BYTES + c * 64 * 128;
            const uint32_t w_s = base + r.stage * STAGE_BYTES + A_BYTES;
            wgmma_k64_sw128(d, a_s, w_s, kt > 0);
            if (MUTANT == EARLY_RELEASE && threadIdx.x % 128 == 0) mbar_arrive(empty0 + 8 * r.stage);
            wgmma_wait<0>();
            if (MUTANT != EARLY_RELEASE && threadIdx.x % 128 == 0) mbar_arrive(empty0 + 8 * r.stage);
            r.advance(STAGES);
        }
        epilogue(p, d, m0 + 64 * c, n0, pairs);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS, 1)
    conv3x3_sm90_f16(const __grid_constant__ TensorMap map_w, half* out, float* out_f32,
                     const half* __restrict__ in, const half* __restrict__ bias, const half* add,
                     int images, int h, int width, int cin, int cout, int up2) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
    __trap();  // built for another architecture than sm_90a: never launched (see build.rs)
#else
    const Params p{out, out_f32, in, bias, add, images, h, width, cin, cout, up2, images * h * width, cin / BK};
    conv_persistent(&map_w, p);
#endif
}

#ifndef __CUDACC__
// Emulation only: the kernel with one synchronisation dropped (enum Mutant), f16 out, no bias,
// no residual, no upsample.
extern "C" void emu_mutant_conv_sm90(const TensorMap map_w, half* out, const half* in, int h, int width, int cin,
                                     int cout, int mutant_id) {
    const Params p{out, nullptr, in, nullptr, nullptr, 1, h, width, cin, cout, 0, h * width, cin / BK};
    switch (mutant_id) {
        case NO_FULL_WAIT: conv_persistent<NO_FULL_WAIT>(&map_w, p); break;
        case NO_EMPTY_WAIT: conv_persistent<NO_EMPTY_WAIT>(&map_w, p); break;
        case EARLY_RELEASE: conv_persistent<EARLY_RELEASE>(&map_w, p); break;
        case NO_INIT_BARRIER: conv_persistent<NO_INIT_BARRIER>(&map_w, p); break;
        default: conv_persistent(&map_w, p); break;
    }
}
#endif
