// The VAE decoder's 3×3 convolution (stride 1, zero padding 1) as an implicit GEMM on tensor
// cores, with the nearest 2× upsample that precedes it fused into the input indexing:
//   out[p, co] = bias[co] + Σ_{ci, ky, kx} in[tap(p, ky, kx), ci] · w[co, ci, ky, kx]
//                + add[p, co]                                   (add: the residual, optional)
// Shapes (NHWC: one row of channels per pixel): out and add (images·h·w, cout); in
// (images·sh·sw, cin) with (sh, sw) = (h, w), or (h/2, w/2) when up2 (pixel (y, x) reads source
// pixel (⌊y/2⌋, ⌊x/2⌋): nearest-neighbour upsampling, never materialised); bias (cout); w
// (cout, 9·cin) in PyTorch's (out, in, ky, kx) order (w_tap_major = 0: column ci·9 + ky·3 + kx,
// the CPU decoder's im2col order) or tap-major (w_tap_major = 1: column (ky·3 + kx)·cin + ci,
// the weight permuted once at upload so its tiles load as 16-byte chunks too).
// As a GEMM: M = images·h·w pixels, N = cout, K = 9·cin. The k loop runs tap by tap, 32 input
// channels at a time (a k step is one tap and one 32-channel block, zero-filled past cin), so
// the A tile is BM pixels × 32 consecutive channels of one neighbour pixel each: contiguous in
// NHWC, staged by 16-byte cp.async when cin % 8 == 0 and `in` is 16-byte aligned, zeros in the
// padding. The B tile is BN output channels × the same 32 (tap, channel) columns: 16-byte
// cp.async when tap-major (cin % 8 == 0, w aligned), else gathered element by element
// (PyTorch order puts a tap's channels 9 elements apart).
// Precision: WMMA m16n16k16 with f16 inputs (products exact) and f32 accumulation; the epilogue
// adds bias then add in f32 and rounds once to f16 (out) or stores f32 (out_f32; exactly one
// of the two is not null). bias and add may be null.
//
// Launch: grid (⌈cout/BN⌉, ⌈M/BM⌉), dynamic shared memory Cfg::SMEM (below); the block
// size picks one of two tile shapes compiled into this one kernel (the launcher in
// src/gpu/launch/vae.rs chooses: the large tile once its tiles fill the GPU, see there):
//   256 threads: block 128×128, 8 warps (2×4) of 64×32 (4×2 fragments), 4 stages, 81,920 B
//   128 threads: block  64×64,  4 warps (2×2) of 32×32 (2×2 fragments), 4 stages, 40,960 B
// (over 48 KiB needs the opt-in every kernel gets at load: src/gpu/cuda.rs). __launch_bounds__
// (256, 2) caps registers at 128 so two large blocks (16 warps, 160 KiB) share an SM. k step
// 32; a stage holds the A tile (BM × 32) and the B tile (BN × 32), rows padded to 40 halves
// (80 bytes: conflict-free fragment loads, every fragment pointer 32-byte aligned). Each
// thread stages 2 A and 2 B chunks of 16 bytes per step in both shapes; the A chunks' source
// pixels (tap and padding arithmetic) are computed once per tap, not per step.
// Pipeline, ONE barrier per k step (the invariant the emulation cannot check: there cp.async
// copies synchronously and the waits are no-ops):
//   prologue: k steps 0 .. S−2 are issued into buffers 0 .. S−2, one commit group each (an
//             empty group past the last step, so the group count stays step-aligned);
//   step t:   cp_async_wait<S−2>: of this thread's t + S − 1 committed groups at most S − 2 are
//             pending, so groups 0 .. t, i.e. step t's copies, have landed;
//             __syncthreads: (a) every thread's copies and synchronous stores of step t are
//             visible to all, (b) every warp has finished the multiply of step t − 1, which
//             read buffer (t − 1) mod S = (t + S − 1) mod S;
//             issue step t + S − 1 into that buffer (one commit group, empty at the end): safe
//             by (b), and nobody reads it before the barrier of step t + S − 1;
//             multiply buffer t mod S.
//   after the loop: cp_async_wait<0> (only empty groups can be pending, but no copy may target
//             the buffers the epilogue reuses), __syncthreads (every warp is done multiplying);
//             the accumulators go to shared memory as f32 (BM × (BN + 4)), __syncthreads, then
//             the epilogue walks the tile: two adjacent columns per thread (half2/float2) when
//             cout is even and the pointers allow, else one.
// Element-by-element staging (cin % 8 ≠ 0, misaligned `in`, PyTorch-order weights) stores into
// the same buffer at the same point, synchronously; the next barrier publishes it (a).
// Rows past M, columns past cout or cin are zero-filled and the epilogue writes only in-range
// elements, so M, cout, cin need not be multiples of anything.
// No output may overlap an input.
// Exported: conv3x3_f16.

