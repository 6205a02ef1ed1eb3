//! kernels/gemm.cu (gemm_bias_f16, gemm_bias_gelu_f16, gemm_bias_f32) against an f64
//! reference, at shapes that are and are not multiples of the 64×64×32 tile, through both the
//! 16-byte cp.async path and the element-wise path (K % 8 ≠ 0, or a misaligned `a`).
//!
//! Two kinds of data per shape:
//!   - small integers (entries in [-2, 2], bias in [-4, 4]): every partial sum is an integer
//!     below 2^24, exact in f32 in any order, so the f32 output must equal the reference
//!     exactly and the f16 output must be its correctly rounded value;
//!   - uniform values: each element within the bound below.
//!
//! Error bound of one output element, S = Σ_k |a_k·w_k| + |bias|:
//!   accumulation: products of f16 values are exact in f32; K f32 additions in any order
//!   err ≤ K·u·S (u = 2^-24) to first order. Tensor cores may truncate instead of rounding
//!   (Fasi et al., 2021), doubling u: acc = 2·(K + 2)·u·S.
//!   f16 output: one rounding, U16·|exact| (+ 2^-25 near zero) on top of acc.
//!   GELU: |gelu'| ≤ 1.13 scales acc; its f32 evaluation (tanhf: 2 ulp) adds ≤ 8u·(|x| + |y|).

mod gpu_common;

use gpu_common::*;
use icdit::gpu::{f16, launch, DevSlice, Device};
use icdit::plan::{Dt, Plan};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    F16,
    GeluF16,
    F32,
}

struct Shape {
    m: usize,
    n: usize,
    k: usize,
    /// Start `a` one element past a 16-byte boundary (forces the element-wise load path).
    misaligned_a: bool,
}

const fn s(m: usize, n: usize, k: usize) -> Shape {
    Shape { m, n, k, misaligned_a: false }
}

const SHAPES: &[Shape] = &[
    s(64, 64, 64),   // one tile, two k steps
    s(100, 70, 50),  // partial tiles in m, n and k
    s(130, 200, 37), // K % 8 ≠ 0: element-wise loads
    s(48, 80, 1152), // DiT-XL hidden size as K: 36 k steps through both stages
    s(33, 1152, 72), // N = hidden size, K = head dim
    s(1, 3, 5),      // a single row
    Shape { m: 65, n: 129, k: 40, misaligned_a: true },
];

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// Runs one kernel on one shape; returns the outputs as f32.
fn run<D: Device>(dev: &D, plan: &Plan, bufs: &Bufs, kind: Kind, data: &Data, sh: &Shape) -> Vec<f32> {
    let a_all = put(dev, plan, bufs.a, &data.a_padded);
    let a = a_all.sub(sh.misaligned_a as usize, sh.m * sh.k).unwrap();
    let w = put(dev, plan, bufs.w, &data.w);
    let b = put(dev, plan, bufs.bias, &data.bias);
    let (m, n, k) = (sh.m as i32, sh.n as i32, sh.k as i32);
    match kind {
        Kind::F32 => {
            let o: DevSlice<f32> = out(dev, plan, bufs.out32);
            launch::gemm_bias_f32(dev, o, a, w, b, m, n, k).unwrap();
            get::<f32, _>(dev, plan, bufs.out32)
        }
        Kind::F16 | Kind::GeluF16 => {
            let o: DevSlice<f16> = out(dev, plan, bufs.out16);
            if kind == Kind::F16 {
                launch::gemm_bias_f16(dev, o, a, w, b, m, n, k).unwrap();
            } else {
                launch::gemm_bias_gelu_f16(dev, o, a, w, b, m, n, k).unwrap();
            }
            get::<f16, _>(dev, plan, bufs.out16).iter().map(|h| h.to_f32()).collect()
        }
    }
}

struct Bufs {
    a: Guarded,
    w: Guarded,
    bias: Guarded,
    out16: Guarded,
    out32: Guarded,
}

struct Data {
    a_padded: Vec<f16>,
    w: Vec<f16>,
    bias: Vec<f16>,
}

impl Data {
    fn a(&self, sh: &Shape) -> &[f16] {
        &self.a_padded[sh.misaligned_a as usize..]
    }
}

/// Exact a·wᵀ + bias and S = Σ|a·w| + |bias| per output element, in f64.
fn reference(data: &Data, sh: &Shape) -> (Vec<f64>, Vec<f64>) {
    let (a, w, bias) = (f64s(data.a(sh)), f64s(&data.w), f64s(&data.bias));
    let mut exact = vec![0.0; sh.m * sh.n];
    let mut mag = vec![0.0; sh.m * sh.n];
    for i in 0..sh.m {
        for j in 0..sh.n {
            let (ar, wr) = (&a[i * sh.k..(i + 1) * sh.k], &w[j * sh.k..(j + 1) * sh.k]);
            let (mut e, mut s) = (bias[j], bias[j].abs());
            for (x, y) in ar.iter().zip(wr) {
                e += x * y;
                s += (x * y).abs();
            }
            exact[i * sh.n + j] = e;
            mag[i * sh.n + j] = s;
        }
    }
    (exact, mag)
}

