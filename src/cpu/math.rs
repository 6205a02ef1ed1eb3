//! Branch-free f32 elementary functions that vectorise, accurate to a few ulp — the error
//! is far below the 1e-5 relative tolerance against PyTorch, whose CPU kernels use
//! vectorised approximations of the same kind (SLEEF, ≤ 1 ulp).

/// e^x for x in f32 range (clamped at the overflow/underflow ends).
/// Range reduction x = n·ln2 + r, |r| ≤ ln2/2, then a degree-7 Taylor polynomial
/// (truncation error < 5e-9 relative) and the exponent written into the float bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding then subtracting 1.5·2^23 rounds to the nearest integer without a branch.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    // The rounded integer also sits in the low mantissa bits of `shifted` (no float→int
    // conversion, which would keep the loop from vectorising).
    let ni = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    p * scale
}

/// GELU with the tanh approximation, as DiT's MLP uses (`approximate="tanh"`):
/// 0.5·x·(1 + tanh(u)) computed as x·σ(2u), which is the same function without the
/// cancellation of 1 + tanh(u) for negative u.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const K2: f32 = 2.0 * 0.797_884_6; // 2·√(2/π)
    let u2 = K2 * (x + 0.044715 * x * x * x);
    x / (1.0 + exp(-u2))
}

/// SiLU x·σ(x).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_within_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, e) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((a - e) / e).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
    }

    #[test]
    fn gelu_and_silu_match_f64_formulas() {
        for i in -2000..2000 {
            let x = i as f32 * 0.005;
            let xd = x as f64;
            let g = 0.5 * xd * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3))).tanh());
            assert!((gelu_tanh(x) as f64 - g).abs() < 2e-7 * (1.0 + g.abs()), "gelu({x})");
            let s = xd / (1.0 + (-xd).exp());
            assert!((silu(x) as f64 - s).abs() < 2e-7 * (1.0 + s.abs()), "silu({x})");
        }
    }
}

/// Sum with 16 independent partial sums: vectorises, and is more accurate than serial.
#[inline(always)]
pub fn lanes_sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for ch in chunks {
        for (a, v) in acc.iter_mut().zip(ch) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Defines `pub fn $name(isa, args)` that runs `$body` compiled for the target features of
/// the engine's instruction-set path. The body is written once; the compiler vectorises it
/// for each target (the elementwise helpers above are `#[inline(always)]`). No path fuses a
/// multiply and an add the source writes separately, so every path gives the same bits.
/// On aarch64 NEON is part of the baseline target, so the plain body is the NEON build.
macro_rules! simd_fn {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        pub fn $name(isa: $crate::isa::Isa, $($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512dq,avx512vl,fma")]
            unsafe fn avx512($($arg: $ty),*) {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) {
                body($($arg),*)
            }
            match isa.kind() {
                // SAFETY: an `Isa` exists only for paths whose features the CPU has.
                #[cfg(target_arch = "x86_64")]
                $crate::isa::IsaKind::Avx512 => unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                $crate::isa::IsaKind::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}

simd_fn! {
    /// row += bias, row += add, then GELU-tanh if `gelu`.
    pub fn bias_act(row: &mut [f32], bias: Option<&[f32]>, add: Option<&[f32]>, gelu: bool) {
        if let Some(bias) = bias {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
        if let Some(add) = add {
            for (v, a) in row.iter_mut().zip(add) {
                *v += a;
            }
        }
        if gelu {
            for v in row.iter_mut() {
                *v = gelu_tanh(*v);
            }
        }
    }
}

simd_fn! {
    /// In-place softmax of `row · scale`, max-subtracted.
    pub fn softmax_scaled(row: &mut [f32], scale: f32) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
        for v in row.iter_mut() {
            *v = exp(*v * scale - max);
        }
        let inv = 1.0 / lanes_sum(row);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

simd_fn! {
    /// LayerNorm without affine (biased variance, two passes, eps inside the root) fused
    /// with the adaLN modulation `·(1 + scale) + shift` (reference doc A.6).
    pub fn layer_norm_modulate(x: &[f32], shift: &[f32], scale: &[f32], eps: f32, out: &mut [f32]) {
        let n = x.len() as f32;
        let mean = lanes_sum(x) / n;
        let mut acc = [0.0f32; 16];
        let chunks = x.chunks_exact(16);
        let tail: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
        for ch in chunks {
            for (a, v) in acc.iter_mut().zip(ch) {
                *a += (v - mean) * (v - mean);
            }
        }
        let inv = 1.0 / ((acc.iter().sum::<f32>() + tail) / n + eps).sqrt();
        for (((o, &v), &sh), &sc) in out.iter_mut().zip(x).zip(shift).zip(scale) {
            *o = (v - mean) * inv * (1.0 + sc) + sh;
        }
    }
}

simd_fn! {
    /// x += gate ⊙ y.
    pub fn gated_add(x: &mut [f32], gate: &[f32], y: &[f32]) {
        for ((xv, g), yv) in x.iter_mut().zip(gate).zip(y) {
            *xv += g * yv;
        }
    }
}

simd_fn! {
    /// x += y.
    pub fn add(x: &mut [f32], y: &[f32]) {
        for (xv, yv) in x.iter_mut().zip(y) {
            *xv += yv;
        }
    }
}

simd_fn! {
    /// dst = GELU-tanh(src).
    pub fn gelu_into(src: &[f32], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = gelu_tanh(*s);
        }
    }
}

simd_fn! {
    /// acc[ch] += Σ over the rows of `x` (row length acc.len()) of x[row][ch] − center[ch],
    /// or of its square with `square`: GroupNorm's statistics, one block of pixels at a time.
    pub fn channel_sums(x: &[f32], center: &[f32], square: bool, acc: &mut [f32]) {
        let c = acc.len();
        for row in x.chunks_exact(c) {
            if square {
                for ((a, &v), &m) in acc.iter_mut().zip(row).zip(center) {
                    let d = v - m;
                    *a += d * d;
                }
            } else {
                for ((a, &v), &m) in acc.iter_mut().zip(row).zip(center) {
                    *a += v - m;
                }
            }
        }
    }
}

simd_fn! {
    /// out = (x − center)·scale + shift per channel (rows of scale.len()), then SiLU if `act`.
    pub fn norm_apply(x: &[f32], center: &[f32], scale: &[f32], shift: &[f32], act: bool, out: &mut [f32]) {
        let c = scale.len();
        for (orow, row) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for ((((o, &v), &m), &a), &b) in orow.iter_mut().zip(row).zip(center).zip(scale).zip(shift) {
                let y = (v - m) * a + b;
                *o = if act { silu(y) } else { y };
            }
        }
    }
}
