//! kernels/lowrank.cu (the fused low-rank linear, `launch::lowrank_fused`) against an f64
//! reference on the same f16 inputs: the direct form (a − a_minus) and the folded form (a
//! alone, scale ±1), one and three output groups with different ranks (rounded up to whole
//! fragments inside the kernel), shapes that are not multiples of the 16/32-row blocks, the
//! 32-wide k step or the 64-wide column tiles, strided operands, GELU, every block layout
//! (16 and 32 rows, 1 to 3 column splits — more splits than tiles included), rank 256 (the
//! largest), agreement with the two-GEMM path it replaces, and the launcher's rejections.
//!
//! Data and tolerances as tests/gpu_gemm.rs:
//!   - small integers (a, a_minus, down, up in [-2, 2], add in [-4, 4]), sizes chosen so that t
//!     stays below 2048 (exact in f16) and every partial sum below 2^24 (exact in f32): the
//!     output is the exact value correctly rounded to f16, to the bit;
//!   - uniform values: every element within the bound of the rounding analysis below.
//!
//! Error bound of one output element, v = add + s·Σ_r t_r·up_r with t_r = Σ_k a'_k·down_rk
//! (a' = f16(a − a_minus) exactly as the kernel rounds it; u = 2^-24, U16 = 2^-11):
//!   t in f32: products exact, K additions in any order, tensor cores possibly truncating:
//!   e1_r = 2·(K + 2)·u·S1_r with S1_r = Σ_k |a'_k·down_rk|; then t is rounded to f16:
//!   |t̂_r − t_r| ≤ e1_r + U16·(|t_r| + e1_r) =: e_r.
//!   Phase 2 on t̂: Σ_r |up_r|·e_r from t's error, 2·(R + 3)·u·S2 from its own f32 sums
//!   (S2 = Σ_r |t̂_r·up_r| + |add|); GELU scales that by 1.13 and adds 8u·(|v| + |y|); the
//!   output's f16 rounding adds U16·|y| + 2^-25.

mod gpu_common;

use gpu_common::*;
use icdit::gpu::launch::{self, GemmAct, GemmOut, GemmSpec, GemmTile, LowRankChoice, LowRankSpec};
use icdit::gpu::{f16, DevSlice, Device};
use icdit::plan::{Dt, Plan};

const U16: f64 = 1.0 / 2048.0;

#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    k: usize,
    /// Columns per output group.
    gw: usize,
    ranks: &'static [usize],
    /// Row strides beyond the widths: lda = k + pad_a, ldc = n + pad_c, ld_add = n + pad_add.
    pad_a: usize,
    pad_c: usize,
    pad_add: usize,
    minus: bool,
    /// The projected form: t_s (f32, (m, Σ ranks)) subtracted from the projection.
    t_minus: bool,
    add: bool,
    scale: f32,
    act: GemmAct,
    ints: bool,
}

const BASE: Case = Case {
    m: 37,
    k: 40,
    gw: 72,
    ranks: &[16, 8, 24],
    pad_a: 0,
    pad_c: 0,
    pad_add: 0,
    minus: true,
    t_minus: false,
    add: true,
    scale: 1.0,
    act: GemmAct::None,
    ints: true,
};

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// The kernel's operands of one case, uploaded.
struct Operands {
    plan: Plan,
    a: Vec<f16>,
    am: Vec<f16>,
    down: Vec<f16>,
    ups: Vec<Vec<f16>>,
    add: Vec<f16>,
    /// t_s of the projected form, (m, Σ ranks).
    tm: Vec<f32>,
    bufs: [Guarded; 8],
    tm_buf: Guarded,
}

