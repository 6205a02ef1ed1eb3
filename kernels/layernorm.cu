// LayerNorm without affine parameters followed by adaLN modulation (DiT, reference doc A.6):
//   out[r, c] = (x[r, c] − mean_r) / sqrt(var_r + eps) · (1 + scale[b, c]) + shift[b, c]
// x: (rows, C) f16 (`layernorm_modulate_f16`) or f32 (`layernorm_modulate_f32_stream`: the GPU
// pipeline keeps the residual stream in f32); out: (rows, C) f16, rows = batch · tokens;
// shift and scale are chunks of the
// modulation vector: one row of C values per batch item b = r / tokens, rows `mod_stride`
// elements apart (6C for a DiT block, 2C for the final layer).
// Launch: one block of 256 threads per row. The row is read once (as half2) into dynamic
// shared memory as f32 (C·4 bytes); mean and variance are two block reductions in f32
// (two-pass variance, no cancellation); the output is rounded once to f16.
// Requires C even and 4-byte (f16 x) or 8-byte (f32 x) aligned pointers (the launcher checks).
// `residual_layernorm_modulate_f32_stream` first applies the gated residual update of
// kernels/residual.cu to the row, x += f32(gate[b])·f32(y) in f32 (the same expression as
// `gated_residual_add_f32_stream`), writes the new x back, then normalises it as above: the block's
// residual add and the next LayerNorm in one pass over x.

#include "block_reduce.cuh"

constexpr int LN_THREADS = 256;

namespace {

__device__ __forceinline__ float2 load_pair(const half* x, int i) {
    return __half22float2(reinterpret_cast<const half2*>(x)[i]);
}
__device__ __forceinline__ float2 load_pair(const float* x, int i) {
    return reinterpret_cast<const float2*>(x)[i];
}

template <class In, bool RESIDUAL>
__device__ __forceinline__ void layernorm_modulate(half* __restrict__ out, const In* x,
                                                   float* x_out, const half* __restrict__ y,
                                                   const half* __restrict__ gate, int gate_stride,
                                                   const half* __restrict__ shift,
                                                   const half* __restrict__ scale, int tokens,
                                                   int channels, int mod_stride, float eps) {
    float* row = dynamic_shared<float>();
    const size_t r = blockIdx.x;
    const size_t b = r / tokens;
    const int pairs = channels / 2;
    const In* xr = x + r * channels;

    float sum = 0.f;
    for (int i = threadIdx.x; i < pairs; i += LN_THREADS) {
        float2 v = load_pair(xr, i);
        if (RESIDUAL) {
            const float2 g = load_pair(gate + b * gate_stride, i);
            const float2 u = load_pair(y + r * channels, i);
            v.x = v.x + g.x * u.x;
            v.y = v.y + g.y * u.y;
            reinterpret_cast<float2*>(x_out + r * channels)[i] = v;
        }
        row[2 * i] = v.x;
        row[2 * i + 1] = v.y;
        sum += v.x + v.y;
    }
    const float mean = block_sum<LN_THREADS / 32>(sum) / channels;

    float sq = 0.f;
    for (int i = threadIdx.x; i < pairs; i += LN_THREADS) {
        const float d0 = row[2 * i] - mean, d1 = row[2 * i + 1] - mean;
        sq += d0 * d0 + d1 * d1;
    }
    const float rstd = rsqrtf(block_sum<LN_THREADS / 32>(sq) / channels + eps);

    const half2* shift2 = reinterpret_cast<const half2*>(shift + b * mod_stride);
    const half2* scale2 = reinterpret_cast<const half2*>(scale + b * mod_stride);
    half2* out2 = reinterpret_cast<half2*>(out + r * channels);
    for (int i = threadIdx.x; i < pairs; i += LN_THREADS) {
        const float2 sh = __half22float2(shift2[i]), sc = __half22float2(scale2[i]);
        out2[i] = __floats2half2_rn((row[2 * i] - mean) * rstd * (1.f + sc.x) + sh.x,
                                    (row[2 * i + 1] - mean) * rstd * (1.f + sc.y) + sh.y);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(LN_THREADS)
    layernorm_modulate_f16(half* __restrict__ out, const half* __restrict__ x,
                           const half* __restrict__ shift, const half* __restrict__ scale,
                           int tokens, int channels, int mod_stride, float eps) {
    layernorm_modulate<half, false>(out, x, nullptr, nullptr, nullptr, 0, shift, scale, tokens,
                                    channels, mod_stride, eps);
}

extern "C" __global__ void __launch_bounds__(LN_THREADS)
    layernorm_modulate_f32_stream(half* __restrict__ out, const float* __restrict__ x,
                            const half* __restrict__ shift, const half* __restrict__ scale,
                            int tokens, int channels, int mod_stride, float eps) {
    layernorm_modulate<float, false>(out, x, nullptr, nullptr, nullptr, 0, shift, scale, tokens,
                                     channels, mod_stride, eps);
}

extern "C" __global__ void __launch_bounds__(LN_THREADS)
    residual_layernorm_modulate_f32_stream(half* __restrict__ out, float* x, const half* __restrict__ y,
                                     const half* __restrict__ gate, int gate_stride,
                                     const half* __restrict__ shift,
                                     const half* __restrict__ scale, int tokens, int channels,
                                     int mod_stride, float eps) {
    layernorm_modulate<float, true>(out, x, x, y, gate, gate_stride, shift, scale, tokens,
                                    channels, mod_stride, eps);
}
