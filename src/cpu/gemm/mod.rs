//! f32 matrix multiply for the CPU backend: C = A·Bᵀ (+ bias, activation), blocked for the
//! cache (BLIS loop order) with packed panels and a register-tile microkernel for each
//! instruction-set path ([`Isa`]): AVX-512 (one 12×32 tile), AVX2+FMA and NEON (four 6×16
//! sub-tiles of it), and a portable kernel. All scratch memory is passed in, so a call never
//! allocates.
//!
//! The SIMD kernels accumulate each element over k in the same order with fused multiply-adds,
//! so they agree bit for bit; packing only copies (or subtracts, for `a − a_minus`), so how a
//! path packs ([`pack`]) changes no bits either.
//!
//! A is m×k row-major with row stride `lda`. B is n×k addressed by two strides, so both a
//! PyTorch weight (out, in) and a transposed operand (attention's P·V reads V as Bᵀ) work.

mod kernels;
mod pack;

use super::math;
use super::pool::{split, SendPtr, ThreadPool};
use crate::isa::{Isa, IsaKind};
use kernels::*;
use pack::{pack_a, pack_a_cols, pack_b};

/// Microkernel tile: MR rows × NR columns of C, the layout of the packed panels. AVX-512
/// holds it in registers at once (12 × 2 zmm = 24 of 32); AVX2 (16 ymm) and NEON (32 q
/// registers of 4 lanes) run it as four 6×16 sub-tiles.
pub const MR: usize = 12;
pub const NR: usize = 32;
/// Cache blocking: a KC×NC packed B block lives in L2, a KC×NR panel of it in L1, and an
/// MC×KC packed A block in L2.
const KC: usize = 256;
const MC: usize = 144;
const NC: usize = 384;

/// Below this many multiply-adds a product runs on the calling thread alone: waking the
/// workers would cost more than it saves.
pub const SMALL_MACS: usize = 1 << 16;

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

type Kernel =
    unsafe fn(usize, *const f32, *const f32, *mut f32, usize, usize, usize, bool, *const f32, usize, Prefetch);

/// A run of consecutive 64-byte lines for a micro-kernel call to prefetch.
#[derive(Clone, Copy)]
struct Run {
    start: *const f32,
    lines: usize,
}

/// The prefetches of one micro-kernel call: `len` runs at `runs` holding `lines` lines in all.
#[derive(Clone, Copy)]
pub(super) struct Prefetch {
    runs: *const Run,
    len: usize,
    lines: usize,
}

/// Most runs one micro-kernel call prefetches (what is left waits for the next call).
const RUNS_MAX: usize = 32;

/// The microkernel and packing routines of one instruction-set path, chosen once.
#[derive(Clone, Copy)]
pub struct Gemmer {
    kernel: Kernel,
    isa: Isa,
}

impl Gemmer {
    pub fn new(isa: Isa) -> Self {
        let kernel: Kernel = match isa.kind() {
            #[cfg(target_arch = "x86_64")]
            IsaKind::Avx512 => kernel_avx512,
            #[cfg(target_arch = "x86_64")]
            IsaKind::Avx2 => kernel_avx2,
            #[cfg(target_arch = "aarch64")]
            IsaKind::Neon => kernel_neon,
            _ => kernel_portable,
        };
        Gemmer { kernel, isa }
    }

