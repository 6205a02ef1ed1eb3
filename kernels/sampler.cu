// The sampler's per-step arithmetic on the device, bit-identical under the emulation to the
// CPU engine (src/engine.rs guide and step, src/diffusion.rs ddpm_step / ddim_step, and
// src/noise.rs):
//
//   normal_f32        out (images, elems) f32: out[r, e] = element e of image (first + r)'s
//                     noise stream `stream_step` (noise::fill_normal), with the seed and the
//                     first image index read from the sampler state.
//   sampler_step_f32  x (images, Cin, HW) f32 updated in place: classifier-free guidance of
//                     the model output then one DDPM (learned-range or fixed-large variance)
//                     or DDIM step, with the step's noise generated in place.
//
// Sampler state (int32, in device memory so that a captured graph replays the whole loop):
//   state[0] = s, the sampling index 0..steps (spaced step k = steps − 1 − s);
//   state[1], state[2] = seed low, high; state[3], state[4] = first image index low, high.
// Coefficient table: coeffs[s·12 .. s·12 + 12] = [nonzero (1 or 0), sqrt_recip,
// sqrt_recipm1, coef1, coef2, min_log, max_log, fixed_log, ddim_sigma, ddim_sqrt_abp,
// ddim_dir, unused], filled on the host by gpu::launch::sampler_coeffs.
// model_out (rows, Cout, HW), rows = 2·images under guidance (conditional rows first):
//   ε = u + scale·(c − u) for channels < guided_channels, else c (c conditional, u not);
//   DDPM learned: v = model_out[r, Cin + ch] (conditional row) interpolates the log-variance.
// The step noise is stream s + 1 of each image, element ch·HW + p, generated only where the
// step adds it (nonzero, and σ ≠ 0 for DDIM); elsewhere it is 0.
// A state index outside 0..steps writes NaN into x.
//
// Launch: 256 threads per block, grid-stride over (image, quad): each thread does 4
// consecutive elements of an image (one Philox call); a quad may cross channels, and the last
// quad of an image is partial when Cin·HW is not a multiple of 4.
// Precision: f32 in exactly the Rust order of operations, never contracted into FMAs (the
// __f*_rn intrinsics on the GPU; -ffp-contract=off in the emulation); expf is the C
// library's in the emulation (as Rust's f32::exp) and CUDA's (≤ 2 ulp) on the GPU.

#include "device.cuh"
#include "philox.cuh"

namespace {

#ifdef __CUDACC__
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
#else
inline float mul_rn(float a, float b) { return a * b; }
inline float add_rn(float a, float b) { return a + b; }
inline float sub_rn(float a, float b) { return a - b; }
#endif

// The 64-bit value held in state[i] (low) and state[i + 1] (high).
__device__ __forceinline__ unsigned long long state_u64(const int* state, int i) {
    return (unsigned long long)(unsigned)state[i] |
           ((unsigned long long)(unsigned)state[i + 1] << 32);
}

enum Mode { DDPM_LEARNED = 0, DDPM_FIXED = 1, DDIM = 2 };  // gpu::launch::SamplerMode

}  // namespace

