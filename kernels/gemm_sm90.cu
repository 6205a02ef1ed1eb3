// Linear layers on Hopper's own path (sm_90a): the fused linear layer of gemm.cu,
//   v[m, n] = Σ_k a[m, k] · w[n, k] + bias[n] + add[m mod add_rows, n],
//   out = act(v) (f16) or v (f32), pre = f16(v) (optional),
// with the same epilogue code (gemm_epilogue.cuh: the same formulas, each output rounded
// once), computed by wgmma from tiles the tensor memory accelerator loads.
// Shapes: a (M, K) f16 with row stride lda, w (N, K) f16 row-major: both given as tensor maps
// (src/gpu/launch/gemm.rs builds them: 2-D, f16, box 64 × 128 — k × rows —, 128-byte
// swizzle, out-of-bounds elements zero), so M, N and K need not be multiples of the tile; the
// launcher needs K % 8 == 0, lda % 8 == 0 and 16-byte aligned a, w and w2 (the tensor map's
// rules). A second weight w2 (n2, K) (map_w2; n2 = 0: none) adds ⌈n2/128⌉ column tiles whose
// raw f32 sums go to out2 (row stride ld2), as in gemm.cu (icc's t_s = down·x_s, kept by a
// full step's linear in the same pass). Split-K (ws not null): every tile once per k slice of
// k_split (a multiple of 64), raw sums into slice z of ws, which gemm.cu's
// gemm_splitk_reduce_f16 adds up in order and finishes with the epilogue; without ws,
// k_split = K. With map_am (minus ≠ 0; icc's increment, as gemm.cu's a_minus: same shape and
// row stride as a) the product is of a' = f16(a − a_minus) instead of a: see "The increment".
//
// Launch: a persistent grid (at most one CTA per SM: __launch_bounds__(384, 1)), 384 threads:
//   warpgroup 0, the producer: one elected thread walks the CTA's work units (unit u, u + grid,
//     …; a unit is a tile and a k slice, consecutive tiles sharing a w column, so the CTAs
//     running at once read the same weight tiles) and, per 64-wide k step, waits until the consumers have released the stage
//     (empty[s]), sets the transaction count (32 KiB) and issues the two bulk tensor copies
//     completing on full[s]; setmaxnreg gives its registers to the consumers;
//   warpgroups 1 and 2, the consumers: rows 0–63 and 64–127 of the 128 × 128 tile; per k step
//     they wait on full[s], issue four wgmma m64n128k16 (k = 0, 16, 32, 48 within the stage:
//     the descriptor's start address moves 32 bytes, the swizzle being a function of the
//     address), commit, wait for them, and release the stage (one arrival per warpgroup);
//     after the last k step each thread runs the epilogue on its 64 accumulators, straight
//     from registers to global memory, while the producer already fills the stages with the
//     next tile.
// Shared memory: 4 stages × (a tile 128 × 64 + w tile 128 × 64, f16, 128-byte swizzled rows)
// = 128 KiB at a 1024-byte aligned start (the swizzle repeats every 1024 bytes), then the 8
// mbarriers, plus up to 1 KiB of alignment slack: 132,160 bytes of dynamic shared memory
// (the launcher asks for exactly that); with the increment each stage also holds the a_minus
// tile (128 × 64 after w's): 4 × 48 KiB + 64 + 1024 = 197,696 bytes.
// The increment: TMA copies, it cannot subtract, so the producer loads a_minus's tile beside
// a's (same box, same coordinates, same swizzle: the two tiles have the same layout, so an
// element-wise subtraction over the swizzled bytes is a subtraction of matrix elements
// whatever the layout) on the same full barrier (48 KiB of transactions). After its full
// wait each consumer warpgroup replaces its 64 rows of the a tile (8 KiB) by
// f16(a − a_minus), each thread four 16-byte chunks (the f32 difference rounded once, as
// gemm.cu forms it: the same a' to the bit), then fence.proxy.async (its generic-proxy writes
// ordered before the async proxy's wgmma reads, and before the TMA copy that later refills
// the stage) and bar.sync over its 128 threads (every row of its A operand is written before
// any warp issues the wgmma that reads them all). The stage is released after the wgmma as
// before. Cost: 50 % more bytes per stage (one more tile read, L2 mostly: a_minus is icc's
// cached x_s) and 16 KiB of shared memory traffic per k step per CTA, against a second GEMM
// pass or a subtraction kernel through global memory.
// Precision: f16 products exact, f32 accumulation (wgmma's internal order), the epilogue of
// gemm.cu.
// Exported: gemm_sm90_f16_128x128_k64.

