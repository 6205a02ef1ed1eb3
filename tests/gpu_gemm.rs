//! kernels/gemm.cu (`gemm_fused_f16_64x64_k64`, launched by `launch::gemm`) against an f64 reference on
//! the same f16 inputs, feature by feature: `a − a_minus`, bias, `add` (wrapping every
//! `add_rows` rows, strided, at a column offset), strides and column-offset sub-slices of `a`
//! and the outputs, the pre-activation output, GELU and SiLU, f16 and f32 outputs; at shapes
//! that are and are not multiples of the 64×64×32 tile, through the 16-byte paths (cp.async, and
//! register-staged loads for `a − a_minus`) and the element-wise paths (k % 8 ≠ 0, lda % 8 ≠ 0,
//! a misaligned `a`). Then one DiT-XL/2 shape, the exact rounding of `a − a_minus`, and the
//! launcher's rejections.
//!
//! Two kinds of data per case:
//!   - small integers (a, a_minus, w in [-2, 2], bias and add in [-4, 4]): every partial sum is
//!     an integer below 2^24, exact in f32 in any order, so `pre`, the f32 output and the f16
//!     output without activation must be the exact value, correctly rounded, to the bit;
//!     activated outputs are held to the bound below;
//!   - uniform values in [-1, 1): every output element within the bound below.
//!
//! Error bound of one output element, v = Σ_k a'_k·w_k + bias + add (a' = f16(a − a_minus)
//! exactly as the kernel rounds it), S = Σ_k |a'_k·w_k| + |bias| + |add|:
//!   accumulation: products of f16 values are exact in f32; K f32 additions in any order, then
//!   bias and add: err ≤ (K + 2)·u·S (u = 2^-24) to first order. Tensor cores may truncate
//!   instead of rounding (Fasi et al., 2021), doubling u; one more term of slack:
//!   acc = 2·(K + 3)·u·S.
//!   GELU: |gelu'| ≤ 1.13 scales acc; its f32 evaluation (tanhf: 2 ulp) adds ≤ 8u·(|v| + |y|).
//!   SiLU: |silu'| ≤ 1.10 scales acc; y = v / (1 + expf(−v)) in f32 (expf 2 ulp = 4u relative,
//!   the sum and the division u each) is within 6u·|y|, written 8u·|y|.
//!   f16 output: one rounding, U16·|y| (+ 2^-25 near zero) on top.

mod gpu_common;

use std::time::Instant;

use gpu_common::*;
use icdit::gpu::launch::{self, GemmAct, GemmLaunch, GemmOut, GemmSpec, GemmTile};
use icdit::gpu::{f16, DevSlice, Device};
use icdit::plan::{Dt, Plan};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Out {
    F16,
    F32,
}

/// The `add` operand: row stride, rows before the row index wraps, first column in its buffer.
#[derive(Clone, Copy, Debug)]
struct Add {
    ld: usize,
    rows: usize,
    off: usize,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    /// `a` (and `a_minus`): row stride, and the column of its buffer it starts at.
    lda: usize,
    a_off: usize,
    /// `out` and `pre`: row stride, and the column of their buffers they start at.
    ldc: usize,
    c_off: usize,
    minus: bool,
    bias: bool,
    add: Option<Add>,
    pre: bool,
    out: Out,
    act: GemmAct,
    /// Launched with a split-k workspace (`gemm_ws`), so that few tiles split along k.
    ws: bool,
    /// A launch forced instead of the launcher's choice (`gemm_as`): every tile shape is tested.
    force: Option<GemmLaunch>,
}

/// a·wᵀ + bias into a contiguous f16 output.
const fn case(m: usize, n: usize, k: usize) -> Case {
    Case {
        m,
        n,
        k,
        lda: k,
        a_off: 0,
        ldc: n,
        c_off: 0,
        minus: false,
        bias: true,
        add: None,
        pre: false,
        out: Out::F16,
        act: GemmAct::None,
        ws: false,
        force: None,
    }
}

/// Every operand, strided and offset, GELU, at a shape of several tiles of every kind.
const fn forced(tile: GemmTile, splits: usize) -> Case {
    Case {
        lda: 1016,
        a_off: 8,
        ldc: 170,
        c_off: 20,
        minus: true,
        add: add(151, 77, 1),
        pre: true,
        act: GemmAct::GeluTanh,
        ws: splits > 1,
        force: Some(GemmLaunch { tile, splits }),
        ..case(200, 150, 1000)
    }
}

const fn add(ld: usize, rows: usize, off: usize) -> Option<Add> {
    Some(Add { ld, rows, off })
}

