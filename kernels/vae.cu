// The VAE decoder's kernels besides the 3×3 convolution (kernels/vae_conv.cu); its 1×1
// convolutions (the resnet shortcuts, the attention projections) are the fused GEMM of kernels/gemm.cu over pixels.
// All activations NHWC: (images·pixels, C) row-major, f16 storage, f32 arithmetic.
//
// group_norm_silu_f16: GroupNorm (affine) over `groups` groups of C / groups consecutive
//   channels, statistics over every pixel of one image, optionally followed by SiLU:
//     y = (x − mean_g)·rstd_g·gamma[c] + beta[c],  rstd_g = 1/sqrt(var_g + eps),
//     out = f16(silu ? y / (1 + e^−y) : y).
//   Two-pass statistics in f32 (the mean, then the mean of squared deviations: no cancellation),
//   each a per-thread sum then a block reduction; the group's values are read three times (the
//   second and third from L2 on a GPU: a group of a 256×256×128 image is 512 KiB).
//   Launch: grid (groups, images), 256 threads.
// group_norm_stats_f16 + group_norm_apply_f16: the same GroupNorm (+ SiLU), the same formula,
//   for the shapes where one block per (group, image) leaves most of the GPU idle (32 blocks
//   for one image) and reads a group's channels a few bytes apart: both kernels run on grid
//   (chunks, images), a block per chunk of chunk_px consecutive pixels of one image, reading
//   16-byte vectors of 8 channels. They need channels % 8 == 0, channels dividing 2048 and
//   groups ≤ 256 (the launcher checks, else group_norm_silu_f16): with 256 threads stepping
//   over vectors, thread t always meets channels 8·(t mod C/8) .. +7, so it keeps 8 running
//   sums and, in the apply, 8 channels' mean, rstd, gamma and beta in registers.
//   stats: per (image, chunk, group) the chunk's mean and M2 = Σ(x − mean)², two passes over
//     the chunk (the second from L1/L2): per-thread sums in f32, then per channel the threads
//     holding it in thread order, then the group's channels in order; into
//     stats[((img·chunks + chunk)·groups + g)·2 + {0: mean, 1: M2}].
//   apply: each block combines its image's chunk statistics per group, in chunk order, by the
//     pairwise update (n, mean, M2) ⊕ (n_k, mean_k, M2_k): δ = mean_k − mean, n' = n + n_k,
//     mean += δ·n_k/n', M2 += M2_k + δ²·n·n_k/n' (no cancellation: every term is ≥ 0), then
//     rstd = 1/sqrt(M2/n + eps) and out = f16(silu?(y)), y = (x − mean)·rstd·gamma[c] + beta[c].
// softmax_rows_f16: out[r, :] = softmax(scale·x[r, :]) in f32 (max-subtracted, expf), rounded
//   once to f16; the mid-block attention's probabilities (x = q·kᵀ from the fused GEMM,
//   scale = 1/√C). Launch: one 256-thread block per row.
// transpose_f16: out (cols, rows) = in (rows, cols)ᵀ, bit copies (V for the P·V GEMM, whose
//   B operand is (N, K) row-major). Launch: 32×32 tiles through shared memory, block (32, 8),
//   grid (⌈cols/32⌉, ⌈rows/32⌉).
// Exported: group_norm_silu_f16, group_norm_stats_f16, group_norm_apply_f16, softmax_rows_f16,
// transpose_f16.

#include "block_reduce.cuh"

namespace {

constexpr int GN_THREADS = 256;
constexpr int SM_THREADS = 256;

#ifdef __CUDACC__
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
#else
inline float mul_rn(float a, float b) { return a * b; }
inline float add_rn(float a, float b) { return a + b; }
#endif


}  // namespace