#include "sm90.cuh"
#include "gemm_epilogue.cuh"

namespace {

constexpr int BM = 128, BN = 128, BK = 64, STAGES = 4;
constexpr int CONSUMERS = 2;
constexpr int THREADS = 128 * (1 + CONSUMERS);
constexpr uint32_t A_BYTES = BM * BK * 2, W_BYTES = BN * BK * 2;
constexpr uint32_t SWIZZLE_ATOM = 8 * 128;  // 8 rows of 128 bytes
// Bytes of a stage: the a and w tiles, and a_minus's tile with the increment.
template <bool MINUS>
constexpr uint32_t STAGE_BYTES_OF = A_BYTES + W_BYTES + (MINUS ? A_BYTES : 0);
// The launcher's dynamic shared memory (src/gpu/launch/gemm.rs, SM90_SMEM and
// SM90_SMEM_MINUS): the stages, 8 mbarriers, 1 KiB of alignment slack.
static_assert(STAGES * STAGE_BYTES_OF<false> + 8 * 8 + 1024 == 132160 &&
                  STAGES * STAGE_BYTES_OF<true> + 8 * 8 + 1024 == 197696,
              "update SM90_SMEM in src/gpu/launch/gemm.rs");
static_assert(STAGES * STAGE_BYTES_OF<true> + 8 * 8 + 1024 <= 227 * 1024, "fits sm_90's opted-in smem");

// Consumer warpgroup c's rows of the stage's a tile (64 rows of 128 bytes at a_tile) become
// f16(a − a_minus) (a_minus's tile at am_tile, the same layout), each of the 128 threads four
// 16-byte chunks; then the writes are ordered before the async proxy's reads (wgmma) and
// writes (the TMA refill), and every thread of the warpgroup waits for all.
__device__ __forceinline__ void subtract_rows(unsigned char* a_tile, const unsigned char* am_tile, int c) {
    const int t = threadIdx.x % 128;
    SM90_UNROLL
    for (int i = 0; i < 4; ++i) {
        const int off = 16 * (t + 128 * i);
        half2* x = reinterpret_cast<half2*>(a_tile + off);
        const half2* y = reinterpret_cast<const half2*>(am_tile + off);
        SM90_UNROLL
        for (int e = 0; e < 4; ++e) {
            const float2 fx = __half22float2(x[e]), fy = __half22float2(y[e]);
            x[e] = __floats2half2_rn(fx.x - fy.x, fx.y - fy.y);
        }
    }
    fence_proxy_async();
    if (c == 0)  // (warpgroup-uniform) one named barrier per consumer warpgroup
        warpgroup_sync<1>();
    else
        warpgroup_sync<2>();
}

// The epilogue of one consumer's 64 × 128 accumulators. Thread t of the warpgroup holds rows
// r and r + 8 (r = 16·warp + lane/4) of each 8-column group j, columns 8j + 2·(lane % 4) and
// the next. Columns are numbered as gemm_epilogue.cuh's finish1/finish2 take them (from N on:
// the second weight's, raw sums into out2): the tile starts at column col0, and columns from
// `limit` on do not exist.
template <int ACT>
__device__ __forceinline__ void epilogue(const Params& p, const float (&d)[64], int row0, int col0,
                                         int limit, bool pairs) {
    const int t = threadIdx.x % 128;
    const int r = row0 + 16 * (t / 32) + (t % 32) / 4;
    SM90_UNROLL
    for (int j = 0; j < 16; ++j) {
        const int c = col0 + 8 * j + 2 * (t % 4);
        SM90_UNROLL
        for (int h = 0; h < 2; ++h) {
            const int gm = r + 8 * h;
            if (gm >= p.M) continue;
            const float v0 = d[4 * j + 2 * h], v1 = d[4 * j + 2 * h + 1];
            if (pairs && c + 1 < limit) {
                finish2<ACT>(p, gm, c, v0, v1);
            } else {
                if (c < limit) finish1<ACT>(p, gm, c, v0);
                if (c + 1 < limit) finish1<ACT>(p, gm, c + 1, v1);
            }
        }
    }
}

// Split-K: the raw sums of one consumer's 64 × 128 accumulators into slice z of the workspace
// ((splits, M, N + n2), row stride N + n2), for gemm_splitk_reduce_f16 (gemm.cu) to add up.
__device__ __forceinline__ void store_partial(const Params& p, const float (&d)[64], int z, int row0,
                                              int col0, int limit) {
    const int t = threadIdx.x % 128, nt = p.N + p.n2;
    const int r = row0 + 16 * (t / 32) + (t % 32) / 4;
    float* dst = p.ws + (size_t)z * p.M * nt;
    SM90_UNROLL
    for (int j = 0; j < 16; ++j) {
        const int c = col0 + 8 * j + 2 * (t % 4);
        SM90_UNROLL
        for (int h = 0; h < 2; ++h) {
            const int gm = r + 8 * h;
            if (gm >= p.M) continue;
            if (c < limit) dst[(size_t)gm * nt + c] = d[4 * j + 2 * h];
            if (c + 1 < limit) dst[(size_t)gm * nt + c + 1] = d[4 * j + 2 * h + 1];
        }
    }
}

// MUTANT ≠ 0 only in the emulation's mutation tests (emu_mutant_gemm_sm90 below): each drops
// one synchronisation the kernel needs, which the tests must see fail.
enum Mutant : int {
    SOUND = 0,
    NO_FULL_WAIT = 1,     // consumers read a stage without waiting for its copies
    NO_EMPTY_WAIT = 2,    // the producer refills a stage without waiting for its release
    EARLY_RELEASE = 3,    // consumers release a stage before their wgmma has read it
    NO_INIT_BARRIER = 4,  // no __syncthreads between the mbarriers' init and their use
    NO_SUBTRACT = 5,      // the increment: consumers multiply a, not a − a_minus
    SHORT_TX = 6,         // the increment: the full barrier expects a's and w's bytes only
};

template <int ACT, bool MINUS, int MUTANT = SOUND>
__device__ __forceinline__ void gemm_persistent(const TensorMap* map_a, const TensorMap* map_w,
                                                const TensorMap* map_w2, const TensorMap* map_am,
                                                const Params& p) {
    constexpr uint32_t STAGE_BYTES = STAGE_BYTES_OF<MINUS>;
    unsigned char* raw = dynamic_shared<unsigned char>();
    const uint32_t raw_s = shared_u32(raw);
    const uint32_t base = (raw_s + SWIZZLE_ATOM - 1) / SWIZZLE_ATOM * SWIZZLE_ATOM;
    const uint32_t full0 = base + STAGES * STAGE_BYTES, empty0 = full0 + 8 * STAGES;
    // Column tiles: ⌈N/BN⌉ of w, then ⌈n2/BN⌉ of the second weight (each weight's tiles start
    // at its row 0, so no tile mixes the two).
    const int tiles_m = (p.M + BM - 1) / BM, tiles_n1 = (p.N + BN - 1) / BN;
    // Work units: every tile once per k slice (split-K: gridDim-independent, k_split a multiple
    // of BK, slice z covering k in [z·k_split, min(K, (z + 1)·k_split))).
    const int tiles = tiles_m * (tiles_n1 + (p.n2 + BN - 1) / BN);
    const int splits = (p.K + p.k_split - 1) / p.k_split, units = tiles * splits;
    auto k_tiles = [&](int z) { return (min(p.K, (z + 1) * p.k_split) - z * p.k_split + BK - 1) / BK; };
    const int wg = threadIdx.x / 128;

    // Full: the producer's arrive.expect_tx; empty: one arrival per consumer warpgroup.
    if (threadIdx.x == 0) init_stage_barriers(full0, empty0, STAGES, 1, CONSUMERS);
    if (MUTANT != NO_INIT_BARRIER) __syncthreads();

    if (wg == 0) {
        setmaxnreg_dec<40>();
        if (threadIdx.x < 32 && elect_one()) {
            RingPos r;
            for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
                const int tile = unit % tiles, z = unit / tiles, k0 = z * p.k_split;
                const int m0 = (tile % tiles_m) * BM, tn = tile / tiles_m;
                const bool second = tn >= tiles_n1;
                const TensorMap* map_b = second ? map_w2 : map_w;
                const int n0 = (second ? tn - tiles_n1 : tn) * BN;
                const int ktiles = k_tiles(z);
                for (int kt = 0; kt < ktiles; ++kt) {
                    if (MUTANT != NO_EMPTY_WAIT) mbar_wait(empty0 + 8 * r.stage, r.phase ^ 1);  // stage s released
                    mbar_arrive_expect_tx(full0 + 8 * r.stage, MUTANT == SHORT_TX ? A_BYTES + W_BYTES : STAGE_BYTES);
                    const uint32_t st = base + r.stage * STAGE_BYTES;
                    tma_load_2d(st, map_a, k0 + kt * BK, m0, full0 + 8 * r.stage);
                    tma_load_2d(st + A_BYTES, map_b, k0 + kt * BK, n0, full0 + 8 * r.stage);
                    if (MINUS) tma_load_2d(st + A_BYTES + W_BYTES, map_am, k0 + kt * BK, m0, full0 + 8 * r.stage);
                    r.advance(STAGES);
                }
            }
        }
        return;
    }