fn check_shapes<D: Device>(open: impl Fn(&Plan) -> Option<D>, kinds: &[Kind]) {
    for sh in SHAPES {
        let mut plan = Plan::new("gemm test");
        let bufs = Bufs {
            a: add(&mut plan, "a", sh.m * sh.k + sh.misaligned_a as usize, Dt::F16),
            w: add(&mut plan, "w", sh.n * sh.k, Dt::F16),
            bias: add(&mut plan, "bias", sh.n, Dt::F16),
            out16: add(&mut plan, "out16", sh.m * sh.n, Dt::F16),
            out32: add(&mut plan, "out32", sh.m * sh.n, Dt::F32),
        };
        let Some(dev) = open(&plan) else { return };
        let mut rng = Rng::new((sh.m * 1_000_003 + sh.n * 1009 + sh.k) as u64);
        let na = sh.m * sh.k + sh.misaligned_a as usize;
        let tag = |kind: Kind, what: &str| {
            format!(
                "{kind:?} m={} n={} k={}{} {what} ({})",
                sh.m,
                sh.n,
                sh.k,
                if sh.misaligned_a { " misaligned a" } else { "" },
                dev.name()
            )
        };

        // Small integers: exact results.
        let ints = Data { a_padded: rng.ints(na, 2), w: rng.ints(sh.n * sh.k, 2), bias: rng.ints(sh.n, 4) };
        let (exact, _) = reference(&ints, sh);
        assert_nontrivial(&tag(Kind::F32, "integers"), &exact);
        for &kind in kinds.iter().filter(|&&k| k != Kind::GeluF16) {
            let got = run(&dev, &plan, &bufs, kind, &ints, sh);
            let expected: Vec<f32> = match kind {
                Kind::F32 => exact.iter().map(|&e| e as f32).collect(),
                _ => exact.iter().map(|&e| f16_rne(e).to_f32()).collect(),
            };
            let bad = (0..got.len()).filter(|&i| got[i].to_bits() != expected[i].to_bits()).collect::<Vec<_>>();
            for &i in bad.iter().take(8) {
                eprintln!("  [{}, {}] got {} expected {}", i / sh.n, i % sh.n, got[i], expected[i]);
            }
            assert!(bad.is_empty(), "{}: {} of {} elements differ", tag(kind, "integers"), bad.len(), got.len());
        }

        // Uniform values: within the error bound.
        let vals = Data { a_padded: rng.f16s(na, 1.0), w: rng.f16s(sh.n * sh.k, 1.0), bias: rng.f16s(sh.n, 1.0) };
        let (pre, mag) = reference(&vals, sh);
        for &kind in kinds {
            let got = run(&dev, &plan, &bufs, kind, &vals, sh);
            let acc = |i: usize| 2.0 * (sh.k as f64 + 2.0) * U32 * mag[i];
            let (exact, bound): (Vec<f64>, Box<dyn Fn(usize) -> f64>) = match kind {
                Kind::F32 => (pre.clone(), Box::new(move |i| acc(i) + 1e-30)),
                Kind::F16 => {
                    let e = pre.clone();
                    (pre.clone(), Box::new(move |i| U16 * e[i].abs() + F16_TINY + (1.0 + U16) * acc(i)))
                }
                Kind::GeluF16 => {
                    let e: Vec<f64> = pre.iter().map(|&x| gelu(x)).collect();
                    let (e2, p) = (e.clone(), pre.clone());
                    (
                        e,
                        Box::new(move |i| {
                            let f32_err = 1.13 * acc(i) + 8.0 * U32 * (p[i].abs() + e2[i].abs());
                            U16 * e2[i].abs() + F16_TINY + (1.0 + U16) * f32_err
                        }),
                    )
                }
            };
            assert_within(&tag(kind, "uniform"), &got, &exact, bound);
        }
    }
}

const ALL: &[Kind] = &[Kind::F16, Kind::GeluF16, Kind::F32];

#[test]
fn gemm_bias_emulated() {
    check_shapes(emu, ALL);
}

#[cfg(feature = "cuda")]
#[test]
fn gemm_bias_cuda() {
    check_shapes(cuda, ALL);
}

/// The speed bar of the emulation (issue 6): a 512×1152×1152 f16 GEMM in under 10 s on two
/// cores. Checked for exactness with integer data. Ignored by default (about 2 s of emulation
/// plus the reference); run with `cargo test --release --test gpu_gemm -- --ignored`.
#[test]
#[ignore]
fn emulated_gemm_512x1152x1152_under_10s() {
    let sh = s(512, 1152, 1152);
    let mut plan = Plan::new("gemm speed");
    let bufs = Bufs {
        a: add(&mut plan, "a", sh.m * sh.k, Dt::F16),
        w: add(&mut plan, "w", sh.n * sh.k, Dt::F16),
        bias: add(&mut plan, "bias", sh.n, Dt::F16),
        out16: add(&mut plan, "out16", sh.m * sh.n, Dt::F16),
        out32: add(&mut plan, "out32", sh.m * sh.n, Dt::F32),
    };
    let dev = emu(&plan).unwrap();
    let mut rng = Rng::new(1);
    let data = Data { a_padded: rng.ints(sh.m * sh.k, 2), w: rng.ints(sh.n * sh.k, 2), bias: rng.ints(sh.n, 4) };
    let start = std::time::Instant::now();
    let got = run(&dev, &plan, &bufs, Kind::F16, &data, &sh);
    let secs = start.elapsed().as_secs_f64();
    println!("emulated gemm_bias_f16 512×1152×1152 on {}: {secs:.2} s (with copies)", dev.name());
    let (exact, _) = reference(&data, &sh);
    let bad = (0..got.len()).filter(|&i| got[i] != f16_rne(exact[i]).to_f32()).count();
    assert_eq!(bad, 0, "{bad} elements differ from the exact result");
    assert!(secs < 10.0, "took {secs:.2} s, the bar is 10 s");
}
