//! kernels/embed.cu and kernels/activation.cu against CPU references: the reshapes
//! (patchify, unpatchify) and the step-state kernels (select_step, step_advance) bit for bit,
//! since they only copy and round once; timestep_freq, condition_silu and gelu within a
//! per-element bound from the rounding analysis written next to each check. Launcher
//! rejections (short buffers, bad patch sizes) come last.

mod gpu_common;

use gpu_common::*;
use icdit::config::{Numerics, FREQ_DIM};
use icdit::embed::timestep_freqs;
use icdit::gpu::{f16, launch, DevSlice, Device, EmuDevice};
use icdit::plan::{Dt, Plan};

/// Bit equality of f32 results (NaN matches NaN), listing the first mismatches.
fn assert_f32_bits_eq(what: &str, got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != expected[i].to_bits() && !(got[i].is_nan() && expected[i].is_nan()))
        .collect();
    for &i in bad.iter().take(8) {
        eprintln!("  [{i}] got {} expected {}", got[i], expected[i]);
    }
    assert!(bad.is_empty(), "{what}: {} of {} elements differ", bad.len(), got.len());
}

/// Half an ulp of f16 at |e|: the largest error of rounding a value near e to f16 (2^-25
/// among the subnormals).
fn half_ulp16(e: f64) -> f64 {
    let exp = ((e.abs().to_bits() >> 52) & 0x7ff) as i32 - 1023;
    2f64.powi(exp.max(-14) - 11)
}

/// f32 values of mixed sign and scale (1e-3 .. 10).
fn f32s(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (rng.uniform() * [1e-3, 1.0, 10.0][(rng.next_u64() % 3) as usize]) as f32).collect()
}

fn f32_of(v: &[f16]) -> Vec<f32> {
    v.iter().map(|h| h.to_f32()).collect()
}

// ---- patchify / unpatchify (bit exact) ------------------------------------------------------

/// (rows, images, channels, size, patch)
const PATCHIFY: &[(usize, usize, usize, usize, usize)] = &[
    (4, 2, 4, 32, 2), // DiT-XL/2 at 256²: guided, both halves read the same image
    (3, 3, 3, 10, 5), // odd sizes, unguided
    (2, 1, 5, 9, 3),
];

fn check_patchify<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for (ci, &(rows, images, ch, size, p)) in PATCHIFY.iter().enumerate() {
        let (g, pd) = (size / p, ch * p * p);
        let n = g * g;
        let mut plan = Plan::new("patchify test");
        let (bx, bp) = (
            add(&mut plan, "x", images * ch * size * size, Dt::F32),
            add(&mut plan, "patches", rows * n * pd, Dt::F16),
        );
        let Some(dev) = open(&plan) else { return };
        let x = f32s(&mut Rng::new(300 + ci as u64), images * ch * size * size);
        let (dx, dp) = (put(&dev, &plan, bx, &x), out::<f16, _>(&dev, &plan, bp));
        launch::patchify_f16(&dev, dp, dx, rows as i32, images as i32, ch as i32, size as i32, p as i32).unwrap();
        let got: Vec<f16> = get(&dev, &plan, bp);
        // The CPU's embed_patches (src/cpu/ops.rs): patch vector order (channel, kh, kw).
        let mut expected = vec![f16::NAN; rows * n * pd];
        for r in 0..rows {
            for t in 0..n {
                let (i, j) = (t / g, t % g);
                for c in 0..ch {
                    for a in 0..p {
                        for b in 0..p {
                            let src = (((r % images) * ch + c) * size + i * p + a) * size + j * p + b;
                            expected[(r * n + t) * pd + (c * p + a) * p + b] = f16_rne(x[src] as f64);
                        }
                    }
                }
            }
        }
        let what = format!("patchify_f16 rows={rows} images={images} C={ch} size={size} p={p} ({})", dev.name());
        println!("{what}: {} elements", expected.len());
        assert_bits_eq(&what, &got, &expected);
    }
}

/// (rows, channels_out, size, patch)
const UNPATCHIFY: &[(usize, usize, usize, usize)] = &[
    (2, 8, 32, 2), // DiT-XL/2 at 256², learned sigma
    (3, 3, 10, 5),
    (1, 5, 9, 3),
];

