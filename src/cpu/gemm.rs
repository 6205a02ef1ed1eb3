//! f32 matrix multiply for the CPU backend: C = A·Bᵀ (+ bias, activation), blocked for the
//! cache (BLIS loop order) with packed panels and an AVX-512 register-tile microkernel,
//! falling back to a portable kernel. All scratch memory is passed in, so a call never
//! allocates.
//!
//! A is m×k row-major with row stride `lda`. B is n×k addressed by two strides, so both a
//! PyTorch weight (out, in) and a transposed operand (attention's P·V reads V as Bᵀ) work.

use super::math;
use super::pool::{split, SendPtr, ThreadPool};

/// Microkernel tile: MR rows × NR columns of C held in registers (12 × 2 zmm = 24 of 32).
pub const MR: usize = 12;
pub const NR: usize = 32;
/// Cache blocking: a KC×NC packed B block lives in L2, a KC×NR panel of it in L1, and an
/// MC×KC packed A block in L2.
const KC: usize = 256;
const MC: usize = 144;
const NC: usize = 384;

/// f32 elements of scratch each thread needs.
pub const SCRATCH_PER_THREAD: usize = KC * NC + MC * KC;

/// What happens to each output element after the dot product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    GeluTanh,
}

/// The B operand: element (row j, col p) at `data[j·rs + p·cs]`.
#[derive(Clone, Copy)]
pub struct BMat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> BMat<'a> {
    /// A PyTorch linear weight (out, in), row-major.
    pub fn weight(data: &'a [f32], k: usize) -> Self {
        BMat { data, rs: k, cs: 1 }
    }
}

/// The A operand of a 3×3 convolution (stride 1, zero padding 1), read straight from the
/// input image instead of a stored im2col matrix. The GEMM's `a` is the input image with
/// one row of `lda` channels per pixel (NHWC); row i of A is output pixel i of an `h`×`w`
/// image and column p = ch·9 + ky·3 + kx, PyTorch's weight order (out, in, ky, kx), so a
/// mapped conv weight is the B operand as it is. With `up2` the input is (h/2)×(w/2) and is
/// read as if first upsampled 2× by nearest neighbour (`in[⌊y/2⌋, ⌊x/2⌋]`).
#[derive(Clone, Copy, Debug)]
pub struct Conv3 {
    pub h: usize,
    pub w: usize,
    pub up2: bool,
}

impl Conv3 {
    /// Pixels of the image the operand reads.
    pub fn src_pixels(&self) -> usize {
        if self.up2 {
            (self.h / 2) * (self.w / 2)
        } else {
            self.h * self.w
        }
    }

    /// Element offsets of the 9 taps of output pixel `i` (`None` where the tap falls in the
    /// zero padding), `c` channels per pixel.
    #[inline]
    fn taps(&self, i: usize, c: usize) -> [Option<usize>; 9] {
        let (y, x) = ((i / self.w) as isize, (i % self.w) as isize);
        std::array::from_fn(|t| {
            let (yy, xx) = (y + (t / 3) as isize - 1, x + (t % 3) as isize - 1);
            if yy < 0 || xx < 0 || yy >= self.h as isize || xx >= self.w as isize {
                return None;
            }
            let (yy, xx) = (yy as usize, xx as usize);
            let px = if self.up2 { (yy / 2) * (self.w / 2) + xx / 2 } else { yy * self.w + xx };
            Some(px * c)
        })
    }
}

/// One GEMM problem. C is written through a raw pointer so threads can own disjoint tiles.
#[derive(Clone, Copy)]
pub struct Gemm<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: &'a [f32],
    /// When set, the A operand is `a − a_minus` (same layout), formed while packing:
    /// calibrated steps multiply the increment x − x_s without storing it.
    pub a_minus: Option<&'a [f32]>,
    pub lda: usize,
    /// When set, A is the implicit im2col matrix of a 3×3 convolution over `a`
    /// (`k` = 9·`lda`); see [`Conv3`].
    pub conv: Option<Conv3>,
    pub b: BMat<'a>,
    pub bias: Option<&'a [f32]>,
    /// A matrix added to the product before the activation: (data, row stride).
    pub add: Option<(&'a [f32], usize)>,
    pub act: Act,
    pub c: SendPtr,
    pub ldc: usize,
}

