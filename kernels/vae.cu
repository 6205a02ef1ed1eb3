// The VAE decoder's kernels besides the 3×3 convolution (kernels/vae_conv.cu); its 1×1
// convolutions (the resnet shortcuts, the attention projections) are gemm_fused_f16 over pixels.
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
//   once to f16; the mid-block attention's probabilities (x = q·kᵀ from gemm_fused_f16,
//   scale = 1/√C). Launch: one 256-thread block per row.
// transpose_f16: out (cols, rows) = in (rows, cols)ᵀ, bit copies (V for the P·V GEMM, whose
//   B operand is (N, K) row-major). Launch: 32×32 tiles through shared memory, block (32, 8),
//   grid (⌈cols/32⌉, ⌈rows/32⌉).
// vae_to_u8: the decoded image (NHWC, f16 or f32: exactly one of x16, x32 not null) to uint8
//   pixels, as src/image.rs bit for bit: rounding 0 (DiT's sample_ddp.py) u8(clamp(127.5·x +
//   128, 0, 255)) truncated; rounding 1 (diffusers) round-half-even(clamp(x/2 + 0.5, 0, 1)·255);
//   NaN → 0 (Rust's `as u8`). Each f32 operation rounded separately (no contraction: __f*_rn
//   on the GPU). Launch: 256 threads, grid-stride.
// Exported: group_norm_silu_f16, softmax_rows_f16, transpose_f16, vae_to_u8.

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

__device__ __forceinline__ unsigned char dit_u8(float x) {
    const float v = add_rn(mul_rn(127.5f, x), 128.f);
    if (!(v > 0.f)) return 0;  // NaN too
    if (v >= 255.f) return 255;
    return (unsigned char)(int)v;
}

__device__ __forceinline__ unsigned char diffusers_u8(float x) {
    float v = add_rn(mul_rn(x, 0.5f), 0.5f);  // x·0.5 is x/2 exactly rounded alike
    if (!(v > 0.f)) return 0;
    if (v > 1.f) v = 1.f;
    return (unsigned char)(int)rintf(mul_rn(v, 255.f));  // current mode: half to even
}

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

extern "C" __global__ void __launch_bounds__(256)
    vae_to_u8(unsigned char* __restrict__ out, const half* __restrict__ x16,
              const float* __restrict__ x32, int n, int rounding) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float v = x16 ? __half2float(x16[i]) : x32[i];
        out[i] = rounding ? diffusers_u8(v) : dit_u8(v);
    }
}
