// PixArt-α's device work beyond DiT's kernels (pixart-reference.md, "Transformer"):
//
//   attention_rows_f16     out[r, i, h·D + d] = Σ_j p_j·v[r, j, h·D + d] with
//                          p = softmax_j(s_j), s_j = (q[r, i, h·D ..]·k[r, j, h·D ..])·scale
//                          + bias[r, j] (no bias when `has_bias` is 0). Cross-attention with
//                          the caption mask (bias = (1 − mask)·(−10000), added to the scaled
//                          scores exactly as diffusers does), and self-attention at head dims
//                          the flash kernel (kernels/attention.cu, D = 72 only) is not built
//                          for. q (rows, nq) rows `ldq` apart, k and v (rows, nk) rows `ldkv`
//                          apart, out (rows, nq) rows `ldo` apart, bias (rows, nk) f32.
//   silu_f32_to_f16        out[i] = f16_rn(x / (1 + expf(−x))), x f32 (adaLN-single's input).
//   pixart_modulation_f16  every modulation vector of a row from adaLN-single:
//                          out[r, j] = f16_rn(table[j] + tmod[r, j mod 6C]) for the blocks'
//                          depth·6C values, then f16_rn(table[j] + emb[r, (j − depth·6C) mod C])
//                          for the final layer's 2C (table: every block's scale_shift_table,
//                          then the final one, f32).
//
// attention_rows_f16: one thread per query; grid (⌈nq/64⌉, heads, rows), 64 threads. Keys
// and values go through shared memory in tiles of 32 keys (f32, D ≤ 128: 32 KiB static); each
// thread keeps its query and its output accumulator in f32 registers and an online softmax
// (running max and sum, the accumulator rescaled once per tile). Scores, exponentials
// (expf) and sums in f32; the output rounded once to f16. A row whose keys are all masked gets
// the softmax of its biased scores like the reference (uniform weights when all biases are
// equal). Scalar FMA work: cross-attention has ≤ 120 keys, so it is a small part of a block.
// The elementwise kernels: 256 threads, grid-stride loops.

#include "device.cuh"

#define GRID_STRIDE(i, n)                                                                  \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)gridDim.x * blockDim.x)

namespace {
constexpr int AR_THREADS = 64;  // queries per block
constexpr int AR_KEYS = 32;     // keys per shared-memory tile
constexpr int AR_MAX_D = 128;   // largest head dim
}  // namespace

