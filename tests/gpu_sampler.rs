//! kernels/sampler.cu against the CPU engine's own code: `normal_f32` against
//! `noise::fill_normal`, and `sampler_step_f32` against the engine's guidance formula followed
//! by `diffusion::ddpm_step` / `ddim_step` with `fill_normal` noise, for every sampler mode,
//! guided (some and all channels) and unguided, at a stochastic step and at the last step.
//! Under the emulation both are bit for bit: the kernel does the same f32 operations in the
//! same order (no FMA contraction) and the same f64 Box–Muller with the same C library.
//! On a GPU, expf and the f64 log/sincospi differ from glibc's by an ulp or two, so there the
//! comparison is against a bound (written at `gpu_bound`).

mod gpu_common;

use gpu_common::*;
use icdit::diffusion::{self, Schedule, Variance};
use icdit::gpu::launch::{self, SamplerMode, SamplerParams};
use icdit::gpu::{DevSlice, Device, EmuDevice};
use icdit::noise;
use icdit::plan::{Dt, Plan};

/// A 64-bit seed and a first image index with both 32-bit halves non-zero.
const SEED: u64 = 0x9e37_79b9_0000_0123;
const FIRST: u64 = (5 << 32) | 0xffff_fffe; // images cross a carry of the low half

/// The sampler state the kernels read: [s, seed lo, seed hi, first lo, first hi].
fn state(s: i32, seed: u64, first: u64) -> [i32; 5] {
    [s, seed as u32 as i32, (seed >> 32) as u32 as i32, first as u32 as i32, (first >> 32) as u32 as i32]
}

/// How results are compared: bit for bit (the emulation) or within `gpu_bound` (a GPU).
#[derive(Clone, Copy)]
enum Compare {
    Bits,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Bound,
}

/// |got − expected| ≤ 8·U32·scale[i] on a GPU: the step's result rounds once in f32 (2·U32
/// of |expected| covers a flipped rounding) and the noise term std·z carries expf's 2 ulp
/// and z's possible 1 ulp (≤ 6·U32 of |std·z|). scale = |expected| + |std·z|.
fn compare(what: &str, how: Compare, got: &[f32], expected: &[f32], scale: &[f64]) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| match how {
            Compare::Bits => got[i].to_bits() != expected[i].to_bits(),
            Compare::Bound => {
                let err = (got[i] as f64 - expected[i] as f64).abs();
                err.is_nan() || err > 8.0 * U32 * scale[i]
            }
        })
        .collect();
    for &i in bad.iter().take(8) {
        eprintln!(
            "  [{i}] got {} ({:#010x}) expected {} ({:#010x})",
            got[i],
            got[i].to_bits(),
            expected[i],
            expected[i].to_bits()
        );
    }
    assert!(bad.is_empty(), "{what}: {} of {} elements differ", bad.len(), got.len());
}

// ---- normal_f32 -----------------------------------------------------------------------------

fn check_normal<D: Device>(open: impl Fn(&Plan) -> Option<D>, how: Compare) {
    // (images, elems, stream step, out offset): latents of DiT-XL/2 at 256² (4·32·32, float4
    // stores), an odd length (partial last quad), and an offset that breaks float4 alignment.
    for &(images, elems, step, offset) in &[(2usize, 4096usize, 0i32, 0usize), (3, 1023, 17, 0), (2, 64, 250, 1)] {
        let mut plan = Plan::new("normal test");
        let (bo, bs) = (add(&mut plan, "out", images * elems + offset, Dt::F32), add(&mut plan, "state", 5, Dt::I32));
        let Some(dev) = open(&plan) else { return };
        let o = out::<f32, _>(&dev, &plan, bo).sub(offset, images * elems).unwrap();
        let st = put(&dev, &plan, bs, &state(7, SEED, FIRST));
        launch::normal_f32(&dev, o, st, images as i32, elems as i32, step).unwrap();
        let got = get::<f32, _>(&dev, &plan, bo);
        assert!(got[..offset].iter().all(|v| v.is_nan()), "normal_f32 wrote before out");
        let mut expected = vec![0.0f32; images * elems];
        for (r, row) in expected.chunks_mut(elems).enumerate() {
            noise::fill_normal(SEED, FIRST + r as u64, step as u32, row);
        }
        let what = format!("normal_f32 images={images} elems={elems} step={step} offset={offset} ({})", dev.name());
        let exact: Vec<f64> = expected.iter().map(|&v| v as f64).collect();
        assert_nontrivial(&what, &exact);
        // On a GPU: one f32 rounding may flip (|z|·2·U32), nothing more.
        let scale: Vec<f64> = exact.iter().map(|v| v.abs() / 4.0).collect();
        compare(&what, how, &got[offset..], &expected, &scale);
        println!("{what}: {} values equal", expected.len());
    }
}