const CASES: &[(&str, Case)] = &[
    ("one tile, two k steps", case(64, 64, 64)),
    ("partial tiles in m, n, k; k % 8 ≠ 0 (element-wise loads)", case(100, 70, 50)),
    ("f32 out", Case { out: Out::F32, ..case(100, 72, 48) }),
    ("no bias", Case { bias: false, ..case(65, 129, 40) }),
    ("a single row", case(1, 3, 5)),
    ("a_minus, 16-byte loads, 3 k steps", Case { minus: true, ..case(130, 96, 96) }),
    ("a_minus, element-wise (k % 8 ≠ 0)", Case { minus: true, ..case(70, 40, 37) }),
    ("a_minus, element-wise (lda % 8 ≠ 0)", Case { minus: true, lda: 67, ..case(70, 40, 64) }),
    ("add wrapping every 16 rows (positional embedding)", Case { add: add(80, 16, 0), ..case(130, 80, 48) }),
    ("add with a stride, at column 5", Case { add: add(101, 90, 5), ..case(90, 72, 32) }),
    ("out at column n of an (m, 3n) buffer (a qkv group)", Case { ldc: 216, c_off: 72, ..case(100, 72, 64) }),
    ("a at column 24 of a (m, 128) buffer (16-byte loads)", Case { lda: 128, a_off: 24, ..case(70, 50, 64) }),
    ("a at column 3 of a (m, 101) buffer (element-wise)", Case { lda: 101, a_off: 3, ..case(70, 50, 64) }),
    ("pre + GELU", Case { pre: true, act: GemmAct::GeluTanh, ..case(100, 70, 64) }),
    ("pre + SiLU", Case { pre: true, act: GemmAct::Silu, ..case(100, 70, 64) }),
    ("GELU, f32 out", Case { act: GemmAct::GeluTanh, out: Out::F32, ..case(64, 64, 40) }),
    (
        "m=37 n=45 k=70: every operand, SiLU, element-wise loads",
        Case { minus: true, add: add(45, 37, 0), pre: true, act: GemmAct::Silu, ..case(37, 45, 70) },
    ),
    (
        "m=37 n=45 k=72: every operand, GELU, 16-byte loads",
        Case { minus: true, add: add(45, 37, 0), pre: true, act: GemmAct::GeluTanh, ..case(37, 45, 72) },
    ),
    (
        "everything strided and offset, f16 out, GELU",
        Case {
            lda: 136,
            a_off: 8,
            ldc: 150,
            c_off: 70,
            minus: true,
            add: add(77, 20, 3),
            pre: true,
            act: GemmAct::GeluTanh,
            ..case(100, 70, 120)
        },
    ),
    (
        "everything strided and offset, f32 out, SiLU, element-wise",
        Case {
            lda: 99,
            a_off: 1,
            ldc: 90,
            c_off: 13,
            minus: true,
            add: add(70, 7, 0),
            pre: true,
            out: Out::F32,
            act: GemmAct::Silu,
            ..case(66, 70, 90)
        },
    ),
    ("DiT-XL hidden size as k, a_minus", Case { minus: true, ..case(48, 80, 1152) }),
    // Many tiles, partial in m, n and k: k ≤ 256 picks 64×64 tiles with 32-wide k steps.
    ("many tiles, short k", case(1100, 1900, 40)),
    // k > 256 and ≥ 200 tiles of 128×64 (9 × 24 = 216): the launcher picks 128×64.
    ("128×64 tiles by the rule", Case { pre: true, act: GemmAct::GeluTanh, ..case(1100, 1500, 300) }),
    (
        "many tiles, every operand, strided, GELU",
        Case {
            lda: 104,
            a_off: 8,
            ldc: 1930,
            c_off: 30,
            minus: true,
            add: add(1901, 50, 1),
            pre: true,
            act: GemmAct::GeluTanh,
            ..case(1090, 1890, 96)
        },
    ),
    ("many tiles, element-wise loads, f32 out", Case { out: Out::F32, minus: true, ..case(1030, 2000, 35) }),
    // Split along k (few tiles, long k, a workspace): partial sums reduced in order, then the
    // epilogue in the reduction kernel.
    ("split k: icc down projection shape", Case { minus: true, bias: false, ws: true, ..case(96, 128, 1152) }),
    (
        "split k: every operand, SiLU, f32 out",
        Case {
            minus: true,
            add: add(70, 33, 0),
            pre: true,
            out: Out::F32,
            act: GemmAct::Silu,
            ws: true,
            ..case(100, 70, 1000)
        },
    ),
    (
        "split k: k % 8 ≠ 0 (element-wise), strided, GELU",
        Case {
            lda: 610,
            a_off: 3,
            ldc: 77,
            c_off: 5,
            minus: true,
            pre: true,
            act: GemmAct::GeluTanh,
            ws: true,
            ..case(65, 70, 601)
        },
    ),
    ("split k: k = 4608 (fc2)", Case { ws: true, ..case(64, 48, 4608) }),
    ("workspace given, no split (k too short)", Case { ws: true, ..case(64, 64, 300) }),
    ("forced 64×64 k64", forced(GemmTile::Small, 1)),
    ("forced 128×128", forced(GemmTile::Large, 1)),
    ("forced 128×64", forced(GemmTile::Tall, 1)),
    ("forced 64×64 k32", forced(GemmTile::Small32, 1)),
    ("forced 64×64 k32, 2 stages", forced(GemmTile::Classic, 1)),
    ("forced 64×64 k32, split 4", forced(GemmTile::Small32, 4)),
    ("forced 128×64, split 3", forced(GemmTile::Tall, 3)),
];

