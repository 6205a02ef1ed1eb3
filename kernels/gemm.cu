// Linear layers on tensor cores, with everything around them the DiT pipeline fuses in:
//   v[m, n]   = Σ_k a'[m, k] · w[n, k] + bias[n] + add[m mod add_rows, n]
//   out[m, n] = act(v[m, n])            pre[m, n] = v[m, n]   (optional)
//   a' = a, or a − a_minus when a_minus is given (increment-calibrated caching's
//   t = (x − x_s)·downᵀ: the difference is formed in f32 and rounded once to f16 while the tile
//   is staged into shared memory, never stored in global memory).
// Shapes: a, a_minus (M, K) f16 with row stride lda; w (N, K) f16 row-major, row stride K
// (PyTorch's Linear weight, so B = wᵀ is read column-major); bias (N) f16; add f16 with row
// stride ld_add, its row index wrapping every add_rows rows (add_rows = M: an ordinary matrix
// such as icc's cached y_s; add_rows = tokens: the positional embedding added to every image);
// out (f16) or out_f32 (f32, exactly one of the two) and pre (f16) with row stride ldc. Every
// pointer but a, w and one output may be null (operand absent). act: 0 none, 1 GELU (tanh
// approximation), 2 SiLU; the values of GemmAct in src/gpu/launch/gemm.rs.
// Precision: WMMA m16n16k16, f16 inputs (products exact), f32 accumulation; the epilogue adds
// bias then add in f32, in that order, and rounds each output once (pre = f16(v),
// out = f16(act(v)) or f32).
// Launch: grid (⌈N/64⌉, ⌈M/64⌉), 128 threads = 4 warps in 2×2; block tile 64×64, warp tile
// 32×32 (2×2 fragments), k step 32. Tiles are staged in shared memory, double-buffered: the
// next k step is fetched while this one multiplies. Rows beyond M or N and columns beyond K
// are zero-filled in shared memory and the epilogue writes only in-range elements, so M, N, K
// need not be multiples of the tile. Staging, per operand:
//   - w, and a without a_minus: 16-byte cp.async when K % 8 == 0 (and lda % 8 == 0 for a) and
//     the pointers are 16-byte aligned;
//   - a with a_minus, same conditions: 16-byte loads of both into registers before the
//     multiply, subtracted and stored to the other stage after it;
//   - otherwise element by element (synchronously, into the other stage).
// Epilogue: accumulators → shared memory (reusing the tile buffers) → each thread owns one
// column and walks every other row of the tile (consecutive threads, consecutive columns).
// No output may overlap an input or another output.
// Exported: gemm_fused_f16.

#include "device.cuh"

using namespace nvcuda;

namespace {

constexpr int BM = 64, BN = 64, BK = 32;
constexpr int THREADS = 128;
constexpr int LDS = BK + 8;  // tile row stride in halves: 80 bytes (wmma needs a multiple of 16)
constexpr int LDC = BN + 4;  // f32 staging row stride
constexpr int STAGE = (BM + BN) * LDS;     // halves per stage: a tile then w tile
constexpr int SMEM_BYTES = 2 * STAGE * 2;  // two stages: 20 KiB
constexpr int CHUNKS_PER_ROW = BK / 8;     // 16-byte chunks of 8 halves in a tile row
constexpr int A_CHUNKS = BM * CHUNKS_PER_ROW / THREADS;  // a chunks per thread per stage: 2
static_assert(BM * LDC * 4 <= SMEM_BYTES, "the f32 staging tile fits in the tile buffers");
static_assert(BM * CHUNKS_PER_ROW % THREADS == 0, "a tile's chunks split evenly over threads");
static_assert(THREADS % BN == 0, "the epilogue gives each thread one column");

enum Act : int { ACT_NONE = 0, ACT_GELU_TANH = 1, ACT_SILU = 2 };

// How the a tile is staged (see the header).
enum class AMode { Async, DiffVec, Scalar };

struct Params {
    half* out;
    float* out_f32;
    half* pre;
    const half* __restrict__ a;
    const half* __restrict__ a_minus;
    const half* __restrict__ w;
    const half* __restrict__ bias;
    const half* add;
    int M, N, K, lda, ldc, ld_add, add_rows;
};

__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608028654f;  // sqrt(2/pi)
    return 0.5f * x * (1.f + tanhf(k * (x + 0.044715f * x * x * x)));
}

template <int ACT>
__device__ __forceinline__ float activate(float x) {
    if (ACT == ACT_GELU_TANH) return gelu_tanh(x);
    if (ACT == ACT_SILU) return x / (1.f + expf(-x));
    return x;
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return reinterpret_cast<size_t>(p) % 16 == 0;
}

