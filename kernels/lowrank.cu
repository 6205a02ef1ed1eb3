// Increment-calibrated caching's low-rank linear in one launch, the rank-r intermediate kept
// on chip:
//   t[m, ·]   = f16( Σ_k a'[m, k] · down_g[·, k] )          (phase 1, f32 sums, rounded once)
//   v[m, n]   = add[m, n] + scale · Σ_j t[m, j] · up_g[n', j] (phase 2, f32)
//   out[m, n] = f16(act(v))
// with a' = f16(a − a_minus) when a_minus is given (icc's direct form, y_s + up·(down·(x − x_s)))
// or a' = a (the folded form b_s + up·(down·x); with scale = −1 and add = y_s the same kernel
// writes b_s = y_s − up·(down·x_s) on a full step). The projected form: with t_minus (f32,
// (M, ld_t), group g's columns at r_off_g) t = f16(Σ_k a·down − t_minus), i.e.
// y_s + up·(down·x − t_s), t_s = down·x_s kept by a full step's GEMM (gemm.cu's second
// weight).
// Output groups: the n columns are `groups` (1 or 3) equal groups of gw = N / groups columns;
// group g uses down rows [r_off_g, r_off_g + r_g) of the stacked down factor (R_total, K) and
// its own up factor up_g (gw, r_g) (row stride r_g), n' = n − g·gw. q, k and v of a qkv layer
// are the three groups of one launch; proj, fc1 and fc2 are one group each.
// Shapes: a, a_minus (M, K) with row stride lda; out and add (M, N) with row strides ldc and
// ld_add; every pointer 16-byte aligned, K, lda, r_g multiples of 8, r_g ≤ RMAX (the launcher,
// src/gpu/launch/lowrank.rs, checks; it falls back to two fused GEMMs otherwise).
// Precision: as the two-GEMM path it replaces (t rounded to f16 once, f32 accumulation, the
// epilogue in f32, one rounding of each output); the k order of the sums is the kernel's own.
//
// Launch: grid (groups × col_splits, ⌈M/BM⌉), 128 threads (4 warps), dynamic shared memory
// lowrank_smem_bytes() (the launcher's formula). Block (x, y): group g = x / col_splits,
// rows [y·BM, y·BM + BM), and the column tiles (64 wide) [s·T/col_splits, (s+1)·T/col_splits)
// of its group (s = x mod col_splits, T = ⌈gw/64⌉). Each block computes t for its rows
// itself (col_splits blocks of one row range repeat phase 1: the launcher bounds how often).
// Phase 1 is a cp.async pipeline of STAGES k tiles (the a tile, the a_minus tile and the down
// tile of RP = r_g rounded up to 16 rows), one barrier per k step as in gemm.cu; warp w owns t's
// column fragments w, w + 4, … . t goes through shared memory as f32, is rounded to f16 into
// its own buffer, and stays there. Phase 2 walks the block's column tiles with two up-tile
// buffers (the next tile loads while the current one multiplies); warp w owns column fragment
// w of the 64-wide tile; the f32 tile goes through shared memory to the epilogue.
// Exported: lowrank_fused_f16_bm16, lowrank_fused_f16_bm32.

#include "device.cuh"

using namespace nvcuda;

namespace {

enum Act : int { ACT_NONE = 0, ACT_GELU_TANH = 1 };

constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;
constexpr int BK = 32;              // phase-1 k step
constexpr int LDS = BK + 8;         // phase-1 stage row stride, halves
constexpr int STAGES = 3;           // phase-1 pipeline depth
constexpr int BN = 64;              // phase-2 column tile
constexpr int RMAX = 256;           // largest rank per group
constexpr int CHUNKS = BK / 8;      // 16-byte chunks per stage row

struct Params {
    half* out;
    const half* __restrict__ a;
    const half* __restrict__ a_minus;
    const half* __restrict__ down;
    const half* __restrict__ up0;
    const half* __restrict__ up1;
    const half* __restrict__ up2;
    const half* add;
    const float* t_minus;
    float scale;
    int M, N, K, lda, ldc, ld_add, ld_t, groups, r0, r1, r2, col_splits, act;
};

__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608028654f;  // sqrt(2/pi)
    return 0.5f * x * (1.f + tanhf(k * (x + 0.044715f * x * x * x)));
}

// Rows [row0, row0 + rows_here) × k [k0, k0 + BK) of a matrix with row stride ld into a
// ROWS × LDS tile, zeros for rows ≥ rows_valid or k ≥ K (K % 8 == 0: a chunk is all in or out).
__device__ __forceinline__ void stage_rows(half* s, const half* g, int ld, int rows, int rows_valid,
                                           int row0, int k0, int K) {
    for (int c = threadIdx.x; c < rows * CHUNKS; c += THREADS) {
        const int r = c / CHUNKS, kc = (c % CHUNKS) * 8;
        const int gr = row0 + r, gk = k0 + kc;
        const bool valid = gr < rows_valid && gk < K;
        cp_async_16(s + r * LDS + kc, valid ? g + (size_t)gr * ld + gk : g, valid);
    }
}