type Kernel = unsafe fn(usize, *const f32, *const f32, *mut f32, usize, usize, usize, bool);

/// The best microkernel this CPU runs, chosen once.
#[derive(Clone, Copy)]
pub struct Gemmer {
    kernel: Kernel,
    pub name: &'static str,
}

impl Gemmer {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Gemmer { kernel: kernel_avx512, name: "avx512" };
            }
        }
        Self::portable()
    }

    /// The plain-Rust kernel (also used by tests to cross-check the SIMD one).
    pub fn portable() -> Self {
        Gemmer { kernel: kernel_portable, name: "portable" }
    }

    /// Runs `g` on every thread of `pool`, splitting the larger output dimension.
    /// `scratch` holds `SCRATCH_PER_THREAD` floats per pool thread; `packed_a` holds at
    /// least [`packed_a_len`]`(m, k)` floats, shared by the threads when they split columns
    /// (A is then packed once, cooperatively, instead of once per thread and column block).
    pub fn run(&self, pool: &ThreadPool, scratch: &mut [f32], packed_a: &mut [f32], g: &Gemm) {
        let threads = pool.threads();
        assert!(scratch.len() >= threads * SCRATCH_PER_THREAD, "GEMM scratch too small");
        check_bounds(g);
        let scratch = SendPtr(scratch.as_mut_ptr());
        if g.m * g.n * g.k < 1 << 16 || threads == 1 {
            // Too small to be worth waking the workers (or nobody to wake).
            // SAFETY: the scratch length was checked for at least one thread.
            let mine = unsafe { std::slice::from_raw_parts_mut(scratch.get(), SCRATCH_PER_THREAD) };
            self.block(g, 0..g.m, 0..g.n, mine, None);
            return;
        }
        // A convolution's rows (pixels) are many and its A panels cost more to form, so each
        // thread takes its own pixels and packs them once.
        let by_cols = g.conv.is_none() && (g.n >= threads * 2 * NR || g.m < threads * MR);
        let m_pad = g.m.next_multiple_of(MR);
        let shared = by_cols && g.m > MR && packed_a.len() >= packed_a_len(g.m, g.k);
        if shared {
            let dst = SendPtr(packed_a.as_mut_ptr());
            pool.run(&|tid| {
                let rows = split(g.m, threads, tid, MR);
                let mut p0 = 0;
                while p0 < g.k && !rows.is_empty() {
                    let kc = KC.min(g.k - p0);
                    // SAFETY: each thread writes the panels of its own MR-aligned rows.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(
                            dst.get().add(p0 * m_pad + rows.start * kc),
                            rows.len().next_multiple_of(MR) * kc,
                        )
                    };
                    pack_a(g, rows.start, rows.len(), p0, kc, out);
                    p0 += kc;
                }
            });
        }
        let pre = shared.then(|| &packed_a[..packed_a_len(g.m, g.k)]);
        let work = |tid: usize| {
            let (rows, cols) =
                if by_cols { (0..g.m, split(g.n, threads, tid, NR)) } else { (split(g.m, threads, tid, MR), 0..g.n) };
            // SAFETY: each thread uses its own scratch slice and its own C tile.
            let mine = unsafe {
                std::slice::from_raw_parts_mut(scratch.get().add(tid * SCRATCH_PER_THREAD), SCRATCH_PER_THREAD)
            };
            self.block(g, rows, cols, mine, pre);
        };
        pool.run(&work);
    }

    /// Single-threaded GEMM (used inside already-parallel loops such as attention heads).
    pub fn run_single(&self, scratch: &mut [f32], g: &Gemm) {
        assert!(scratch.len() >= SCRATCH_PER_THREAD, "GEMM scratch too small");
        check_bounds(g);
        self.block(g, 0..g.m, 0..g.n, scratch, None);
    }

    /// C[rows, cols] for one thread: the BLIS jc → pc → ic → jr → ir loop nest. With
    /// `pre`, A was packed for all rows already (layout of [`packed_a_len`]).
    fn block(
        &self,
        g: &Gemm,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        scratch: &mut [f32],
        pre: Option<&[f32]>,
    ) {
        if rows.is_empty() || cols.is_empty() {
            return;
        }
        let (bpack, apack) = scratch.split_at_mut(KC * NC);
        let mut j0 = cols.start;
        while j0 < cols.end {
            let nc = NC.min(cols.end - j0);
            let mut p0 = 0;
            while p0 < g.k {
                let kc = KC.min(g.k - p0);
                pack_b(g.b, j0, nc, p0, kc, bpack);
                let mut i0 = rows.start;
                while i0 < rows.end {
                    let mc = MC.min(rows.end - i0);
                    let apanels: &[f32] = match pre {
                        Some(pre) => &pre[p0 * g.m.next_multiple_of(MR) + i0 * kc..],
                        None => {
                            pack_a(g, i0, mc, p0, kc, apack);
                            apack
                        }
                    };
                    for jp in 0..nc.div_ceil(NR) {
                        let nr = NR.min(nc - jp * NR);
                        for ip in 0..mc.div_ceil(MR) {
                            let mr = MR.min(mc - ip * MR);
                            // SAFETY: bounds were checked in `check_bounds`; the packed
                            // panels are padded to full MR/NR tiles.
                            unsafe {
                                let c = g.c.get().add((i0 + ip * MR) * g.ldc + j0 + jp * NR);
                                (self.kernel)(
                                    kc,
                                    apanels.as_ptr().add(ip * MR * kc),
                                    bpack.as_ptr().add(jp * NR * kc),
                                    c,
                                    g.ldc,
                                    mr,
                                    nr,
                                    p0 > 0,
                                );
                            }
                        }
                    }
                    i0 += mc;
                }
                p0 += kc;
            }
            if g.k == 0 {
                zero_tile(g, rows.clone(), j0..j0 + nc);
            }
            epilogue(g, rows.clone(), j0..j0 + nc);
            j0 += nc;
        }
    }
}

