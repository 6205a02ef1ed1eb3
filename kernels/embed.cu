// The DiT's input and output reshapes and its conditioning, plus the two kernels that let a
// captured CUDA graph replay a whole sampling loop (reference doc A.1–A.3, A.8):
//
//   patchify_f16       x (images, C, S, S) f32 NCHW → patches (rows, N, C·p·p) f16, N = g²,
//                      g = S/p, token n = i·g + j, feature (c·p + kh)·p + kw:
//                      patches[r, n, f] = f16_rn(x[r mod images, c, i·p + kh, j·p + kw])
//                      (rows = 2·images under guidance: both halves read the same image).
//   timestep_freq_f16  t (count) f32, freqs (128) f32 → out (count, 256) f16:
//                      a = t[i]·freqs[k] (one f32 product), out[i, k] = f16_rn(cosf(a)),
//                      out[i, 128 + k] = f16_rn(sinf(a)) (src/embed.rs timestep_embedding).
//   condition_silu_f16 c = temb[i, ch] + f32(table[l, ch]) in f32, l = labels[i mod rows];
//                      silu_c[i, ch] = f16_rn(c / (1 + expf(−c))). A label outside
//                      0..table_rows makes its row NaN instead of reading past the table.
//   unpatchify_f32     out (rows, N, p²·Cout) f32 → image (rows, Cout, S, S) f32:
//                      image[r, c, i·p + a, j·p + b] = out[r, i·g + j, (a·p + b)·Cout + c].
//                      A pure copy (bit exact).
//   select_step_f16    dst[i] = src[s·per_step + i], s = state[0] (the sampling index, kept
//                      in device memory so a graph replays it); NaN when s ∉ 0..steps.
//   step_advance       state[0] += 1 (one thread).
//
// Launch: 256 threads per block, grid-stride loops over the outputs (writes coalesced);
// step_advance is one thread. Precision: the copies are exact; the conversions round once to
// f16; cosf/sinf/expf are the C library's in the emulation and CUDA's (≤ 2 ulp) on the GPU.

#include "device.cuh"

// A grid-stride loop over 0..n.
#define GRID_STRIDE(i, n)                                                                  \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void __launch_bounds__(256)
    patchify_f16(half* __restrict__ patches, const float* __restrict__ x, int rows, int images,
                 int channels, int size, int patch) {
    const int g = size / patch, pp = patch * patch;
    const long long features = (long long)channels * pp, tokens = (long long)g * g;
    GRID_STRIDE(o, rows * tokens * features) {
        const long long f = o % features, rn = o / features;
        const long long n = rn % tokens, r = rn / tokens;
        const long long c = f / pp, kh = (f / patch) % patch, kw = f % patch;
        const long long i = n / g, j = n % g;
        const long long src = (((r % images) * channels + c) * size + i * patch + kh) * size +
                              j * patch + kw;
        patches[o] = __float2half_rn(x[src]);
    }
}

extern "C" __global__ void __launch_bounds__(256)
    timestep_freq_f16(half* __restrict__ out, const float* __restrict__ t,
                      const float* __restrict__ freqs, int count) {
    constexpr int HALF = 128;  // FREQ_DIM / 2
    GRID_STRIDE(o, (long long)count * HALF) {
        const long long i = o / HALF;
        const int k = int(o % HALF);
        const float a = t[i] * freqs[k];
        out[i * 2 * HALF + k] = __float2half_rn(cosf(a));
        out[i * 2 * HALF + HALF + k] = __float2half_rn(sinf(a));
    }
}

extern "C" __global__ void __launch_bounds__(256)
    condition_silu_f16(half* __restrict__ silu_c, const float* __restrict__ temb,
                       const half* __restrict__ table, const int* __restrict__ labels, int count,
                       int rows, int channels, int table_rows) {
    GRID_STRIDE(o, (long long)count * channels) {
        const long long i = o / channels, ch = o % channels;
        const int l = labels[i % rows];
        float v = nanf("");
        if (l >= 0 && l < table_rows) {
            const float c = temb[o] + __half2float(table[(long long)l * channels + ch]);
            v = c / (1.f + expf(-c));
        }
        silu_c[o] = __float2half_rn(v);
    }
}

extern "C" __global__ void __launch_bounds__(256)
    unpatchify_f32(float* __restrict__ image, const float* __restrict__ out, int rows,
                   int channels_out, int size, int patch) {
    const int g = size / patch;
    const long long plane = (long long)size * size;
    GRID_STRIDE(o, (long long)rows * channels_out * plane) {
        const long long yx = o % plane, rc = o / plane;
        const long long c = rc % channels_out, r = rc / channels_out;
        const long long y = yx / size, x = yx % size;
        const long long i = y / patch, a = y % patch, j = x / patch, b = x % patch;
        const long long token = r * g * g + i * g + j;
        image[o] = out[(token * patch * patch + a * patch + b) * channels_out + c];
    }
}

extern "C" __global__ void __launch_bounds__(256)
    select_step_f16(half* __restrict__ dst, const half* __restrict__ src,
                    const int* __restrict__ state, int per_step, int steps) {
    const int s = state[0];
    if (s < 0 || s >= steps) {
        const half nan = __float2half_rn(nanf(""));
        GRID_STRIDE(i, per_step) dst[i] = nan;
        return;
    }
    const half* from = src + (long long)s * per_step;
    // The widest copy every element of the step allows: 16 bytes (8 halves), 4 bytes, 2 bytes.
    const unsigned long long addr = reinterpret_cast<unsigned long long>(dst) |
                                   reinterpret_cast<unsigned long long>(from);
    if (per_step % 8 == 0 && addr % 16 == 0) {
        const uint4* f = reinterpret_cast<const uint4*>(from);
        uint4* d = reinterpret_cast<uint4*>(dst);
        GRID_STRIDE(i, per_step / 8) d[i] = f[i];
    } else if (per_step % 2 == 0 && addr % 4 == 0) {
        const half2* f = reinterpret_cast<const half2*>(from);
        half2* d = reinterpret_cast<half2*>(dst);
        GRID_STRIDE(i, per_step / 2) d[i] = f[i];
    } else {
        GRID_STRIDE(i, per_step) dst[i] = from[i];
    }
}

extern "C" __global__ void __launch_bounds__(1) step_advance(int* __restrict__ state) {
    state[0] += 1;
}
