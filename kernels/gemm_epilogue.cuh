// The fused linear layer's parameters and epilogue, shared by the WMMA GEMM (gemm.cu) and the
// Hopper GEMM (gemm_sm90.cu): what one output element (finish1) or an adjacent pair (finish2)
// becomes — bias, the row-wrapped add, the pre-activation copy, the activation, f16 or f32
// out, or a second weight's raw sum — with the formulas and rounding gemm.cu's header states.
#pragma once

#include "device.cuh"

namespace {

enum Act : int { ACT_NONE = 0, ACT_GELU_TANH = 1, ACT_SILU = 2 };

struct Params {
    half* out;
    float* out_f32;
    half* pre;
    const half* __restrict__ a;
    const half* __restrict__ a_minus;
    const half* __restrict__ w;
    const half* __restrict__ bias;
    const half* add;
    float* ws;
    int M, N, K, lda, ldc, ld_add, add_rows, k_split;
    // More output columns N .. N + n2 − 1 from a second weight w2 (n2, K), written as raw f32
    // sums (no bias, add or activation) to out2 (row stride ld2): icc's t_s = down·x_s, kept
    // by a full step's linear in the same pass over x_s. n2 = 0: none.
    const half* __restrict__ w2;
    float* out2;
    int n2, ld2;
};

__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608028654f;  // sqrt(2/pi)
    return 0.5f * x * (1.f + tanhf(k * (x + 0.044715f * x * x * x)));
}

template <int ACT>
__device__ __forceinline__ float activate(float x) {
    if (ACT == ACT_GELU_TANH) return gelu_tanh(x);
    if (ACT == ACT_SILU) return x / (1.f + expf(-x));
    return x;
}

__device__ __forceinline__ bool aligned(const void* p, size_t bytes) {
    return reinterpret_cast<size_t>(p) % bytes == 0;
}

// The epilogue of one element: v + bias, + add, pre = f16(v), out = act(v); a column of the
// second weight (gn ≥ N): the raw sum to out2.
template <int ACT>
__device__ __forceinline__ void finish1(const Params& p, int gm, int gn, float v) {
    if (gn >= p.N) {
        p.out2[(size_t)gm * p.ld2 + gn - p.N] = v;
        return;
    }
    if (p.bias) v += __half2float(p.bias[gn]);
    if (p.add) v += __half2float(p.add[(size_t)(gm % p.add_rows) * p.ld_add + gn]);
    const size_t at = (size_t)gm * p.ldc + gn;
    if (p.pre) p.pre[at] = __float2half_rn(v);
    const float y = activate<ACT>(v);
    if (p.out)
        p.out[at] = __float2half_rn(y);
    else
        p.out_f32[at] = y;
}

// The same for columns gn and gn + 1 (gn even, N even), by 4- and 8-byte accesses.
template <int ACT>
__device__ __forceinline__ void finish2(const Params& p, int gm, int gn, float v0, float v1) {
    if (gn >= p.N) {  // N even: the pair lies wholly in the second weight's columns
        float2 y;
        y.x = v0;
        y.y = v1;
        *reinterpret_cast<float2*>(p.out2 + (size_t)gm * p.ld2 + gn - p.N) = y;
        return;
    }
    if (p.bias) {
        const float2 b = __half22float2(*reinterpret_cast<const half2*>(p.bias + gn));
        v0 += b.x;
        v1 += b.y;
    }
    if (p.add) {
        const half2 d2 =
            *reinterpret_cast<const half2*>(p.add + (size_t)(gm % p.add_rows) * p.ld_add + gn);
        const float2 d = __half22float2(d2);
        v0 += d.x;
        v1 += d.y;
    }
    const size_t at = (size_t)gm * p.ldc + gn;
    if (p.pre) *reinterpret_cast<half2*>(p.pre + at) = __floats2half2_rn(v0, v1);
    const float y0 = activate<ACT>(v0), y1 = activate<ACT>(v1);
    if (p.out) {
        *reinterpret_cast<half2*>(p.out + at) = __floats2half2_rn(y0, y1);
    } else {
        float2 y;
        y.x = y0;
        y.y = y1;
        *reinterpret_cast<float2*>(p.out_f32 + at) = y;
    }
}

// Whether every access of finish2 is aligned: N and the strides even, pointers 4-byte aligned
// (8 for f32 out).
__device__ __forceinline__ bool pairs_ok(const Params& p) {
    return p.N % 2 == 0 && p.ldc % 2 == 0 && aligned(p.bias, 4) && aligned(p.pre, 4) &&
           aligned(p.out, 4) && aligned(p.out_f32, 8) &&
           (!p.add || (p.ld_add % 2 == 0 && aligned(p.add, 4))) &&
           (p.n2 == 0 || (p.n2 % 2 == 0 && p.ld2 % 2 == 0 && aligned(p.out2, 8)));
}

}  // namespace
