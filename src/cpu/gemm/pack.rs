//! Packing GEMM operands into the panel layouts the microkernels read: A into MR-tall
//! panels (`panel[p·MR + ii]`), B into NR-wide panels (`panel[p·NR + jj]`). Packing only
//! moves values (or forms `a − a_minus`, one IEEE subtraction either way), so every route
//! below gives the same bits; they differ in speed only:
//! - AVX2, AVX-512 and NEON: 4×4 block transposes in registers (SSE on x86-64, NEON on
//!   aarch64), so rows are read with contiguous vector loads. (AVX-512 gathers, one per k
//!   column, were the AVX-512 route until 2026-12; on the Zen 4 dev VM the transposes made a
//!   DiT-XL/2 forward 9 % faster, a calibrated step 20 % and the VAE decode 8 %.)
//! - scalar: plain indexed loops, the portable reference.
//!
//! B stored with contiguous columns (`rs == 1`, attention's V read as Bᵀ) is a row copy on
//! every path.

use super::{BMat, Conv3, Gemm, MR, NR};
use crate::isa::{Isa, IsaKind};

/// A 4×4 block transpose: `dst[q·ds + i] = src[i][q] − minus[i][q]` (without `minus`,
/// `src[i][q]`) for i, q < 4.
trait Block4 {
    /// # Safety
    /// `src[i]` and `minus[i]` readable for 4 floats, `dst` writable at `q·ds + i`.
    unsafe fn t4(src: [*const f32; 4], minus: Option<[*const f32; 4]>, dst: *mut f32, ds: usize);
}

/// SSE (part of every x86-64 CPU), used by the AVX2 and AVX-512 paths.
#[cfg(target_arch = "x86_64")]
struct Sse;

#[cfg(target_arch = "x86_64")]
impl Block4 for Sse {
    #[inline(always)]
    unsafe fn t4(src: [*const f32; 4], minus: Option<[*const f32; 4]>, dst: *mut f32, ds: usize) {
        use std::arch::x86_64::*;
        let mut v = src.map(|s| _mm_loadu_ps(s));
        if let Some(m) = minus {
            for (v, m) in v.iter_mut().zip(m) {
                *v = _mm_sub_ps(*v, _mm_loadu_ps(m));
            }
        }
        let lo01 = _mm_unpacklo_ps(v[0], v[1]); // a0 b0 a1 b1
        let lo23 = _mm_unpacklo_ps(v[2], v[3]); // c0 d0 c1 d1
        let hi01 = _mm_unpackhi_ps(v[0], v[1]); // a2 b2 a3 b3
        let hi23 = _mm_unpackhi_ps(v[2], v[3]); // c2 d2 c3 d3
        _mm_storeu_ps(dst, _mm_movelh_ps(lo01, lo23));
        _mm_storeu_ps(dst.add(ds), _mm_movehl_ps(lo23, lo01));
        _mm_storeu_ps(dst.add(2 * ds), _mm_movelh_ps(hi01, hi23));
        _mm_storeu_ps(dst.add(3 * ds), _mm_movehl_ps(hi23, hi01));
    }
}

/// NEON (part of every aarch64 CPU).
#[cfg(target_arch = "aarch64")]
struct Neon;

#[cfg(target_arch = "aarch64")]
impl Block4 for Neon {
    #[inline(always)]
    unsafe fn t4(src: [*const f32; 4], minus: Option<[*const f32; 4]>, dst: *mut f32, ds: usize) {
        use std::arch::aarch64::*;
        let mut v = src.map(|s| vld1q_f32(s));
        if let Some(m) = minus {
            for (v, m) in v.iter_mut().zip(m) {
                *v = vsubq_f32(*v, vld1q_f32(m));
            }
        }
        let e01 = vtrn1q_f32(v[0], v[1]); // a0 b0 a2 b2
        let o01 = vtrn2q_f32(v[0], v[1]); // a1 b1 a3 b3
        let e23 = vtrn1q_f32(v[2], v[3]); // c0 d0 c2 d2
        let o23 = vtrn2q_f32(v[2], v[3]); // c1 d1 c3 d3
        let lo = |x: float32x4_t, y: float32x4_t| {
            vreinterpretq_f32_f64(vtrn1q_f64(vreinterpretq_f64_f32(x), vreinterpretq_f64_f32(y)))
        };
        let hi = |x: float32x4_t, y: float32x4_t| {
            vreinterpretq_f32_f64(vtrn2q_f64(vreinterpretq_f64_f32(x), vreinterpretq_f64_f32(y)))
        };
        vst1q_f32(dst, lo(e01, e23));
        vst1q_f32(dst.add(ds), lo(o01, o23));
        vst1q_f32(dst.add(2 * ds), hi(e01, e23));
        vst1q_f32(dst.add(3 * ds), hi(o01, o23));
    }
}