/// Floats of a whole packed A (rows padded to MR): the shared buffer of [`Gemmer::run`].
pub fn packed_a_len(m: usize, k: usize) -> usize {
    m.next_multiple_of(MR) * k
}

/// Panics (a programming error, never input-reachable) if any operand is too short.
fn check_bounds(g: &Gemm) {
    if g.m == 0 || g.n == 0 {
        return;
    }
    if let Some(cv) = g.conv {
        assert!(g.k == 9 * g.lda && g.m <= cv.h * cv.w, "GEMM: conv operand shape");
        assert!(g.a.len() >= cv.src_pixels() * g.lda && g.a_minus.is_none(), "GEMM: conv input too small");
        assert!(!cv.up2 || (cv.h % 2 == 0 && cv.w % 2 == 0), "GEMM: odd upsampled conv size");
    } else if g.k > 0 {
        assert!(g.lda >= g.k && g.a.len() >= (g.m - 1) * g.lda + g.k, "GEMM: A too small");
        if let Some(m) = g.a_minus {
            assert!(m.len() >= (g.m - 1) * g.lda + g.k, "GEMM: subtracted A too small");
        }
        let last = (g.n - 1) * g.b.rs + (g.k - 1) * g.b.cs;
        assert!(g.b.data.len() > last, "GEMM: B too small");
    }
    assert!(g.ldc >= g.n, "GEMM: ldc < n");
    if let Some(bias) = g.bias {
        assert!(bias.len() >= g.n, "GEMM: bias too small");
    }
    if let Some((m, ld)) = g.add {
        assert!(ld >= g.n && m.len() >= (g.m - 1) * ld + g.n, "GEMM: added matrix too small");
    }
}