fn operands(c: &Case, seed: u64) -> Operands {
    let groups = c.ranks.len();
    let n = c.gw * groups;
    let (lda, ld_add) = (c.k + c.pad_a, n + c.pad_add);
    let r_total: usize = c.ranks.iter().sum();
    let mut rng = Rng::new(seed);
    let (a, am, down, add) = if c.ints {
        (rng.ints(c.m * lda, 2), rng.ints(c.m * lda, 2), rng.ints(r_total * c.k, 2), rng.ints(c.m * ld_add, 4))
    } else {
        (rng.f16s(c.m * lda, 1.0), rng.f16s(c.m * lda, 1.0), rng.f16s(r_total * c.k, 0.2), rng.f16s(c.m * ld_add, 1.0))
    };
    let ups: Vec<Vec<f16>> =
        c.ranks.iter().map(|&r| if c.ints { rng.ints(c.gw * r, 2) } else { rng.f16s(c.gw * r, 0.3) }).collect();
    let tm: Vec<f32> = if c.ints {
        rng.ints(c.m * r_total, 8).iter().map(|h| h.to_f32()).collect()
    } else {
        (0..c.m * r_total).map(|_| rng.uniform() as f32 * 2.0).collect()
    };
    let mut plan = Plan::new("lowrank test");
    let ldc = n + c.pad_c;
    let bufs = [
        gpu_common::add(&mut plan, "a", a.len(), Dt::F16),
        gpu_common::add(&mut plan, "a_minus", am.len(), Dt::F16),
        gpu_common::add(&mut plan, "down", down.len().max(1), Dt::F16),
        gpu_common::add(&mut plan, "up0", ups[0].len().max(1), Dt::F16),
        gpu_common::add(&mut plan, "up1", ups.get(1).map_or(1, |u| u.len().max(1)), Dt::F16),
        gpu_common::add(&mut plan, "up2", ups.get(2).map_or(1, |u| u.len().max(1)), Dt::F16),
        gpu_common::add(&mut plan, "add", add.len(), Dt::F16),
        gpu_common::add(&mut plan, "out", c.m * ldc, Dt::F16),
    ];
    let tm_buf = gpu_common::add(&mut plan, "t_s", tm.len().max(1), Dt::F32);
    Operands { plan, a, am, down, ups, add, tm, bufs, tm_buf }
}

/// The exact result and its error bound per output element (see the module doc).
fn reference(c: &Case, o: &Operands) -> (Vec<f64>, Vec<f64>) {
    let groups = c.ranks.len();
    let n = c.gw * groups;
    let (lda, ld_add) = (c.k + c.pad_a, n + c.pad_add);
    let r_total: usize = c.ranks.iter().sum();
    let u = U32;
    let mut exact = vec![0.0; c.m * n];
    let mut bound = vec![0.0; c.m * n];
    let mut r_off = 0;
    for (g, &rank) in c.ranks.iter().enumerate() {
        for i in 0..c.m {
            // t for this row and group, with each element's error bound.
            let mut t = vec![0.0; rank];
            let mut e = vec![0.0; rank];
            for r in 0..rank {
                let (mut s, mut s1) = (0.0, 0.0);
                for kk in 0..c.k {
                    let x = o.a[i * lda + kk].to_f64();
                    let ap = if c.minus { f16_rne(x - o.am[i * lda + kk].to_f64()).to_f64() } else { x };
                    let p = ap * o.down[(r_off + r) * c.k + kk].to_f64();
                    s += p;
                    s1 += p.abs();
                }
                // The projected form subtracts t_s in f32 (one more rounding) before f16.
                let (s, e1) = if c.t_minus {
                    let d = s - o.tm[i * r_total + r_off + r] as f64;
                    (d, 2.0 * (c.k as f64 + 2.0) * u * s1 + u * d.abs())
                } else {
                    (s, 2.0 * (c.k as f64 + 2.0) * u * s1)
                };
                t[r] = s;
                e[r] = e1 + U16 * (s.abs() + e1);
            }
            for j in 0..c.gw {
                let col = g * c.gw + j;
                let addv = if c.add { o.add[i * ld_add + col].to_f64() } else { 0.0 };
                let (mut p, mut s2, mut from_t) = (0.0, addv.abs(), 0.0);
                for r in 0..rank {
                    let w = o.ups[g][j * rank + r].to_f64();
                    p += t[r] * w;
                    s2 += (t[r].abs() + e[r]) * w.abs();
                    from_t += w.abs() * e[r];
                }
                let v = addv + c.scale as f64 * p;
                let acc = from_t + 2.0 * (rank as f64 + 3.0) * u * s2;
                let (y, b) = match c.act {
                    GemmAct::GeluTanh => (gelu(v), 1.13 * acc + 8.0 * u * (v.abs() + gelu(v).abs())),
                    _ => (v, acc),
                };
                exact[i * n + col] = y;
                bound[i * n + col] = b + U16 * y.abs() + 2f64.powi(-25);
            }
        }
        r_off += rank;
    }
    (exact, bound)
}

