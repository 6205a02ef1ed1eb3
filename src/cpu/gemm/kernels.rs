//! The register-tile microkernels: C[0..mr, 0..nr] (+)= Apanel · Bpanel over kc, for one
//! MR×NR tile of packed panels, one per instruction-set path. Every kernel takes the same
//! arguments: `accumulate` adds the tile to what C holds (a later k block); a non-null `add`
//! (row stride `ld_add`) is a matrix added as the tile is stored, after the C term, the order
//! of the separate epilogue ((A·B + C) + add), so fusing it changes no bits; `pf` lists the
//! lines to prefetch during the call ([`PfCursor`]).

use super::{prefetch, Prefetch, LINE, MR, NR};

/// Walks the prefetches of a micro-kernel call, one line every `stride` k steps, so that the
/// lines are requested a few at a time while the FMAs run rather than in one burst that
/// fills the core's miss buffers and stalls it. Lives in registers inside the k loop.
pub(super) struct PfCursor {
    pf: Prefetch,
    next: usize,
    at: *const f32,
    left: usize,
    stride: usize,
    countdown: usize,
}

impl PfCursor {
    /// A cursor spreading `pf` over `steps` k steps.
    #[inline(always)]
    pub(super) fn new(pf: Prefetch, steps: usize) -> Self {
        let stride = steps.checked_div(pf.lines).map_or(usize::MAX, |s| s.max(1));
        PfCursor { pf, next: 0, at: std::ptr::null(), left: 0, stride, countdown: stride }
    }

    /// One k step done: every `stride` steps, prefetch the next line.
    #[inline(always)]
    fn tick(&mut self) {
        self.countdown -= 1;
        if self.countdown == 0 {
            self.countdown = self.stride;
            if self.left == 0 && self.next < self.pf.len {
                // SAFETY: `pf.runs` holds `pf.len` runs (Prefetch's contract).
                let r = unsafe { *self.pf.runs.add(self.next) };
                (self.next, self.at, self.left) = (self.next + 1, r.start, r.lines);
            }
            if self.left > 0 {
                prefetch(self.at);
                (self.at, self.left) = (self.at.wrapping_add(LINE), self.left - 1);
            }
        }
    }

    /// Issues whatever is left (more lines than k steps).
    #[inline(always)]
    pub(super) fn finish(&mut self) {
        loop {
            while self.left > 0 {
                prefetch(self.at);
                (self.at, self.left) = (self.at.wrapping_add(LINE), self.left - 1);
            }
            if self.next >= self.pf.len {
                return;
            }
            // SAFETY: as in `tick`.
            let r = unsafe { *self.pf.runs.add(self.next) };
            (self.next, self.at, self.left) = (self.next + 1, r.start, r.lines);
        }
    }
}

/// Runs `step(p)` for p in 0..kc, ticking the prefetch cursor after each step.
#[inline(always)]
fn k_loop(kc: usize, cur: &mut PfCursor, mut step: impl FnMut(usize)) {
    for p in 0..kc {
        step(p);
        cur.tick();
    }
}

/// Portable microkernel: C[0..mr, 0..nr] (+)= Apanel · Bpanel over kc (+ add).
///
/// # Safety
/// `a` holds kc·MR floats, `b` kc·NR, and C rows 0..mr × cols 0..nr are in bounds, and so
/// are `add`'s (unless null).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn kernel_portable(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
    add: *const f32,
    ld_add: usize,
    pf: Prefetch,
) {
    let _ = pf; // prefetching is for the SIMD paths
    let mut acc = [[0.0f32; NR]; MR];
    for p in 0..kc {
        let bp = std::slice::from_raw_parts(b.add(p * NR), NR);
        let ap = std::slice::from_raw_parts(a.add(p * MR), MR);
        for i in 0..MR {
            for j in 0..NR {
                acc[i][j] += ap[i] * bp[j];
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(mr) {
        let crow = std::slice::from_raw_parts_mut(c.add(i * ldc), nr);
        for (j, (cv, &v)) in crow.iter_mut().zip(row).enumerate() {
            let v = if accumulate { *cv + v } else { v };
            *cv = if add.is_null() { v } else { v + *add.add(i * ld_add + j) };
        }
    }
}

/// AVX-512 microkernel: 12 rows × 32 columns in 24 zmm accumulators; per k step two B
/// loads, twelve broadcasts and 24 FMAs. Edge columns use masked loads/stores. A tile of at
/// most 4 valid rows (the modulation GEMMs have m = 2 per request row pair) runs a 4-row
/// build of the same loop instead of computing 12 rows and storing 2: every element is the
/// same chain of FMAs either way, so the bits do not change.
///
/// # Safety
/// As [`kernel_portable`], and the CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn kernel_avx512(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
    add: *const f32,
    ld_add: usize,
    pf: Prefetch,
) {
    if mr <= 4 {
        kernel_avx512_rows::<4>(kc, a, b, c, ldc, mr, nr, accumulate, add, ld_add, pf)
    } else {
        kernel_avx512_rows::<MR>(kc, a, b, c, ldc, mr, nr, accumulate, add, ld_add, pf)
    }
}

/// [`kernel_avx512`] computing the first `R` rows of the tile (`mr` ≤ `R` ≤ `MR`).
///
/// # Safety
/// As [`kernel_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn kernel_avx512_rows<const R: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
    add: *const f32,
    ld_add: usize,
    pf: Prefetch,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let mut cur = PfCursor::new(pf, kc);
    k_loop(kc, &mut cur, |p| {
        let b0 = _mm512_loadu_ps(b.add(p * NR));
        let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
        let ap = a.add(p * MR);
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*ap.add(i));
            acc_i[0] = _mm512_fmadd_ps(ai, b0, acc_i[0]);
            acc_i[1] = _mm512_fmadd_ps(ai, b1, acc_i[1]);
        }
    });
    cur.finish();
    let mask = |lo: usize| -> __mmask16 {
        let w = nr.saturating_sub(lo).min(16);
        ((1u32 << w) - 1) as __mmask16
    };
    let (m0, m1) = (mask(0), mask(16));
    for (i, acc_i) in acc.iter().enumerate().take(mr) {
        let cp = c.add(i * ldc);
        let (mut v0, mut v1) = (acc_i[0], acc_i[1]);
        if accumulate {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cp));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cp.add(16)));
        }
        if !add.is_null() {
            let ap = add.add(i * ld_add);
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, ap));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, ap.add(16)));
        }
        _mm512_mask_storeu_ps(cp, m0, v0);
        _mm512_mask_storeu_ps(cp.add(16), m1, v1);
    }
}

