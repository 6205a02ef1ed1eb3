// Linear layers on tensor cores, with everything around them the DiT pipeline fuses in:
//   v[m, n]   = Σ_k a'[m, k] · w[n, k] + bias[n] + add[m mod add_rows, n]
//   out[m, n] = act(v[m, n])            pre[m, n] = v[m, n]   (optional)
//   a' = a, or a − a_minus when a_minus is given (increment-calibrated caching's
//   t = (x − x_s)·downᵀ: the difference is formed in f32 and rounded once to f16 on the
//   fragments just before the multiply, never stored in global memory).
// Shapes: a, a_minus (M, K) f16 with row stride lda; w (N, K) f16 row-major, row stride K
// (PyTorch's Linear weight, so B = wᵀ is read column-major); bias (N) f16; add f16 with row
// stride ld_add, its row index wrapping every add_rows rows (add_rows = M: an ordinary matrix
// such as icc's cached y_s; add_rows = tokens: the positional embedding added to every image);
// out (f16) or out_f32 (f32, exactly one of the two) and pre (f16) with row stride ldc. Every
// pointer but a, w and one output may be null (operand absent). With n2 > 0 the product has
// n2 more columns from a second weight w2 (n2, K), whose raw f32 sums (no bias, add or
// activation) go to out2 (row stride ld2): a full step's linear keeps icc's t_s = down·x_s
// this way, in the same pass over its input. act: 0 none, 1 GELU (tanh
// approximation), 2 SiLU; the values of GemmAct in src/gpu/launch/gemm.rs.
// Precision: WMMA m16n16k16, f16 inputs (products exact), f32 accumulation; the epilogue adds
// bias then add in f32, in that order, and rounds each output once (pre = f16(v),
// out = f16(act(v)) or f32).
//
// Two tile shapes, one template (the launcher picks by how many tiles fill the GPU):
//   gemm_fused_f16_64x64_k64     block 64×64,   4 warps (2×2) of 32×32, k step 64, 4 stages
//   gemm_fused_f16_128x128_k32   block 128×128, 8 warps (2×4) of 64×32, k step 32, 4 stages
// and, for measuring the choice (icdit bench-gemm): gemm_fused_f16_128x64_k32 (128×64, 4 warps
// of 64×32, k 32, 4 stages), gemm_fused_f16_64x64_k32 (64×64, k 32, 4 stages) and
// gemm_fused_f16_64x64_k32_s2 (64×64, k 32, 2 stages: the first kernel's configuration).
// Each name says the block tile, the k step and (s2) a stage count other than 4.
// Launch: grid (⌈N/BN⌉, ⌈M/BM⌉, splits), THREADS threads, dynamic shared memory
// gemm_smem_bytes() below (over 48 KiB: the device opts every kernel in at load).
// Stages: each holds the a tile (BM × BK), the w tile (BN × BK) and, with a_minus, its tile
// (BM × BK), rows padded to BK + 8 halves (conflict-free fragment loads). The k loop is the
// usual multistage cp.async pipeline with ONE barrier per k step:
//   prologue: stages 0 .. S−2 are issued, one commit group each (empty past the last k tile);
//   step t:   wait until at most S−2 groups are pending (so k tile t has landed for this
//             thread), barrier (so it has for every thread, AND every warp has finished the
//             multiply of step t − 1, whose buffer (t − 1) mod S = (t + S − 1) mod S is the one
//             refilled next), issue k tile t + S − 1 into that buffer (one commit group, empty
//             at the end), multiply buffer t mod S.
// Element-by-element staging (k % 8 ≠ 0, lda % 8 ≠ 0, misaligned pointers) stores into the
// same buffer at the same point, synchronously; the next barrier publishes it. Rows beyond M
// or N and columns beyond the k range are zero-filled, and the epilogue writes only in-range
// elements, so M, N, K need not be multiples of the tile.
// Split-K: with ws not null, block z multiplies k range [z·k_split, min(K, (z+1)·k_split))
// (k_split a multiple of BK) and stores its raw f32 partial sums into slice z of ws ((splits,
// M, N), row stride N); gemm_splitk_reduce_f16 then adds the slices in order z = 0, 1, …
// (deterministic) and applies the epilogue. Without ws, k_split ≥ K and gridDim.z = 1.
// Epilogue: accumulators → shared memory (reusing the stage buffers, after a barrier that
// follows the last multiply and a wait for every copy) → threads walk the tile row by row,
// two adjacent columns per thread (half2 / float2 accesses) when N, the strides and the
// pointers allow, else one.
// No output may overlap an input or another output.
// Exported: gemm_fused_f16_64x64_k64, gemm_fused_f16_128x128_k32, gemm_fused_f16_128x64_k32,
// gemm_fused_f16_64x64_k32, gemm_fused_f16_64x64_k32_s2, gemm_splitk_reduce_f16.