/// Runs one case under `layout` (None: the launcher's choice) and checks it.
fn check<D: Device>(open: &impl Fn(&Plan) -> Option<D>, what: &str, c: &Case, layout: Option<LowRankChoice>) {
    let o = operands(c, 11);
    let Some(dev) = open(&o.plan) else { return };
    let groups = c.ranks.len();
    let n = c.gw * groups;
    let (lda, ldc, ld_add) = (c.k + c.pad_a, n + c.pad_c, n + c.pad_add);
    let p = &o.plan;
    let [ba, bam, bd, bu0, bu1, bu2, badd, bo] = o.bufs;
    let a = put(&dev, p, ba, &o.a);
    let am = put(&dev, p, bam, &o.am);
    let pad = |v: &[f16]| if v.is_empty() { vec![f16::ZERO] } else { v.to_vec() };
    let down = put(&dev, p, bd, &pad(&o.down));
    let empty: Vec<f16> = Vec::new();
    let up = [
        put(&dev, p, bu0, &pad(&o.ups[0])),
        put(&dev, p, bu1, &pad(o.ups.get(1).unwrap_or(&empty))),
        put(&dev, p, bu2, &pad(o.ups.get(2).unwrap_or(&empty))),
    ];
    let addm = put(&dev, p, badd, &o.add);
    let tm = put(&dev, p, o.tm_buf, &if o.tm.is_empty() { vec![0.0] } else { o.tm.clone() });
    let out_s: DevSlice<f16> = out(&dev, p, bo);
    let mut ranks = [0i32; 3];
    for (g, &r) in c.ranks.iter().enumerate() {
        ranks[g] = r as i32;
    }
    let spec = LowRankSpec {
        out: out_s,
        a,
        a_minus: c.minus.then_some(am),
        down,
        up,
        ranks,
        groups: groups as i32,
        add: c.add.then_some(addm),
        t_minus: c.t_minus.then_some(tm),
        scale: c.scale,
        m: c.m as i32,
        n: n as i32,
        k: c.k as i32,
        lda: lda as i32,
        ldc: ldc as i32,
        ld_add: ld_add as i32,
        act: c.act,
    };
    match layout {
        Some(l) => launch::lowrank_fused_as(&dev, &spec, l).unwrap_or_else(|e| panic!("{what}: {e}")),
        None => launch::lowrank_fused(&dev, &spec).unwrap_or_else(|e| panic!("{what}: {e}")),
    }
    let got_all = get::<f16, _>(&dev, p, bo);
    // Padding columns of the output are never written.
    for i in 0..c.m {
        for j in n..ldc {
            assert_eq!(got_all[i * ldc + j].to_bits(), 0xffff, "{what}: padding ({i}, {j}) was written");
        }
    }
    let got: Vec<f16> = (0..c.m * n).map(|e| got_all[(e / n) * ldc + e % n]).collect();
    let (exact, bound) = reference(c, &o);
    let what = format!("{what} ({}, {layout:?})", dev.name());
    if c.ints && c.act == GemmAct::None {
        let expected: Vec<f16> = exact.iter().map(|&v| f16_rne(v)).collect();
        assert_nontrivial(&what, &exact);
        assert_bits_eq(&what, &got, &expected);
        println!("{what}: exact");
    } else {
        let got32: Vec<f32> = got.iter().map(|h| h.to_f32()).collect();
        assert_within(&what, &got32, &exact, |i| bound[i]);
    }
}