/// A (rows, width) matrix at column `off` of a buffer of `rows` rows of `ld` elements; its
/// device slice starts at `off` and spans `(rows − 1)·ld + width` elements.
#[derive(Clone, Copy)]
struct Layout {
    rows: usize,
    width: usize,
    ld: usize,
    off: usize,
}

impl Layout {
    fn buf_len(self) -> usize {
        self.rows * self.ld
    }
    fn span(self) -> usize {
        (self.rows - 1) * self.ld + self.width
    }
    fn inside(self, i: usize) -> bool {
        (self.off..self.off + self.width).contains(&(i % self.ld))
    }
    /// The matrix's values (row-major, contiguous) in a buffer of NaN.
    fn place(self, vals: &[f16]) -> Vec<f16> {
        let mut buf = vec![f16::NAN; self.buf_len()];
        for (r, row) in vals.chunks(self.width).enumerate() {
            buf[r * self.ld + self.off..][..self.width].copy_from_slice(row);
        }
        buf
    }
    /// The matrix from its buffer, asserting the rest of the buffer still holds NaN bits.
    fn extract<T: bytemuck::Pod>(self, what: &str, buf: &[T]) -> Vec<T> {
        for (i, v) in buf.iter().enumerate().filter(|&(i, _)| !self.inside(i)) {
            assert!(bytemuck::bytes_of(v).iter().all(|&b| b == 0xff), "{what}: element {i} outside was written");
        }
        (0..self.rows).flat_map(|r| buf[r * self.ld + self.off..][..self.width].to_vec()).collect()
    }
}

impl Case {
    fn a(&self) -> Layout {
        Layout { rows: self.m, width: self.k, ld: self.lda, off: self.a_off }
    }
    fn c(&self) -> Layout {
        Layout { rows: self.m, width: self.n, ld: self.ldc, off: self.c_off }
    }
    fn add_layout(&self) -> Option<Layout> {
        self.add.map(|a| Layout { rows: a.rows, width: self.n, ld: a.ld, off: a.off })
    }
}

/// The logical operands, row-major and contiguous.
struct Data {
    a: Vec<f16>,
    a_minus: Vec<f16>,
    w: Vec<f16>,
    bias: Vec<f16>,
    add: Vec<f16>,
}

impl Data {
    fn new(c: &Case, rng: &mut Rng, ints: bool) -> Data {
        let mut gen = |n: usize, r: i64| if ints { rng.ints(n, r) } else { rng.f16s(n, 1.0) };
        let add_len = c.add.map_or(0, |a| a.rows * c.n);
        Data {
            a: gen(c.m * c.k, 2),
            a_minus: gen(if c.minus { c.m * c.k } else { 0 }, 2),
            w: gen(c.n * c.k, 2),
            bias: gen(if c.bias { c.n } else { 0 }, 4),
            add: gen(add_len, 4),
        }
    }
}