/// Packs B[j0.., p0..] into NR-wide panels, p-major inside each panel, zero-padding
/// columns past the edge: `out[jp·kc·NR + p·NR + jj] = B(j0 + jp·NR + jj, p0 + p)`.
#[inline(never)]
fn pack_b(b: BMat, j0: usize, nc: usize, p0: usize, kc: usize, out: &mut [f32]) {
    for jp in 0..nc.div_ceil(NR) {
        let panel = &mut out[jp * NR * kc..(jp + 1) * NR * kc];
        let width = NR.min(nc - jp * NR);
        let base = j0 + jp * NR;
        if b.cs == 1 && gather_ok(b.rs) {
            // SAFETY: rows base..base+width, columns p0..p0+kc are in bounds (check_bounds)
            // and the CPU has AVX-512 (gather_ok).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                pack_b_panel_gather(&b.data[base * b.rs + p0..], b.rs, kc, width, panel)
            };
        } else if b.cs == 1 {
            // Rows of B are contiguous in p. Walking all NR rows in lockstep keeps NR
            // memory streams in flight (the weights are cold: this is a DRAM read).
            let rows: [&[f32]; NR] = std::array::from_fn(|jj| {
                let j = base + jj.min(width - 1);
                &b.data[j * b.rs + p0..][..kc]
            });
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
                    *d = if jj < width { b.data[(j0 + jp * NR + jj) * b.rs + (p0 + p) * b.cs] } else { 0.0 };
                }
            }
        }
    }
}

/// Whether the gather path of `pack_b` applies: AVX-512 and row offsets that fit in i32.
#[inline]
fn gather_ok(rs: usize) -> bool {
    cfg!(target_arch = "x86_64") && rs.checked_mul(NR).is_some_and(|v| v < i32::MAX as usize) && math::has_avx512()
}

/// One B panel by AVX-512 gathers: for each p, the NR values B(j, p) of the panel's rows
/// come in with two 16-lane gathers (rows past `width` masked to zero).
///
/// # Safety
/// `src[jj·rs + p]` must be in bounds for jj < width, p < kc, and the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_b_panel_gather(src: &[f32], rs: usize, kc: usize, width: usize, panel: &mut [f32]) {
    use std::arch::x86_64::*;
    let lanes = |lo: i32| {
        _mm512_mullo_epi32(
            _mm512_add_epi32(
                _mm512_set1_epi32(lo),
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            ),
            _mm512_set1_epi32(rs as i32),
        )
    };
    let (idx0, idx1) = (lanes(0), lanes(16));
    let mask = |lo: usize| -> __mmask16 { ((1u32 << width.saturating_sub(lo).min(16)) - 1) as __mmask16 };
    let (m0, m1) = (mask(0), mask(16));
    let zero = _mm512_setzero_ps();
    let ptr = src.as_ptr();
    for p in 0..kc {
        let v0 = _mm512_mask_i32gather_ps::<4>(zero, m0, idx0, ptr.add(p));
        let v1 = _mm512_mask_i32gather_ps::<4>(zero, m1, idx1, ptr.add(p));
        _mm512_storeu_ps(panel.as_mut_ptr().add(p * NR), v0);
        _mm512_storeu_ps(panel.as_mut_ptr().add(p * NR + 16), v1);
    }
}

/// One A panel by AVX-512 gathers: for each p, the MR values A(i, p) of the panel's rows
/// in one 12-lane gather (rows past `height` repeat the last valid row, as `pack_a` does).
///
/// # Safety
/// `src[ii·lda + p]` must be in bounds for ii < height, p < kc; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_a_panel_gather(
    src: &[f32],
    minus: Option<&[f32]>,
    lda: usize,
    kc: usize,
    height: usize,
    panel: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut rows = [0i32; 16];
    for (ii, r) in rows.iter_mut().enumerate().take(MR) {
        *r = (ii.min(height - 1) * lda) as i32;
    }
    let idx = _mm512_loadu_si512(rows.as_ptr().cast());
    let mask: __mmask16 = ((1u32 << MR) - 1) as __mmask16;
    let zero = _mm512_setzero_ps();
    let ptr = src.as_ptr();
    match minus {
        None => {
            for p in 0..kc {
                let v = _mm512_mask_i32gather_ps::<4>(zero, mask, idx, ptr.add(p));
                _mm512_mask_storeu_ps(panel.as_mut_ptr().add(p * MR), mask, v);
            }
        }
        Some(m) => {
            let mptr = m.as_ptr();
            for p in 0..kc {
                let v = _mm512_mask_i32gather_ps::<4>(zero, mask, idx, ptr.add(p));
                let w = _mm512_mask_i32gather_ps::<4>(zero, mask, idx, mptr.add(p));
                _mm512_mask_storeu_ps(panel.as_mut_ptr().add(p * MR), mask, _mm512_sub_ps(v, w));
            }
        }
    }
}