fn layouts() -> Vec<LowRankChoice> {
    let mut v = Vec::new();
    for bm in [16, 32] {
        for col_splits in 1..=3 {
            v.push(LowRankChoice { bm, col_splits });
        }
    }
    v
}

fn cases<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    // q, k and v in one launch, ranks 16, 8, 24 (8 and 24 are not whole fragments), 37 rows,
    // k = 40 (not a multiple of the k step), 72 columns per group (a full and a partial tile),
    // direct form: every layout, to the bit.
    for l in layouts() {
        check(&open, "qkv direct, ints", &BASE, Some(l));
    }
    // Folded form, writing b_s = y_s − up·(down·x_s) (scale −1), strided everything.
    let folded = Case { minus: false, scale: -1.0, pad_a: 8, pad_c: 3, pad_add: 5, ..BASE };
    check(&open, "qkv folded b_s, ints, strided", &folded, None);
    check(&open, "qkv folded b_s, ints, strided", &folded, Some(LowRankChoice { bm: 32, col_splits: 2 }));
    // One group of rank 128 (icc's default), folded use on a calibrated step (scale 1).
    let one = Case { m: 40, k: 96, gw: 200, ranks: &[128], minus: false, ..BASE };
    check(&open, "one group r128 folded, ints", &one, None);
    check(&open, "one group r128 folded, ints", &one, Some(LowRankChoice { bm: 32, col_splits: 3 }));
    // The projected form: y_s + up·(down·x − t_s), t_s in f32.
    let projected = Case { minus: false, t_minus: true, ..BASE };
    for l in [LowRankChoice { bm: 16, col_splits: 2 }, LowRankChoice { bm: 32, col_splits: 1 }] {
        check(&open, "qkv projected, ints", &projected, Some(l));
    }
    check(&open, "qkv projected, uniform", &Case { ints: false, ..projected }, None);
    // Without add (pure product).
    check(&open, "no add, ints", &Case { add: false, ..BASE }, None);
    // Uniform data: the bound. GELU as fc1 of a calibrated step.
    check(&open, "qkv direct, uniform", &Case { ints: false, ..BASE }, None);
    check(
        &open,
        "fc1-like GELU, uniform",
        &Case { ints: false, act: GemmAct::GeluTanh, ranks: &[32], gw: 130, ..BASE },
        None,
    );
    // The largest rank the kernel holds, 32-row blocks.
    let big = Case { m: 20, k: 64, gw: 64, ranks: &[256], ints: false, ..BASE };
    check(&open, "rank 256, uniform", &big, Some(LowRankChoice { bm: 32, col_splits: 1 }));
    check(&open, "rank 256, uniform", &big, Some(LowRankChoice { bm: 16, col_splits: 1 }));
}

#[test]
fn lowrank_fused_emulated() {
    cases(emu);
}

#[cfg(feature = "cuda")]
#[test]
fn lowrank_fused_cuda() {
    cases(cuda("lowrank_fused_cuda"));
}