/// AVX2 microkernel: the 12×32 tile as four 6×16 sub-tiles, each in 12 ymm accumulators;
/// per k step two B loads, six broadcasts and 12 FMAs (the BLIS Haswell shape). The column
/// halves are the outer loop so that each half of the B panel is read twice from L1.
///
/// # Safety
/// As [`kernel_portable`], and the CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn kernel_avx2(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
    add: *const f32,
    ld_add: usize,
    pf: Prefetch,
) {
    use std::arch::x86_64::*;
    const SR: usize = MR / 2;
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    // The prefetches are spread over the k steps of all sub-tiles.
    let mut cur = PfCursor::new(pf, kc * nr.div_ceil(16) * mr.div_ceil(SR));
    for j0 in (0..nr).step_by(16) {
        for i0 in (0..mr).step_by(SR) {
            let mut acc = [[_mm256_setzero_ps(); 2]; SR];
            k_loop(kc, &mut cur, |p| {
                let bp = b.add(p * NR + j0);
                let (b0, b1) = (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)));
                let ap = a.add(p * MR + i0);
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let ai = _mm256_broadcast_ss(&*ap.add(i));
                    acc_i[0] = _mm256_fmadd_ps(ai, b0, acc_i[0]);
                    acc_i[1] = _mm256_fmadd_ps(ai, b1, acc_i[1]);
                }
            });
            for (i, acc_i) in acc.iter().enumerate().take(mr - i0) {
                for (h, &v) in acc_i.iter().enumerate() {
                    let lo = j0 + 8 * h;
                    let w = nr.saturating_sub(lo).min(8);
                    let cp = c.add((i0 + i) * ldc + lo);
                    let ap = add.wrapping_add((i0 + i) * ld_add + lo);
                    if w == 8 {
                        let v = if accumulate { _mm256_add_ps(v, _mm256_loadu_ps(cp)) } else { v };
                        let v = if add.is_null() { v } else { _mm256_add_ps(v, _mm256_loadu_ps(ap)) };
                        _mm256_storeu_ps(cp, v);
                    } else if w > 0 {
                        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(w as i32), lane);
                        let v = if accumulate { _mm256_add_ps(v, _mm256_maskload_ps(cp, mask)) } else { v };
                        let v = if add.is_null() { v } else { _mm256_add_ps(v, _mm256_maskload_ps(ap, mask)) };
                        _mm256_maskstore_ps(cp, mask, v);
                    }
                }
            }
        }
    }
    cur.finish();
}

/// NEON microkernel: the 12×32 tile as four 6×16 sub-tiles, each in 24 q-register
/// accumulators (4 lanes each); per k step four B loads, six broadcast loads and 24 fused
/// multiply-adds (`vfmaq_f32`, one rounding, as x86's FMA).
///
/// # Safety
/// As [`kernel_portable`] (NEON is part of every aarch64 target).
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn kernel_neon(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
    add: *const f32,
    ld_add: usize,
    pf: Prefetch,
) {
    use std::arch::aarch64::*;
    let _ = pf; // no prefetch instruction is used on aarch64
    const SR: usize = MR / 2;
    for j0 in (0..nr).step_by(16) {
        for i0 in (0..mr).step_by(SR) {
            let mut acc = [[vdupq_n_f32(0.0); 4]; SR];
            for p in 0..kc {
                let bp = b.add(p * NR + j0);
                let bv = [vld1q_f32(bp), vld1q_f32(bp.add(4)), vld1q_f32(bp.add(8)), vld1q_f32(bp.add(12))];
                let ap = a.add(p * MR + i0);
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let ai = vld1q_dup_f32(ap.add(i));
                    for (q, acc_q) in acc_i.iter_mut().enumerate() {
                        *acc_q = vfmaq_f32(*acc_q, bv[q], ai);
                    }
                }
            }
            for (i, acc_i) in acc.iter().enumerate().take(mr - i0) {
                for (q, &v) in acc_i.iter().enumerate() {
                    let lo = j0 + 4 * q;
                    let w = nr.saturating_sub(lo).min(4);
                    let cp = c.add((i0 + i) * ldc + lo);
                    let ap = add.wrapping_add((i0 + i) * ld_add + lo);
                    if w == 4 {
                        let v = if accumulate { vaddq_f32(v, vld1q_f32(cp)) } else { v };
                        let v = if add.is_null() { v } else { vaddq_f32(v, vld1q_f32(ap)) };
                        vst1q_f32(cp, v);
                    } else if w > 0 {
                        let mut lanes = [0.0f32; 4];
                        vst1q_f32(lanes.as_mut_ptr(), v);
                        for (l, &x) in lanes.iter().enumerate().take(w) {
                            let x = if accumulate { *cp.add(l) + x } else { x };
                            *cp.add(l) = if add.is_null() { x } else { x + *ap.add(l) };
                        }
                    }
                }
            }
        }
    }
}