/// Exact v = a'·wᵀ + bias + add and S = Σ|a'·w| + |bias| + |add| per output element, with
/// a' = f16(a − a_minus) correctly rounded (as the kernel forms it: an f32 difference of two
/// f16 values rounded to f16 is the correctly rounded difference, since 24 ≥ 2·11 + 2).
fn reference(c: &Case, d: &Data) -> (Vec<f64>, Vec<f64>) {
    let a: Vec<f64> = if c.minus {
        d.a.iter().zip(&d.a_minus).map(|(x, y)| f16_rne(x.to_f64() - y.to_f64()).to_f64()).collect()
    } else {
        f64s(&d.a)
    };
    let (w, bias, add) = (f64s(&d.w), f64s(&d.bias), f64s(&d.add));
    let (mut v, mut mag) = (vec![0.0; c.m * c.n], vec![0.0; c.m * c.n]);
    for i in 0..c.m {
        let ar = &a[i * c.k..][..c.k];
        for j in 0..c.n {
            let (mut e, mut s) = (0.0, 0.0);
            for (x, y) in ar.iter().zip(&w[j * c.k..][..c.k]) {
                e += x * y;
                s += (x * y).abs();
            }
            for t in [bias.get(j), c.add.and_then(|ad| add.get((i % ad.rows) * c.n + j))].into_iter().flatten() {
                e += t;
                s += t.abs();
            }
            v[i * c.n + j] = e;
            mag[i * c.n + j] = s;
        }
    }
    (v, mag)
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

fn activate(act: GemmAct, x: f64) -> f64 {
    match act {
        GemmAct::None => x,
        GemmAct::GeluTanh => gelu(x),
        GemmAct::Silu => x / (1.0 + (-x).exp()),
    }
}

/// The bound of the header for an output y = act(v) with S = `s`, rounded to f16 or not.
fn bound(c: &Case, act: GemmAct, out: Out, v: f64, s: f64) -> f64 {
    let acc = 2.0 * (c.k as f64 + 3.0) * U32 * s;
    let y = activate(act, v);
    let f32_err = match act {
        GemmAct::None => acc,
        GemmAct::GeluTanh => 1.13 * acc + 8.0 * U32 * (v.abs() + y.abs()),
        GemmAct::Silu => 1.10 * acc + 8.0 * U32 * y.abs(),
    };
    match out {
        Out::F16 => U16 * y.abs() + F16_TINY + (1.0 + U16) * f32_err,
        Out::F32 => f32_err + 1e-30,
    }
}

struct Bufs {
    a: Guarded,
    a_minus: Guarded,
    w: Guarded,
    bias: Guarded,
    add: Guarded,
    out16: Guarded,
    out32: Guarded,
    pre: Guarded,
    ws: Guarded,
}

impl Bufs {
    fn new(plan: &mut Plan, c: &Case) -> Bufs {
        let (a, out) = (c.a().buf_len(), c.c().buf_len());
        Bufs {
            a: gpu_common::add(plan, "a", a, Dt::F16),
            a_minus: gpu_common::add(plan, "a_minus", a, Dt::F16),
            w: gpu_common::add(plan, "w", c.n * c.k, Dt::F16),
            bias: gpu_common::add(plan, "bias", c.n, Dt::F16),
            add: gpu_common::add(plan, "add", c.add_layout().map_or(1, |l| l.buf_len()), Dt::F16),
            out16: gpu_common::add(plan, "out16", out, Dt::F16),
            out32: gpu_common::add(plan, "out32", out, Dt::F32),
            pre: gpu_common::add(plan, "pre", out, Dt::F16),
            ws: gpu_common::add(plan, "ws", if c.ws { launch::SPLIT_WORKSPACE_ELEMS } else { 1 }, Dt::F32),
        }
    }
}

/// The kernel's outputs: `out` as f32 (exact for f16), `pre` if requested.
struct Got {
    out: Vec<f32>,
    pre: Option<Vec<f16>>,
}

fn run<D: Device>(dev: &D, plan: &Plan, b: &Bufs, c: &Case, d: &Data) -> Got {
    let (la, lc) = (c.a(), c.c());
    let strided = |s: DevSlice<f16>, l: Layout| s.sub(l.off, l.span()).unwrap();
    let a = strided(put(dev, plan, b.a, &la.place(&d.a)), la);
    let a_minus = c.minus.then(|| strided(put(dev, plan, b.a_minus, &la.place(&d.a_minus)), la));
    let w = put(dev, plan, b.w, &d.w);
    let bias = c.bias.then(|| put(dev, plan, b.bias, &d.bias));
    let add = c.add_layout().map(|l| {
        let s = strided(put(dev, plan, b.add, &l.place(&d.add)), l);
        (s, l.ld as i32, l.rows as i32)
    });
    let o16: DevSlice<f16> = out(dev, plan, b.out16);
    let o32: DevSlice<f32> = out(dev, plan, b.out32);
    let pre: DevSlice<f16> = out(dev, plan, b.pre);
    let o = match c.out {
        Out::F16 => GemmOut::F16(strided(o16, lc)),
        Out::F32 => {
            let s = o32.sub(lc.off, lc.span()).unwrap();
            GemmOut::F32(s)
        }
    };
    let spec = GemmSpec {
        pre: c.pre.then(|| strided(pre, lc)),
        a_minus,
        bias,
        add,
        lda: c.lda as i32,
        ldc: c.ldc as i32,
        act: c.act,
        ..GemmSpec::new(o, a, w, c.m as i32, c.n as i32, c.k as i32)
    };
    let ws: DevSlice<f32> = out(dev, plan, b.ws);
    let (tile, splits) = match c.force {
        Some(h) => (h.tile, h.splits),
        None => launch::gemm_choice_on(dev, &spec, if c.ws { ws.len() } else { 0 }),
    };
    match (c.force, c.ws) {
        (Some(h), _) => launch::gemm_as(dev, &spec, c.ws.then_some(ws), h).unwrap(),
        (None, true) => launch::gemm_ws(dev, &spec, Some(ws)).unwrap(),
        (None, false) => launch::gemm(dev, &spec).unwrap(),
    }
    // The workspace holds partial sums exactly when the launcher split k.
    let ws_used = get::<f32, _>(dev, plan, b.ws).iter().take(c.m * c.n).filter(|v| !v.is_nan()).count();
    assert_eq!(ws_used > 0, splits > 1, "{splits} k slices, {ws_used} workspace elements written");
    println!("  {}×{}×{}: {} tiles, {splits} k slice(s)", c.m, c.n, c.k, tile.name());
    let out = match c.out {
        Out::F16 => lc.extract("out", &get::<f16, _>(dev, plan, b.out16)).iter().map(|h| h.to_f32()).collect(),
        Out::F32 => lc.extract("out", &get::<f32, _>(dev, plan, b.out32)),
    };
    let pre_all = get::<f16, _>(dev, plan, b.pre);
    let pre = if c.pre {
        Some(lc.extract("pre", &pre_all))
    } else {
        assert!(pre_all.iter().all(|h| h.to_bits() == 0xffff), "pre was written though not requested");
        None
    };
    Got { out, pre }
}

/// Runs one case on integer data (exact where defined) and on uniform data (bounded).
fn check_case<D: Device>(open: &impl Fn(&Plan) -> Option<D>, name: &str, c: &Case, seed: u64, uniform: bool) {
    let mut plan = Plan::new("gemm test");
    let bufs = Bufs::new(&mut plan, c);
    let Some(dev) = open(&plan) else { return };
    let mut rng = Rng::new(seed);
    let kinds: &[bool] = if uniform { &[true, false] } else { &[true] };
    for &ints in kinds {
        let tag = format!("{name} ({}, {})", if ints { "integers" } else { "uniform" }, dev.name());
        let data = Data::new(c, &mut rng, ints);
        let (v, mag) = reference(c, &data);
        let start = Instant::now();
        let got = run(&dev, &plan, &bufs, c, &data);
        let secs = start.elapsed().as_secs_f64();
        assert_nontrivial(&tag, &v);

        if let Some(pre) = &got.pre {
            if ints {
                let expected: Vec<f16> = v.iter().map(|&x| f16_rne(x)).collect();
                assert_bits_eq(&format!("{tag} pre"), pre, &expected);
            } else {
                let pre: Vec<f32> = pre.iter().map(|h| h.to_f32()).collect();
                assert_within(&format!("{tag} pre"), &pre, &v, |i| bound(c, GemmAct::None, Out::F16, v[i], mag[i]));
            }
        }
        if ints && c.act == GemmAct::None {
            let expected: Vec<f32> = match c.out {
                Out::F32 => v.iter().map(|&x| x as f32).collect(),
                Out::F16 => v.iter().map(|&x| f16_rne(x).to_f32()).collect(),
            };
            let bad: Vec<usize> = (0..v.len()).filter(|&i| got.out[i].to_bits() != expected[i].to_bits()).collect();
            for &i in bad.iter().take(8) {
                eprintln!("  [{}, {}] got {} expected {}", i / c.n, i % c.n, got.out[i], expected[i]);
            }
            assert!(bad.is_empty(), "{tag} out: {} of {} elements differ", bad.len(), v.len());
            println!("{tag} out: exact, {secs:.3} s");
        } else {
            let y: Vec<f64> = v.iter().map(|&x| activate(c.act, x)).collect();
            assert_within(&format!("{tag} out, {secs:.3} s"), &got.out, &y, |i| bound(c, c.act, c.out, v[i], mag[i]));
        }
    }
}

fn check_cases<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for (i, (name, c)) in CASES.iter().enumerate() {
        check_case(&open, name, c, 1000 + i as u64, true);
    }
}