/// Packs B[j0.., p0..] into NR-wide panels, p-major inside each panel, zero-padding
/// columns past the edge: `out[jp·kc·NR + p·NR + jj] = B(j0 + jp·NR + jj, p0 + p)`.
#[inline(never)]
pub(super) fn pack_b(isa: Isa, b: BMat, j0: usize, nc: usize, p0: usize, kc: usize, out: &mut [f32]) {
    for jp in 0..nc.div_ceil(NR) {
        let panel = &mut out[jp * NR * kc..(jp + 1) * NR * kc];
        let width = NR.min(nc - jp * NR);
        let base = j0 + jp * NR;
        if b.rs == 1 {
            // Columns of B are contiguous: each p is one run of `width` floats.
            for p in 0..kc {
                let dst = &mut panel[p * NR..(p + 1) * NR];
                dst[..width].copy_from_slice(&b.data[(p0 + p) * b.cs + base..][..width]);
                dst[width..].fill(0.0);
            }
            continue;
        }
        if b.cs == 1 {
            let src = &b.data[base * b.rs + p0..];
            match isa.kind() {
                #[cfg(target_arch = "x86_64")]
                IsaKind::Avx2 | IsaKind::Avx512 => {
                    // SAFETY: rows base..base+width, columns p0..p0+kc are in bounds
                    // (check_bounds); SSE is part of x86-64.
                    unsafe { pack_b_panel_t4::<Sse>(src, b.rs, kc, width, panel) };
                    continue;
                }
                #[cfg(target_arch = "aarch64")]
                IsaKind::Neon => {
                    // SAFETY: as above; NEON is part of aarch64.
                    unsafe { pack_b_panel_t4::<Neon>(src, b.rs, kc, width, panel) };
                    continue;
                }
                _ => {}
            }
            // Rows of B are contiguous in p. Walking all NR rows in lockstep keeps NR
            // memory streams in flight (the weights are cold: this is a DRAM read).
            let rows: [&[f32]; NR] = std::array::from_fn(|jj| &src[jj.min(width - 1) * b.rs..][..kc]);
            for p in 0..kc {
                let dst = &mut panel[p * NR..(p + 1) * NR];
                for jj in 0..NR {
                    dst[jj] = if jj < width { rows[jj][p] } else { 0.0 };
                }
            }
        } else {
            for p in 0..kc {
                let dst = &mut panel[p * NR..(p + 1) * NR];
                for (jj, d) in dst.iter_mut().enumerate() {
                    *d = if jj < width { b.data[(base + jj) * b.rs + (p0 + p) * b.cs] } else { 0.0 };
                }
            }
        }
    }
}

/// One B panel (rows contiguous in p) by 4×4 transposes; rows past `width` are zero.
///
/// # Safety
/// `src[jj·rs + p]` must be in bounds for jj < width, p < kc; `panel` holds kc·NR floats.
#[inline(always)]
unsafe fn pack_b_panel_t4<T: Block4>(src: &[f32], rs: usize, kc: usize, width: usize, panel: &mut [f32]) {
    let (s, dst) = (src.as_ptr(), panel.as_mut_ptr());
    let k4 = kc & !3;
    for j in (0..NR).step_by(4) {
        if j + 4 <= width {
            let rows: [*const f32; 4] = std::array::from_fn(|i| s.add((j + i) * rs));
            for p in (0..k4).step_by(4) {
                T::t4(rows.map(|r| r.add(p)), None, dst.add(p * NR + j), NR);
            }
            for p in k4..kc {
                for (i, r) in rows.iter().enumerate() {
                    *dst.add(p * NR + j + i) = *r.add(p);
                }
            }
        } else {
            for jj in j..j + 4 {
                for p in 0..kc {
                    *dst.add(p * NR + jj) = if jj < width { *s.add(jj * rs + p) } else { 0.0 };
                }
            }
        }
    }
}