    setmaxnreg_inc<232>();
    const int c = wg - 1;  // rows 64c .. 64c + 63 of each tile
    const bool pairs = pairs_ok(p);
    RingPos r;
    float d[64];
    for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
        const int tile = unit % tiles, z = unit / tiles;
        const int m0 = (tile % tiles_m) * BM, tn = tile / tiles_m;
        const int ktiles = k_tiles(z);
        for (int kt = 0; kt < ktiles; ++kt) {
            if (MUTANT != NO_FULL_WAIT) mbar_wait(full0 + 8 * r.stage, r.phase);
            const uint32_t a_s = base + r.stage * STAGE_BYTES + c * 64 * 128;
            const uint32_t w_s = base + r.stage * STAGE_BYTES + A_BYTES;
            if (MINUS && MUTANT != NO_SUBTRACT)
                subtract_rows(raw + (a_s - raw_s), raw + (a_s + A_BYTES + W_BYTES - raw_s), c);
            wgmma_k64_sw128(d, a_s, w_s, kt > 0);
            if (MUTANT == EARLY_RELEASE && threadIdx.x % 128 == 0) mbar_arrive(empty0 + 8 * r.stage);
            wgmma_wait<0>();
            if (MUTANT != EARLY_RELEASE && threadIdx.x % 128 == 0) mbar_arrive(empty0 + 8 * r.stage);
            r.advance(STAGES);
        }
        const int col0 = tn < tiles_n1 ? tn * BN : p.N + (tn - tiles_n1) * BN;
        const int limit = tn < tiles_n1 ? p.N : p.N + p.n2;
        if (p.ws)
            store_partial(p, d, z, m0 + 64 * c, col0, limit);
        else
            epilogue<ACT>(p, d, m0 + 64 * c, col0, limit, pairs);
    }
}

}  // namespace


