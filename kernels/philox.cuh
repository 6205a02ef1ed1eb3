// The counter-based Gaussian noise of src/noise.rs on the device, bit for bit: Philox4x32-10
// (Salmon et al., SC'11) keyed by the 64-bit seed, counter (element / 4, image low, image
// high, stream step); each call's four outputs become four uniforms ((x >> 8) + 0.5)·2^-24,
// two Box–Muller pairs computed in f64 and rounded once to f32, i.e. the normals of elements
// 4q .. 4q + 3 of that image's stream.
// The emulation calls the C library's log/cos/sin, as Rust's f64 methods do, so it matches
// noise::fill_normal exactly. On the GPU, CUDA's f64 log (1 ulp) and sincospi (see
// box_muller) can differ from those in the last f64 bits, which changes the f32 result (by
// one ulp) only in the rare case that those bits decide a rounding.
#pragma once

#include "device.cuh"

namespace philox {

// The Philox4x32 multipliers and Weyl key increments (noise.rs M0, M1, W0, W1).
constexpr unsigned M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
constexpr unsigned W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;

// Philox4x32 with 10 rounds of counter (c0, c1, c2, c3) under key (k0, k1).
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, unsigned k0, unsigned k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += W0;
            k1 += W1;
        }
        const unsigned long long p0 = (unsigned long long)M0 * c.x;
        const unsigned long long p1 = (unsigned long long)M1 * c.z;
        c = uint4{unsigned(p1 >> 32) ^ c.y ^ k0, unsigned(p1), unsigned(p0 >> 32) ^ c.w ^ k1,
                  unsigned(p0)};
    }
    return c;
}

// A uniform in (0, 1) from the top 24 bits: exact in f32, never 0 (so the log is finite).
__device__ __forceinline__ float uniform(unsigned x) {
    return (float(x >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

// One Box–Muller pair in f64 (noise.rs box_muller): (radius·cos θ, radius·sin θ), θ = 2π·u_b,
// rounded to f32.
__device__ __forceinline__ float2 box_muller(unsigned a, unsigned b) {
    const double radius = sqrt(-2.0 * log((double)uniform(a)));
#ifdef __CUDACC__
    // CUDA's cos/sin carry a Payne–Hanek path for huge arguments that needs a 40-byte stack
    // frame (tests/gpu_ptxas.rs refuses any); sincospi(2u) = (sin, cos)(2π·u) has none. It
    // evaluates at the exact 2π·u rather than at θ rounded to f64, a difference of at most
    // 2^-50 that changes the f32 result only when it decides a rounding.
    double s, c;
    sincospi(2.0 * (double)uniform(b), &s, &c);
#else
    const double theta = 6.283185307179586 * (double)uniform(b);  // std::f64::consts::TAU
    const double c = cos(theta), s = sin(theta);
#endif
    return make_float2((float)(radius * c), (float)(radius * s));
}

// The normals of elements 4q .. 4q + 3 of image `image`'s stream `step` under `seed`.
__device__ __forceinline__ float4 normal4(unsigned long long seed, unsigned long long image,
                                          unsigned step, unsigned q) {
    const uint4 r = philox4x32_10(uint4{q, unsigned(image), unsigned(image >> 32), step},
                                  unsigned(seed), unsigned(seed >> 32));
    const float2 p = box_muller(r.x, r.y), s = box_muller(r.z, r.w);
    return make_float4(p.x, p.y, s.x, s.y);
}

}  // namespace philox