#define GRID_STRIDE(i, n)                                                                  \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void __launch_bounds__(256)
    normal_f32(float* __restrict__ out, const int* __restrict__ state, int images, int elems,
               int stream_step) {
    const unsigned long long seed = state_u64(state, 1), first = state_u64(state, 3);
    const long long quads = (elems + 3) / 4;
    const bool vec = elems % 4 == 0 && reinterpret_cast<unsigned long long>(out) % 16 == 0;
    GRID_STRIDE(t, images * quads) {
        const long long r = t / quads, q = t % quads;
        const float4 z = philox::normal4(seed, first + r, unsigned(stream_step), unsigned(q));
        float* dst = out + r * elems + 4 * q;
        if (vec) {
            *reinterpret_cast<float4*>(dst) = z;
        } else {
            const float v[4] = {z.x, z.y, z.z, z.w};
            for (int j = 0; j < 4; ++j)  // unrolled by nvcc: v stays in registers
                if (4 * q + j < elems) dst[j] = v[j];
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
    sampler_step_f32(float* __restrict__ x, const float* __restrict__ model_out,
                     const float* __restrict__ coeffs, const int* __restrict__ state, int images,
                     int cin, int cout, int hw, int guided_channels, float cfg_scale, int mode,
                     int steps, float* __restrict__ x0_out) {
    const long long img = (long long)cin * hw, quads = (img + 3) / 4;
    const int s = state[0];
    if (s < 0 || s >= steps) {
        GRID_STRIDE(i, images * img) x[i] = nanf("");
        return;
    }
    const float* c = coeffs + (long long)s * 12;
    const bool nonzero = c[0] != 0.f;
    const float sqrt_recip = c[1], sqrt_recipm1 = c[2], coef1 = c[3], coef2 = c[4];
    const float min_log = c[5], max_log = c[6], fixed_log = c[7];
    const float sigma = c[8], sqrt_abp = c[9], dir = c[10];
    const bool noisy = nonzero && (mode != DDIM || sigma != 0.f);
    const unsigned long long seed = state_u64(state, 1), first = state_u64(state, 3);

    GRID_STRIDE(t, images * quads) {
        const long long r = t / quads, q = t % quads;
        float z[4] = {0.f, 0.f, 0.f, 0.f};
        if (noisy) {
            const float4 n = philox::normal4(seed, first + r, unsigned(s) + 1, unsigned(q));
            z[0] = n.x, z[1] = n.y, z[2] = n.z, z[3] = n.w;
        }
        const long long e0 = 4 * q;
        for (int j = 0; j < 4; ++j) {  // unrolled by nvcc: z stays in registers
            const long long e = e0 + j;
            if (e >= img) break;
            const long long ch = e / hw, p = e % hw;
            const float cond = model_out[(r * cout + ch) * hw + p];
            float eps = cond;
            if (ch < guided_channels) {  // engine.rs guide: u + s·(c − u)
                const float u = model_out[((images + r) * cout + ch) * hw + p];
                eps = add_rn(u, mul_rn(cfg_scale, sub_rn(cond, u)));
            }
            const float xv = x[r * img + e];
            const float x0 = sub_rn(mul_rn(sqrt_recip, xv), mul_rn(sqrt_recipm1, eps));
            if (x0_out) x0_out[r * img + e] = x0;  // the step's x̂₀, for per-step previews
            float next;
            if (mode == DDIM) {  // diffusion.rs ddim_step
                const float e_re = sub_rn(mul_rn(sqrt_recip, xv), x0) / sqrt_recipm1;
                const float mean = add_rn(mul_rn(x0, sqrt_abp), mul_rn(dir, e_re));
                next = nonzero ? add_rn(mean, mul_rn(sigma, z[j])) : mean;
            } else {  // diffusion.rs ddpm_step, ddpm_mean_logvar
                float log_var = fixed_log;
                if (mode == DDPM_LEARNED) {
                    const float v = model_out[(r * cout + cin + ch) * hw + p];
                    const float frac = add_rn(v, 1.f) / 2.f;
                    log_var = add_rn(mul_rn(frac, max_log), mul_rn(sub_rn(1.f, frac), min_log));
                }
                const float mean = add_rn(mul_rn(coef1, x0), mul_rn(coef2, xv));
                const float add = nonzero ? mul_rn(expf(mul_rn(0.5f, log_var)), z[j]) : 0.f;
                next = add_rn(mean, add);
            }
            x[r * img + e] = next;
        }
    }
}

// Non-finite detection for the GPU pipeline (engine option `check_finite`):
//   if any of v[0..n) is NaN or ±Inf, state[slot] = state[0] (the sampling step) unless
//   state[slot] already holds a step (it starts at −1), so it keeps the first bad step.
// Grid-stride, 256 threads; one compare per element, an atomic only on a bad value. The
// host reads state[slot] once, with the request's result: no synchronisation per step.
extern "C" __global__ void __launch_bounds__(256)
    check_finite_f32(const float* __restrict__ v, int n, int* __restrict__ state, int slot) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float x = v[i];
        if (!(fabsf(x) <= 3.402823466e38f)) {  // false for NaN and ±Inf
            atomicCAS(&state[slot], -1, state[0]);
            return;
        }
    }
}