extern "C" __global__ void __launch_bounds__(THREADS, 1)
    gemm_sm90_f16_128x128_k64(const __grid_constant__ TensorMap map_a,
                              const __grid_constant__ TensorMap map_w,
                              const __grid_constant__ TensorMap map_w2,
                              const __grid_constant__ TensorMap map_am, int minus, half* out,
                              float* out_f32, half* pre, const half* __restrict__ bias,
                              const half* add, int M, int N, int K, int ldc, int ld_add,
                              int add_rows, float* out2, int n2, int ld2, float* ws, int k_split,
                              int act) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
    __trap();  // built for another architecture than sm_90a: never launched (see build.rs)
#else
    const Params p{out, out_f32, pre,    nullptr, nullptr, nullptr, bias, add, ws,  M, N,
                   K,   0,       ldc,    ld_add,  add_rows, k_split, nullptr, out2, n2, ld2};
    if (minus) {
        if (act == ACT_GELU_TANH)
            gemm_persistent<ACT_GELU_TANH, true>(&map_a, &map_w, &map_w2, &map_am, p);
        else if (act == ACT_SILU)
            gemm_persistent<ACT_SILU, true>(&map_a, &map_w, &map_w2, &map_am, p);
        else
            gemm_persistent<ACT_NONE, true>(&map_a, &map_w, &map_w2, &map_am, p);
    } else {
        if (act == ACT_GELU_TANH)
            gemm_persistent<ACT_GELU_TANH, false>(&map_a, &map_w, &map_w2, &map_am, p);
        else if (act == ACT_SILU)
            gemm_persistent<ACT_SILU, false>(&map_a, &map_w, &map_w2, &map_am, p);
        else
            gemm_persistent<ACT_NONE, false>(&map_a, &map_w, &map_w2, &map_am, p);
    }