#[test]
fn gemm_fused_emulated() {
    // The emulation models an sm_90 GPU: the GEMMs the Hopper kernel takes run on it.
    check_cases(emu);
}

#[test]
fn gemm_fused_emulated_without_hopper() {
    // The same cases on gemm.cu's kernels only (an sm_80/sm_89 GPU, or ICDIT_GEMM=wmma).
    check_cases(|plan: &Plan| {
        let dev = emu(plan)?;
        dev.disable_gemm_sm90();
        Some(dev)
    });
}

#[cfg(feature = "cuda")]
#[test]
fn gemm_fused_cuda() {
    check_cases(cuda("gemm_fused_cuda"));
}

/// A DiT-XL/2 shape (256 tokens = one image, hidden size 1152) with every operand: integer
/// data, so `pre` is exact and the GELU output bounded.
const XL: Case =
    Case { minus: true, add: add(1152, 256, 0), pre: true, act: GemmAct::GeluTanh, ..case(256, 1152, 1152) };

#[test]
fn gemm_fused_xl_shape_emulated() {
    check_case(&emu, "DiT-XL/2 256×1152×1152", &XL, 7, false);
}

#[cfg(feature = "cuda")]
#[test]
fn gemm_fused_xl_shape_cuda() {
    check_case(&cuda("gemm_fused_xl_shape_cuda"), "DiT-XL/2 256×1152×1152", &XL, 7, false);
}

