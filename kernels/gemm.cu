// Linear layers on tensor cores:  out[m, n] = act(Σ_k a[m, k] · w[n, k] + bias[n])
//   a: (M, K) f16 row-major (activations); w: (N, K) f16 row-major (PyTorch's Linear weight,
//   so B = wᵀ is read column-major); bias: (N) f16; out: (M, N) f16 or f32 row-major.
// WMMA m16n16k16: f16 inputs, f32 accumulation, one rounding of the result to the output type.
// Launch: grid (⌈N/64⌉, ⌈M/64⌉), 128 threads = 4 warps in 2×2; block tile 64×64, warp tile
// 32×32 (2×2 fragments), k step 32. Tiles are staged in shared memory, double-buffered: the
// next k step is copied (cp.async) while this one multiplies. Rows beyond M or N and columns
// beyond K are zero-filled in shared memory and the epilogue writes only in-range elements,
// so M, N, K need not be multiples of the tile. The 16-byte cp.async path needs K % 8 == 0
// and 16-byte aligned a and w; otherwise tiles are loaded element by element.
// Epilogue: accumulators → shared memory (reusing the tile buffers) → each thread adds bias,
// applies the activation, converts and writes.
// Exported: gemm_bias_f16, gemm_bias_gelu_f16 (GELU, tanh approximation), gemm_bias_f32.

#include "device.cuh"

using namespace nvcuda;

namespace {

constexpr int BM = 64, BN = 64, BK = 32;
constexpr int THREADS = 128;
constexpr int LDS = BK + 8;  // tile row stride in halves: 80 bytes (wmma needs a multiple of 16)
constexpr int LDC = BN + 4;  // f32 staging row stride
constexpr int STAGE = (BM + BN) * LDS;          // halves per stage: a tile then w tile
constexpr int SMEM_BYTES = 2 * STAGE * 2;       // two stages: 20 KiB
static_assert(BM * LDC * 4 <= SMEM_BYTES, "the f32 staging tile fits in the tile buffers");

enum class Act { None, GeluTanh };

__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608028654f;  // sqrt(2/pi)
    return 0.5f * x * (1.f + tanhf(k * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ void store_out(half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_out(float* p, float v) { *p = v; }

// Rows [row0, row0 + ROWS) × columns [k0, k0 + BK) of a (rows, K) row-major matrix into a
// ROWS × LDS shared tile, zeros outside the matrix.
template <int ROWS>
__device__ __forceinline__ void load_tile(half* s, const half* g, int rows, int K, int row0,
                                          int k0, bool vec) {
    if (vec) {
        constexpr int CHUNKS = ROWS * BK / 8;  // 16-byte chunks of 8 halves
        for (int c = threadIdx.x; c < CHUNKS; c += THREADS) {
            const int r = c / (BK / 8), kc = (c % (BK / 8)) * 8;
            const int gr = row0 + r, gk = k0 + kc;
            const bool valid = gr < rows && gk < K;  // K % 8 == 0: a chunk is all in or all out
            cp_async_16(s + r * LDS + kc, valid ? g + (size_t)gr * K + gk : g, valid);
        }
    } else {
        for (int i = threadIdx.x; i < ROWS * BK; i += THREADS) {
            const int r = i / BK, kk = i % BK;
            const int gr = row0 + r, gk = k0 + kk;
            s[r * LDS + kk] =
                (gr < rows && gk < K) ? g[(size_t)gr * K + gk] : __float2half_rn(0.f);
        }
    }
}

template <class Out, Act ACT>
__device__ __forceinline__ void gemm_tile(Out* __restrict__ out, const half* __restrict__ a,
                                          const half* __restrict__ w,
                                          const half* __restrict__ bias, int M, int N, int K) {
    __shared__ __align__(128) unsigned char smem[SMEM_BYTES];
    half* tiles = reinterpret_cast<half*>(smem);
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
    const bool vec = K % 8 == 0 && reinterpret_cast<size_t>(a) % 16 == 0 &&
                     reinterpret_cast<size_t>(w) % 16 == 0;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    const int ktiles = (K + BK - 1) / BK;
    load_tile<BM>(tiles, a, M, K, m0, 0, vec);
    load_tile<BN>(tiles + BM * LDS, w, N, K, n0, 0, vec);
    cp_async_commit();
    for (int t = 0; t < ktiles; ++t) {
        if (t + 1 < ktiles) {
            half* next = tiles + ((t + 1) & 1) * STAGE;
            load_tile<BM>(next, a, M, K, m0, (t + 1) * BK, vec);
            load_tile<BN>(next + BM * LDS, w, N, K, n0, (t + 1) * BK, vec);
            cp_async_commit();
            cp_async_wait<1>();  // all but the copy just issued: stage t has landed
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

    float* cs = reinterpret_cast<float*>(smem);
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j],
                                    LDC, wmma::mem_row_major);
    __syncthreads();
    for (int idx = threadIdx.x; idx < BM * BN; idx += THREADS) {
        const int r = idx / BN, c = idx % BN, gm = m0 + r, gn = n0 + c;
        if (gm < M && gn < N) {
            float v = cs[r * LDC + c] + __half2float(bias[gn]);
            if (ACT == Act::GeluTanh) v = gelu_tanh(v);
            store_out(out + (size_t)gm * N + gn, v);
        }
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS)
    gemm_bias_f16(half* __restrict__ out, const half* __restrict__ a, const half* __restrict__ w,
                  const half* __restrict__ bias, int M, int N, int K) {
    gemm_tile<half, Act::None>(out, a, w, bias, M, N, K);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    gemm_bias_gelu_f16(half* __restrict__ out, const half* __restrict__ a,
                       const half* __restrict__ w, const half* __restrict__ bias, int M, int N,
                       int K) {
    gemm_tile<half, Act::GeluTanh>(out, a, w, bias, M, N, K);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    gemm_bias_f32(float* __restrict__ out, const half* __restrict__ a,
                  const half* __restrict__ w, const half* __restrict__ bias, int M, int N, int K) {
    gemm_tile<float, Act::None>(out, a, w, bias, M, N, K);
}