#[test]
fn normal_emulated() {
    check_normal(emu, Compare::Bits);
}

#[cfg(feature = "cuda")]
#[test]
fn normal_cuda() {
    check_normal(cuda("normal_cuda"), Compare::Bound);
}

// ---- sampler_step_f32 -----------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Mode {
    DdpmLearned,
    DdpmFixed,
    Ddim(f32),
}

struct Shape {
    cin: usize,
    hw: usize,
}

/// DiT-XL/2 at 256² (4 × 32² latents, elements a multiple of 4), and 3 × 5² (75 elements: a
/// partial last quad, quads crossing channels).
const SHAPES: &[Shape] = &[Shape { cin: 4, hw: 32 * 32 }, Shape { cin: 3, hw: 25 }];
const IMAGES: usize = 2;
const SCALE: f32 = 4.0;

/// The CPU engine's step (src/engine.rs `guide` then `step`) on every image: returns x after
/// the step and, per element, |expected| + |std·noise| for the GPU bound.
#[allow(clippy::too_many_arguments)]
fn cpu_step(
    sched: &Schedule,
    s: usize,
    mode: Mode,
    sh: &Shape,
    cout: usize,
    guided_ch: usize,
    x: &[f32],
    model_out: &[f32],
) -> (Vec<f32>, Vec<f64>) {
    let (cin, hw, n) = (sh.cin, sh.hw, IMAGES);
    let img = cin * hw;
    let k = sched.len() - 1 - s;
    let c = sched.coeffs(k);
    let guided = guided_ch > 0;
    let mut x = x.to_vec();
    let mut scale = vec![0.0f64; n * img];
    for r in 0..n {
        // engine.rs guide: ε = u + s·(c − u) on the guided channels, c elsewhere.
        let mut eps = vec![0.0f32; img];
        for ch in 0..cin {
            for p in 0..hw {
                let cond = model_out[(r * cout + ch) * hw + p];
                eps[ch * hw + p] = if guided && ch < guided_ch {
                    let u = model_out[((n + r) * cout + ch) * hw + p];
                    u + SCALE * (cond - u)
                } else {
                    cond
                };
            }
        }
        // engine.rs sample: the noise of stream step index + 1 when the sampler adds noise.
        let stochastic = match mode {
            Mode::Ddim(eta) => eta > 0.0,
            _ => true,
        };
        let mut z = vec![0.0f32; img];
        if stochastic && k != 0 {
            noise::fill_normal(SEED, FIRST + r as u64, s as u32 + 1, &mut z);
        }
        let xr = &mut x[r * img..][..img];
        let x_before = xr.to_vec();
        let var_ch = &model_out[(r * cout + cin) * hw..];
        match mode {
            Mode::DdpmLearned => diffusion::ddpm_step(&c, xr, &eps, Variance::Learned(&var_ch[..img]), &z),
            Mode::DdpmFixed => diffusion::ddpm_step(&c, xr, &eps, Variance::FixedLarge, &z),
            Mode::Ddim(eta) => diffusion::ddim_step(&c, eta, xr, &eps, &z),
        }
        for i in 0..img {
            let std = match mode {
                Mode::DdpmLearned => {
                    let lv = diffusion::ddpm_mean_logvar(&c, x_before[i], eps[i], Variance::Learned(var_ch), i).1;
                    (0.5 * lv as f64).exp()
                }
                Mode::DdpmFixed => (0.5 * c.fixed_log as f64).exp(),
                Mode::Ddim(eta) => launch::sampler_coeffs(&c, eta)[8] as f64,
            };
            scale[r * img + i] = (xr[i] as f64).abs() + std * (z[i] as f64).abs();
        }
    }
    (x, scale)
}