/// The fused kernel and the two fused GEMMs it replaces (t = (x − x_s)·downᵀ rounded to f16,
/// then y_s + t·upᵀ) agree at a DiT-like shape (256 rows, k = 1152, one group of rank 128,
/// 1152 columns): both within the bound of the exact value, and within two f16 ulps of each other.
/// Where the device runs the Hopper GEMM (the emulation, an sm_90 GPU), the two GEMMs run on it
/// first (its a − a_minus operand: t on the Hopper kernel), within the same bound.
fn versus_gemms<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    let c = Case { m: 256, k: 1152, gw: 1152, ranks: &[128], ints: false, ..BASE };
    let o = operands(&c, 5);
    let mut plan = o.plan;
    let bt = gpu_common::add(&mut plan, "t", c.m * 128, Dt::F16);
    let bo2 = gpu_common::add(&mut plan, "out (two GEMMs)", c.m * c.gw, Dt::F16);
    let Some(dev) = open(&plan) else { return };
    let [ba, bam, bd, bu0, _, _, badd, bo] = o.bufs;
    let (a, am, down) = (put(&dev, &plan, ba, &o.a), put(&dev, &plan, bam, &o.am), put(&dev, &plan, bd, &o.down));
    let up = put(&dev, &plan, bu0, &o.ups[0]);
    let addm = put(&dev, &plan, badd, &o.add);
    let (out1, t, out2): (DevSlice<f16>, DevSlice<f16>, DevSlice<f16>) =
        (out(&dev, &plan, bo), out(&dev, &plan, bt), out(&dev, &plan, bo2));
    let (m, n, k) = (c.m as i32, c.gw as i32, c.k as i32);
    let spec = LowRankSpec {
        out: out1,
        a,
        a_minus: Some(am),
        down,
        up: [up; 3],
        ranks: [128, 0, 0],
        groups: 1,
        add: Some(addm),
        t_minus: None,
        scale: 1.0,
        m,
        n,
        k,
        lda: k,
        ldc: n,
        ld_add: n,
        act: GemmAct::None,
    };
    let g1 = GemmSpec { a_minus: Some(am), ..GemmSpec::new(GemmOut::F16(t), a, down, m, 128, k) };
    let g2 = GemmSpec { add: Some((addm, n, m)), ..GemmSpec::new(GemmOut::F16(out2), t, up, m, n, 128) };
    let (exact, bound) = reference(&c, &Operands { plan: Plan::new("unused"), ..o });
    let to32 = |v: &[f16]| v.iter().map(|h| h.to_f32()).collect::<Vec<_>>();
    let name = dev.name().to_string();
    if dev.gemm_sm90() {
        assert_eq!(
            launch::gemm_choice_on(&dev, &g1, 0).0,
            GemmTile::Sm90,
            "t = (a − a_minus)·downᵀ on the Hopper kernel"
        );
        launch::gemm(&dev, &g1).unwrap();
        launch::gemm(&dev, &g2).unwrap();
        let h = get::<f16, _>(&dev, &plan, bo2);
        assert_within(&format!("two GEMMs on the Hopper kernel, 256×1152 r128 ({name})"), &to32(&h), &exact, |i| {
            bound[i]
        });
    }
    // The two GEMMs on the WMMA kernels, whose summation order the fused kernel follows (the
    // Hopper kernel sums in wgmma's order: both stay within the reference bound, but not
    // within 4 half-ulps of each other).
    dev.disable_gemm_sm90();
    launch::lowrank_fused(&dev, &spec).unwrap();
    launch::gemm(&dev, &g1).unwrap();
    launch::gemm(&dev, &g2).unwrap();
    let (f, s) = (get::<f16, _>(&dev, &plan, bo), get::<f16, _>(&dev, &plan, bo2));

    assert_within(&format!("fused, 256×1152 r128 ({name})"), &to32(&f), &exact, |i| bound[i]);
    assert_within(&format!("two GEMMs, 256×1152 r128 ({name})"), &to32(&s), &exact, |i| bound[i]);
    let worst = f
        .iter()
        .zip(&s)
        .map(|(x, y)| (x.to_f64() - y.to_f64()).abs() / (U16 * y.to_f64().abs()).max(1e-7))
        .fold(0.0, f64::max);
    println!("fused vs two GEMMs ({name}): largest difference {worst:.2} f16 half-ulps (relative)");
    assert!(worst <= 4.0, "fused and two-GEMM results differ by {worst} half-ulps");
}

#[test]
fn lowrank_fused_matches_two_gemms_emulated() {
    versus_gemms(emu);
}

#[cfg(feature = "cuda")]
#[test]
fn lowrank_fused_matches_two_gemms_cuda() {
    versus_gemms(cuda("lowrank_fused_matches_two_gemms_cuda"));
}