fn check_unpatchify<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for (ci, &(rows, co, size, p)) in UNPATCHIFY.iter().enumerate() {
        let (g, elems) = (size / p, rows * co * size * size);
        let mut plan = Plan::new("unpatchify test");
        let (bo, bi) = (add(&mut plan, "out", elems, Dt::F32), add(&mut plan, "image", elems, Dt::F32));
        let Some(dev) = open(&plan) else { return };
        let o = f32s(&mut Rng::new(400 + ci as u64), elems);
        let (d_o, d_i) = (put(&dev, &plan, bo, &o), out::<f32, _>(&dev, &plan, bi));
        launch::unpatchify_f32(&dev, d_i, d_o, rows as i32, co as i32, size as i32, p as i32).unwrap();
        let got: Vec<f32> = get(&dev, &plan, bi);
        // The CPU's unpatchify (src/cpu/ops.rs), loop for loop.
        let mut expected = vec![f32::NAN; elems];
        for tok in 0..rows * g * g {
            let (r, t) = (tok / (g * g), tok % (g * g));
            let (gi, gj) = (t / g, t % g);
            for a in 0..p {
                for b in 0..p {
                    for c in 0..co {
                        expected[((r * co + c) * size + gi * p + a) * size + gj * p + b] =
                            o[tok * p * p * co + (a * p + b) * co + c];
                    }
                }
            }
        }
        let what = format!("unpatchify_f32 rows={rows} Cout={co} size={size} p={p} ({})", dev.name());
        println!("{what}: {elems} elements");
        assert_f32_bits_eq(&what, &got, &expected);
    }
}

// ---- timestep frequencies, conditioning SiLU, GELU (bounded) --------------------------------

/// Bound of a value computed in f32 with relative error ≤ ε·|e| (δ) then rounded to f16:
/// |f16(v) − e| ≤ half_ulp16(e) + 2δ (the nearest f16 to v is at most half an ulp of e's
/// binade plus δ from v, and v is δ from e).
fn f16_bound(e: f64, delta: f64) -> f64 {
    half_ulp16(e) + 2.0 * delta
}

fn check_timestep_freq<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    let cases: [(Vec<f32>, Numerics); 2] = [
        (vec![0.0, 999.0, 1.0], Numerics::Official),
        (vec![0.0, 20.0, 41.0, 999.0, 500.0, 250.5, 3.0], Numerics::Diffusers), // odd count
    ];
    for (t, numerics) in cases {
        let count = t.len();
        let freqs = timestep_freqs(numerics);
        let mut plan = Plan::new("timestep_freq test");
        let (bt, bf, bo) = (
            add(&mut plan, "t", count, Dt::F32),
            add(&mut plan, "freqs", 128, Dt::F32),
            add(&mut plan, "out", count * FREQ_DIM, Dt::F16),
        );
        let Some(dev) = open(&plan) else { return };
        let (dt, df, d_o) = (put(&dev, &plan, bt, &t), put(&dev, &plan, bf, &freqs), out::<f16, _>(&dev, &plan, bo));
        launch::timestep_freq_f16(&dev, d_o, dt, df, count as i32).unwrap();
        let got = f32_of(&get::<f16, _>(&dev, &plan, bo));
        // a = t·f is defined as the f32 product (as embed::timestep_embedding computes it);
        // cos and sin of that a in f64 are the exact values.
        let mut exact = vec![0.0f64; count * FREQ_DIM];
        for i in 0..count {
            for k in 0..128 {
                let a = (t[i] * freqs[k]) as f64;
                exact[i * FREQ_DIM + k] = a.cos();
                exact[i * FREQ_DIM + 128 + k] = a.sin();
            }
        }
        // cosf/sinf: ≤ 2 ulp on the GPU (CUDA's documented bound; glibc's are within 1), so
        // δ = 2 ulp ≤ 4·U32·|e| (doubled for the binade below a power of two) = 8·U32·|e|.
        let what = format!("timestep_freq_f16 count={count} {numerics:?} ({})", dev.name());
        assert_within(&what, &got, &exact, |i| f16_bound(exact[i], 8.0 * U32 * exact[i].abs()));
    }
}