/// Packs A[i0.., p0..] into MR-tall panels, p-major: `out[ip·kc·MR + p·MR + ii]`,
/// repeating a valid row past the edge (those results are never stored).
#[inline(never)]
fn pack_a(g: &Gemm, i0: usize, mc: usize, p0: usize, kc: usize, out: &mut [f32]) {
    if let Some(cv) = g.conv {
        return pack_a_conv(g.a, cv, g.lda, i0, mc, p0, kc, out);
    }
    let (a, minus, lda) = (g.a, g.a_minus, g.lda);
    let gather = cfg!(target_arch = "x86_64")
        && lda.checked_mul(MR).is_some_and(|v| v < i32::MAX as usize)
        && math::has_avx512();
    for ip in 0..mc.div_ceil(MR) {
        let panel = &mut out[ip * MR * kc..(ip + 1) * MR * kc];
        let height = MR.min(mc - ip * MR);
        if gather {
            // SAFETY: rows i0 + ip·MR .. + height and columns p0 .. p0 + kc are in bounds
            // (check_bounds); the CPU has AVX-512 (checked above).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let at = (i0 + ip * MR) * lda + p0;
                pack_a_panel_gather(&a[at..], minus.map(|m| &m[at..]), lda, kc, height, panel)
            };
            continue;
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

/// [`pack_a`] for a [`Conv3`] operand: each panel row is an output pixel, and column p reads
/// channel p / 9 of tap p % 9 of its neighbourhood (zero in the padding).
#[allow(clippy::too_many_arguments)]
fn pack_a_conv(a: &[f32], cv: Conv3, c: usize, i0: usize, mc: usize, p0: usize, kc: usize, out: &mut [f32]) {
    let gather = cfg!(target_arch = "x86_64") && (cv.src_pixels() * c) < i32::MAX as usize && math::has_avx512();
    for ip in 0..mc.div_ceil(MR) {
        let panel = &mut out[ip * MR * kc..(ip + 1) * MR * kc];
        let height = MR.min(mc - ip * MR);
        let taps: [[Option<usize>; 9]; MR] = std::array::from_fn(|ii| cv.taps(i0 + ip * MR + ii.min(height - 1), c));
        if gather {
            // SAFETY: every tap offset plus a channel < c is inside the input image
            // (check_bounds checked its length); the CPU has AVX-512 (checked above).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                pack_a_conv_panel_gather(a, &taps, p0, kc, panel)
            };
            continue;
        }
        for p in 0..kc {
            let (ch, t) = ((p0 + p) / 9, (p0 + p) % 9);
            for (ii, tp) in taps.iter().enumerate() {
                panel[p * MR + ii] = tp[t].map_or(0.0, |o| a[o + ch]);
            }
        }
    }
}

/// One conv A panel by AVX-512 gathers: per column p, one 12-lane gather at the tap's
/// pixel offsets plus the channel, lanes in the padding masked to zero.
///
/// # Safety
/// Every `Some` offset plus any channel read (< (p0 + kc) / 9 + 1) must be in bounds of
/// `a`, and the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_a_conv_panel_gather(
    a: &[f32],
    taps: &[[Option<usize>; 9]; MR],
    p0: usize,
    kc: usize,
    panel: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut idx = [_mm512_setzero_si512(); 9];
    let mut masks = [0 as __mmask16; 9];
    for t in 0..9 {
        let mut lanes = [0i32; 16];
        for ii in 0..MR {
            if let Some(o) = taps[ii][t] {
                lanes[ii] = o as i32;
                masks[t] |= 1 << ii;
            }
        }
        idx[t] = _mm512_loadu_si512(lanes.as_ptr().cast());
    }
    let store: __mmask16 = ((1u32 << MR) - 1) as __mmask16;
    let zero = _mm512_setzero_ps();
    let ptr = a.as_ptr();
    for p in 0..kc {
        let (ch, t) = ((p0 + p) / 9, (p0 + p) % 9);
        let v = _mm512_mask_i32gather_ps::<4>(zero, masks[t], idx[t], ptr.add(ch));
        _mm512_mask_storeu_ps(panel.as_mut_ptr().add(p * MR), store, v);
    }
}