#include "device.cuh"

using namespace nvcuda;

namespace {

constexpr int BK = 32;          // k step: one tap × 32 input channels
constexpr int LDS = BK + 8;     // stage row stride in halves: 80 bytes (wmma: a multiple of 16)
constexpr int CHUNKS = BK / 8;  // 16-byte chunks per stage row

template <int BM_, int BN_, int WM_, int WN_, int STAGES_>
struct Cfg {
    static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, STAGES = STAGES_;
    static constexpr int THREADS = 32 * WM * WN;
    static constexpr int TM = BM / WM, TN = BN / WN;  // warp tile
    static constexpr int FM = TM / 16, FN = TN / 16;  // fragments per warp
    static constexpr int LDC = BN + 4;                // f32 epilogue row stride
    static constexpr int STAGE = (BM + BN) * LDS;     // halves
    static constexpr int A_CHUNKS = BM * CHUNKS / THREADS, B_CHUNKS = BN * CHUNKS / THREADS;
    static constexpr int PIPE_BYTES = STAGES * STAGE * 2, C_BYTES = BM * LDC * 4;
    static constexpr int SMEM = PIPE_BYTES > C_BYTES ? PIPE_BYTES : C_BYTES;
    static_assert(TM % 16 == 0 && TN % 16 == 0, "whole fragments");
    static_assert(STAGES >= 2, "a pipeline");
    static_assert(BM * CHUNKS % THREADS == 0 && BN * CHUNKS % THREADS == 0,
                  "a tile's chunks split evenly over the threads");
};

using Large = Cfg<128, 128, 2, 4, 4>;
using Small = Cfg<64, 64, 2, 2, 4>;
static_assert(Large::SMEM == 81920 && Small::SMEM == 40960, "src/gpu/launch/vae.rs's sizes");

struct Params {
    half* out;
    float* out_f32;
    const half* __restrict__ in;
    const half* __restrict__ w;
    const half* __restrict__ bias;
    const half* add;
    int images, h, w_, cin, cout, up2, tap_major;
    int M, K, cblocks;  // derived: pixels, 9·cin, ⌈cin/32⌉
};

__device__ __forceinline__ bool aligned(const void* p, size_t bytes) {
    return reinterpret_cast<size_t>(p) % bytes == 0;
}

// An output pixel's coordinates, and the first element of its image in the input. Rows past
// M get y far outside the image, so every tap of theirs is padding.
struct Pixel {
    size_t base;
    int y, x;
};

__device__ __forceinline__ Pixel pixel_of(const Params& p, int gm) {
    if (gm >= p.M) return Pixel{0, -4, -4};
    const int hw = p.h * p.w_;
    const int img = gm / hw, r = gm % hw;
    const size_t src_px = p.up2 ? (size_t)(p.h / 2) * (p.w_ / 2) : (size_t)hw;
    return Pixel{(size_t)img * src_px * p.cin, r / p.w_, r % p.w_};
}

// Element offset in `in` of channel 0 of pixel q's neighbour (dy, dx), or −1 in the padding.
__device__ __forceinline__ long long tap_offset(const Params& p, const Pixel& q, int dy, int dx) {
    const int yy = q.y + dy, xx = q.x + dx;
    if (yy < 0 || xx < 0 || yy >= p.h || xx >= p.w_) return -1;
    const size_t px = p.up2 ? (size_t)(yy >> 1) * (p.w_ >> 1) + (xx >> 1) : (size_t)yy * p.w_ + xx;
    return (long long)(q.base + px * p.cin);
}

// Where the next k step to be loaded reads: tap (dy, dx offsets), channels [c0, c0 + 32).
// Steps are loaded strictly in order 0, 1, …, so the loader advances it instead of dividing.
struct Step {
    int tap, c0;
    __device__ __forceinline__ void advance(const Params& p) {
        c0 += BK;
        if (c0 >= p.cblocks * BK) {
            c0 = 0;
            ++tap;
        }
    }
};

// This thread's A chunks of tap `tap`: rows threadIdx.x / 4 + i·THREADS/4 (pixels `rows`),
// each the address of channel 0 of that pixel's neighbour, or null in the padding. Computed
// once per tap (every cblocks steps), not per step.
template <class C>
__device__ __forceinline__ void a_sources(const half* (&src)[C::A_CHUNKS], const Params& p,
                                          const Pixel (&rows)[C::A_CHUNKS], int tap) {
    const int dy = tap / 3 - 1, dx = tap % 3 - 1;
    for (int i = 0; i < C::A_CHUNKS; ++i) {
        const long long at = tap_offset(p, rows[i], dy, dx);
        src[i] = at >= 0 ? p.in + at : nullptr;
    }
}

// The A tile of a step by cp.async (cin % 8 == 0, `in` aligned): chunk i of this thread is
// row threadIdx.x / 4 + i·THREADS/4, channels c0 + 8·(threadIdx.x % 4), from src[i].
template <class C>
__device__ __forceinline__ void load_a_async(half* s, const Params& p,
                                             const half* const (&src)[C::A_CHUNKS], const Step& st) {
    const int kc = (threadIdx.x % CHUNKS) * 8;
    const bool in_c = st.c0 + kc < p.cin;
    for (int i = 0; i < C::A_CHUNKS; ++i) {
        const int r = threadIdx.x / CHUNKS + i * (C::THREADS / CHUNKS);
        const bool valid = src[i] != nullptr && in_c;
        cp_async_16(s + r * LDS + kc, valid ? src[i] + st.c0 + kc : p.in, valid);
    }
}

// The A tile element by element (any cin, any alignment), synchronously.
template <class C>
__device__ __forceinline__ void load_a_scalar(half* s, const Params& p, int m0, const Step& st) {
    const int dy = st.tap / 3 - 1, dx = st.tap % 3 - 1;
    for (int i = threadIdx.x; i < C::BM * BK; i += C::THREADS) {
        const int r = i / BK, kk = i % BK;
        half v = __float2half_rn(0.f);
        if (st.c0 + kk < p.cin) {
            const long long at = tap_offset(p, pixel_of(p, m0 + r), dy, dx);
            if (at >= 0) v = p.in[at + st.c0 + kk];
        }
        s[r * LDS + kk] = v;
    }
}

// The B tile of a step: rows n0 .. n0 + BN of w, columns (tap, c0 .. c0 + 32). By cp.async
// when `vec` (tap-major, cin % 8 == 0, w aligned): this thread's chunks are rows
// threadIdx.x / 4 + j·THREADS/4, whose first elements `wrow` holds (null past cout).
template <class C>
__device__ __forceinline__ void load_b(half* s, const Params& p, bool vec,
                                       const half* const (&wrow)[C::B_CHUNKS], int n0, const Step& st) {
    if (vec) {
        const int kc = (threadIdx.x % CHUNKS) * 8, ci = st.c0 + kc, col = st.tap * p.cin + ci;
        for (int j = 0; j < C::B_CHUNKS; ++j) {
            const int r = threadIdx.x / CHUNKS + j * (C::THREADS / CHUNKS);
            const bool valid = wrow[j] != nullptr && ci < p.cin;
            const half* g = valid ? wrow[j] + col : p.w;
            cp_async_16(s + r * LDS + kc, g, valid);
        }
        return;
    }
    for (int i = threadIdx.x; i < C::BN * BK; i += C::THREADS) {
        const int r = i / BK, kk = i % BK;
        const int co = n0 + r, ci = st.c0 + kk;
        half v = __float2half_rn(0.f);
        if (co < p.cout && ci < p.cin)
            v = p.w[(size_t)co * p.K + (p.tap_major ? st.tap * p.cin + ci : ci * 9 + st.tap)];
        s[r * LDS + kk] = v;
    }
}

// Whether every access of the paired epilogue is aligned: cout even, pointers 4-byte aligned
// (8 for f32 out).
__device__ __forceinline__ bool pairs_ok(const Params& p) {
    return p.cout % 2 == 0 && aligned(p.bias, 4) && aligned(p.add, 4) && aligned(p.out, 4) &&
           aligned(p.out_f32, 8);
}

// The block's f32 tile cs (row stride LDC) + bias + add into out / out_f32, each output
// rounded once. Pairs and singles do the same f32 operations in the same order.
template <class C>
__device__ __forceinline__ void epilogue(const float* cs, const Params& p, int m0, int n0) {
    if (pairs_ok(p)) {
        for (int i = threadIdx.x; i < C::BM * C::BN / 2; i += C::THREADS) {
            const int r = i / (C::BN / 2), c = 2 * (i % (C::BN / 2));
            const int gm = m0 + r, gn = n0 + c;
            if (gm >= p.M || gn >= p.cout) continue;  // cout even: gn + 1 < cout too
            float v0 = cs[r * C::LDC + c], v1 = cs[r * C::LDC + c + 1];
            if (p.bias) {
                const float2 b = __half22float2(*reinterpret_cast<const half2*>(p.bias + gn));
                v0 += b.x;
                v1 += b.y;
            }
            const size_t at = (size_t)gm * p.cout + gn;
            if (p.add) {
                const float2 d = __half22float2(*reinterpret_cast<const half2*>(p.add + at));
                v0 += d.x;
                v1 += d.y;
            }
            if (p.out) {
                *reinterpret_cast<half2*>(p.out + at) = __floats2half2_rn(v0, v1);
            } else {
                float2 y;
                y.x = v0;
                y.y = v1;
                *reinterpret_cast<float2*>(p.out_f32 + at) = y;
            }
        }
        return;
    }
    for (int i = threadIdx.x; i < C::BM * C::BN; i += C::THREADS) {
        const int r = i / C::BN, c = i % C::BN;
        const int gm = m0 + r, gn = n0 + c;
        if (gm >= p.M || gn >= p.cout) continue;
        float v = cs[r * C::LDC + c];
        if (p.bias) v += __half2float(p.bias[gn]);
        const size_t at = (size_t)gm * p.cout + gn;
        if (p.add) v += __half2float(p.add[at]);
        if (p.out)
            p.out[at] = __float2half_rn(v);
        else
            p.out_f32[at] = v;
    }
}

template <class C, bool A_VEC>
__device__ __forceinline__ void conv_tile(const Params& p) {
    half* smem = dynamic_shared<half>();
    const int m0 = blockIdx.y * C::BM, n0 = blockIdx.x * C::BN;
    const int warp = threadIdx.x / 32, wm = warp / C::WN, wn = warp % C::WN;
    const bool b_vec = p.tap_major && p.cin % 8 == 0 && aligned(p.w, 16);
    const int steps = 9 * p.cblocks;

    Pixel rows[C::A_CHUNKS] = {};
    if constexpr (A_VEC)
        for (int i = 0; i < C::A_CHUNKS; ++i)
            rows[i] = pixel_of(p, m0 + threadIdx.x / CHUNKS + i * (C::THREADS / CHUNKS));
    const half* wrow[C::B_CHUNKS];
    for (int j = 0; j < C::B_CHUNKS; ++j) {
        const int co = n0 + threadIdx.x / CHUNKS + j * (C::THREADS / CHUNKS);
        wrow[j] = co < p.cout ? p.w + (size_t)co * p.K : nullptr;
    }

    // The next step to load (in order), into buffer (its index) mod STAGES.
    Step next{0, 0};
    int next_buf = 0;
    const half* a_src[C::A_CHUNKS] = {};  // A_VEC: this thread's A chunks of tap next.tap
    auto load = [&]() {
        half* s = smem + next_buf * C::STAGE;
        if constexpr (A_VEC) {
            if (next.c0 == 0) a_sources<C>(a_src, p, rows, next.tap);  // a new tap
            load_a_async<C>(s, p, a_src, next);
        } else {
            load_a_scalar<C>(s, p, m0, next);
        }
        load_b<C>(s + C::BM * LDS, p, b_vec, wrow, n0, next);
        next.advance(p);
        next_buf = next_buf + 1 == C::STAGES ? 0 : next_buf + 1;
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[C::FM][C::FN];
    for (int i = 0; i < C::FM; ++i)
        for (int j = 0; j < C::FN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    for (int s = 0; s < C::STAGES - 1; ++s) {
        if (s < steps) load();  // step s into buffer s
        cp_async_commit();      // one group per prologue slot, empty past the last step
    }
    int buf = 0;  // t mod STAGES
    for (int t = 0; t < steps; ++t) {
        cp_async_wait<C::STAGES - 2>();  // this thread's copies of step t have landed
        __syncthreads();  // everyone's have; every warp is done with buffer (t − 1) mod S
        // Step t + S − 1 into buffer (t + S − 1) mod S = (t − 1) mod S (next_buf says so).
        if (t + C::STAGES - 1 < steps) load();
        cp_async_commit();
        const half* as = smem + buf * C::STAGE;
        const half* bs = as + C::BM * LDS;
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa[C::FM];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb[C::FN];
            for (int i = 0; i < C::FM; ++i)
                wmma::load_matrix_sync(fa[i], as + (wm * C::TM + i * 16) * LDS + kk, LDS);
            for (int j = 0; j < C::FN; ++j)
                wmma::load_matrix_sync(fb[j], bs + (wn * C::TN + j * 16) * LDS + kk, LDS);
            for (int i = 0; i < C::FM; ++i)
                for (int j = 0; j < C::FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        buf = buf + 1 == C::STAGES ? 0 : buf + 1;
    }
    cp_async_wait<0>();  // the trailing (empty) groups: no copy may still target the buffers
    __syncthreads();     // every warp is done multiplying: the buffers can hold C

    float* cs = reinterpret_cast<float*>(smem);
    for (int i = 0; i < C::FM; ++i)
        for (int j = 0; j < C::FN; ++j)
            wmma::store_matrix_sync(cs + (wm * C::TM + i * 16) * C::LDC + wn * C::TN + j * 16,
                                    acc[i][j], C::LDC, wmma::mem_row_major);
    __syncthreads();  // the whole f32 tile is in shared memory
    epilogue<C>(cs, p, m0, n0);
}

template <class C>
__device__ __forceinline__ void conv_block(const Params& p) {
    if (p.cin % 8 == 0 && aligned(p.in, 16))
        conv_tile<C, true>(p);
    else
        conv_tile<C, false>(p);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(Large::THREADS, 2)
    conv3x3_f16(half* out, float* out_f32, const half* __restrict__ in,
                const half* __restrict__ w, const half* __restrict__ bias, const half* add,
                int images, int h, int width, int cin, int cout, int up2, int w_tap_major) {
    const Params p{out, out_f32, in, w, bias, add, images, h, width, cin, cout, up2, w_tap_major,
                   images * h * width, 9 * cin, (cin + BK - 1) / BK};
    // The block size is the launcher's choice of tile (uniform over the block).
    if (blockDim.x == Large::THREADS)
        conv_block<Large>(p);
    else if (blockDim.x == Small::THREADS)
        conv_block<Small>(p);
}
