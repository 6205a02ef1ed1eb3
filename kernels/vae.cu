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
// softmax_rows_f16: out[r, :] = softmax(scale·x[r, :]) in f32 (max-subtracted, expf), rounded
//   once to f16; the mid-block attention's probabilities (x = q·kᵀ from the fused GEMM,
//   scale = 1/√C). Launch: one 256-thread block per row.
// transpose_f16: out (cols, rows) = in (rows, cols)ᵀ, bit copies (V for the P·V GEMM, whose
//   B operand is (N, K) row-major). Launch: 32×32 tiles through shared memory, block (32, 8),
//   grid (⌈cols/32⌉, ⌈rows/32⌉).
// Exported: group_norm_silu_f16, softmax_rows_f16, transpose_f16.

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