/// Every malformed spec comes back as an error and none reaches the kernel.
fn rejections<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    let o = operands(&BASE, 3);
    let Some(dev) = open(&o.plan) else { return };
    let p = &o.plan;
    let [ba, bam, bd, bu0, bu1, bu2, badd, bo] = o.bufs;
    let (a, am, down) = (put(&dev, p, ba, &o.a), put(&dev, p, bam, &o.am), put(&dev, p, bd, &o.down));
    let up = [put(&dev, p, bu0, &o.ups[0]), put(&dev, p, bu1, &o.ups[1]), put(&dev, p, bu2, &o.ups[2])];
    let addm = put(&dev, p, badd, &o.add);
    let o_s: DevSlice<f16> = out(&dev, p, bo);
    let tm_all = put(&dev, p, o.tm_buf, &o.tm);
    let tm_short = tm_all.sub(0, tm_all.len() - 1).unwrap();
    let n = (BASE.gw * 3) as i32;
    let good = LowRankSpec {
        out: o_s,
        a,
        a_minus: Some(am),
        down,
        up,
        ranks: [16, 8, 24],
        groups: 3,
        add: Some(addm),
        t_minus: None,
        scale: 1.0,
        m: BASE.m as i32,
        n,
        k: BASE.k as i32,
        lda: BASE.k as i32,
        ldc: n,
        ld_add: n,
        act: GemmAct::None,
    };
    let short = |s: DevSlice<f16>| s.sub(0, s.len() - 1).unwrap();
    let cases: Vec<(&str, LowRankSpec)> = vec![
        ("m = 0", LowRankSpec { m: 0, ..good }),
        ("k = 0", LowRankSpec { k: 0, ..good }),
        ("groups = 2", LowRankSpec { groups: 2, ..good }),
        ("n not 3 groups", LowRankSpec { n: n - 1, ldc: n - 1, ld_add: n - 1, ..good }),
        ("rank 12", LowRankSpec { ranks: [12, 8, 24], ..good }),
        ("rank 264", LowRankSpec { ranks: [264, 8, 24], ..good }),
        ("negative rank", LowRankSpec { ranks: [-8, 8, 24], ..good }),
        ("k = 36", LowRankSpec { k: 36, lda: 36, ..good }),
        ("lda < k", LowRankSpec { lda: 32, ..good }),
        ("ldc < n", LowRankSpec { ldc: n - 1, ..good }),
        ("SiLU", LowRankSpec { act: GemmAct::Silu, ..good }),
        ("scale NaN", LowRankSpec { scale: f32::NAN, ..good }),
        ("a short", LowRankSpec { a: short(a), ..good }),
        ("a misaligned", LowRankSpec { a: a.sub(1, a.len() - 1).unwrap(), m: BASE.m as i32 - 1, ..good }),
        ("a_minus short", LowRankSpec { a_minus: Some(short(am)), ..good }),
        ("down short", LowRankSpec { down: short(down), ..good }),
        ("up[2] short", LowRankSpec { up: [up[0], up[1], short(up[2])], ..good }),
        ("add short", LowRankSpec { add: Some(short(addm)), ..good }),
        ("out short", LowRankSpec { out: short(o_s), ..good }),
        ("t_minus short", LowRankSpec { t_minus: Some(tm_short), ..good }),
    ];
    for (what, spec) in &cases {
        match launch::lowrank_fused(&dev, spec) {
            Ok(()) => panic!("{what}: accepted"),
            Err(e) => println!("{what}: {e}"),
        }
    }
    for bad in [LowRankChoice { bm: 64, col_splits: 1 }, LowRankChoice { bm: 16, col_splits: 0 }] {
        assert!(launch::lowrank_fused_as(&dev, &good, bad).is_err(), "{bad:?} accepted");
    }
    let untouched = get::<f16, _>(&dev, p, bo);
    assert!(untouched.iter().all(|h| h.to_bits() == 0xffff), "a rejected launch wrote the output");
    launch::lowrank_fused(&dev, &good).unwrap();
}

#[test]
fn lowrank_rejections_emulated() {
    rejections(emu);
}

#[cfg(feature = "cuda")]
#[test]
fn lowrank_rejections_cuda() {
    rejections(cuda("lowrank_rejections_cuda"));
}