/// (count, rows, channels, table_rows)
const SILU: &[(usize, usize, usize, usize)] = &[
    (4, 2, 1152, 1001), // DiT-XL/2: guided rows, 1000 classes + the null class
    (6, 3, 10, 4),      // conditioning rows repeating the labels (count = 2·rows)
    (3, 5, 7, 3),       // count < rows, odd channels
];

fn check_condition_silu<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for (ci, &(count, rows, ch, trows)) in SILU.iter().enumerate() {
        let mut plan = Plan::new("condition_silu test");
        let (bs, bt, btab, bl) = (
            add(&mut plan, "silu_c", count * ch, Dt::F16),
            add(&mut plan, "temb", count * ch, Dt::F32),
            add(&mut plan, "table", trows * ch, Dt::F16),
            add(&mut plan, "labels", rows, Dt::I32),
        );
        let Some(dev) = open(&plan) else { return };
        let mut rng = Rng::new(500 + ci as u64);
        let temb: Vec<f32> = (0..count * ch).map(|_| (rng.uniform() * 6.0) as f32).collect();
        let table = rng.f16s(trows * ch, 2.0);
        let mut labels: Vec<i32> = (0..rows).map(|_| (rng.next_u64() % trows as u64) as i32).collect();
        labels[rows - 1] = trows as i32 - 1; // the last table row (the null class)
        let ds = out::<f16, _>(&dev, &plan, bs);
        let (dt, dtab) = (put(&dev, &plan, bt, &temb), put(&dev, &plan, btab, &table));
        let dl = put(&dev, &plan, bl, &labels);
        launch::condition_silu_f16(&dev, ds, dt, dtab, dl, count as i32, rows as i32, ch as i32, trows as i32).unwrap();
        let got = f32_of(&get::<f16, _>(&dev, &plan, bs));
        // c = temb + f32(table) is the defined f32 sum; SiLU of it in f64 is exact.
        let exact: Vec<f64> = (0..count * ch)
            .map(|o| {
                let l = labels[(o / ch) % rows] as usize;
                let c = (temb[o] + table[l * ch + o % ch].to_f32()) as f64;
                c / (1.0 + (-c).exp())
            })
            .collect();
        // expf ≤ 2 ulp (CUDA), then 1 + e and the division one rounding each: relative error
        // ≤ 2·2^-23 + 2·U32 = 6·U32 of the f32 result; 8·U32 leaves room.
        let what = format!("condition_silu_f16 count={count} rows={rows} C={ch} table={trows} ({})", dev.name());
        assert_within(&what, &got, &exact, |i| f16_bound(exact[i], 8.0 * U32 * exact[i].abs()));

        // An out-of-range label makes its rows NaN and leaves the others as they were.
        for bad in [-1, trows as i32] {
            let mut wrong = labels.clone();
            wrong[0] = bad;
            let dl = put(&dev, &plan, bl, &wrong);
            launch::condition_silu_f16(&dev, ds, dt, dtab, dl, count as i32, rows as i32, ch as i32, trows as i32)
                .unwrap();
            let again = f32_of(&get::<f16, _>(&dev, &plan, bs));
            for (o, v) in again.iter().enumerate() {
                let i = o / ch;
                if i % rows == 0 {
                    assert!(v.is_nan(), "{what}: label {bad}: element {o} is {v}, expected NaN");
                } else {
                    assert_eq!(v.to_bits(), got[o].to_bits(), "{what}: label {bad}: element {o} changed");
                }
            }
        }
    }
}