extern "C" __global__ void __launch_bounds__(GN_THREADS)
    group_norm_silu_f16(half* __restrict__ out, const half* __restrict__ x,
                        const half* __restrict__ gamma, const half* __restrict__ beta,
                        int pixels, int channels, int groups, float eps, int silu) {
    const int g = blockIdx.x, cpg = channels / groups;
    const size_t base = (size_t)blockIdx.y * pixels * channels + (size_t)g * cpg;
    const int n = pixels * cpg;
    auto at = [&](int e) { return base + (size_t)(e / cpg) * channels + e % cpg; };

    float s = 0.f;
    for (int e = threadIdx.x; e < n; e += GN_THREADS) s += __half2float(x[at(e)]);
    const float mean = block_sum<GN_THREADS / 32>(s) / (float)n;
    float q = 0.f;
    for (int e = threadIdx.x; e < n; e += GN_THREADS) {
        const float d = __half2float(x[at(e)]) - mean;
        q += d * d;
    }
    const float var = block_sum<GN_THREADS / 32>(q) / (float)n;
    const float rstd = 1.f / sqrtf(var + eps);
    for (int e = threadIdx.x; e < n; e += GN_THREADS) {
        const int c = g * cpg + e % cpg;
        const size_t i = at(e);
        float y = (__half2float(x[i]) - mean) * rstd * __half2float(gamma[c]) +
                  __half2float(beta[c]);
        if (silu) y = y / (1.f + expf(-y));
        out[i] = __float2half_rn(y);
    }
}