/// Packs A[i0.., p0..] into MR-tall panels, p-major: `out[ip·kc·MR + p·MR + ii]`,
/// repeating a valid row past the edge (those results are never stored).
#[inline(never)]
pub(super) fn pack_a(isa: Isa, g: &Gemm, i0: usize, mc: usize, p0: usize, kc: usize, out: &mut [f32]) {
    if let Some(cv) = g.conv {
        return pack_a_conv(isa, g.a, cv, g.lda, i0, mc, p0, kc, out);
    }
    let (a, minus, lda) = (g.a, g.a_minus, g.lda);
    for ip in 0..mc.div_ceil(MR) {
        let panel = &mut out[ip * MR * kc..(ip + 1) * MR * kc];
        let height = MR.min(mc - ip * MR);
        let at = (i0 + ip * MR) * lda + p0;
        // SAFETY (both SIMD routes): rows i0 + ip·MR .. + height and columns p0 .. p0 + kc
        // are in bounds (check_bounds); SSE and NEON are part of their architectures.
        match isa.kind() {
            #[cfg(target_arch = "x86_64")]
            IsaKind::Avx2 | IsaKind::Avx512 => {
                unsafe { pack_a_panel_t4::<Sse>(&a[at..], minus.map(|m| &m[at..]), lda, kc, height, panel) };
                continue;
            }
            #[cfg(target_arch = "aarch64")]
            IsaKind::Neon => {
                unsafe { pack_a_panel_t4::<Neon>(&a[at..], minus.map(|m| &m[at..]), lda, kc, height, panel) };
                continue;
            }
            _ => {}
        }
        for ii in 0..MR {
            let r = i0 + ip * MR + ii.min(height - 1);
            let row = &a[r * lda + p0..][..kc];
            match minus {
                None => row.iter().enumerate().for_each(|(p, &v)| panel[p * MR + ii] = v),
                Some(m) => {
                    let mrow = &m[r * lda + p0..][..kc];
                    row.iter().zip(mrow).enumerate().for_each(|(p, (&v, &w))| panel[p * MR + ii] = v - w);
                }
            }
        }
    }
}

/// One A panel by 4×4 transposes (rows past `height` repeat the last valid row).
///
/// # Safety
/// `src[ii·lda + p]` (and `minus`'s) must be in bounds for ii < height, p < kc.
#[inline(always)]
unsafe fn pack_a_panel_t4<T: Block4>(
    src: &[f32],
    minus: Option<&[f32]>,
    lda: usize,
    kc: usize,
    height: usize,
    panel: &mut [f32],
) {
    let dst = panel.as_mut_ptr();
    let k4 = kc & !3;
    for g in (0..MR).step_by(4) {
        let offs: [usize; 4] = std::array::from_fn(|i| (g + i).min(height - 1) * lda);
        let rows = offs.map(|o| src.as_ptr().add(o));
        let mrows = minus.map(|m| offs.map(|o| m.as_ptr().add(o)));
        for p in (0..k4).step_by(4) {
            T::t4(rows.map(|r| r.add(p)), mrows.map(|m| m.map(|r| r.add(p))), dst.add(p * MR + g), MR);
        }
        for p in k4..kc {
            for i in 0..4 {
                let v = *rows[i].add(p);
                *dst.add(p * MR + g + i) = match mrows {
                    Some(m) => v - *m[i].add(p),
                    None => v,
                };
            }
        }
    }
}

/// [`pack_a`] for a [`Conv3`] operand: each panel row is an output pixel, and column p reads
/// channel p / 9 of tap p % 9 of its neighbourhood (zero in the padding).
#[allow(clippy::too_many_arguments)]
fn pack_a_conv(isa: Isa, a: &[f32], cv: Conv3, c: usize, i0: usize, mc: usize, p0: usize, kc: usize, out: &mut [f32]) {
    for ip in 0..mc.div_ceil(MR) {
        let panel = &mut out[ip * MR * kc..(ip + 1) * MR * kc];
        let height = MR.min(mc - ip * MR);
        let taps: [[Option<usize>; 9]; MR] = std::array::from_fn(|ii| cv.taps(i0 + ip * MR + ii.min(height - 1), c));
        // SAFETY (both SIMD routes): every tap offset plus a channel < c is inside the input
        // image (check_bounds checked its length).
        match isa.kind() {
            #[cfg(target_arch = "x86_64")]
            IsaKind::Avx2 | IsaKind::Avx512 => {
                unsafe { pack_a_conv_panel_t4::<Sse>(a, &taps, p0, kc, panel) };
                continue;
            }
            #[cfg(target_arch = "aarch64")]
            IsaKind::Neon => {
                unsafe { pack_a_conv_panel_t4::<Neon>(a, &taps, p0, kc, panel) };
                continue;
            }
            _ => {}
        }
        pack_a_conv_columns(a, &taps, p0, p0..p0 + kc, panel);
    }
}

/// Columns `cols` (absolute p) of one conv A panel, one element at a time.
fn pack_a_conv_columns(
    a: &[f32],
    taps: &[[Option<usize>; 9]; MR],
    p0: usize,
    cols: std::ops::Range<usize>,
    panel: &mut [f32],
) {
    for p in cols {
        let (ch, t) = (p / 9, p % 9);
        for (ii, tp) in taps.iter().enumerate() {
            panel[(p - p0) * MR + ii] = tp[t].map_or(0.0, |o| a[o + ch]);
        }
    }
}