fn zero_tile(g: &Gemm, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) {
    for i in rows {
        // SAFETY: inside this thread's C tile, bounds checked.
        let row = unsafe { std::slice::from_raw_parts_mut(g.c.get().add(i * g.ldc + cols.start), cols.len()) };
        row.fill(0.0);
    }
}

#[inline(never)]
fn epilogue(g: &Gemm, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) {
    if g.bias.is_none() && g.add.is_none() && g.act == Act::None {
        return;
    }
    for i in rows {
        // SAFETY: inside this thread's C tile, bounds checked.
        let row = unsafe { std::slice::from_raw_parts_mut(g.c.get().add(i * g.ldc + cols.start), cols.len()) };
        let add = g.add.map(|(m, ld)| &m[i * ld + cols.start..i * ld + cols.end]);
        math::bias_act(row, g.bias.map(|b| &b[cols.clone()]), add, g.act == Act::GeluTanh);
    }
}

/// Portable microkernel: C[0..mr, 0..nr] (+)= Apanel · Bpanel over kc.
///
/// # Safety
/// `a` holds kc·MR floats, `b` kc·NR, and C rows 0..mr × cols 0..nr are in bounds.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_portable(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
) {
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
        for (cv, &v) in crow.iter_mut().zip(row) {
            *cv = if accumulate { *cv + v } else { v };
        }
    }
}