fn check_sampler_step<D: Device>(open: impl Fn(&Plan) -> Option<D>, how: Compare) {
    let sched = Schedule::new("50").unwrap();
    let steps = sched.len();
    let modes = [Mode::DdpmLearned, Mode::DdpmFixed, Mode::Ddim(0.0), Mode::Ddim(1.0)];
    for (si, sh) in SHAPES.iter().enumerate() {
        let (cin, hw) = (sh.cin, sh.hw);
        let img = cin * hw;
        let max_out = 2 * IMAGES * 2 * img; // guided rows × learned-sigma channels
        let mut plan = Plan::new("sampler_step test");
        let (bx, bo, bc, bs) = (
            add(&mut plan, "x", IMAGES * img, Dt::F32),
            add(&mut plan, "model_out", max_out, Dt::F32),
            add(&mut plan, "coeffs", steps * 12, Dt::F32),
            add(&mut plan, "state", 5, Dt::I32),
        );
        let Some(dev) = open(&plan) else { return };
        let mut rng = Rng::new(900 + si as u64);
        let x: Vec<f32> = (0..IMAGES * img).map(|_| (rng.uniform() * 2.0) as f32).collect();
        let mut cases = 0;
        for mode in modes {
            let (eta, kmode) = match mode {
                Mode::DdpmLearned => (0.0, SamplerMode::DdpmLearned),
                Mode::DdpmFixed => (0.0, SamplerMode::DdpmFixed),
                Mode::Ddim(eta) => (eta, SamplerMode::Ddim),
            };
            // The host's table of every step, as the pipeline fills it.
            let table: Vec<f32> =
                (0..steps).flat_map(|s| launch::sampler_coeffs(&sched.coeffs(steps - 1 - s), eta)).collect();
            let dc = put(&dev, &plan, bc, &table);
            // Learned variance needs 2·Cin output channels; the others run with Cout = Cin
            // (fixed variance) and Cout = 2·Cin (DDIM ignoring the variance channels).
            let cout = if matches!(mode, Mode::DdpmFixed) { cin } else { 2 * cin };
            for guided_ch in [0, cin - 1, cin] {
                let rows = if guided_ch > 0 { 2 * IMAGES } else { IMAGES };
                let mo: Vec<f32> = (0..rows * cout * hw).map(|_| rng.uniform() as f32).collect();
                // A stochastic step (nonzero = 1) and the last step (k = 0, nonzero = 0).
                for s in [10, steps - 1] {
                    let dx = put(&dev, &plan, bx, &x);
                    let full: DevSlice<f32> = out(&dev, &plan, bo);
                    let dmo = full.sub(0, mo.len()).unwrap();
                    dev.upload(dmo, &mo).unwrap();
                    let dst = put(&dev, &plan, bs, &state(s as i32, SEED, FIRST));
                    let p = SamplerParams {
                        images: IMAGES as i32,
                        cin: cin as i32,
                        cout: cout as i32,
                        hw: hw as i32,
                        guided_channels: guided_ch as i32,
                        cfg_scale: if guided_ch > 0 { SCALE } else { 1.0 },
                        mode: kmode,
                        steps: steps as i32,
                    };
                    launch::sampler_step_f32(&dev, dx, dmo, dc, dst, &p).unwrap();
                    let got = get::<f32, _>(&dev, &plan, bx);
                    let (expected, scale) = cpu_step(&sched, s, mode, sh, cout, guided_ch, &x, &mo);
                    let what = format!(
                        "sampler_step_f32 {mode:?} Cin={cin} hw={hw} Cout={cout} guided={guided_ch} s={s} ({})",
                        dev.name()
                    );
                    let exact: Vec<f64> = expected.iter().map(|&v| v as f64).collect();
                    assert_nontrivial(&what, &exact);
                    assert!(expected.iter().zip(&x).any(|(a, b)| a != b), "{what}: the step changed nothing");
                    compare(&what, how, &got, &expected, &scale);
                    cases += 1;
                }
            }
        }
        println!("sampler_step_f32 Cin={cin} hw={hw}: {cases} cases equal ({})", dev.name());

        // A sampling index outside 0..steps poisons x instead of reading past the table.
        for s in [steps as i32, -1] {
            let dx = put(&dev, &plan, bx, &x);
            let dmo = out::<f32, _>(&dev, &plan, bo).sub(0, IMAGES * cin * hw).unwrap();
            let dst = put(&dev, &plan, bs, &state(s, SEED, FIRST));
            let p = SamplerParams {
                images: IMAGES as i32,
                cin: cin as i32,
                cout: cin as i32,
                hw: hw as i32,
                guided_channels: 0,
                cfg_scale: 1.0,
                mode: SamplerMode::DdpmFixed,
                steps: steps as i32,
            };
            launch::sampler_step_f32(&dev, dx, dmo, put(&dev, &plan, bc, &vec![0.0; steps * 12]), dst, &p).unwrap();
            assert!(get::<f32, _>(&dev, &plan, bx).iter().all(|v| v.is_nan()), "s = {s} must give NaN");
        }
    }
}