    /// The path's name (`scalar`, `avx2`, `avx512`, `neon`).
    pub fn name(&self) -> &'static str {
        self.isa.name()
    }

    pub fn isa(&self) -> Isa {
        self.isa
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
        if g.m * g.n * g.k < SMALL_MACS || threads == 1 {
            // Too small to be worth waking the workers (or nobody to wake).
            // SAFETY: the scratch length was checked for at least one thread.
            let mine = unsafe { std::slice::from_raw_parts_mut(scratch.get(), SCRATCH_PER_THREAD) };
            self.block(g, 0..g.m, 0..g.n, mine, None, None);
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
                    pack_a(self.isa, g, rows.start, rows.len(), p0, kc, out);
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
            self.block(g, rows, cols, mine, pre, None);
        };
        pool.run(&work);
    }

    /// Single-threaded GEMM (used inside already-parallel loops such as attention heads).
    pub fn run_single(&self, scratch: &mut [f32], g: &Gemm) {
        assert!(scratch.len() >= SCRATCH_PER_THREAD, "GEMM scratch too small");
        check_bounds(g);
        self.block(g, 0..g.m, 0..g.n, scratch, None, None);
    }

    /// Packs all of B (`n`×`k`) into `out` ([`packed_b_len`]`(n, k)` floats) once, for
    /// [`Gemmer::run_single_packed_b`]: NR-wide panels over the whole k, panel j at
    /// `out[j·NR·k..]`, `out[j·NR·k + p·NR + jj] = B(j·NR + jj, p)` (zero past n).
    pub fn pack_b_whole(&self, b: BMat, n: usize, k: usize, out: &mut [f32]) {
        assert!(out.len() >= packed_b_len(n, k), "GEMM: packed B too small");
        if k > 0 && n > 0 {
            let last = (n - 1) * b.rs + (k - 1) * b.cs;
            assert!(b.data.len() > last, "GEMM: B too small");
        }
        for j in (0..n).step_by(NR) {
            pack_b(self.isa, b, j, NR.min(n - j), 0, k, &mut out[j * k..(j + NR) * k]);
        }
    }

    /// [`Gemmer::run_single`] with B already packed whole by [`Gemmer::pack_b_whole`] from
    /// `g.b` (the same n and k): a weight that many products read is packed once instead of
    /// by every call. Packing only copies, so the bits are those of `run_single`.
    pub fn run_single_packed_b(&self, scratch: &mut [f32], g: &Gemm, packed_b: &[f32]) {
        assert!(scratch.len() >= SCRATCH_PER_THREAD, "GEMM scratch too small");
        assert!(packed_b.len() >= packed_b_len(g.n, g.k), "GEMM: packed B too small");
        check_bounds(g);
        self.block(g, 0..g.m, 0..g.n, scratch, None, Some(packed_b));
    }

    /// Single-threaded GEMM whose A operand has contiguous columns: A(i, p) =
    /// `a_cols[p·cs + i]` (`g.a`, `g.a_minus`, `g.lda` and `g.conv` are ignored). A is
    /// packed once into `packed` ([`packed_a_len`]`(m, k)` floats) with plain copies, where
    /// the row-major packer would need transposes. Attention's O = P·v runs as
    /// Oᵀ = vᵀ·Pᵀ through this, so the head dim (72) fills 12-row tiles.
    pub fn run_single_cols(&self, scratch: &mut [f32], packed: &mut [f32], a_cols: &[f32], cs: usize, g: &Gemm) {
        assert!(scratch.len() >= SCRATCH_PER_THREAD, "GEMM scratch too small");
        if g.m == 0 || g.n == 0 {
            return;
        }
        let len = packed_a_len(g.m, g.k);
        assert!(g.k == 0 || (cs >= g.m && a_cols.len() >= (g.k - 1) * cs + g.m), "GEMM: A (columns) too small");
        assert!(packed.len() >= len, "GEMM: packed A too small");
        check_bounds(&Gemm { a: &[], a_minus: None, conv: None, lda: g.k, k: 0, ..*g });
        if g.k > 0 {
            let last = (g.n - 1) * g.b.rs + (g.k - 1) * g.b.cs;
            assert!(g.b.data.len() > last, "GEMM: B too small");
        }
        pack_a_cols(a_cols, cs, g.m, g.k, packed);
        self.block(g, 0..g.m, 0..g.n, scratch, Some(&packed[..len]), None);
    }

    /// `dst[c·ds + r] = src[r·ss + c]`, r < rows, c < cols (by 4×4 register blocks).
    ///
    /// # Safety
    /// `dst` must be writable at every `c·ds + r`, and nothing else may access those elements.
    pub unsafe fn transpose(&self, src: &[f32], ss: usize, rows: usize, cols: usize, dst: *mut f32, ds: usize) {
        pack::transpose(self.isa, src, ss, rows, cols, dst, ds)
    }

    /// C[rows, cols] for one thread: the BLIS jc → pc → ic → jr → ir loop nest. With
    /// `pre`, A was packed for all rows already (layout of [`packed_a_len`]); with `pre_b`,
    /// all of B was ([`Gemmer::pack_b_whole`]; `cols.start` a multiple of NR).
    fn block(
        &self,
        g: &Gemm,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        scratch: &mut [f32],
        pre: Option<&[f32]>,
        pre_b: Option<&[f32]>,
    ) {
        if rows.is_empty() || cols.is_empty() {
            return;
        }
        let (bpack, apack) = scratch.split_at_mut(KC * NC);
        let mut runs = [Run { start: std::ptr::null(), lines: 0 }; RUNS_MAX];
        let row_tiles = rows.len().div_ceil(MR);
        let mut j0 = cols.start;
        while j0 < cols.end {
            let nc = NC.min(cols.end - j0);
            let col_tiles = nc.div_ceil(NR);
            let mut p0 = 0;
            while p0 < g.k {
                let kc = KC.min(g.k - p0);
                let last = p0 + kc == g.k;
                // The B panels of this block (panel jp at jp · panel_stride), and the next B
                // block (weights: a DRAM read), fetched while this one's kernels run.
                let next = if p0 + kc < g.k { Some((j0, nc, p0 + kc)) } else { None };
                let next = next.or((j0 + nc < cols.end).then(|| (j0 + nc, NC.min(cols.end - j0 - nc), 0)));
                let mut b_ahead = Ahead::new(row_tiles * col_tiles);
                let (bpanels, panel_stride): (&[f32], usize) = match pre_b {
                    Some(pb) => {
                        if let Some((nj, nn, np)) = next {
                            let nk = KC.min(g.k - np);
                            b_ahead.add(pb, nj * g.k + np * NR, NR * g.k, nn.div_ceil(NR), nk * NR);
                        }
                        (&pb[j0 * g.k + p0 * NR..], NR * g.k)
                    }
                    None => {
                        pack_b(self.isa, g.b, j0, nc, p0, kc, bpack);
                        if let (1, Some((nj, nn, np))) = (g.b.cs, next) {
                            b_ahead.add(g.b.data, nj * g.b.rs + np, g.b.rs, nn, KC.min(g.k - np));
                        }
                        (bpack, NR * kc)
                    }
                };
                let mut i0 = rows.start;
                while i0 < rows.end {
                    let mc = MC.min(rows.end - i0);
                    let apanels: &[f32] = match pre {
                        Some(pre) => &pre[p0 * g.m.next_multiple_of(MR) + i0 * kc..],
                        None => {
                            pack_a(self.isa, g, i0, mc, p0, kc, apack);
                            apack
                        }
                    };
                    // What the next pack_a and this block's epilogue (or its kernels) will
                    // read (the icc caches x_s and y_s are cold), fetched while the kernels
                    // run instead of stalling the packer and the epilogue.
                    let mut ahead = Ahead::new(mc.div_ceil(MR) * col_tiles);
                    // Without a bias, the added matrix (icc's cached y_s) is added by the kernel
                    // as it stores each tile, rather than by a pass over the block after; the
                    // sum is formed in the same order, (A·B [+ C]) + add, so the bits are
                    // those of the epilogue.
                    let fused_add = match g.add {
                        Some(add) if last && g.bias.is_none() => Some(add),
                        Some((m, ld)) if last => {
                            ahead.add(m, i0 * ld + j0, ld, mc, nc);
                            None
                        }
                        _ => None,
                    };
                    if pre.is_none() && g.conv.is_none() {
                        let next = if i0 + mc < rows.end {
                            Some((i0 + mc, MC.min(rows.end - i0 - mc), p0))
                        } else {
                            (p0 + kc < g.k).then(|| (rows.start, MC.min(rows.len()), p0 + kc))
                        };
                        if let Some((ni, nm, np)) = next {
                            let nk = KC.min(g.k - np);
                            ahead.add(g.a, ni * g.lda + np, g.lda, nm, nk);
                            if let Some(minus) = g.a_minus {
                                ahead.add(minus, ni * g.lda + np, g.lda, nm, nk);
                            }
                        }
                    }
                    let ip_tiles = mc.div_ceil(MR);
                    for jp in 0..col_tiles {
                        let nr = NR.min(nc - jp * NR);
                        for ip in 0..ip_tiles {
                            let mr = MR.min(mc - ip * MR);
                            // This call's share of the prefetches, issued by the kernel
                            // between its k steps so that a burst of misses never stalls it.
                            let mut nruns = 0;
                            let mut lines = ahead.take(&mut runs, &mut nruns) + b_ahead.take(&mut runs, &mut nruns);
                            // With the added matrix fused, each call fetches the next tile's
                            // part of it, which the next call reads as it stores.
                            if let Some((m, ld)) = fused_add {
                                let next = if ip + 1 < ip_tiles {
                                    Some((ip + 1, jp))
                                } else {
                                    (jp + 1 < col_tiles).then_some((0, jp + 1))
                                };
                                if let Some((ni, nj)) = next {
                                    let (r, c) = (i0 + ni * MR, j0 + nj * NR);
                                    let mut tile = Ahead::new(1);
                                    tile.add(m, r * ld + c, ld, MR.min(mc - ni * MR), NR.min(nc - nj * NR));
                                    lines += tile.take(&mut runs, &mut nruns);
                                }
                            }
                            let (add, ld_add) = match fused_add {
                                Some((m, ld)) => (m[(i0 + ip * MR) * ld + j0 + jp * NR..].as_ptr(), ld),
                                None => (std::ptr::null(), 0),
                            };
                            let pf = Prefetch { runs: runs.as_ptr(), len: nruns, lines };
                            // SAFETY: bounds were checked in `check_bounds`; the packed
                            // panels are padded to full MR/NR tiles.
                            unsafe {
                                let c = g.c.get().add((i0 + ip * MR) * g.ldc + j0 + jp * NR);
                                (self.kernel)(
                                    kc,
                                    apanels.as_ptr().add(ip * MR * kc),
                                    bpanels.as_ptr().add(jp * panel_stride),
                                    c,
                                    g.ldc,
                                    mr,
                                    nr,
                                    p0 > 0,
                                    add,
                                    ld_add,
                                    pf,
                                );
                            }
                        }
                    }
                    if last {
                        // The MC×NC block of C is still in L2: bias, added matrix and
                        // activation now rather than in a second pass over all rows.
                        let g = if fused_add.is_some() { &Gemm { add: None, ..*g } } else { g };
                        epilogue(self.isa, g, i0..i0 + mc, j0..j0 + nc);
                    }
                    i0 += mc;
                }
                p0 += kc;
            }
            if g.k == 0 {
                zero_tile(g, rows.clone(), j0..j0 + nc);
                epilogue(self.isa, g, rows.clone(), j0..j0 + nc);
            }
            j0 += nc;
        }
    }
}

