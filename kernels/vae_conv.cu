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
// the A tile is 64 pixels × 32 consecutive channels of one neighbour pixel each: contiguous in
// NHWC, staged by 16-byte cp.async when cin % 8 == 0 and `in` is 16-byte aligned, zeros in the
// padding. The B tile is 64 output channels × the same 32 (tap, channel) columns: 16-byte
// cp.async when tap-major (cin % 8 == 0, w aligned), else gathered element by element
// (PyTorch order puts a tap's channels 9 elements apart).
// Precision: WMMA m16n16k16 with f16 inputs (products exact) and f32 accumulation; the epilogue
// adds bias then add in f32 and rounds once to f16 (out) or stores f32 (out_f32; exactly one
// of the two is not null). bias and add may be null.
// Launch: grid (⌈cout/64⌉, ⌈M/64⌉), 128 threads (2×2 warps of 32×32), block tile 64×64, k
// step 32, double-buffered in 20 KiB of static shared memory, as kernels/gemm.cu.
// No output may overlap an input.
// Exported: conv3x3_f16.

#include "device.cuh"

using namespace nvcuda;

namespace {

constexpr int BM = 64, BN = 64, BK = 32;
constexpr int THREADS = 128;
constexpr int LDS = BK + 8;  // tile row stride in halves: 80 bytes (wmma: a multiple of 16)
constexpr int LDC = BN + 4;  // f32 staging row stride
constexpr int STAGE = (BM + BN) * LDS;
constexpr int SMEM_BYTES = 2 * STAGE * 2;
constexpr int CHUNKS_PER_ROW = BK / 8;
constexpr int A_CHUNKS = BM * CHUNKS_PER_ROW / THREADS;  // 2
static_assert(BM * LDC * 4 <= SMEM_BYTES, "the f32 staging tile fits in the tile buffers");
static_assert(BM * CHUNKS_PER_ROW % THREADS == 0, "a tile's chunks split evenly over threads");
static_assert(THREADS % BN == 0, "the epilogue gives each thread one column");

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

__device__ __forceinline__ bool aligned16(const void* p) {
    return reinterpret_cast<size_t>(p) % 16 == 0;
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

// k step s: tap s / cblocks, channels [c0, c0 + 32).
__device__ __forceinline__ void step_of(const Params& p, int s, int& tap, int& c0) {
    tap = s / p.cblocks;
    c0 = (s % p.cblocks) * BK;
}

// The A tile of step s by cp.async (cin % 8 == 0, `in` aligned): thread chunks are rows
// threadIdx.x / 4 + 32·i, whose pixels `rows` holds.
__device__ __forceinline__ void load_a_async(half* s, const Params& p, const Pixel (&rows)[A_CHUNKS],
                                             int step) {
    int tap, c0;
    step_of(p, step, tap, c0);
    const int dy = tap / 3 - 1, dx = tap % 3 - 1;
    for (int i = 0; i < A_CHUNKS; ++i) {
        const int c = threadIdx.x + i * THREADS;
        const int r = c / CHUNKS_PER_ROW, kc = (c % CHUNKS_PER_ROW) * 8;
        const long long at = tap_offset(p, rows[i], dy, dx);
        const bool valid = at >= 0 && c0 + kc < p.cin;
        cp_async_16(s + r * LDS + kc, valid ? p.in + at + c0 + kc : p.in, valid);
    }
}

// The A tile element by element (any cin, any alignment).
__device__ __forceinline__ void load_a_scalar(half* s, const Params& p, int m0, int step) {
    int tap, c0;
    step_of(p, step, tap, c0);
    const int dy = tap / 3 - 1, dx = tap % 3 - 1;
    for (int i = threadIdx.x; i < BM * BK; i += THREADS) {
        const int r = i / BK, kk = i % BK;
        half v = __float2half_rn(0.f);
        if (c0 + kk < p.cin) {
            const long long at = tap_offset(p, pixel_of(p, m0 + r), dy, dx);
            if (at >= 0) v = p.in[at + c0 + kk];
        }
        s[r * LDS + kk] = v;
    }
}

// The B tile of step s: rows n0.. of w, columns (tap, c0 + kk).
__device__ __forceinline__ void load_b(half* s, const Params& p, bool vec, int n0, int step) {
    int tap, c0;
    step_of(p, step, tap, c0);
    if (vec) {
        for (int c = threadIdx.x; c < BN * CHUNKS_PER_ROW; c += THREADS) {
            const int r = c / CHUNKS_PER_ROW, kc = (c % CHUNKS_PER_ROW) * 8;
            const int co = n0 + r, ci = c0 + kc;
            const bool valid = co < p.cout && ci < p.cin;
            const half* g = valid ? p.w + (size_t)co * p.K + tap * p.cin + ci : p.w;
            cp_async_16(s + r * LDS + kc, g, valid);
        }
        return;
    }
    for (int i = threadIdx.x; i < BN * BK; i += THREADS) {
        const int r = i / BK, kk = i % BK;
        const int co = n0 + r, ci = c0 + kk;
        half v = __float2half_rn(0.f);
        if (co < p.cout && ci < p.cin)
            v = p.w[(size_t)co * p.K + (p.tap_major ? tap * p.cin + ci : ci * 9 + tap)];
        s[r * LDS + kk] = v;
    }
}

template <bool A_VEC>
__device__ __forceinline__ void mainloop(
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> (&acc)[2][2], half* tiles,
    const Params& p, int m0, int n0) {
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
    const bool b_vec = p.tap_major && p.cin % 8 == 0 && aligned16(p.w);
    const int steps = 9 * p.cblocks;
    Pixel rows[A_CHUNKS];
    for (int i = 0; i < A_CHUNKS; ++i)
        rows[i] = pixel_of(p, m0 + (threadIdx.x + i * THREADS) / CHUNKS_PER_ROW);

    auto load = [&](half* stage, int s) {
        if (A_VEC)
            load_a_async(stage, p, rows, s);
        else
            load_a_scalar(stage, p, m0, s);
        load_b(stage + BM * LDS, p, b_vec, n0, s);
        cp_async_commit();
    };
    load(tiles, 0);
    for (int t = 0; t < steps; ++t) {
        if (t + 1 < steps) {
            // `next` was last read in step t − 1, finished by every warp before its barrier.
            load(tiles + ((t + 1) & 1) * STAGE, t + 1);
            cp_async_wait<1>();
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
        __syncthreads();  // every warp is done with stage t before it is refilled
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS)
    conv3x3_f16(half* out, float* out_f32, const half* __restrict__ in,
                const half* __restrict__ w, const half* __restrict__ bias, const half* add,
                int images, int h, int width, int cin, int cout, int up2, int w_tap_major) {
    __shared__ __align__(128) unsigned char smem[SMEM_BYTES];
    Params p{out, out_f32, in, w, bias, add, images, h, width, cin, cout, up2, w_tap_major,
             images * h * width, 9 * cin, (cin + BK - 1) / BK};
    half* tiles = reinterpret_cast<half*>(smem);
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    if (cin % 8 == 0 && aligned16(in))
        mainloop<true>(acc, tiles, p, m0, n0);
    else
        mainloop<false>(acc, tiles, p, m0, n0);

    // After the loop's closing barrier the tiles can hold C.
    float* cs = reinterpret_cast<float*>(smem);
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j],
                                    LDC, wmma::mem_row_major);
    __syncthreads();
    const int c = threadIdx.x % BN, gn = n0 + c;
    if (gn >= cout) return;
    const float b = bias ? __half2float(bias[gn]) : 0.f;
    for (int r = threadIdx.x / BN; r < BM && m0 + r < p.M; r += THREADS / BN) {
        float v = cs[r * LDC + c];
        if (bias) v += b;
        const size_t at = (size_t)(m0 + r) * cout + gn;
        if (add) v += __half2float(add[at]);
        if (out)
            out[at] = __float2half_rn(v);
        else
            out_f32[at] = v;
    }
}