/// AVX-512 microkernel: 12 rows × 32 columns in 24 zmm accumulators; per k step two B
/// loads, twelve broadcasts and 24 FMAs. Edge columns use masked loads/stores.
///
/// # Safety
/// As [`kernel_portable`], and the CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx512(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kc {
        let b0 = _mm512_loadu_ps(b.add(p * NR));
        let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
        let ap = a.add(p * MR);
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*ap.add(i));
            acc_i[0] = _mm512_fmadd_ps(ai, b0, acc_i[0]);
            acc_i[1] = _mm512_fmadd_ps(ai, b1, acc_i[1]);
        }
    }
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
        _mm512_mask_storeu_ps(cp, m0, v0);
        _mm512_mask_storeu_ps(cp.add(16), m1, v1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// Checks C = A·Bᵀ + bias (+GELU) against an f64 reference for one shape and B layout.
    fn check(gm: &Gemmer, pool: &ThreadPool, m: usize, n: usize, k: usize, transposed_b: bool, act: Act) {
        let mut s = (m * 131 + n * 7 + k) as u64;
        let lda = k + 3; // a padded row stride
        let a: Vec<f32> = (0..m * lda).map(|_| lcg(&mut s)).collect();
        let bdata: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let b = if transposed_b {
            BMat { data: &bdata, rs: 1, cs: n } // B(j, p) = data[p·n + j]
        } else {
            BMat::weight(&bdata, k)
        };
        let bias: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
        let ldc = n + 5;
        let mut c = vec![f32::NAN; m * ldc];
        let mut scratch = vec![0.0; pool.threads() * SCRATCH_PER_THREAD];
        let mut packed = vec![0.0; packed_a_len(m, k)];
        let add: Vec<f32> = (0..m * n).map(|_| lcg(&mut s)).collect();
        let minus: Vec<f32> = (0..m * lda).map(|_| lcg(&mut s) * 0.5).collect();
        let g = Gemm {
            m,
            n,
            k,
            a: &a,
            a_minus: Some(&minus),
            lda,
            conv: None,
            b,
            bias: Some(&bias),
            add: Some((&add, n)),
            act,
            c: SendPtr(c.as_mut_ptr()),
            ldc,
        };
        gm.run(pool, &mut scratch, &mut packed, &g);
        let mut worst = 0.0f64;
        for i in 0..m {
            for j in 0..n {
                let mut e = bias[j] as f64 + add[i * n + j] as f64;
                for p in 0..k {
                    e += (a[i * lda + p] - minus[i * lda + p]) as f64 * b.data[j * b.rs + p * b.cs] as f64;
                }
                if act == Act::GeluTanh {
                    e = 0.5 * e * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (e + 0.044715 * e * e * e)).tanh());
                }
                worst = worst.max((c[i * ldc + j] as f64 - e).abs() / (1.0 + e.abs()));
            }
            // Padding columns of C are never written.
            assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()), "wrote past n");
        }
        // f32 accumulation over k terms of size ≤ 0.25: error ~ k · 2⁻²⁴ at worst.
        let tol = 1e-6 * (k as f64).max(16.0);
        assert!(worst < tol, "{} m{m} n{n} k{k} transposed {transposed_b}: worst {worst:.2e} > {tol:.1e}", gm.name);
    }

    #[test]
    fn gemm_matches_f64_reference_at_edge_shapes() {
        let pool = ThreadPool::new(2).unwrap();
        for gm in [Gemmer::detect(), Gemmer::portable()] {
            for &(m, n, k) in &[
                (1, 1, 1),
                (13, 33, 7),    // one past MR and NR
                (12, 32, 256),  // exactly one tile, one K block
                (37, 100, 300), // crosses a K block, ragged everywhere
                (150, 400, 72), // crosses MC and NC
                (2, 6912, 144), // modulation-like: tiny m, wide n
                (256, 72, 256), // attention P·V shape
                (5, 3, 0),      // empty K: C = bias
            ] {
                for transposed in [false, true] {
                    check(&gm, &pool, m, n, k, transposed, Act::None);
                }
            }
            check(&gm, &pool, 40, 130, 50, false, Act::GeluTanh);
        }
    }

    /// The implicit-im2col conv operand against a direct f64 3×3 convolution (zero padding),
    /// with and without the fused nearest 2× upsample, at ragged sizes.
    #[test]
    fn conv3_operand_matches_direct_convolution() {
        let pool = ThreadPool::new(2).unwrap();
        for gm in [Gemmer::detect(), Gemmer::portable()] {
            for &(h, w, cin, cout, up2) in
                &[(5, 7, 3, 4, false), (8, 6, 20, 33, true), (13, 16, 40, 70, false), (16, 16, 48, 40, true)]
            {
                let mut s = (h * 31 + w * 7 + cin + cout) as u64;
                let (sh, sw) = if up2 { (h / 2, w / 2) } else { (h, w) };
                let img: Vec<f32> = (0..sh * sw * cin).map(|_| lcg(&mut s)).collect();
                let wt: Vec<f32> = (0..cout * cin * 9).map(|_| lcg(&mut s)).collect();
                let bias: Vec<f32> = (0..cout).map(|_| lcg(&mut s)).collect();
                let mut c = vec![f32::NAN; h * w * cout];
                let mut scratch = vec![0.0; pool.threads() * SCRATCH_PER_THREAD];
                let g = Gemm {
                    m: h * w,
                    n: cout,
                    k: 9 * cin,
                    a: &img,
                    a_minus: None,
                    lda: cin,
                    conv: Some(Conv3 { h, w, up2 }),
                    b: BMat::weight(&wt, 9 * cin),
                    bias: Some(&bias),
                    add: None,
                    act: Act::None,
                    c: SendPtr(c.as_mut_ptr()),
                    ldc: cout,
                };
                gm.run(&pool, &mut scratch, &mut [], &g);
                let mut worst = 0.0f64;
                for y in 0..h {
                    for x in 0..w {
                        for o in 0..cout {
                            let mut e = bias[o] as f64;
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (yy, xx) = (y as isize + ky as isize - 1, x as isize + kx as isize - 1);
                                    if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                                        continue;
                                    }
                                    let (yy, xx) = (yy as usize, xx as usize);
                                    let px = if up2 { (yy / 2) * sw + xx / 2 } else { yy * sw + xx };
                                    for ch in 0..cin {
                                        e += img[px * cin + ch] as f64 * wt[((o * cin + ch) * 3 + ky) * 3 + kx] as f64;
                                    }
                                }
                            }
                            worst = worst.max((c[(y * w + x) * cout + o] as f64 - e).abs() / (1.0 + e.abs()));
                        }
                    }
                }
                assert!(worst < 1e-5, "{} conv {h}x{w} {cin}->{cout} up2 {up2}: worst {worst:.2e}", gm.name);
            }
        }
    }
}
