// IEEE binary16 for the emulation: CUDA's __half/__half2 and the intrinsics our kernels use,
// bit-exact with the GPU for conversions and for the arithmetic intrinsics (round to nearest
// even). Single operations (+, ×) are computed in float and rounded once: float has
// 24 ≥ 2·11 + 2 bits, so that double rounding is innocuous (Figueroa 1995). Fused
// multiply-add is computed in double, where a·b + c is exact whenever the result is finite
// in f16 (a·b has 22 significant bits and the exponent range of f16 is narrow), then
// rounded once.
#pragma once

namespace icdit_emu {

// Round-to-nearest-even conversion of a double to binary16 bits.
inline uint16_t f64_to_f16_bits(double d) {
    uint64_t b;
    std::memcpy(&b, &d, 8);
    const uint16_t sign = uint16_t((b >> 48) & 0x8000);
    const int exp = int((b >> 52) & 0x7ff);
    const uint64_t frac = b & ((uint64_t(1) << 52) - 1);
    if (exp == 0x7ff)  // inf or NaN (NaN stays quiet and keeps its top payload bits)
        return uint16_t(sign | 0x7c00 | (frac ? 0x200 | (frac >> 42) : 0));
    const int e = exp - 1023;
    if (e > 15) return uint16_t(sign | 0x7c00);  // ≥ 2^16: beyond the largest finite f16
    if (exp == 0) return sign;                    // double subnormals are far below f16's
    const uint64_t m = frac | (uint64_t(1) << 52);  // 53-bit significand
    // Normal results keep 11 bits of m; subnormal ones fewer, with exponent field 0.
    const int shift = e >= -14 ? 42 : 42 + (-14 - e);
    if (shift >= 64) return sign;
    const uint64_t q = m >> shift, r = m & ((uint64_t(1) << shift) - 1);
    const uint64_t halfway = uint64_t(1) << (shift - 1);
    const uint64_t qr = q + ((r > halfway || (r == halfway && (q & 1))) ? 1 : 0);
    if (e < -14) return uint16_t(sign | qr);  // qr == 0x400 is the smallest normal, as wanted
    // qr carries into bit 11 when rounding up 0x7ff: the exponent then grows by one, and the
    // largest exponent grows into 0x7c00, infinity.
    return uint16_t(sign | ((uint32_t(e + 15 - 1) << 10) + uint32_t(qr)));
}

inline float f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (frac << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (frac << 13);
    } else {
        const float f = float(frac) * 0x1p-24f;  // subnormal or zero: exact
        return sign ? -f : f;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

}  // namespace icdit_emu

struct __half {
    uint16_t bits_;
    __half() = default;
    __half(float f) : bits_(icdit_emu::f64_to_f16_bits(double(f))) {}
    operator float() const { return icdit_emu::f16_bits_to_f32(bits_); }
};
struct alignas(4) __half2 {
    __half x, y;
};
using half = __half;
using half2 = __half2;

inline __half icdit_emu_half_from_bits(uint16_t b) {
    __half h;
    h.bits_ = b;
    return h;
}

inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__half(a), __half(b)}; }
inline __half2 __float22half2_rn(float2 f) { return __half2{__half(f.x), __half(f.y)}; }
inline float2 __half22float2(__half2 h) { return float2{float(h.x), float(h.y)}; }
inline float __low2float(__half2 h) { return float(h.x); }
inline float __high2float(__half2 h) { return float(h.y); }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline __half2 __half2half2(__half a) { return __half2{a, a}; }

inline __half __hadd(__half a, __half b) { return __half(float(a) + float(b)); }
inline __half __hmul(__half a, __half b) { return __half(float(a) * float(b)); }
inline __half __hfma(__half a, __half b, __half c) {
    return icdit_emu_half_from_bits(
        icdit_emu::f64_to_f16_bits(double(float(a)) * double(float(b)) + double(float(c))));
}
inline __half2 __hadd2(__half2 a, __half2 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }
inline __half2 __hmul2(__half2 a, __half2 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
    return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)};
}