#include "device.cuh"
#include "gemm_epilogue.cuh"

using namespace nvcuda;

namespace {

template <int BM_, int BN_, int WM_, int WN_, int BK_, int STAGES_>
struct Cfg {
    static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, BK = BK_, STAGES = STAGES_;
    static constexpr int THREADS = 32 * WM * WN;
    static constexpr int TM = BM / WM, TN = BN / WN;  // warp tile
    static constexpr int FM = TM / 16, FN = TN / 16;  // fragments per warp
    static constexpr int LDS = BK + 8;                 // stage row stride, halves
    static constexpr int LDC = BN + 4;                 // f32 epilogue row stride
    static constexpr int CHUNKS = BK / 8;              // 16-byte chunks per stage row
    static_assert(TM % 16 == 0 && TN % 16 == 0 && BK % 16 == 0, "whole fragments");
    static_assert(STAGES >= 2, "a pipeline");
};

using Small = Cfg<64, 64, 2, 2, 64, 4>;
using Large = Cfg<128, 128, 2, 4, 32, 4>;
using Tall = Cfg<128, 64, 2, 2, 32, 4>;
using Small32 = Cfg<64, 64, 2, 2, 32, 4>;
using Classic = Cfg<64, 64, 2, 2, 32, 2>;

// Rows [row0, row0 + ROWS) × columns [k0, k0 + BK) of a (rows, ·) matrix with row stride ld
// into a ROWS × LDS shared tile by 16-byte cp.async, zeros outside rows × [·, k_end). Needs
// k_end % 8 == 0 (a chunk is all in or all out), ld % 8 == 0 and g 16-byte aligned.
template <class C, int ROWS>
__device__ __forceinline__ void load_async(half* s, const half* g, int ld, int rows, int k_end,
                                           int row0, int k0) {
    for (int c = threadIdx.x; c < ROWS * C::CHUNKS; c += C::THREADS) {
        const int r = c / C::CHUNKS, kc = (c % C::CHUNKS) * 8;
        const int gr = row0 + r, gk = k0 + kc;
        const bool valid = gr < rows && gk < k_end;
        cp_async_16(s + r * C::LDS + kc, valid ? g + (size_t)gr * ld + gk : g, valid);
    }
}

// The same tile element by element, synchronously.
template <class C, int ROWS>
__device__ __forceinline__ void load_scalar(half* s, const half* g, int ld, int rows, int k_end,
                                            int row0, int k0) {
    for (int i = threadIdx.x; i < ROWS * C::BK; i += C::THREADS) {
        const int r = i / C::BK, kk = i % C::BK;
        const int gr = row0 + r, gk = k0 + kk;
        s[r * C::LDS + kk] = gr < rows && gk < k_end ? g[(size_t)gr * ld + gk] : __float2half_rn(0.f);
    }
}

// The w tile: rows [n0, n0 + BN) of w (rows < N) followed by w2 (rows N .. N + n2), as
// load_async / load_scalar (w's row stride is K for both).
template <class C>
__device__ __forceinline__ void load_w_async(half* s, const Params& p, int k_end, int n0, int k0) {
    const int rows = p.N + p.n2;
    for (int c = threadIdx.x; c < C::BN * C::CHUNKS; c += C::THREADS) {
        const int r = c / C::CHUNKS, kc = (c % C::CHUNKS) * 8;
        const int gr = n0 + r, gk = k0 + kc;
        const bool valid = gr < rows && gk < k_end;
        const half* src = gr < p.N ? p.w + (size_t)gr * p.K : p.w2 + (size_t)(gr - p.N) * p.K;
        cp_async_16(s + r * C::LDS + kc, valid ? src + gk : p.w, valid);
    }
}

template <class C>
__device__ __forceinline__ void load_w_scalar(half* s, const Params& p, int k_end, int n0, int k0) {
    const int rows = p.N + p.n2;
    for (int i = threadIdx.x; i < C::BN * C::BK; i += C::THREADS) {
        const int r = i / C::BK, kk = i % C::BK;
        const int gr = n0 + r, gk = k0 + kk;
        const half* src = gr < p.N ? p.w + (size_t)gr * p.K : p.w2 + (size_t)(gr - p.N) * p.K;
        s[r * C::LDS + kk] = gr < rows && gk < k_end ? src[gk] : __float2half_rn(0.f);
    }
}

// The block's f32 tile cs (row stride LDC) through the epilogue into the outputs.
template <class C, int ACT>
__device__ __forceinline__ void epilogue(const float* cs, const Params& p, int m0, int n0) {
    if (pairs_ok(p)) {
        for (int i = threadIdx.x; i < C::BM * C::BN / 2; i += C::THREADS) {
            const int r = i / (C::BN / 2), c = 2 * (i % (C::BN / 2));
            const int gm = m0 + r, gn = n0 + c;
            if (gm < p.M && gn < p.N + p.n2) finish2<ACT>(p, gm, gn, cs[r * C::LDC + c], cs[r * C::LDC + c + 1]);
        }
    } else {
        for (int i = threadIdx.x; i < C::BM * C::BN; i += C::THREADS) {
            const int r = i / C::BN, c = i % C::BN;
            const int gm = m0 + r, gn = n0 + c;
            if (gm < p.M && gn < p.N + p.n2) finish1<ACT>(p, gm, gn, cs[r * C::LDC + c]);
        }
    }
}

template <class C>
__device__ __forceinline__ void gemm_tile(const Params& p, int act) {
    half* smem = dynamic_shared<half>();
    const int m0 = blockIdx.y * C::BM, n0 = blockIdx.x * C::BN;
    const int k_begin = blockIdx.z * p.k_split;
    const int k_end = min(p.K, k_begin + p.k_split);
    const int warp = threadIdx.x / 32, wm = warp / C::WN, wn = warp % C::WN;
    const bool diff = p.a_minus != nullptr;
    const int stage = (C::BM + C::BN + (diff ? C::BM : 0)) * C::LDS;  // halves
    const bool a_vec = k_end % 8 == 0 && p.lda % 8 == 0 && aligned(p.a, 16) &&
                       (!diff || aligned(p.a_minus, 16));
    const bool w_vec = k_end % 8 == 0 && p.K % 8 == 0 && aligned(p.w, 16) && (p.n2 == 0 || aligned(p.w2, 16));
    const int ktiles = k_end > k_begin ? (k_end - k_begin + C::BK - 1) / C::BK : 0;

    // k tile kt into buffer kt mod STAGES.
    auto load = [&](int kt) {
        half* s = smem + (kt % C::STAGES) * stage;
        const int k0 = k_begin + kt * C::BK;
        if (a_vec) {
            load_async<C, C::BM>(s, p.a, p.lda, p.M, k_end, m0, k0);
            if (diff) load_async<C, C::BM>(s + (C::BM + C::BN) * C::LDS, p.a_minus, p.lda, p.M, k_end, m0, k0);
        } else {
            load_scalar<C, C::BM>(s, p.a, p.lda, p.M, k_end, m0, k0);
            if (diff) load_scalar<C, C::BM>(s + (C::BM + C::BN) * C::LDS, p.a_minus, p.lda, p.M, k_end, m0, k0);
        }
        if (p.n2 > 0) {
            if (w_vec)
                load_w_async<C>(s + C::BM * C::LDS, p, k_end, n0, k0);
            else
                load_w_scalar<C>(s + C::BM * C::LDS, p, k_end, n0, k0);
        } else if (w_vec) {
            load_async<C, C::BN>(s + C::BM * C::LDS, p.w, p.K, p.N, k_end, n0, k0);
        } else {
            load_scalar<C, C::BN>(s + C::BM * C::LDS, p.w, p.K, p.N, k_end, n0, k0);
        }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[C::FM][C::FN];
    for (int i = 0; i < C::FM; ++i)
        for (int j = 0; j < C::FN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    for (int s = 0; s < C::STAGES - 1; ++s) {
        if (s < ktiles) load(s);
        cp_async_commit();
    }
    for (int t = 0; t < ktiles; ++t) {
        cp_async_wait<C::STAGES - 2>();  // this thread's copies of k tile t have landed
        __syncthreads();  // everyone's have; every warp is done with buffer (t − 1) mod S
        if (t + C::STAGES - 1 < ktiles) load(t + C::STAGES - 1);
        cp_async_commit();
        const half* as = smem + (t % C::STAGES) * stage;
        const half* bs = as + C::BM * C::LDS;
        const half* ms = bs + C::BN * C::LDS;
        for (int kk = 0; kk < C::BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa[C::FM];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb[C::FN];
            for (int i = 0; i < C::FM; ++i) {
                const int off = (wm * C::TM + i * 16) * C::LDS + kk;
                wmma::load_matrix_sync(fa[i], as + off, C::LDS);
                if (diff) {
                    // a − a_minus element by element: fragments of one type share their
                    // element mapping, so fa.x[e] and fm.x[e] are the same matrix element.
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fm;
                    wmma::load_matrix_sync(fm, ms + off, C::LDS);
                    for (int e = 0; e < fm.num_elements; ++e)
                        fa[i].x[e] = __float2half_rn(__half2float(fa[i].x[e]) - __half2float(fm.x[e]));
                }
            }
            for (int j = 0; j < C::FN; ++j)
                wmma::load_matrix_sync(fb[j], bs + (wn * C::TN + j * 16) * C::LDS + kk, C::LDS);
            for (int i = 0; i < C::FM; ++i)
                for (int j = 0; j < C::FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
    }
    cp_async_wait<0>();  // the trailing (empty) groups: no copy may still target the buffers
    __syncthreads();     // every warp is done multiplying: the buffers can hold C

    float* cs = reinterpret_cast<float*>(smem);
    for (int i = 0; i < C::FM; ++i)
        for (int j = 0; j < C::FN; ++j)
            wmma::store_matrix_sync(cs + (wm * C::TM + i * 16) * C::LDC + wn * C::TN + j * 16,
                                    acc[i][j], C::LDC, wmma::mem_row_major);
    __syncthreads();

    if (p.ws) {  // split-K partial: raw sums into slice z, row stride N + n2
        const int nt = p.N + p.n2;
        float* dst = p.ws + (size_t)blockIdx.z * p.M * nt;
        for (int i = threadIdx.x; i < C::BM * C::BN; i += C::THREADS) {
            const int r = i / C::BN, c = i % C::BN;
            if (m0 + r < p.M && n0 + c < nt) dst[(size_t)(m0 + r) * nt + n0 + c] = cs[r * C::LDC + c];
        }
        return;
    }
    if (act == ACT_GELU_TANH)
        epilogue<C, ACT_GELU_TANH>(cs, p, m0, n0);
    else if (act == ACT_SILU)
        epilogue<C, ACT_SILU>(cs, p, m0, n0);
    else
        epilogue<C, ACT_NONE>(cs, p, m0, n0);
}

}  // namespace

#define GEMM_PARAMS                                                                          \
    half *out, float *out_f32, half *pre, const half *__restrict__ a,                        \
        const half *__restrict__ a_minus, const half *__restrict__ w,                        \
        const half *__restrict__ bias, const half *add, float *ws, int M, int N, int K, int lda, \
        int ldc, int ld_add, int add_rows, int k_split, const half *__restrict__ w2,           \
        float *out2, int n2, int ld2, int act
#define GEMM_ARGS \
    out, out_f32, pre, a, a_minus, w, bias, add, ws, M, N, K, lda, ldc, ld_add, add_rows, k_split, w2, out2, n2, ld2

extern "C" __global__ void __launch_bounds__(Small::THREADS) gemm_fused_f16_64x64_k64(GEMM_PARAMS) {
    gemm_tile<Small>(Params{GEMM_ARGS}, act);
}

extern "C" __global__ void __launch_bounds__(Large::THREADS) gemm_fused_f16_128x128_k32(GEMM_PARAMS) {
    gemm_tile<Large>(Params{GEMM_ARGS}, act);
}

extern "C" __global__ void __launch_bounds__(Tall::THREADS) gemm_fused_f16_128x64_k32(GEMM_PARAMS) {
    gemm_tile<Tall>(Params{GEMM_ARGS}, act);
}

extern "C" __global__ void __launch_bounds__(Small32::THREADS) gemm_fused_f16_64x64_k32(GEMM_PARAMS) {
    gemm_tile<Small32>(Params{GEMM_ARGS}, act);
}

extern "C" __global__ void __launch_bounds__(Classic::THREADS) gemm_fused_f16_64x64_k32_s2(GEMM_PARAMS) {
    gemm_tile<Classic>(Params{GEMM_ARGS}, act);
}

// v[m, n] = Σ_z ws[z, m, n] in order z = 0 .. splits − 1, then the GEMM's epilogue (columns
// N .. N + n2 − 1 to out2). Grid-stride over the M·(N + n2) outputs.
extern "C" __global__ void __launch_bounds__(256)
    gemm_splitk_reduce_f16(half* out, float* out_f32, half* pre, const float* __restrict__ ws,
                           const half* __restrict__ bias, const half* add, int M, int N, int ldc,
                           int ld_add, int add_rows, int splits, float* out2, int n2, int ld2,
                           int act) {
    const Params p{out, out_f32, pre,      nullptr, nullptr, nullptr, bias, add, nullptr, M,  N,
                   0,   0,       ldc,      ld_add,  add_rows, 0,      nullptr, out2, n2,  ld2};
    const int nt = N + n2;
    const size_t total = (size_t)M * nt;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = 0.f;
        for (int z = 0; z < splits; ++z) v += ws[(size_t)z * total + i];
        const int gm = (int)(i / nt), gn = (int)(i % nt);
        if (act == ACT_GELU_TANH)
            finish1<ACT_GELU_TANH>(p, gm, gn, v);
        else if (act == ACT_SILU)
            finish1<ACT_SILU>(p, gm, gn, v);
        else
            finish1<ACT_NONE>(p, gm, gn, v);
    }
}