fn check_gelu<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for (ci, n) in [4608usize, 37].into_iter().enumerate() {
        let mut plan = Plan::new("gelu test");
        let (bx, bo) = (add(&mut plan, "x", n, Dt::F16), add(&mut plan, "out", n, Dt::F16));
        let Some(dev) = open(&plan) else { return };
        let mut x = Rng::new(600 + ci as u64).f16s(n, 6.0);
        // The tails: −10 (tanh saturates to −1, the result underflows) and large positive.
        x[0] = f16::from_f32(-10.0);
        x[1] = f16::from_f32(12.0);
        x[2] = f16::from_f32(0.0);
        let (dx, d_o) = (put(&dev, &plan, bx, &x), out::<f16, _>(&dev, &plan, bo));
        launch::gelu_f16(&dev, d_o, dx, n as i32).unwrap();
        let got = f32_of(&get::<f16, _>(&dev, &plan, bo));
        let k = (2.0 / std::f64::consts::PI).sqrt();
        let xs = f64s(&x);
        let exact: Vec<f64> = xs.iter().map(|&v| 0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh())).collect();
        // f32 evaluation (the rounded constants, x³, the sum and scaling: ≈ 6·U32 relative on
        // tanh's argument u, damped by u·sech²u ≤ 0.45; tanhf ≤ 2 ulp; 1 + T; the product):
        // absolute error ≤ 8·U32·(|x| + |e|), as for gemm_bias_gelu_f16 (docs/gpu-emulation.md).
        let what = format!("gelu_f16 n={n} ({})", dev.name());
        assert_within(&what, &got, &exact, |i| f16_bound(exact[i], 8.0 * U32 * (xs[i].abs() + exact[i].abs())));
    }
}

// ---- select_step / step_advance (bit exact) -------------------------------------------------

fn check_select_step<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    // (per_step, steps, dst offset): 16-byte copies, half2 copies, single halves (odd length),
    // single halves (dst offset by one element breaks the alignment of an even length).
    for (ci, &(per_step, steps, offset)) in
        [(48usize, 5usize, 0usize), (10, 3, 0), (7, 4, 0), (16, 3, 1)].iter().enumerate()
    {
        let mut plan = Plan::new("select_step test");
        let (bd, bs, bst) = (
            add(&mut plan, "dst", per_step + offset, Dt::F16),
            add(&mut plan, "src", steps * per_step, Dt::F16),
            add(&mut plan, "state", 1, Dt::I32),
        );
        let Some(dev) = open(&plan) else { return };
        let src = Rng::new(700 + ci as u64).f16s(steps * per_step, 4.0);
        let ds = put(&dev, &plan, bs, &src);
        let what = format!("select_step_f16 per_step={per_step} steps={steps} offset={offset} ({})", dev.name());
        for s in [0, steps as i32 - 1, 1, steps as i32, -1] {
            let dd = out::<f16, _>(&dev, &plan, bd);
            let dst = dd.sub(offset, per_step).unwrap();
            let dstate = put(&dev, &plan, bst, &[s]);
            launch::select_step_f16(&dev, dst, ds, dstate, per_step as i32, steps as i32).unwrap();
            let got = get::<f16, _>(&dev, &plan, bd);
            assert!(got[..offset].iter().all(|h| h.is_nan()), "{what}: s={s}: wrote before dst");
            let got = &got[offset..];
            if (0..steps as i32).contains(&s) {
                assert_bits_eq(&format!("{what} s={s}"), got, &src[s as usize * per_step..][..per_step]);
            } else {
                assert!(got.iter().all(|h| h.is_nan()), "{what}: s={s} out of range must give NaN");
            }
            assert_eq!(get::<i32, _>(&dev, &plan, bst), [s], "{what}: state changed");
        }
        println!("{what}: ok");
    }
}

fn check_step_advance<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    let mut plan = Plan::new("step_advance test");
    let b = add(&mut plan, "state", 5, Dt::I32);
    let Some(dev) = open(&plan) else { return };
    let state = put(&dev, &plan, b, &[3, 11, -12, 13, 14]);
    for _ in 0..4 {
        launch::step_advance(&dev, state).unwrap();
    }
    assert_eq!(get::<i32, _>(&dev, &plan, b), [7, 11, -12, 13, 14], "step_advance ({})", dev.name());
}

#[test]
fn patchify_emulated() {
    check_patchify(emu);
}
#[test]
fn unpatchify_emulated() {
    check_unpatchify(emu);
}
#[test]
fn timestep_freq_emulated() {
    check_timestep_freq(emu);
}
#[test]
fn condition_silu_emulated() {
    check_condition_silu(emu);
}
#[test]
fn gelu_emulated() {
    check_gelu(emu);
}
#[test]
fn select_step_emulated() {
    check_select_step(emu);
}
#[test]
fn step_advance_emulated() {
    check_step_advance(emu);
}