/// Zeros standing in for a tap in the padding (4 channels of a missing pixel).
static ZEROS: [f32; 4] = [0.0; 4];

/// One conv A panel by 4×4 transposes of (4 pixels × 4 channels) blocks, for each tap: the
/// channels whose nine columns all lie in [p0, p0 + kc), four at a time; the columns of the
/// channels cut by the block's edges and the last few channels one at a time.
///
/// # Safety
/// Every `Some` tap offset plus a channel < (p0 + kc) / 9 + 1 must be in bounds of `a`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // t indexes the inner arrays of `taps`
unsafe fn pack_a_conv_panel_t4<T: Block4>(
    a: &[f32],
    taps: &[[Option<usize>; 9]; MR],
    p0: usize,
    kc: usize,
    panel: &mut [f32],
) {
    let end = p0 + kc;
    let (ch_lo, ch_hi) = (p0.div_ceil(9), end / 9);
    if ch_hi < ch_lo + 4 {
        return pack_a_conv_columns(a, taps, p0, p0..end, panel);
    }
    let ch_vec = ch_lo + (ch_hi - ch_lo) / 4 * 4;
    pack_a_conv_columns(a, taps, p0, p0..ch_lo * 9, panel);
    pack_a_conv_columns(a, taps, p0, ch_vec * 9..end, panel);
    let dst = panel.as_mut_ptr();
    for t in 0..9 {
        for g in (0..MR).step_by(4) {
            let base: [Option<*const f32>; 4] = std::array::from_fn(|i| taps[g + i][t].map(|o| a.as_ptr().add(o)));
            for ch in (ch_lo..ch_vec).step_by(4) {
                let src = base.map(|b| b.map_or(ZEROS.as_ptr(), |b| b.add(ch)));
                T::t4(src, None, dst.add((ch * 9 + t - p0) * MR + g), 9 * MR);
            }
        }
    }
}

/// Packs an A operand whose columns are contiguous, A(i, p) = `src[p·cs + i]` (attention's
/// vᵀ read straight from v), for all `m` rows and `k` columns into the layout a shared
/// packed A has ([`super::packed_a_len`]: per KC block, MR-tall panels, rows past `m`
/// repeating the last). Each panel row of 12 is a contiguous copy.
pub(super) fn pack_a_cols(src: &[f32], cs: usize, m: usize, k: usize, out: &mut [f32]) {
    let m_pad = m.next_multiple_of(MR);
    let mut p0 = 0;
    while p0 < k {
        let kc = super::KC.min(k - p0);
        for ip in 0..m_pad / MR {
            let (i0, height) = (ip * MR, MR.min(m - ip * MR));
            let panel = &mut out[p0 * m_pad + ip * MR * kc..][..MR * kc];
            for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
                let row = &src[(p0 + p) * cs + i0..][..height];
                dst[..height].copy_from_slice(row);
                dst[height..].fill(row[height - 1]);
            }
        }
        p0 += kc;
    }
}

/// `dst[c·ds + r] = src[r·ss + c]` for r < rows, c < cols: a transpose, by 4×4 register
/// blocks on the SIMD paths (it only moves values, so every path gives the same bits).
///
/// # Safety
/// `dst` must be writable at every `c·ds + r`, and nothing else may access those elements.
pub(super) unsafe fn transpose(isa: Isa, src: &[f32], ss: usize, rows: usize, cols: usize, dst: *mut f32, ds: usize) {
    assert!(rows == 0 || cols == 0 || src.len() >= (rows - 1) * ss + cols, "transpose: source too small");
    let (r4, c4) = (rows & !3, cols & !3);
    let s = src.as_ptr();
    let blocked = match isa.kind() {
        #[cfg(target_arch = "x86_64")]
        IsaKind::Avx2 | IsaKind::Avx512 => {
            for r in (0..r4).step_by(4) {
                for c in (0..c4).step_by(4) {
                    Sse::t4(std::array::from_fn(|i| s.add((r + i) * ss + c)), None, dst.add(c * ds + r), ds);
                }
            }
            true
        }
        #[cfg(target_arch = "aarch64")]
        IsaKind::Neon => {
            for r in (0..r4).step_by(4) {
                for c in (0..c4).step_by(4) {
                    Neon::t4(std::array::from_fn(|i| s.add((r + i) * ss + c)), None, dst.add(c * ds + r), ds);
                }
            }
            true
        }
        _ => false,
    };
    for r in 0..rows {
        let from = if blocked && r < r4 { c4 } else { 0 };
        for c in from..cols {
            *dst.add(c * ds + r) = src[r * ss + c];
        }
    }
}