// Rows [row0, row0 + ROWS) × columns [k0, k0 + BK) of a (rows, K) matrix with row stride ld
// into a ROWS × LDS shared tile by 16-byte cp.async, zeros outside the matrix. Needs
// K % 8 == 0 (a chunk is all in or all out), ld % 8 == 0 and g 16-byte aligned.
template <int ROWS>
__device__ __forceinline__ void load_tile_async(half* s, const half* g, int ld, int rows, int K,
                                                int row0, int k0) {
    for (int c = threadIdx.x; c < ROWS * CHUNKS_PER_ROW; c += THREADS) {
        const int r = c / CHUNKS_PER_ROW, kc = (c % CHUNKS_PER_ROW) * 8;
        const int gr = row0 + r, gk = k0 + kc;
        const bool valid = gr < rows && gk < K;
        cp_async_16(s + r * LDS + kc, valid ? g + (size_t)gr * ld + gk : g, valid);
    }
}

// The same tile element by element, as g − g_minus rounded once when g_minus is not null.
template <int ROWS>
__device__ __forceinline__ void load_tile_scalar(half* s, const half* g, const half* g_minus,
                                                 int ld, int rows, int K, int row0, int k0) {
    for (int i = threadIdx.x; i < ROWS * BK; i += THREADS) {
        const int r = i / BK, kk = i % BK;
        const int gr = row0 + r, gk = k0 + kk;
        half v = __float2half_rn(0.f);
        if (gr < rows && gk < K) {
            const size_t at = (size_t)gr * ld + gk;
            v = g_minus ? __float2half_rn(__half2float(g[at]) - __half2float(g_minus[at])) : g[at];
        }
        s[r * LDS + kk] = v;
    }
}

// One stage of a and a_minus in flight in registers (AMode::DiffVec): this thread's chunks.
struct DiffRegs {
    uint4 x[A_CHUNKS], y[A_CHUNKS];
};

__device__ __forceinline__ void fetch_diff(DiffRegs& d, const Params& p, int m0, int k0) {
    for (int i = 0; i < A_CHUNKS; ++i) {
        const int c = threadIdx.x + i * THREADS;
        const int gr = m0 + c / CHUNKS_PER_ROW, gk = k0 + (c % CHUNKS_PER_ROW) * 8;
        if (gr < p.M && gk < p.K) {
            const size_t at = (size_t)gr * p.lda + gk;
            d.x[i] = *reinterpret_cast<const uint4*>(p.a + at);
            d.y[i] = *reinterpret_cast<const uint4*>(p.a_minus + at);
        } else {
            d.x[i] = d.y[i] = uint4{0, 0, 0, 0};
        }
    }
}

__device__ __forceinline__ void store_diff(half* s, const DiffRegs& d) {
    for (int i = 0; i < A_CHUNKS; ++i) {
        const int c = threadIdx.x + i * THREADS;
        const half2* x = reinterpret_cast<const half2*>(&d.x[i]);
        const half2* y = reinterpret_cast<const half2*>(&d.y[i]);
        uint4 diff;
        half2* o = reinterpret_cast<half2*>(&diff);
        for (int j = 0; j < 4; ++j) {
            const float2 fx = __half22float2(x[j]), fy = __half22float2(y[j]);
            o[j] = __floats2half2_rn(fx.x - fy.x, fx.y - fy.y);
        }
        *reinterpret_cast<uint4*>(s + (c / CHUNKS_PER_ROW) * LDS + (c % CHUNKS_PER_ROW) * 8) =
            diff;
    }
}

// Stages the a tile of k step k0 into `s` the ways that need no registers across the multiply.
template <AMode MODE>
__device__ __forceinline__ void load_a(half* s, const Params& p, int m0, int k0) {
    if (MODE == AMode::Async) load_tile_async<BM>(s, p.a, p.lda, p.M, p.K, m0, k0);
    if (MODE == AMode::Scalar) load_tile_scalar<BM>(s, p.a, p.a_minus, p.lda, p.M, p.K, m0, k0);
}

__device__ __forceinline__ void load_w(half* s, const Params& p, bool vec, int n0, int k0) {
    if (vec)
        load_tile_async<BN>(s, p.w, p.K, p.N, p.K, n0, k0);
    else
        load_tile_scalar<BN>(s, p.w, nullptr, p.K, p.N, p.K, n0, k0);
}