namespace {

// The 8 channels of a 16-byte vector as f32, and back (rounded once each).
__device__ __forceinline__ void load8(float (&v)[8], const uint4* p) {
    const uint4 raw = *p;
    const half2* h = reinterpret_cast<const half2*>(&raw);
    for (int j = 0; j < 4; ++j) {
        const float2 f = __half22float2(h[j]);
        v[2 * j] = f.x;
        v[2 * j + 1] = f.y;
    }
}
__device__ __forceinline__ void store8(uint4* p, const float (&v)[8]) {
    uint4 raw;
    half2* h = reinterpret_cast<half2*>(&raw);
    for (int j = 0; j < 4; ++j) h[j] = __floats2half2_rn(v[2 * j], v[2 * j + 1]);
    *p = raw;
}

// Per group g < groups (threads 0 .. groups−1), the sum over its channels of every thread's
// 8 partial sums in `part` (thread t's at part[8t .. 8t + 7], channels 8·(t mod vpp) ..):
// channel by channel in order, the threads holding a channel in thread order.
__device__ __forceinline__ float group_total(const float* part, int g, int cpg, int vpp) {
    float s = 0.f;
    for (int c = g * cpg; c < (g + 1) * cpg; ++c)
        for (int t = c / 8; t < GN_THREADS; t += vpp) s += part[8 * t + c % 8];
    return s;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(GN_THREADS)
    group_norm_stats_f16(float* __restrict__ stats, const half* __restrict__ x, int pixels,
                         int channels, int groups, int chunk_px) {
    __shared__ float part[8 * GN_THREADS];
    __shared__ float mean_g[GN_THREADS];
    const int chunk = blockIdx.x, img = blockIdx.y, vpp = channels / 8, cpg = channels / groups;
    const int p0 = chunk * chunk_px, p1 = min(pixels, p0 + chunk_px);
    const uint4* xv = reinterpret_cast<const uint4*>(x + ((size_t)img * pixels + p0) * channels);
    const int nv = (p1 - p0) * vpp, c0 = (threadIdx.x % vpp) * 8;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int i = threadIdx.x; i < nv; i += GN_THREADS) {
        float v[8];
        load8(v, xv + i);
        for (int j = 0; j < 8; ++j) acc[j] += v[j];
    }
    for (int j = 0; j < 8; ++j) part[8 * threadIdx.x + j] = acc[j];
    __syncthreads();
    const float count = (float)(p1 - p0) * (float)cpg;
    if ((int)threadIdx.x < groups) mean_g[threadIdx.x] = group_total(part, threadIdx.x, cpg, vpp) / count;
    __syncthreads();  // the means are out; every thread is done reading part
    float mean[8];
    for (int j = 0; j < 8; ++j) {
        mean[j] = mean_g[(c0 + j) / cpg];
        acc[j] = 0.f;
    }
    for (int i = threadIdx.x; i < nv; i += GN_THREADS) {
        float v[8];
        load8(v, xv + i);
        for (int j = 0; j < 8; ++j) {
            const float d = v[j] - mean[j];
            acc[j] += d * d;
        }
    }
    for (int j = 0; j < 8; ++j) part[8 * threadIdx.x + j] = acc[j];
    __syncthreads();
    if ((int)threadIdx.x < groups) {
        float* o = stats + (((size_t)img * gridDim.x + chunk) * groups + threadIdx.x) * 2;
        o[0] = mean_g[threadIdx.x];
        o[1] = group_total(part, threadIdx.x, cpg, vpp);
    }
}

extern "C" __global__ void __launch_bounds__(GN_THREADS)
    group_norm_apply_f16(half* __restrict__ out, const half* __restrict__ x,
                         const float* __restrict__ stats, const half* __restrict__ gamma,
                         const half* __restrict__ beta, int pixels, int channels, int groups,
                         int chunk_px, float eps, int silu) {
    __shared__ float mean_g[GN_THREADS], rstd_g[GN_THREADS];
    const int chunk = blockIdx.x, img = blockIdx.y, chunks = gridDim.x;
    const int vpp = channels / 8, cpg = channels / groups;
    if ((int)threadIdx.x < groups) {
        const float* st = stats + (size_t)img * chunks * groups * 2 + threadIdx.x * 2;
        float n = 0.f, mean = 0.f, m2 = 0.f;
        for (int k = 0; k < chunks; ++k) {
            const float nk = (float)(min(pixels, (k + 1) * chunk_px) - k * chunk_px) * (float)cpg;
            const float mk = st[(size_t)k * groups * 2], m2k = st[(size_t)k * groups * 2 + 1];
            const float nt = n + nk, delta = mk - mean, w = nk / nt;
            mean += delta * w;
            m2 += m2k + delta * delta * (n * w);
            n = nt;
        }
        mean_g[threadIdx.x] = mean;
        rstd_g[threadIdx.x] = 1.f / sqrtf(m2 / n + eps);
    }
    __syncthreads();
    const int c0 = (threadIdx.x % vpp) * 8;
    float mean[8], rstd[8], ga[8], be[8];
    for (int j = 0; j < 8; ++j) {
        const int c = c0 + j, g = c / cpg;
        mean[j] = mean_g[g];
        rstd[j] = rstd_g[g];
        ga[j] = __half2float(gamma[c]);
        be[j] = __half2float(beta[c]);
    }
    const int p0 = chunk * chunk_px, p1 = min(pixels, p0 + chunk_px);
    const size_t first = ((size_t)img * pixels + p0) * channels;
    const uint4* xv = reinterpret_cast<const uint4*>(x + first);
    uint4* ov = reinterpret_cast<uint4*>(out + first);
    const int nv = (p1 - p0) * vpp;
    for (int i = threadIdx.x; i < nv; i += GN_THREADS) {
        float v[8];
        load8(v, xv + i);
        for (int j = 0; j < 8; ++j) {
            float y = (v[j] - mean[j]) * rstd[j] * ga[j] + be[j];
            if (silu) y = y / (1.f + expf(-y));
            v[j] = y;
        }
        store8(ov + i, v);
    }
}

extern "C" __global__ void __launch_bounds__(SM_THREADS)
    softmax_rows_f16(half* __restrict__ out, const half* __restrict__ x, int cols, float scale) {
    const size_t row = (size_t)blockIdx.x * cols;
    float m = -INFINITY;
    for (int c = threadIdx.x; c < cols; c += SM_THREADS) m = fmaxf(m, scale * __half2float(x[row + c]));
    // Block max: the warp's by shuffles, then across warps through shared memory.
    for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    __shared__ float wmax[SM_THREADS / 32];
    if (threadIdx.x % 32 == 0) wmax[threadIdx.x / 32] = m;
    __syncthreads();
    m = wmax[0];
    for (int w = 1; w < SM_THREADS / 32; ++w) m = fmaxf(m, wmax[w]);
    float s = 0.f;
    for (int c = threadIdx.x; c < cols; c += SM_THREADS) s += expf(scale * __half2float(x[row + c]) - m);
    const float inv = 1.f / block_sum<SM_THREADS / 32>(s);
    for (int c = threadIdx.x; c < cols; c += SM_THREADS)
        out[row + c] = __float2half_rn(expf(scale * __half2float(x[row + c]) - m) * inv);
}

extern "C" __global__ void __launch_bounds__(256)
    transpose_f16(half* __restrict__ out, const half* __restrict__ in, int rows, int cols) {
    __shared__ half tile[32][33];  // +1: no bank conflicts on the transposed read
    const int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    for (int i = threadIdx.y; i < 32; i += 8) {
        const int r = r0 + i, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[i][threadIdx.x] = in[(size_t)r * cols + c];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += 8) {
        const int c = c0 + i, r = r0 + threadIdx.x;
        if (r < rows && c < cols) out[(size_t)c * rows + r] = tile[threadIdx.x][i];
    }
}