#[test]
fn sampler_step_emulated() {
    check_sampler_step(emu, Compare::Bits);
}

#[cfg(feature = "cuda")]
#[test]
fn sampler_step_cuda() {
    check_sampler_step(cuda("sampler_step_cuda"), Compare::Bound);
}

/// The coefficient row is the StepCoeffs and ddim_step's σ, √ᾱ_prev and direction factor.
#[test]
fn sampler_coeffs_row() {
    let sched = Schedule::new("50").unwrap();
    let c = sched.coeffs(10);
    let row = launch::sampler_coeffs(&c, 1.0);
    assert_eq!(&row[..8], &[1.0, c.sqrt_recip, c.sqrt_recipm1, c.coef1, c.coef2, c.min_log, c.max_log, c.fixed_log]);
    let (ab, abp) = (c.alpha_bar as f64, c.alpha_bar_prev as f64);
    let sigma = ((1.0 - abp) / (1.0 - ab) * (1.0 - ab / abp)).sqrt();
    assert!((row[8] as f64 - sigma).abs() < 1e-6 && sigma > 0.01, "sigma {} vs {sigma}", row[8]);
    assert_eq!(row[9], c.alpha_bar_prev.sqrt());
    assert!((row[10] as f64 - (1.0 - abp - sigma * sigma).sqrt()).abs() < 1e-6);
    let last = launch::sampler_coeffs(&sched.coeffs(0), 1.0);
    assert_eq!((last[0], last[8]), (0.0, 0.0), "the last step adds no noise");
    assert_eq!(launch::sampler_coeffs(&c, 0.0)[8], 0.0, "eta 0: deterministic");
}

#[test]
fn launchers_reject_bad_arguments() {
    let mut plan = Plan::new("rejections");
    let (bf, bi) = (add(&mut plan, "f", 4096, Dt::F32), add(&mut plan, "i", 8, Dt::I32));
    let dev = EmuDevice::new(&plan).unwrap();
    let f: DevSlice<f32> = out(&dev, &plan, bf);
    let i: DevSlice<i32> = out(&dev, &plan, bi);
    let (f100, i4) = (f.sub(0, 100).unwrap(), i.sub(0, 4).unwrap());
    let p = SamplerParams {
        images: 2,
        cin: 4,
        cout: 8,
        hw: 64,
        guided_channels: 3,
        cfg_scale: 4.0,
        mode: SamplerMode::DdpmLearned,
        steps: 50,
    };
    let cases: Vec<(&str, icdit::error::Result<()>)> = vec![
        ("normal: short out", launch::normal_f32(&dev, f100, i, 1, 101, 0)),
        ("normal: short state", launch::normal_f32(&dev, f, i4, 1, 16, 0)),
        ("normal: negative stream step", launch::normal_f32(&dev, f, i, 1, 16, -1)),
        ("normal: no images", launch::normal_f32(&dev, f, i, 0, 16, 0)),
        ("step: short x", launch::sampler_step_f32(&dev, f100, f, f, i, &p)),
        // guided rows: 2 images × 2 × 8 channels × 64 = 2048 ≤ 4096, but hw 200 needs 6400.
        ("step: short model_out", launch::sampler_step_f32(&dev, f, f, f, i, &SamplerParams { hw: 200, cin: 2, ..p })),
        ("step: short coeffs", launch::sampler_step_f32(&dev, f, f, f100, i, &p)),
        ("step: short state", launch::sampler_step_f32(&dev, f, f, f, i4, &p)),
        (
            "step: learned variance without 2·Cin channels",
            launch::sampler_step_f32(&dev, f, f, f, i, &SamplerParams { cout: 4, ..p }),
        ),
        (
            "step: negative guided channels",
            launch::sampler_step_f32(&dev, f, f, f, i, &SamplerParams { guided_channels: -1, ..p }),
        ),
        (
            "step: infinite scale",
            launch::sampler_step_f32(&dev, f, f, f, i, &SamplerParams { cfg_scale: f32::INFINITY, ..p }),
        ),
        ("step: no steps", launch::sampler_step_f32(&dev, f, f, f, i, &SamplerParams { steps: 0, ..p })),
    ];
    for (what, r) in cases {
        match r {
            Err(e) => println!("{what}: {e}"),
            Ok(()) => panic!("{what}: accepted"),
        }
    }
}