extern "C" __global__ void __launch_bounds__(64)
    attention_rows_f16(half* __restrict__ out, const half* __restrict__ q,
                       const half* __restrict__ k, const half* __restrict__ v,
                       const float* __restrict__ bias, int nq, int nk, int head_dim, int ldq,
                       int ldkv, int ldo, float scale, int has_bias) {
    __shared__ float ks[AR_KEYS][AR_MAX_D];
    __shared__ float vs[AR_KEYS][AR_MAX_D];
    const int h = blockIdx.y, r = blockIdx.z;
    const int i = blockIdx.x * AR_THREADS + threadIdx.x;
    const bool live = i < nq;
    const int D = head_dim;
    float qv[AR_MAX_D], acc[AR_MAX_D];
    const half* qrow = q + ((long long)r * nq + (live ? i : 0)) * ldq + (long long)h * D;
    for (int d = 0; d < D; ++d) {
        qv[d] = __half2float(qrow[d]);
        acc[d] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    const half* kbase = k + (long long)r * nk * ldkv + (long long)h * D;
    const half* vbase = v + (long long)r * nk * ldkv + (long long)h * D;
    for (int j0 = 0; j0 < nk; j0 += AR_KEYS) {
        const int tile = min(AR_KEYS, nk - j0);
        __syncthreads();  // the previous tile is no longer read
        for (int e = threadIdx.x; e < tile * D; e += AR_THREADS) {
            const int j = e / D, d = e % D;
            ks[j][d] = __half2float(kbase[(long long)(j0 + j) * ldkv + d]);
            vs[j][d] = __half2float(vbase[(long long)(j0 + j) * ldkv + d]);
        }
        __syncthreads();
        float s[AR_KEYS];
        float tmax = -INFINITY;
        for (int j = 0; j < tile; ++j) {
            float dot = 0.f;
            for (int d = 0; d < D; ++d) dot += qv[d] * ks[j][d];
            float sj = dot * scale;
            if (has_bias) sj += bias[(long long)r * nk + j0 + j];
            s[j] = sj;
            tmax = fmaxf(tmax, sj);
        }
        const float mnew = fmaxf(m, tmax);
        const float corr = expf(m - mnew);  // 0 on the first tile (m = −inf)
        l *= corr;
        for (int d = 0; d < D; ++d) acc[d] *= corr;
        for (int j = 0; j < tile; ++j) {
            const float p = expf(s[j] - mnew);
            l += p;
            for (int d = 0; d < D; ++d) acc[d] += p * vs[j][d];
        }
        m = mnew;
    }
    if (!live) return;
    const float inv = 1.f / l;
    half* orow = out + ((long long)r * nq + i) * ldo + (long long)h * D;
    for (int d = 0; d < D; ++d) orow[d] = __float2half_rn(acc[d] * inv);
}

extern "C" __global__ void __launch_bounds__(256)
    silu_f32_to_f16(half* __restrict__ out, const float* __restrict__ x, int n) {
    GRID_STRIDE(o, n) {
        const float v = x[o];
        out[o] = __float2half_rn(v / (1.f + expf(-v)));
    }
}

extern "C" __global__ void __launch_bounds__(256)
    pixart_modulation_f16(half* __restrict__ out, const float* __restrict__ tmod,
                          const float* __restrict__ emb, const float* __restrict__ table,
                          int rows, int channels, int depth) {
    const long long blocks = 6LL * depth * channels, width = blocks + 2LL * channels;
    GRID_STRIDE(o, rows * width) {
        const long long r = o / width, j = o % width;
        const float t = j < blocks ? tmod[r * 6 * channels + j % (6 * channels)]
                                   : emb[r * channels + (j - blocks) % channels];
        out[o] = __float2half_rn(table[j] + t);
    }
}

// pixart_sampler_step_f32: guidance and one DPM-Solver++ or DDIM update of every latent value
// (src/pixart/sampler.rs `update_coeffs`): for image k, value e of img = C·H·W,
//   ε = u + s·(c − u) with u = out[k, e], c = out[images + k, e] (rows [negative, positive],
//       every channel guided, the variance half after img dropped), or ε = out[k, e] unguided;
//   x̂₀ = (x − σ·ε)/α;  x ← A·x + B·x̂₀ + C·ε + D·x̂₀_prev;  x0[k, e] = x̂₀,
// coeffs = [α, σ, A, B, C, D] of this step (f32). x̂₀_prev (x0 before the write) is read only
// when D ≠ 0. f32 throughout; 256 threads, grid-stride loop.
extern "C" __global__ void __launch_bounds__(256)
    pixart_sampler_step_f32(float* __restrict__ x, float* __restrict__ x0,
                            const float* __restrict__ out, const float* __restrict__ coeffs,
                            int images, int img, int out_img, int guided, float cfg_scale) {
    const float alpha = coeffs[0], sigma = coeffs[1], A = coeffs[2], B = coeffs[3],
                C = coeffs[4], D = coeffs[5];
    GRID_STRIDE(i, (long long)images * img) {
        const long long k = i / img, e = i % img;
        float eps = out[k * out_img + e];
        if (guided) {
            const float c = out[(images + k) * out_img + e];
            eps = eps + cfg_scale * (c - eps);
        }
        const float xv = x[i];
        const float x0v = (xv - sigma * eps) / alpha;
        float xn = A * xv + B * x0v + C * eps;
        if (D != 0.f) xn += D * x0[i];
        x0[i] = x0v;
        x[i] = xn;
    }
}
