// Taylor forecasting of a transformer block's branch outputs (TaylorSeer-style; the formulas
// are in docs/caching-policies.md). A branch keeps `levels` f32 factors D_0 … D_{levels−1},
// each `stride` elements (the planned rows × N × C) apart. The step's numbers are row s of
// `table` (8 f32 per step, s = state[0], the sampling index kept in device memory, so one
// recorded graph replays every step): [0] orders, [1] Δ, [2 + i] the weight w_i.
//   forecast_update_f32  a Taylor-full step, from the new branch output y (f16):
//                        new = f32(y); for i < levels: if i ≤ orders { old = D_i; D_i = new;
//                        new = (new − old) / Δ } else D_i = 0.
//   forecast_f16         a forecast step: y = f16(Σ_{i < levels} w_i · D_i), w_i = k^i / i!
//                        (0 past the differences available).
// Both write NaN (the update: into D_0) when s ∉ 0..steps, as select_step_f16 does.
// Launch: 256 threads per block, grid-stride loops over the n = rows·N·C elements. Precision:
// f32 arithmetic (differences of f16 values would lose their leading digits), one rounding
// of the prediction to f16.

#include "device.cuh"

#define FORECAST_TABLE 8

extern "C" __global__ void __launch_bounds__(256)
    forecast_update_f32(float* __restrict__ factors, const half* __restrict__ y,
                        const float* __restrict__ table, const int* __restrict__ state, int n,
                        int stride, int levels, int steps) {
    const int s = state[0];
    const bool valid = s >= 0 && s < steps;
    const float orders = valid ? table[s * FORECAST_TABLE] : 0.0f;
    const float delta = valid ? table[s * FORECAST_TABLE + 1] : 1.0f;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        float next = valid ? __half2float(y[e]) : nanf("");
        for (int i = 0; i < levels; ++i) {
            float* d = factors + (long long)i * stride + e;
            if ((float)i <= orders) {
                const float old = *d;
                *d = next;
                next = (next - old) / delta;
            } else {
                *d = 0.0f;
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
    forecast_f16(half* __restrict__ y, const float* __restrict__ factors,
                 const float* __restrict__ table, const int* __restrict__ state, int n,
                 int stride, int levels, int steps) {
    const int s = state[0];
    const bool valid = s >= 0 && s < steps;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        if (!valid) {
            y[e] = __float2half_rn(nanf(""));
            continue;
        }
        float acc = table[s * FORECAST_TABLE + 2] * factors[e];
        for (int i = 1; i < levels; ++i) {
            acc += table[s * FORECAST_TABLE + 2 + i] * factors[(long long)i * stride + e];
        }
        y[e] = __float2half_rn(acc);
    }
}