/// out = a − a_minus through an identity weight, in f32: each output is one product by 1, so
/// it must equal f16(a − a_minus) correctly rounded, to the bit. The operands have random
/// exponents, so most differences round. Through the 16-byte path (k = 64: the Hopper kernel's
/// subtraction in shared memory where it runs, gemm.cu's on its fragments otherwise) and the
/// element-wise one (k = 61).
fn a_minus_rounding<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for k in [64, 61] {
        let m = 70;
        let mut plan = Plan::new("a_minus rounding");
        let (ba, bm, bw, bo) = (
            gpu_common::add(&mut plan, "a", m * k, Dt::F16),
            gpu_common::add(&mut plan, "a_minus", m * k, Dt::F16),
            gpu_common::add(&mut plan, "w", k * k, Dt::F16),
            gpu_common::add(&mut plan, "out", m * k, Dt::F32),
        );
        let Some(dev) = open(&plan) else { return };
        let mut rng = Rng::new(k as u64);
        let mut scaled = |n: usize| -> Vec<f16> {
            (0..n).map(|_| f16_rne(rng.uniform() * 2f64.powi(-((rng.next_u64() % 14) as i32)))).collect()
        };
        let (a, am) = (scaled(m * k), scaled(m * k));
        let eye: Vec<f16> = (0..k * k).map(|i| f16::from_f32((i / k == i % k) as u8 as f32)).collect();
        let o: DevSlice<f32> = out(&dev, &plan, bo);
        let spec = GemmSpec {
            a_minus: Some(put(&dev, &plan, bm, &am)),
            ..GemmSpec::new(
                GemmOut::F32(o),
                put(&dev, &plan, ba, &a),
                put(&dev, &plan, bw, &eye),
                m as i32,
                k as i32,
                k as i32,
            )
        };
        launch::gemm(&dev, &spec).unwrap();
        let exact: Vec<f64> = a.iter().zip(&am).map(|(x, y)| x.to_f64() - y.to_f64()).collect();
        let expected: Vec<f16> = exact.iter().map(|&d| f16_rne(d)).collect();
        let rounded = (0..exact.len()).filter(|&i| expected[i].to_f64() != exact[i]).count();
        assert!(rounded > m * k / 4, "only {rounded} differences need rounding");
        // Each f32 output must be exactly an f16 value, so converting it to f16 loses nothing.
        let got32 = get::<f32, _>(&dev, &plan, bo);
        let got: Vec<f16> = got32.iter().map(|&x| f16::from_f32(x)).collect();
        assert!(got32.iter().zip(&got).all(|(&x, h)| h.to_f32() == x), "k={k}: an output is not an f16 value");
        assert_bits_eq(&format!("a − a_minus, k={k} ({})", dev.name()), &got, &expected);
        println!("a − a_minus, k={k} ({}): exact ({rounded} of {} differences rounded)", dev.name(), exact.len());
    }
}

#[test]
fn a_minus_rounded_once_emulated() {
    a_minus_rounding(emu);
    // gemm.cu's kernels only (the emulation models an sm_90 GPU: k = 64 ran on the Hopper
    // kernel above).
    a_minus_rounding(|plan: &Plan| {
        let dev = emu(plan)?;
        dev.disable_gemm_sm90();
        Some(dev)
    });
}

#[cfg(feature = "cuda")]
#[test]
fn a_minus_rounded_once_cuda() {
    a_minus_rounding(cuda("a_minus_rounded_once_cuda"));
}