// The k loop: acc = a'·wᵀ over the block's 64×64 tile.
template <AMode MODE>
__device__ __forceinline__ void mainloop(
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> (&acc)[2][2], half* tiles,
    const Params& p, int m0, int n0) {
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
    const bool w_vec = p.K % 8 == 0 && aligned16(p.w);
    const int ktiles = p.K / BK + (p.K % BK != 0);
    DiffRegs d;

    if (MODE == AMode::DiffVec) {
        fetch_diff(d, p, m0, 0);
        store_diff(tiles, d);
    }
    load_a<MODE>(tiles, p, m0, 0);
    load_w(tiles + BM * LDS, p, w_vec, n0, 0);
    cp_async_commit();
    for (int t = 0; t < ktiles; ++t) {
        half* next = tiles + ((t + 1) & 1) * STAGE;
        if (t + 1 < ktiles) {
            // Stage t + 1: into `next` now (cp.async or element-wise), or for DiffVec into
            // registers now and into `next` after the multiply. `next` was last read in step
            // t − 1, which every warp finished before that step's closing barrier.
            if (MODE == AMode::DiffVec) fetch_diff(d, p, m0, (t + 1) * BK);
            load_a<MODE>(next, p, m0, (t + 1) * BK);
            load_w(next + BM * LDS, p, w_vec, n0, (t + 1) * BK);
            cp_async_commit();
            cp_async_wait<1>();  // all but the copies just issued: stage t has landed
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // stage t is complete for every thread
        const half* as = tiles + (t & 1) * STAGE;
        const half* ws = as + BM * LDS;
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb[2];
            for (int i = 0; i < 2; ++i)
                wmma::load_matrix_sync(fa[i], as + (wm * 32 + i * 16) * LDS + kk, LDS);
            for (int j = 0; j < 2; ++j)
                wmma::load_matrix_sync(fb[j], ws + (wn * 32 + j * 16) * LDS + kk, LDS);
            for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        if (MODE == AMode::DiffVec && t + 1 < ktiles) store_diff(next, d);
        __syncthreads();  // every warp is done with stage t before it is refilled
    }
}

// v = acc + bias + add, pre = f16(v), out = act(v); cs is the block's f32 tile (stride LDC).
template <int ACT>
__device__ __forceinline__ void epilogue(const float* cs, const Params& p, int m0, int n0) {
    const int c = threadIdx.x % BN, gn = n0 + c;
    if (gn >= p.N) return;
    const float b = p.bias ? __half2float(p.bias[gn]) : 0.f;
    for (int r = threadIdx.x / BN; r < BM && m0 + r < p.M; r += THREADS / BN) {
        const int gm = m0 + r;
        float v = cs[r * LDC + c];
        if (p.bias) v += b;
        if (p.add) v += __half2float(p.add[(size_t)(gm % p.add_rows) * p.ld_add + gn]);
        const size_t at = (size_t)gm * p.ldc + gn;
        if (p.pre) p.pre[at] = __float2half_rn(v);
        const float y = activate<ACT>(v);
        if (p.out)
            p.out[at] = __float2half_rn(y);
        else
            p.out_f32[at] = y;
    }
}

__device__ __forceinline__ void gemm_fused(const Params& p, int act) {
    __shared__ __align__(128) unsigned char smem[SMEM_BYTES];
    half* tiles = reinterpret_cast<half*>(smem);
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    const bool a_vec = p.K % 8 == 0 && p.lda % 8 == 0 && aligned16(p.a) &&
                       (!p.a_minus || aligned16(p.a_minus));
    if (!a_vec)
        mainloop<AMode::Scalar>(acc, tiles, p, m0, n0);
    else if (p.a_minus)
        mainloop<AMode::DiffVec>(acc, tiles, p, m0, n0);
    else
        mainloop<AMode::Async>(acc, tiles, p, m0, n0);

    // The loop's closing barrier: every warp is done with the tiles, so they can hold C.
    float* cs = reinterpret_cast<float*>(smem);
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j],
                                    LDC, wmma::mem_row_major);
    __syncthreads();
    if (act == ACT_GELU_TANH)
        epilogue<ACT_GELU_TANH>(cs, p, m0, n0);
    else if (act == ACT_SILU)
        epilogue<ACT_SILU>(cs, p, m0, n0);
    else
        epilogue<ACT_NONE>(cs, p, m0, n0);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS)
    gemm_fused_f16(half* out, float* out_f32, half* pre, const half* __restrict__ a,
                   const half* __restrict__ a_minus, const half* __restrict__ w,
                   const half* __restrict__ bias, const half* add, int M, int N, int K, int lda,
                   int ldc, int ld_add, int add_rows, int act) {
    const Params p{out, out_f32, pre, a, a_minus, w, bias, add, M, N, K, lda, ldc, ld_add, add_rows};
    gemm_fused(p, act);
}