#endif
}

#ifndef __CUDACC__
// Emulation only: the kernel with one synchronisation dropped (enum Mutant), no activation;
// with minus ≠ 0, of a − a_minus (map_am).
template <bool MINUS>
static void run_mutant(const TensorMap& map_a, const TensorMap& map_w, const TensorMap& map_am, const Params& p,
            int mutant) {
    const TensorMap *a = &map_a, *w = &map_w, *am = &map_am;
    switch (mutant) {
        case NO_FULL_WAIT: gemm_persistent<ACT_NONE, MINUS, NO_FULL_WAIT>(a, w, w, am, p); break;
        case NO_EMPTY_WAIT: gemm_persistent<ACT_NONE, MINUS, NO_EMPTY_WAIT>(a, w, w, am, p); break;
        case EARLY_RELEASE: gemm_persistent<ACT_NONE, MINUS, EARLY_RELEASE>(a, w, w, am, p); break;
        case NO_INIT_BARRIER: gemm_persistent<ACT_NONE, MINUS, NO_INIT_BARRIER>(a, w, w, am, p); break;
        case NO_SUBTRACT: gemm_persistent<ACT_NONE, MINUS, NO_SUBTRACT>(a, w, w, am, p); break;
        case SHORT_TX: gemm_persistent<ACT_NONE, MINUS, SHORT_TX>(a, w, w, am, p); break;
        default: gemm_persistent<ACT_NONE, MINUS>(a, w, w, am, p); break;
    }
}

extern "C" void emu_mutant_gemm_sm90(const TensorMap map_a, const TensorMap map_w, const TensorMap map_am,
                                     int minus, half* out, int M, int N, int K, int mutant_id) {
    const Params p{out, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, M, N,
                   K,   0,       N,       N,       M,       K,       nullptr, nullptr, 0,       0};
    if (minus)
        run_mutant<true>(map_a, map_w, map_am, p, mutant_id);
    else
        run_mutant<false>(map_a, map_w, map_am, p, mutant_id);
}
#endif