/// Software prefetch of up to three row-major regions (`rows` × `cols` floats from `start`,
/// row stride `ld`), shared out over the micro-kernel calls of a block so that the lines
/// arrive while the kernels compute. Each call gets its share as a few runs of consecutive
/// lines and issues them one at a time between its k steps ([`kernels::PfCursor`]): issuing
/// them here line by line before each call, as until 2026-12-05, cost 9 % of a calibrated
/// DiT-XL/2 step (address bookkeeping per line, and bursts of 24–96 misses that stalled the
/// core until they drained). Prefetching moves no values, so it changes no bits; on paths
/// without a prefetch instruction here (aarch64, scalar builds elsewhere) it does nothing.
struct Ahead<'a> {
    regions: [(&'a [f32], usize, usize, usize, usize); 3],
    len: usize,
    /// Kernel calls to spread the lines over, and the lines each takes (fixed at the
    /// first call, so that no call divides).
    calls: usize,
    share: usize,
    /// Cursor: region, row, float offset within the row.
    at: (usize, usize, usize),
    lines_left: usize,
}

/// Floats per 64-byte cache line.
pub(super) const LINE: usize = 16;

impl<'a> Ahead<'a> {
    fn new(calls: usize) -> Self {
        Ahead { regions: [(&[], 0, 0, 0, 0); 3], len: 0, calls: calls.max(1), share: 0, at: (0, 0, 0), lines_left: 0 }
    }

    fn add(&mut self, data: &'a [f32], start: usize, ld: usize, rows: usize, cols: usize) {
        if self.len < 3 && rows > 0 && cols > 0 {
            self.regions[self.len] = (data, start, ld, rows, cols);
            self.len += 1;
            self.lines_left += rows * cols.div_ceil(LINE);
        }
    }

    /// Appends this call's share of the remaining lines to `out` from run `*n` on, as runs
    /// of consecutive lines (as many as fit; the rest stay for later calls); returns the
    /// lines added.
    #[inline]
    fn take(&mut self, out: &mut [Run; RUNS_MAX], n: &mut usize) -> usize {
        if self.lines_left == 0 {
            return 0;
        }
        if self.share == 0 {
            self.share = self.lines_left.div_ceil(self.calls);
        }
        let mut share = self.share;
        let (mut region, mut r, mut c) = self.at;
        let mut taken = 0;
        while share > 0 && region < self.len && *n < RUNS_MAX {
            let (data, start, ld, rows, cols) = self.regions[region];
            let row_lines = (cols - c).div_ceil(LINE);
            let k = row_lines.min(share);
            out[*n] = Run { start: data.as_ptr().wrapping_add(start + r * ld + c), lines: k };
            *n += 1;
            share -= k;
            taken += k;
            if k < row_lines {
                c += k * LINE;
            } else if r + 1 < rows {
                (r, c) = (r + 1, 0);
            } else {
                (region, r, c) = (region + 1, 0, 0);
            }
        }
        self.at = (region, r, c);
        self.lines_left -= taken;
        taken
    }
}

#[inline(always)]
pub(super) fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Floats of a whole packed B (columns padded to NR): [`Gemmer::pack_b_whole`].
pub fn packed_b_len(n: usize, k: usize) -> usize {
    n.next_multiple_of(NR) * k
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

fn zero_tile(g: &Gemm, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) {
    for i in rows {
        // SAFETY: inside this thread's C tile, bounds checked.
        let row = unsafe { std::slice::from_raw_parts_mut(g.c.get().add(i * g.ldc + cols.start), cols.len()) };
        row.fill(0.0);
    }
}

#[inline(never)]
fn epilogue(isa: Isa, g: &Gemm, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) {
    if g.bias.is_none() && g.add.is_none() && g.act == Act::None {
        return;
    }
    for i in rows {
        // SAFETY: inside this thread's C tile, bounds checked.
        let row = unsafe { std::slice::from_raw_parts_mut(g.c.get().add(i * g.ldc + cols.start), cols.len()) };
        let add = g.add.map(|(m, ld)| &m[i * ld + cols.start..i * ld + cols.end]);
        math::bias_act(isa, row, g.bias.map(|b| &b[cols.clone()]), add, g.act == Act::GeluTanh);
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
    /// Returns C (row stride n + 5) for cross-path comparisons.
    fn check(gm: &Gemmer, pool: &ThreadPool, m: usize, n: usize, k: usize, transposed_b: bool, act: Act) -> Vec<f32> {
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
        assert!(worst < tol, "{} m{m} n{n} k{k} transposed {transposed_b}: worst {worst:.2e} > {tol:.1e}", gm.name());
        c
    }

    #[test]
    fn gemm_matches_f64_reference_at_edge_shapes() {
        let pool = ThreadPool::new(2).unwrap();
        for gm in Isa::available().map(Gemmer::new) {
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

    /// The SIMD paths (AVX2, AVX-512, NEON) give the same bits, and so does every thread
    /// count: each element is summed over k in one order with fused multiply-adds.
    #[test]
    fn simd_paths_and_thread_counts_agree_bit_for_bit() {
        let simd: Vec<Gemmer> = Isa::available().filter(|i| i.kind() != IsaKind::Scalar).map(Gemmer::new).collect();
        println!("SIMD paths on this CPU: {:?}", simd.iter().map(|g| g.name()).collect::<Vec<_>>());
        if simd.is_empty() {
            println!("no SIMD path on this CPU: only the thread-count half of this test runs");
        }
        let pools = [ThreadPool::new(1).unwrap(), ThreadPool::new(2).unwrap(), ThreadPool::new(3).unwrap()];
        let gemmers: Vec<Gemmer> = if simd.is_empty() { vec![Gemmer::new(Isa::scalar())] } else { simd };
        for &(m, n, k) in &[(37, 100, 300), (150, 400, 72), (2, 6912, 144), (512, 96, 600)] {
            let first = check(&gemmers[0], &pools[0], m, n, k, false, Act::GeluTanh);
            for gm in &gemmers {
                for pool in &pools {
                    let c = check(gm, pool, m, n, k, false, Act::GeluTanh);
                    let same = c.iter().zip(&first).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(
                        same,
                        "{} with {} threads differs from {} at m{m} n{n} k{k}",
                        gm.name(),
                        pool.threads(),
                        gemmers[0].name()
                    );
                }
            }
        }
    }

    /// An A operand with contiguous columns (packed by copies) gives the bits of the same
    /// operand stored row-major, on every path and at ragged shapes, with and without an
    /// epilogue; and the transpose helper moves every element.
    #[test]
    fn column_operand_and_transpose_match_row_major() {
        for gm in Isa::available().map(Gemmer::new) {
            for &(m, n, k) in &[(72, 256, 256), (13, 33, 300), (1, 5, 7), (25, 40, 0)] {
                let mut s = (m * 17 + n * 3 + k) as u64;
                let cs = m + 2;
                let cols: Vec<f32> = (0..k.max(1) * cs).map(|_| lcg(&mut s)).collect();
                let rows: Vec<f32> = (0..m * k).map(|i| cols[(i % k.max(1)) * cs + i / k.max(1)]).collect();
                let bdata: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
                let add: Vec<f32> = (0..m * n).map(|_| lcg(&mut s)).collect();
                let (mut c1, mut c2) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                let mut scratch = vec![0.0; SCRATCH_PER_THREAD];
                let mut packed = vec![0.0; packed_a_len(m, k)];
                let g = Gemm {
                    m,
                    n,
                    k,
                    a: &rows,
                    a_minus: None,
                    lda: k,
                    conv: None,
                    b: BMat::weight(&bdata, k),
                    bias: None,
                    add: Some((&add, n)),
                    act: Act::GeluTanh,
                    c: SendPtr(c1.as_mut_ptr()),
                    ldc: n,
                };
                gm.run_single(&mut scratch, &g);
                let g = Gemm { a: &[], c: SendPtr(c2.as_mut_ptr()), ..g };
                gm.run_single_cols(&mut scratch, &mut packed, &cols, cs, &g);
                let same = c1.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{} m{m} n{n} k{k}: column operand differs", gm.name());
                assert!(c1.iter().any(|v| *v != 0.0), "trivial result");
                // Transpose c1 (m×n, stride n) into t (n×m, stride m + 1).
                let mut t = vec![f32::NAN; n * (m + 1)];
                unsafe { gm.transpose(&c1, n, m, n, t.as_mut_ptr(), m + 1) };
                for i in 0..m {
                    for j in 0..n {
                        assert_eq!(t[j * (m + 1) + i].to_bits(), c1[i * n + j].to_bits(), "{} transpose", gm.name());
                    }
                }
            }
        }
    }

    /// B packed once for the whole product (what calibrated steps do with icc's factors)
    /// gives the bits of B packed per call, on every path, at shapes that cross the KC and
    /// NC blocks and end mid-panel, with the increment operand, an added matrix and GELU;
    /// and the added matrix, which the kernels add as they store (no bias), gives the bits
    /// of the product followed by the separate epilogue.
    #[test]
    fn b_packed_once_matches_b_packed_per_call() {
        for gm in Isa::available().map(Gemmer::new) {
            for &(m, n, k) in &[(13, 33, 300), (37, 100, 72), (150, 400, 520), (24, 32, 128), (5, 3, 0)] {
                let mut s = (m * 7 + n * 13 + k) as u64;
                let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
                let minus: Vec<f32> = (0..m * k).map(|_| lcg(&mut s) * 0.5).collect();
                let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
                let add: Vec<f32> = (0..m * n).map(|_| lcg(&mut s)).collect();
                let (mut c1, mut c2) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                let mut scratch = vec![0.0; SCRATCH_PER_THREAD];
                let mut packed = vec![f32::NAN; packed_b_len(n, k)];
                gm.pack_b_whole(BMat::weight(&w, k), n, k, &mut packed);
                let g = Gemm {
                    m,
                    n,
                    k,
                    a: &a,
                    a_minus: Some(&minus),
                    lda: k,
                    conv: None,
                    b: BMat::weight(&w, k),
                    bias: None,
                    add: Some((&add, n)),
                    act: Act::GeluTanh,
                    c: SendPtr(c1.as_mut_ptr()),
                    ldc: n,
                };
                gm.run_single(&mut scratch, &g);
                gm.run_single_packed_b(&mut scratch, &Gemm { c: SendPtr(c2.as_mut_ptr()), ..g }, &packed);
                assert!(c1.iter().any(|v| *v != 0.0) && c1.iter().all(|v| v.is_finite()), "trivial result");
                let same = c1.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{} m{m} n{n} k{k}: B packed once differs from B packed per call", gm.name());
                let mut c3 = vec![f32::NAN; m * n];
                gm.run_single(&mut scratch, &Gemm { add: None, act: Act::None, c: SendPtr(c3.as_mut_ptr()), ..g });
                for (row, add) in c3.chunks_exact_mut(n).zip(add.chunks_exact(n)) {
                    math::bias_act(gm.isa(), row, None, Some(add), true);
                }
                let same = c1.iter().zip(&c3).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{} m{m} n{n} k{k}: the fused add differs from the epilogue's", gm.name());
            }
        }
    }

    /// The implicit-im2col conv operand against a direct f64 3×3 convolution (zero padding),
    /// with and without the fused nearest 2× upsample, at ragged sizes.
    #[test]
    fn conv3_operand_matches_direct_convolution() {
        let pool = ThreadPool::new(2).unwrap();
        for gm in Isa::available().map(Gemmer::new) {
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
                assert!(worst < 1e-5, "{} conv {h}x{w} {cin}->{cout} up2 {up2}: worst {worst:.2e}", gm.name());
            }
        }
    }
}