/// Every malformed spec comes back as an error, and none of them reaches the kernel.
fn rejections<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    let (m, n, k) = (10usize, 20usize, 16usize);
    let mut plan = Plan::new("gemm rejections");
    let (ba, bw, bb, bad_, bo, bo32) = (
        gpu_common::add(&mut plan, "a", m * k, Dt::F16),
        gpu_common::add(&mut plan, "w", n * k, Dt::F16),
        gpu_common::add(&mut plan, "bias", n, Dt::F16),
        gpu_common::add(&mut plan, "add", m * n, Dt::F16),
        gpu_common::add(&mut plan, "out", m * n, Dt::F16),
        gpu_common::add(&mut plan, "out32", m * n, Dt::F32),
    );
    let Some(dev) = open(&plan) else { return };
    let mut rng = Rng::new(3);
    let a = put(&dev, &plan, ba, &rng.ints(m * k, 2));
    let w = put(&dev, &plan, bw, &rng.ints(n * k, 2));
    let bias = put(&dev, &plan, bb, &rng.ints(n, 4));
    let addm = put(&dev, &plan, bad_, &rng.ints(m * n, 4));
    let o: DevSlice<f16> = out(&dev, &plan, bo);
    let o32: DevSlice<f32> = out(&dev, &plan, bo32);
    let (mi, ni, ki) = (m as i32, n as i32, k as i32);
    let good =
        GemmSpec { bias: Some(bias), add: Some((addm, ni, mi)), ..GemmSpec::new(GemmOut::F16(o), a, w, mi, ni, ki) };
    let short = |s: DevSlice<f16>| s.sub(0, s.len() - 1).unwrap();
    let cases: Vec<(&str, GemmSpec)> = vec![
        ("m = 0", GemmSpec { m: 0, ..good }),
        ("n < 0", GemmSpec { n: -1, ..good }),
        ("k = 0", GemmSpec { k: 0, ..good }),
        ("lda < k", GemmSpec { lda: ki - 1, ..good }),
        ("ldc < n", GemmSpec { ldc: ni - 1, ..good }),
        ("add stride < n", GemmSpec { add: Some((addm, ni - 1, mi)), ..good }),
        ("add rows = 0", GemmSpec { add: Some((addm, ni, 0)), ..good }),
        ("a one element short", GemmSpec { a: short(a), ..good }),
        ("a short for lda = k + 1", GemmSpec { lda: ki + 1, ..good }),
        ("a_minus short", GemmSpec { a_minus: Some(short(a)), ..good }),
        ("w short", GemmSpec { w: short(w), ..good }),
        ("bias short", GemmSpec { bias: Some(short(bias)), ..good }),
        ("out short", GemmSpec { out: GemmOut::F16(short(o)), ..good }),
        ("f32 out short", GemmSpec { out: GemmOut::F32(o32.sub(0, m * n - 1).unwrap()), ..good }),
        ("out short for ldc = n + 1", GemmSpec { ldc: ni + 1, ..good }),
        ("pre short", GemmSpec { pre: Some(short(addm)), ..good }),
        ("add short", GemmSpec { add: Some((short(addm), ni, mi)), ..good }),
        ("add short for 3 wrapping rows", GemmSpec { add: Some((addm.sub(0, 3 * n - 1).unwrap(), ni, 3)), ..good }),
        ("more than 65535 row tiles", GemmSpec { m: 65536 * 64, ..good }),
        ("n near i32::MAX", GemmSpec { n: i32::MAX - 1, ldc: i32::MAX, add: None, ..good }),
    ];
    for (what, spec) in &cases {
        match launch::gemm(&dev, spec) {
            Ok(()) => panic!("{what}: accepted"),
            Err(e) => println!("{what}: {e}"),
        }
    }
    let untouched = get::<f16, _>(&dev, &plan, bo);
    assert!(untouched.iter().all(|h| h.to_bits() == 0xffff), "a rejected launch wrote the output");
    // The same operands, well formed, run (including add with 3 wrapping rows, exactly covered).
    let wrap = GemmSpec { add: Some((addm.sub(0, 3 * n).unwrap(), ni, 3)), ..good };
    launch::gemm(&dev, &good).unwrap();
    launch::gemm(&dev, &wrap).unwrap();
}

#[test]
fn gemm_rejections_emulated() {
    rejections(emu);
}

#[cfg(feature = "cuda")]
#[test]
fn gemm_rejections_cuda() {
    rejections(cuda("gemm_rejections_cuda"));
}

/// The speed bar of the emulation (issue 6): a 512×1152×1152 f16 GEMM in under 10 s on two
/// cores. Checked for exactness with integer data. Ignored by default (about 2 s of emulation
/// plus the reference); run with `cargo test --release --test gpu_gemm -- --ignored`.
#[test]
#[ignore]
fn emulated_gemm_512x1152x1152_under_10s() {
    let c = case(512, 1152, 1152);
    let mut plan = Plan::new("gemm speed");
    let bufs = Bufs::new(&mut plan, &c);
    let data = Data::new(&c, &mut Rng::new(1), true);
    let (exact, _) = reference(&c, &data);
    // The launcher's own choice on the emulation (the Hopper kernel), then gemm.cu's.
    for hopper in [true, false] {
        let dev = emu(&plan).unwrap();
        if !hopper {
            dev.disable_gemm_sm90();
        }
        let start = Instant::now();
        let got = run(&dev, &plan, &bufs, &c, &data);
        let secs = start.elapsed().as_secs_f64();
        let kernel = if hopper { "gemm_sm90_f16_128x128_k64" } else { "gemm_fused_f16_64x64_k64" };
        println!("emulated {kernel} (bias) 512×1152×1152 on {}: {secs:.2} s (with copies)", dev.name());
        let bad = (0..got.out.len()).filter(|&i| got.out[i] != f16_rne(exact[i]).to_f32()).count();
        assert_eq!(bad, 0, "{kernel}: {bad} elements differ from the exact result");
        assert!(secs < 10.0, "{kernel} took {secs:.2} s, the bar is 10 s");
    }
}