template <int FMR>
__device__ __forceinline__ void lowrank(const Params& p) {
    constexpr int BM = 16 * FMR;
    const int splits = p.col_splits;
    const int g = blockIdx.x / splits, s = blockIdx.x % splits;
    const int gw = p.N / p.groups;
    const int rank = g == 0 ? p.r0 : g == 1 ? p.r1 : p.r2;
    const int r_off = g == 0 ? 0 : g == 1 ? p.r0 : p.r0 + p.r1;
    const half* up = g == 0 ? p.up0 : g == 1 ? p.up1 : p.up2;
    const int rp = (rank + 15) / 16 * 16;  // rank rounded up to whole fragments
    const int m0 = blockIdx.y * BM;
    const bool diff = p.a_minus != nullptr;

    // Shared memory (lowrank_smem_bytes in the launcher): cf (f32, BM rows of
    // max(RP, BN) + 4: t, then each output tile), ts (f16 t, BM × (RP + 8)), then the phase-1
    // stages or, later, the two up-tile buffers (BN × (RP + 8) each).
    const int ldf = max(rp, BN) + 4, ldt = rp + 8;
    float* cf = dynamic_shared<float>();
    half* ts = reinterpret_cast<half*>(cf + BM * ldf);
    half* work = ts + BM * ldt;
    const int stage = (2 * BM + rp) * LDS;  // halves: a, a_minus, down

    const int warp = threadIdx.x / 32;
    const int frags = rp / 16;  // t's column fragments; warp w owns w, w + 4, …

    // ---- phase 1: t = a'·down_gᵀ for rows [m0, m0 + BM) -----------------------------------
    {
        const half* down = p.down + (size_t)r_off * p.K;
        const int ktiles = (p.K + BK - 1) / BK;
        auto load = [&](int kt) {
            half* st = work + (kt % STAGES) * stage;
            const int k0 = kt * BK;
            stage_rows(st, p.a, p.lda, BM, p.M, m0, k0, p.K);
            if (diff) stage_rows(st + BM * LDS, p.a_minus, p.lda, BM, p.M, m0, k0, p.K);
            stage_rows(st + 2 * BM * LDS, down, p.K, rp, rank, 0, k0, p.K);
        };
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FMR][RMAX / 16 / WARPS];
        for (int i = 0; i < FMR; ++i)
            for (int j = 0; j < RMAX / 16 / WARPS; ++j) wmma::fill_fragment(acc[i][j], 0.f);
        for (int st = 0; st < STAGES - 1; ++st) {
            if (st < ktiles) load(st);
            cp_async_commit();
        }
        for (int t = 0; t < ktiles; ++t) {
            cp_async_wait<STAGES - 2>();  // this thread's copies of k tile t have landed
            __syncthreads();  // everyone's have; every warp is done with buffer (t − 1) mod S
            if (t + STAGES - 1 < ktiles) load(t + STAGES - 1);
            cp_async_commit();
            const half* as = work + (t % STAGES) * stage;
            const half* ms = as + BM * LDS;
            const half* ds = as + 2 * BM * LDS;
            for (int kk = 0; kk < BK; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa[FMR];
                for (int i = 0; i < FMR; ++i) {
                    wmma::load_matrix_sync(fa[i], as + i * 16 * LDS + kk, LDS);
                    if (diff) {
                        // a − a_minus element by element (fragments of one type share their
                        // element mapping), rounded once to f16 as the two-GEMM path does.
                        wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fm;
                        wmma::load_matrix_sync(fm, ms + i * 16 * LDS + kk, LDS);
                        for (int e = 0; e < fm.num_elements; ++e)
                            fa[i].x[e] = __float2half_rn(__half2float(fa[i].x[e]) - __half2float(fm.x[e]));
                    }
                }
                for (int j = 0; j < RMAX / 16 / WARPS; ++j) {
                    const int f = warp + j * WARPS;
                    if (f >= frags) break;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb;
                    wmma::load_matrix_sync(fb, ds + f * 16 * LDS + kk, LDS);
                    for (int i = 0; i < FMR; ++i) wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
                }
            }
        }
        cp_async_wait<0>();  // the trailing (empty) groups: no copy may still target the stages
        for (int j = 0; j < RMAX / 16 / WARPS; ++j) {
            const int f = warp + j * WARPS;
            if (f >= frags) break;
            for (int i = 0; i < FMR; ++i)
                wmma::store_matrix_sync(cf + i * 16 * ldf + f * 16, acc[i][j], ldf, wmma::mem_row_major);
        }
        __syncthreads();  // t complete in cf; every warp is done with the stages
        for (int e = threadIdx.x; e < BM * rp; e += THREADS) {
            const int r = e / rp, c = e % rp;
            float v = cf[r * ldf + c];
            // The projected form: t − t_s in f32, rounded once (rows past M and columns past
            // the rank stay zero: their t is zero and t_s is not read).
            if (p.t_minus && c < rank && m0 + r < p.M) v -= p.t_minus[(size_t)(m0 + r) * p.ld_t + r_off + c];
            ts[r * ldt + c] = __float2half_rn(v);
        }
        // The barrier at the top of phase 2's first tile publishes ts.
    }

    // ---- phase 2: the block's output tiles, act(add + scale · t·up_gᵀ) ---------------------
    const int tiles = (gw + BN - 1) / BN;
    const int first = (int)((long long)s * tiles / splits), last = (int)((long long)(s + 1) * tiles / splits);
    // The two up-tile buffers: work and work + BN·ldt (by arithmetic, not an array, so the
    // pointers stay in registers).
    const int ub_stride = BN * ldt;
    const int up_chunks = rp / 8;  // 16-byte chunks per up-tile row
    auto load_up = [&](int tile, half* dst) {
        const int n0 = tile * BN;
        for (int c = threadIdx.x; c < BN * up_chunks; c += THREADS) {
            const int r = c / up_chunks, kc = (c % up_chunks) * 8;
            const bool valid = n0 + r < gw && kc < rank;
            cp_async_16(dst + r * ldt + kc, valid ? up + (size_t)(n0 + r) * rank + kc : up, valid);
        }
    };
    if (first < last) load_up(first, work);
    cp_async_commit();
        for (int tile = first; tile < last; ++tile) {
        const int b = (tile - first) % 2;
        if (tile + 1 < last) load_up(tile + 1, work + (1 - b) * ub_stride);
        cp_async_commit();
        cp_async_wait<1>();  // this thread's copies of this tile have landed
        __syncthreads();     // everyone's have; ts is published; the last epilogue is done with cf
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FMR];
        for (int i = 0; i < FMR; ++i) wmma::fill_fragment(acc[i], 0.f);
        const half* us = work + b * ub_stride;
        for (int kk = 0; kk < rp; kk += 16) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb;
            wmma::load_matrix_sync(fb, us + warp * 16 * ldt + kk, ldt);
            for (int i = 0; i < FMR; ++i) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
                wmma::load_matrix_sync(fa, ts + i * 16 * ldt + kk, ldt);
                wmma::mma_sync(acc[i], fa, fb, acc[i]);
            }
        }
        for (int i = 0; i < FMR; ++i)
            wmma::store_matrix_sync(cf + i * 16 * ldf + warp * 16, acc[i], ldf, wmma::mem_row_major);
        __syncthreads();  // the tile is in cf; every warp is done with this up buffer
        const int n0 = g * gw + tile * BN;
        const int width = min(BN, gw - tile * BN);
        for (int e = threadIdx.x; e < BM * BN; e += THREADS) {
            const int r = e / BN, c = e % BN;
            const int gm = m0 + r;
            if (gm >= p.M || c >= width) continue;
            float v = p.scale * cf[r * ldf + c];
            if (p.add) v += __half2float(p.add[(size_t)gm * p.ld_add + n0 + c]);
            if (p.act == ACT_GELU_TANH) v = gelu_tanh(v);
            p.out[(size_t)gm * p.ldc + n0 + c] = __float2half_rn(v);
        }
    }
    cp_async_wait<0>();
}

}  // namespace

#define LOWRANK_PARAMS                                                                         \
    half *out, const half *__restrict__ a, const half *__restrict__ a_minus,                   \
        const half *__restrict__ down, const half *__restrict__ up0, const half *__restrict__ up1, \
        const half *__restrict__ up2, const half *add, const float *t_minus,                   \
        float scale, int M, int N, int K, int lda, int ldc, int ld_add, int ld_t, int groups,    \
        int r0, int r1, int r2, int col_splits, int act
#define LOWRANK_ARGS                                                                           \
    out, a, a_minus, down, up0, up1, up2, add, t_minus, scale, M, N, K, lda, ldc, ld_add,        \
        ld_t, groups, r0, r1, r2, col_splits, act

extern "C" __global__ void __launch_bounds__(THREADS) lowrank_fused_f16_bm16(LOWRANK_PARAMS) {
    lowrank<1>(Params{LOWRANK_ARGS});
}

extern "C" __global__ void __launch_bounds__(THREADS) lowrank_fused_f16_bm32(LOWRANK_PARAMS) {
    lowrank<2>(Params{LOWRANK_ARGS});
}