#[cfg(feature = "cuda")]
#[test]
fn patchify_cuda() {
    check_patchify(cuda("patchify_cuda"));
}
#[cfg(feature = "cuda")]
#[test]
fn unpatchify_cuda() {
    check_unpatchify(cuda("unpatchify_cuda"));
}
#[cfg(feature = "cuda")]
#[test]
fn timestep_freq_cuda() {
    check_timestep_freq(cuda("timestep_freq_cuda"));
}
#[cfg(feature = "cuda")]
#[test]
fn condition_silu_cuda() {
    check_condition_silu(cuda("condition_silu_cuda"));
}
#[cfg(feature = "cuda")]
#[test]
fn gelu_cuda() {
    check_gelu(cuda("gelu_cuda"));
}
#[cfg(feature = "cuda")]
#[test]
fn select_step_cuda() {
    check_select_step(cuda("select_step_cuda"));
}
#[cfg(feature = "cuda")]
#[test]
fn step_advance_cuda() {
    check_step_advance(cuda("step_advance_cuda"));
}

// ---- launcher rejections --------------------------------------------------------------------

/// Every launcher refuses arguments its buffers cannot hold, before launching anything.
#[test]
fn launchers_reject_bad_arguments() {
    let mut plan = Plan::new("rejections");
    let (bh, bf, bi) =
        (add(&mut plan, "h", 4096, Dt::F16), add(&mut plan, "f", 4096, Dt::F32), add(&mut plan, "i", 8, Dt::I32));
    let dev = EmuDevice::new(&plan).unwrap();
    let h: DevSlice<f16> = out(&dev, &plan, bh);
    let f: DevSlice<f32> = out(&dev, &plan, bf);
    let i: DevSlice<i32> = out(&dev, &plan, bi);
    let (h10, f10, i0) = (h.sub(0, 10).unwrap(), f.sub(0, 10).unwrap(), i.sub(0, 0).unwrap());
    let cases: Vec<(&str, icdit::error::Result<()>)> = vec![
        ("patchify: size not a multiple of patch", launch::patchify_f16(&dev, h, f, 1, 1, 4, 9, 2)),
        ("patchify: patch 0", launch::patchify_f16(&dev, h, f, 1, 1, 4, 8, 0)),
        ("patchify: short patches", launch::patchify_f16(&dev, h10, f, 1, 1, 4, 8, 2)),
        ("patchify: short x", launch::patchify_f16(&dev, h, f10, 1, 1, 4, 8, 2)),
        ("unpatchify: size not a multiple of patch", launch::unpatchify_f32(&dev, f, f, 1, 4, 10, 3)),
        ("unpatchify: short image", launch::unpatchify_f32(&dev, f10, f, 1, 4, 8, 2)),
        ("timestep_freq: short out", launch::timestep_freq_f16(&dev, h10, f, f, 1)),
        ("timestep_freq: short freqs", launch::timestep_freq_f16(&dev, h, f, f10, 1)),
        ("timestep_freq: count 0", launch::timestep_freq_f16(&dev, h, f, f, 0)),
        ("condition_silu: short labels", launch::condition_silu_f16(&dev, h, f, h, i, 16, 16, 4, 2)),
        ("condition_silu: short table", launch::condition_silu_f16(&dev, h, f, h10, i, 2, 2, 4, 3)),
        ("gelu: short out", launch::gelu_f16(&dev, h10, h, 11)),
        ("gelu: negative n", launch::gelu_f16(&dev, h, h, -1)),
        ("select_step: short src", launch::select_step_f16(&dev, h10, h10, i, 10, 2)),
        ("select_step: empty state", launch::select_step_f16(&dev, h10, h, i0, 10, 2)),
        ("step_advance: empty state", launch::step_advance(&dev, i0)),
    ];
    for (what, r) in cases {
        match r {
            Err(e) => println!("{what}: {e}"),
            Ok(()) => panic!("{what}: accepted"),
        }
    }
}