/// A second weight (`GemmSpec::also`, icc's t_s = down·x_s kept by a full step's linear): its
/// columns come out as raw f32 sums — no bias, add or activation — into their own output, while
/// the first weight's columns get the full epilogue; with and without split-k, through the
/// paired (even n) and element-wise (odd n) epilogues, a − a_minus included. Small integers:
/// every value exact.
fn second_weight<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for (n, n2, splits, minus) in
        [(50usize, 24usize, 1usize, false), (50, 24, 3, false), (49, 20, 1, true), (49, 20, 2, false)]
    {
        let (m, k) = (37usize, 96usize);
        let mut plan = Plan::new("gemm second weight");
        let (ba, bm, bw, bw2, bb, bad_, bo, bo2, bws) = (
            gpu_common::add(&mut plan, "a", m * k, Dt::F16),
            gpu_common::add(&mut plan, "a_minus", m * k, Dt::F16),
            gpu_common::add(&mut plan, "w", n * k, Dt::F16),
            gpu_common::add(&mut plan, "w2", n2 * k, Dt::F16),
            gpu_common::add(&mut plan, "bias", n, Dt::F16),
            gpu_common::add(&mut plan, "add", m * n, Dt::F16),
            gpu_common::add(&mut plan, "out", m * n, Dt::F16),
            gpu_common::add(&mut plan, "out2", m * n2, Dt::F32),
            gpu_common::add(&mut plan, "ws", 4 * m * (n + n2), Dt::F32),
        );
        let Some(dev) = open(&plan) else { return };
        let mut rng = Rng::new(21);
        let (a, am, w, w2) = (rng.ints(m * k, 2), rng.ints(m * k, 2), rng.ints(n * k, 2), rng.ints(n2 * k, 2));
        let (bias, addv) = (rng.ints(n, 4), rng.ints(m * n, 4));
        let o2: DevSlice<f32> = out(&dev, &plan, bo2);
        let spec = GemmSpec {
            a_minus: minus.then(|| put(&dev, &plan, bm, &am)),
            bias: Some(put(&dev, &plan, bb, &bias)),
            add: Some((put(&dev, &plan, bad_, &addv), n as i32, m as i32)),
            also: Some(launch::GemmAlso { w: put(&dev, &plan, bw2, &w2), n: n2 as i32, out: o2, ld: n2 as i32 }),
            ..GemmSpec::new(
                GemmOut::F16(out(&dev, &plan, bo)),
                put(&dev, &plan, ba, &a),
                put(&dev, &plan, bw, &w),
                m as i32,
                n as i32,
                k as i32,
            )
        };
        let ws: DevSlice<f32> = out(&dev, &plan, bws);
        let ap = |i: usize, kk: usize| {
            let x = a[i * k + kk].to_f64();
            if minus {
                x - am[i * k + kk].to_f64()
            } else {
                x
            }
        };
        let dot = |i: usize, w: &[f16], j: usize| (0..k).map(|kk| ap(i, kk) * w[j * k + kk].to_f64()).sum::<f64>();
        let exact: Vec<f64> =
            (0..m * n).map(|e| dot(e / n, &w, e % n) + bias[e % n].to_f64() + addv[e].to_f64()).collect();
        let exact2: Vec<f64> = (0..m * n2).map(|e| dot(e / n2, &w2, e % n2)).collect();
        // gemm.cu's kernel, and the Hopper kernel where it takes the GEMM (no a_minus, no split).
        let mut tiles = vec![GemmTile::Small];
        if dev.gemm_sm90() && splits == 1 && launch::sm90_unsupported(&spec).is_none() {
            tiles.push(GemmTile::Sm90);
        }
        for tile in tiles {
            let _: DevSlice<f16> = out(&dev, &plan, bo);
            let _: DevSlice<f32> = out(&dev, &plan, bo2);
            launch::gemm_as(&dev, &spec, Some(ws), GemmLaunch { tile, splits }).unwrap();
            let what = format!(
                "second weight n {n} + {n2}, {} tiles, {splits} k slice(s), a_minus {minus} ({})",
                tile.name(),
                dev.name()
            );
            assert_nontrivial(&what, &exact2);
            assert_bits_eq(
                &what,
                &get::<f16, _>(&dev, &plan, bo),
                &exact.iter().map(|&v| f16_rne(v)).collect::<Vec<_>>(),
            );
            let got2 = get::<f32, _>(&dev, &plan, bo2);
            assert!(got2.iter().zip(&exact2).all(|(&g, &e)| g as f64 == e), "{what}: second output not exact");
            println!("{what}: exact");
        }
    }
}

#[test]
fn gemm_second_weight_emulated() {
    second_weight(emu);
}

#[cfg(feature = "cuda")]
#[test]
fn gemm_second_weight_cuda() {
    second_weight(cuda("gemm_second_weight_cuda"));
}
