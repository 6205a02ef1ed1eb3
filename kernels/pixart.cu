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
// attention_rows_f16: 16 queries of one (row, head) per block; grid (⌈nq/16⌉, heads, rows),
// 128 threads. The queries (f32) and the output accumulators (f32) live in shared memory, keys
// and values go through it in tiles of 32 keys (f16, D ≤ 128; 34 KiB static in all, no
// per-thread arrays, so nothing spills to local memory): per tile the threads compute the
// (query, key) scores, one thread per query the online softmax (running max and sum, the
// accumulators rescaled once per tile), then the (query, dim) accumulators. Scores,
// exponentials (expf) and sums in f32; the output rounded once to f16. A row whose keys are
// all masked gets the softmax of its biased scores like the reference (uniform weights when all
// biases are equal). Scalar FMA work: cross-attention has ≤ 120 keys, a small part of a block.
// The elementwise kernels: 256 threads, grid-stride loops.

#include "device.cuh"

#define GRID_STRIDE(i, n)                                                                  \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)gridDim.x * blockDim.x)

namespace {
constexpr int AR_Q = 16;         // queries per block
constexpr int AR_KEYS = 32;      // keys per shared-memory tile
constexpr int AR_MAX_D = 128;    // largest head dim
constexpr int AR_THREADS = 128;  // threads per block
}  // namespace

extern "C" __global__ void __launch_bounds__(128)
    attention_rows_f16(half* __restrict__ out, const half* __restrict__ q,
                       const half* __restrict__ k, const half* __restrict__ v,
                       const float* __restrict__ bias, int nq, int nk, int head_dim, int ldq,
                       int ldkv, int ldo, float scale, int has_bias) {
    __shared__ float qs[AR_Q][AR_MAX_D];
    __shared__ half ks[AR_KEYS][AR_MAX_D];
    __shared__ half vs[AR_KEYS][AR_MAX_D];
    __shared__ float ps[AR_Q][AR_KEYS];
    __shared__ float os[AR_Q][AR_MAX_D];
    __shared__ float run_max[AR_Q], run_sum[AR_Q], rescale[AR_Q];
    const int h = blockIdx.y, r = blockIdx.z, q0 = blockIdx.x * AR_Q;
    const int D = head_dim, t = threadIdx.x;
    for (int e = t; e < AR_Q * D; e += AR_THREADS) {
        const int i = e / D, d = e % D;
        // Rows past nq repeat the last query; they are never written out.
        const int qi = min(q0 + i, nq - 1);
        qs[i][d] = __half2float(q[((long long)r * nq + qi) * ldq + (long long)h * D + d]);
        os[i][d] = 0.f;
    }
    if (t < AR_Q) {
        run_max[t] = -INFINITY;
        run_sum[t] = 0.f;
    }
    for (int j0 = 0; j0 < nk; j0 += AR_KEYS) {
        const int tile = min(AR_KEYS, nk - j0);
        __syncthreads();  // the previous tile is no longer read (first: q, o and the runs set)
        for (int e = t; e < tile * D; e += AR_THREADS) {
            const int j = e / D, d = e % D;
            const long long src = ((long long)r * nk + j0 + j) * ldkv + (long long)h * D + d;
            ks[j][d] = k[src];
            vs[j][d] = v[src];
        }
        __syncthreads();
        // Scores of the tile: (query, key) pairs over the threads.
        for (int e = t; e < AR_Q * tile; e += AR_THREADS) {
            const int i = e / tile, j = e % tile;
            float dot = 0.f;
            for (int d = 0; d < D; ++d) dot += qs[i][d] * __half2float(ks[j][d]);
            float sc = dot * scale;
            if (has_bias) sc += bias[(long long)r * nk + j0 + j];
            ps[i][j] = sc;
        }
        __syncthreads();
        // Online softmax, one thread per query: the new running max, the tile's weights.
        if (t < AR_Q) {
            float tmax = -INFINITY;
            for (int j = 0; j < tile; ++j) tmax = fmaxf(tmax, ps[t][j]);
            const float mnew = fmaxf(run_max[t], tmax);
            const float corr = expf(run_max[t] - mnew);  // 0 on the first tile (max −inf)
            float sum = 0.f;
            for (int j = 0; j < tile; ++j) {
                const float p = expf(ps[t][j] - mnew);
                ps[t][j] = p;
                sum += p;
            }
            run_sum[t] = run_sum[t] * corr + sum;
            run_max[t] = mnew;
            rescale[t] = corr;
        }
        __syncthreads();
        // The output accumulators, (query, dim) elements over the threads (each element
        // always the same thread's).
        for (int e = t; e < AR_Q * D; e += AR_THREADS) {
            const int i = e / D, d = e % D;
            float a = os[i][d] * rescale[i];
            for (int j = 0; j < tile; ++j) a += ps[i][j] * __half2float(vs[j][d]);
            os[i][d] = a;
        }
    }
    __syncthreads();
    for (int e = t; e < AR_Q * D; e += AR_THREADS) {
        const int i = e / D, d = e % D;
        if (q0 + i < nq)
            out[((long long)r * nq + q0 + i) * ldo + (long long)h * D + d] =
                __float2half_rn(os[i][d] / run_sum[i]);
    }
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
