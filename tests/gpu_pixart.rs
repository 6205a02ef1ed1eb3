//! PixArt-α on the GPU pipeline's device (src/gpu/pixart/), emulated: the masked attention
//! kernel against a direct f64 computation, the forward pass against the CPU backend and the
//! diffusers fixture, sampling (DPM-Solver++ and DDIM with guidance, reuse and icc) against
//! the CPU backend, and bad input. The tiny pipeline of tests/fixtures/pixart (2 blocks, C 32,
//! 2 heads of 16, 16 tokens, 6 caption tokens).
//!
//! Tolerances (relative L2), as DiT's pipeline tests (tests/gpu_pipeline.rs's header): weights,
//! activations and caches are f16 (unit roundoff u ≈ 4.9e-4), sums f32, so one forward pass is
//! held to 2e-3 (4u) against the f32 CPU backend; against diffusers the same bound (the CPU
//! backend itself is within 1e-6 of it). Guided samples chain up to ten guided steps (scale
//! 4.5): 5e-3 (DiT's guided bound is 1.5e-2; measured here 7.5e-4–7.8e-4).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::pixart::{cpu_forward, embeddings, exact_factors, forward_in, load, options, sample, tiny};
use common::{assert_close, fixture, rel_l2, TempDir};
use icdit::forward::StepKind;
use icdit::gpu::launch::{self, AttentionRows};
use icdit::gpu::pixart::{PixArtGpu, PixArtGpuOptions};
use icdit::gpu::{f16, Device, EmuDevice};
use icdit::pixart::{
    Embeddings, PixArtCache, PixArtCpu, PixArtCpuOptions, PixArtEngine, PixArtFactors, PixArtModel, PixArtOptions,
    PixArtRequest, PixArtRunner, PixArtSampler,
};
use icdit::plan::{Dt, Plan};
use icdit::tensorfile::{write_safetensors, TensorFile};

const FORWARD_TOL: f64 = 2e-3;
/// Guided sampling on the tiny pipeline: measured 7.5e-4–7.8e-4 (10 DPM-Solver++ or DDIM steps,
/// 6 with reuse or icc); DiT's guided bound is 1.5e-2, this one is tighter so a sampling-loop
/// error of the device path shows.
const GUIDED_TOL: f64 = 5e-3;

fn gpu(model: &Arc<PixArtModel>, rows: usize, len: usize, cache: PixArtCache) -> PixArtGpu<EmuDevice> {
    PixArtGpu::new(Arc::clone(model), &PixArtGpuOptions { max_rows: rows, max_text_len: len, cache }, EmuDevice::new)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// f16 values of a deterministic pseudo-random stream in (−scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f16> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            f16::from_f32(u * scale)
        })
        .collect()
}

/// The masked attention kernel against softmax(q·kᵀ/√D + bias)·v in f64 from the same f16
/// inputs: two rows, 3 heads of 24, 70 queries (not a multiple of the 64-query block), 45 keys
/// (a full 32-key tile and a partial one), q, k and v at strided column offsets of wider
/// rows. Row 0's mask is partial, row 1's keeps one key only (its output is that key's v).
/// Bound: 2e-3 relative L2 (f32 sums, f16 output: measured ≈ 2e-4).
#[test]
fn masked_attention_kernel() {
    let (rows, nq, nk, heads, d) = (2usize, 70usize, 45usize, 3usize, 24usize);
    let c = heads * d;
    let (ldq, ldkv, ldo) = (c + 8, 2 * c, c + 16);
    let mut plan = Plan::new("masked attention test");
    let qb = plan.add("q", &[rows * nq * ldq], Dt::F16);
    let kvb = plan.add("kv", &[rows * nk * ldkv], Dt::F16);
    let ob = plan.add("out", &[rows * nq * ldo], Dt::F16);
    let bb = plan.add("bias", &[rows * nk], Dt::F32);
    let dev = EmuDevice::new(&plan).unwrap();
    let (q, kv) = (values(rows * nq * ldq, 1, 2.0), values(rows * nk * ldkv, 2, 2.0));
    let mask: Vec<i64> =
        (0..rows * nk).map(|i| if i < nk { (i % 3 != 1) as i64 } else { (i == nk + 17) as i64 }).collect();
    let bias: Vec<f32> = mask.iter().map(|&m| (1 - m) as f32 * -10000.0).collect();
    let s = |id| dev.slice::<f16>(plan.get(id)).unwrap();
    dev.upload(s(qb), &q).unwrap();
    dev.upload(s(kvb), &kv).unwrap();
    let bias_s = dev.slice::<f32>(plan.get(bb)).unwrap();
    dev.upload(bias_s, &bias).unwrap();
    let kvs = s(kvb);
    launch::attention_rows_f16(
        &dev,
        &AttentionRows {
            out: s(ob),
            q: s(qb).sub(8, rows * nq * ldq - 8).unwrap(),
            k: kvs,
            v: kvs.sub(c, kvs.len() - c).unwrap(),
            bias: Some(bias_s),
            rows: rows as i32,
            nq: nq as i32,
            nk: nk as i32,
            heads: heads as i32,
            head_dim: d as i32,
            ldq: ldq as i32,
            ldkv: ldkv as i32,
            ldo: ldo as i32,
        },
    )
    .unwrap();
    let mut out = vec![f16::ZERO; rows * nq * ldo];
    dev.download(s(ob), &mut out).unwrap();
    let (mut got, mut want) = (Vec::new(), Vec::new());
    let scale = 1.0 / (d as f64).sqrt();
    for r in 0..rows {
        for h in 0..heads {
            for i in 0..nq {
                let qv = |e: usize| q[(r * nq + i) * ldq + 8 + h * d + e].to_f64();
                let kv_at = |j: usize, off: usize, e: usize| kv[(r * nk + j) * ldkv + off + h * d + e].to_f64();
                let sc: Vec<f64> = (0..nk)
                    .map(|j| (0..d).map(|e| qv(e) * kv_at(j, 0, e)).sum::<f64>() * scale + bias[r * nk + j] as f64)
                    .collect();
                let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                let p: Vec<f64> = sc.iter().map(|v| (v - mx).exp()).collect();
                let sum: f64 = p.iter().sum();
                for e in 0..d {
                    let w = (0..nk).map(|j| p[j] * kv_at(j, c, e)).sum::<f64>() / sum;
                    want.push(w as f32);
                    got.push(out[(r * nq + i) * ldo + h * d + e].to_f32());
                    if r == 1 {
                        // One key unmasked: exactly its value (up to the f16 rounding of the output).
                        assert!(
                            (got.last().unwrap() - kv_at(17, c, e) as f32).abs() <= 1e-3,
                            "row 1 keeps key 17 only"
                        );
                    }
                }
            }
        }
    }
    assert_close("masked attention vs f64", &got, &want, 2e-3);
    // The padding columns between rows are never written (the emulated arena starts as NaN).
    assert!(out[c].to_f32().is_nan(), "the kernel wrote past a row's heads");
}

/// One plain forward pass (the fixture's partial caption mask) against the f32 CPU backend and
/// against diffusers: bound 2e-3 (module header).
#[test]
fn forward_matches_cpu_and_diffusers() {
    let model = load(&tiny());
    let got = gpu_forward(&model);
    assert_close("GPU forward vs CPU", &got, &cpu_forward(&model, 2), FORWARD_TOL);
    let diffusers = TensorFile::open(&fixture("pixart/forward_out.safetensors")).unwrap().read_f32("out").unwrap().1;
    assert_close("GPU forward vs diffusers", &got, &diffusers, FORWARD_TOL);
}

/// The emulated device's forward pass of `model` on the forward fixture's inputs.
fn gpu_forward(model: &Arc<PixArtModel>) -> Vec<f32> {
    let inp = forward_in();
    let rows = inp.t.len();
    let mut out = vec![0.0; rows * model.config.out_elems()];
    let mut g = gpu(model, rows, inp.len, PixArtCache::None);
    g.forward(&inp.x, &inp.t, &inp.text, &inp.mask, inp.len, None, &mut out).unwrap_or_else(|e| panic!("{e}"));
    out
}

/// The same request on both backends: (device, CPU) latents.
fn both(opts: &PixArtOptions) -> (Vec<f32>, Vec<f32>) {
    let model = load(&tiny());
    let mut g = PixArtEngine::new_gpu(Arc::clone(&model), opts, EmuDevice::new).unwrap_or_else(|e| panic!("{e}"));
    let mut c = PixArtEngine::new(model, opts).unwrap_or_else(|e| panic!("{e}"));
    let got = sample(&mut g);
    // A full-size request replays one recorded step per step kind of the policy.
    assert_eq!(g.runner().graphs(), opts.cache.policy().step_kinds().len());
    (got, sample(&mut c))
}

/// 10 guided steps (scale 4.5, guidance on all channels, rows [negative, positive]) of
/// DPM-Solver++ 2M and of DDIM: the device's steps (recorded graphs for full-size requests,
/// direct launches for a smaller one) match the CPU backend within the guided bound.
#[test]
fn sampling_matches_cpu() {
    for sampler in [PixArtSampler::DpmSolver, PixArtSampler::Ddim] {
        let (gpu, cpu) = both(&options(sampler, 10, 4.5, PixArtCache::None, 1));
        assert_close(&format!("{} 10 steps, guided: device vs CPU", sampler.name()), &gpu, &cpu, GUIDED_TOL);
    }
    // One image on an engine built for two: direct launches instead of the recorded steps.
    let opts = options(PixArtSampler::DpmSolver, 10, 4.5, PixArtCache::None, 1);
    let model = load(&tiny());
    let (pos, neg) = (embeddings("prompt_embeds"), embeddings("negative_embeds"));
    let one =
        Embeddings::new(pos.embeds[..pos.len * pos.dim].to_vec(), pos.mask[..pos.len].to_vec(), 1, pos.len, pos.dim)
            .unwrap();
    let req = PixArtRequest { prompt: &one, negative: Some(&neg), noise: None, seed: 9, first_index: 0 };
    let n = model.config.image_elems();
    let (mut got, mut want) = (vec![0.0; n], vec![0.0; n]);
    let mut g = PixArtEngine::new_gpu(Arc::clone(&model), &opts, EmuDevice::new).unwrap();
    g.sample(&req, &mut got, &mut |_| {}).unwrap();
    assert_eq!(g.runner().graphs(), 0, "a smaller request launches directly");
    PixArtEngine::new(model, &opts).unwrap().sample(&req, &mut want, &mut |_| {}).unwrap();
    assert_close("dpm-solver, 1 of 2 images (direct launches): device vs CPU", &got, &want, GUIDED_TOL);
}

/// Reuse (period 2) and icc (period 3; the fixture's rank-4 factors on the two-GEMM path, exact
/// rank-32 factors on the fused kernel) on the device against the same policy on the CPU
/// backend, DPM-Solver++ 6 guided steps: within the guided bound; and each cached run differs
/// from the uncached one by more than the device–CPU difference (the cached steps did run).
#[test]
fn caching_matches_cpu() {
    let model = load(&tiny());
    let dir = TempDir::new("pixart-gpu-factors");
    let rank4 = Arc::new(PixArtFactors::load(&fixture("pixart/factors_rank4.safetensors"), &model).unwrap());
    let exact = Arc::new(PixArtFactors::load(&exact_factors(&dir), &model).unwrap());
    let (none, _) = both(&options(PixArtSampler::DpmSolver, 6, 4.5, PixArtCache::None, 1));
    for (name, cache, period) in [
        ("reuse", PixArtCache::Reuse, 2),
        ("icc rank 4", PixArtCache::Icc(rank4), 3),
        ("icc exact", PixArtCache::Icc(exact), 3),
    ] {
        let (gpu, cpu) = both(&options(PixArtSampler::DpmSolver, 6, 4.5, cache, period));
        let err = assert_close(&format!("{name}: device vs CPU"), &gpu, &cpu, GUIDED_TOL);
        let moved = rel_l2(&cpu, &none);
        println!("{name}: CPU vs uncached device {moved:.3e}");
        if name != "icc exact" {
            assert!(
                moved > 2.0 * err,
                "{name}: caching moved the sample by {moved:.3e}, the device error is {err:.3e}"
            );
        }
    }
}

/// Bad input gives errors naming what is wrong: a caption longer than the engine was planned
/// for, a calibrated step without a full step before it, a step kind outside the policy, a
/// mask value that is not 0 or 1, latents whose model output overflows.
#[test]
fn bad_input() {
    let model = load(&tiny());
    let inp = forward_in();
    let mut g = gpu(&model, 2, 4, PixArtCache::Reuse);
    let mut out = vec![0.0; 2 * model.config.out_elems()];
    let e = g.forward(&inp.x, &inp.t, &inp.text, &inp.mask, inp.len, None, &mut out).unwrap_err().to_string();
    assert!(e.contains("6 tokens") && e.contains("max text length"), "{e}");
    let e = g.run(2, StepKind::Reuse).unwrap_err().to_string();
    assert!(e.contains("caption"), "{e}");
    let text = &inp.text[..2 * 4 * model.config.caption_channels];
    g.stage_text(text, &[1; 8], 2, 4).unwrap();
    g.stage_inputs(&inp.x, &inp.t, 2).unwrap();
    let e = g.run(2, StepKind::Reuse).unwrap_err().to_string();
    assert!(e.contains("needs a full step"), "{e}");
    let e = g.run(2, StepKind::Calibrated).unwrap_err().to_string();
    assert!(e.contains("under cache policy reuse"), "{e}");
    let e = g.stage_text(text, &[2; 8], 2, 4).unwrap_err().to_string();
    assert!(e.contains("masks are 0 or 1"), "{e}");
    // Latents that overflow f16 make the first step's model output non-finite: the request
    // fails naming step 0, found by the device's check (one compare per value, read once).
    let opts = options(PixArtSampler::Ddim, 3, 4.5, PixArtCache::None, 1);
    let mut e = PixArtEngine::new_gpu(Arc::clone(&model), &opts, EmuDevice::new).unwrap();
    let (pos, neg) = (embeddings("prompt_embeds"), embeddings("negative_embeds"));
    let z = vec![1e30f32; 2 * model.config.image_elems()];
    let req = PixArtRequest { prompt: &pos, negative: Some(&neg), noise: Some(&z), seed: 0, first_index: 0 };
    let mut out = vec![0.0; z.len()];
    let err = e.sample(&req, &mut out, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("sampling step 0 of 3") && err.contains("the model output on the device"), "{err}");
}

/// The six numbers per step the device's sampler kernel reads reproduce the host's update
/// (`PixArtSchedule::step`) for every step of DPM-Solver++ (first order, second order, the
/// final step to σ = 0) and DDIM: x and x̂₀ within 1e-5 relative L2 (f32, terms grouped
/// differently; measured ≤ 2.1e-7). The device's previews (x̂₀ of each step) match the CPU's.
#[test]
fn device_sampler_matches_host_update() {
    for sampler in [PixArtSampler::DpmSolver, PixArtSampler::Ddim] {
        let sched = icdit::pixart::PixArtSchedule::new(sampler, 7).unwrap();
        let v = |seed| values(64, seed, 3.0).iter().map(|h| h.to_f32()).collect::<Vec<f32>>();
        let (mut x, mut p) = (v(11), vec![0.0f32; 64]);
        let (mut xd, mut pd) = (x.clone(), p.clone());
        for i in 0..sched.len() {
            let eps = v(20 + i as u64);
            sched.step(i, &mut x, &eps, &mut p);
            let [alpha, sigma, a, b, c, d] = sched.update_coeffs(i);
            for ((xv, pv), &e) in xd.iter_mut().zip(pd.iter_mut()).zip(&eps) {
                let x0 = (*xv - sigma * e) / alpha;
                *xv = a * *xv + b * x0 + c * e + if d != 0.0 { d * *pv } else { 0.0 };
                *pv = x0;
            }
            assert_close(&format!("{} step {i}: x", sampler.name()), &xd, &x, 1e-5);
            assert_close(&format!("{} step {i}: x̂₀", sampler.name()), &pd, &p, 1e-5);
        }
    }
    let opts = options(PixArtSampler::DpmSolver, 4, 4.5, PixArtCache::None, 1);
    let model = load(&tiny());
    let (pos, neg) = (embeddings("prompt_embeds"), embeddings("negative_embeds"));
    let req = PixArtRequest { prompt: &pos, negative: Some(&neg), noise: None, seed: 5, first_index: 0 };
    let n = 2 * model.config.image_elems();
    let mut previews = Vec::new();
    let mut g = PixArtEngine::new_gpu(Arc::clone(&model), &opts, EmuDevice::new).unwrap();
    let mut c = PixArtEngine::new(model, &opts).unwrap();
    let (mut out_g, mut out_c, mut buf) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    g.sample_previewed(&req, &mut out_g, &mut buf, &mut |_, x0| previews.push(x0.to_vec())).unwrap();
    let mut k = 0;
    c.sample_previewed(&req, &mut out_c, &mut buf, &mut |s, x0| {
        assert_close(&format!("device x̂₀ preview of step {}", s.index), &previews[k], x0, GUIDED_TOL);
        k += 1;
    })
    .unwrap();
    assert_eq!((k, previews.last().unwrap()), (4, &out_g), "the last preview is the device's result");
}

/// A one-block PixArt pipeline with DiT-XL/2's head dim (72, 2 heads: C = 144) and seeded
/// random weights (uniform, scaled 1/√fan-in), written next to the tiny pipeline's configs.
fn head72_pipeline(dir: &Path) -> PathBuf {
    let root = dir.join("pipe72");
    std::fs::create_dir_all(root.join("transformer")).unwrap();
    std::fs::create_dir_all(root.join("scheduler")).unwrap();
    for f in ["model_index.json", "scheduler/scheduler_config.json"] {
        std::fs::copy(tiny().join(f), root.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("transformer/config.json")).unwrap()).unwrap();
    cfg["attention_head_dim"] = 72.into();
    cfg["num_layers"] = 1.into();
    cfg["cross_attention_dim"] = 144.into();
    std::fs::write(root.join("transformer/config.json"), cfg.to_string()).unwrap();
    let cfg = icdit::pixart::PixArtConfig::load(&root).unwrap();
    let c = cfg.hidden_size();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32| {
        let seed = tensors.len() as u64 + 2;
        let v = values(shape.iter().product(), seed, scale).iter().map(|h| h.to_f32()).collect();
        tensors.push((name, shape, v));
    };
    add("pos_embed.proj.weight".into(), vec![c, cfg.in_channels, cfg.patch_size, cfg.patch_size], 0.5);
    add("pos_embed.proj.bias".into(), vec![c], 0.1);
    add("transformer_blocks.0.scale_shift_table".into(), vec![6, c], 0.3);
    add("scale_shift_table".into(), vec![2, c], 0.3);
    for layer in icdit::pixart::Layer::all(cfg.depth) {
        let (out, inp) = layer.shape(&cfg);
        add(format!("{}.weight", layer.name()), vec![out, inp], 1.0 / (inp as f32).sqrt());
        add(format!("{}.bias", layer.name()), vec![out], 0.1);
    }
    let views: Vec<(&str, &[usize], &[f32])> =
        tensors.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())).collect();
    write_safetensors(&root.join("transformer/diffusion_pytorch_model.safetensors"), &views, &[], None).unwrap();
    root
}

/// At head dim 72 (PixArt-α-XL/2's) self-attention runs on DiT's flash kernel: one forward
/// pass of a random one-block model with the fixture's inputs against the CPU backend, the f16
/// bound 2e-3 (measured 2.8e-4).
#[test]
fn head_dim_72_forward_matches_cpu() {
    let dir = TempDir::new("pixart-head72");
    let model = load(&head72_pipeline(&dir));
    assert_eq!((model.config.head_dim, model.config.hidden_size()), (72, 144));
    let (got, want) = (gpu_forward(&model), cpu_forward(&model, 2));
    assert_close("head dim 72 forward: device vs CPU", &got, &want, FORWARD_TOL);
}

/// The 1024-MS model's micro-conditions on the device (tests/fixtures/pixart_ms/tiny_ms at its
/// trained square size): the resolution / aspect-ratio embedding, computed on the host once per
/// request and added to `emb` in the GEMM's epilogue, gives the CPU backend's forward within the
/// forward bound (2e-3; measured 5e-4) for two different conditions per row, and they matter
/// (the two outputs differ by far more); guided sampling matches within the guided bound (5e-3).
/// A latent size other than the trained square is refused, naming `--backend cpu`.
#[test]
fn micro_conditions_match_cpu_and_other_sizes_are_refused() {
    let ms = load(&fixture("pixart_ms/tiny_ms"));
    let cfg = ms.config;
    assert!(cfg.use_additional_conditions);
    let inp = forward_in();
    let rows = 2;
    let x: Vec<f32> = (0..rows * cfg.image_elems()).map(|i| ((i * 29 % 97) as f32 / 48.0) - 1.0).collect();
    let t = [500.0f32, 120.0];
    let text = &inp.text[..rows * inp.len * cfg.caption_channels];
    let mask = &inp.mask[..rows * inp.len];
    let gopts = PixArtGpuOptions { max_rows: rows, max_text_len: inp.len, cache: PixArtCache::None };
    let mut g = PixArtGpu::new(Arc::clone(&ms), &gopts, EmuDevice::new).unwrap_or_else(|e| panic!("{e}"));
    let copts = PixArtCpuOptions { max_rows: rows, max_text_len: inp.len, threads: 2, ..Default::default() };
    let mut c = PixArtCpu::new(Arc::clone(&ms), &copts).unwrap();
    let mut outs = Vec::new();
    for (res, ar) in [([1024.0f32, 1024.0, 768.0, 1280.0], [1.0f32, 0.6]), ([512.0, 2048.0, 256.0, 256.0], [0.25, 1.0])]
    {
        let run = |m: &mut dyn FnMut(&[f32], &[f32]) -> Vec<f32>| m(&res, &ar);
        let got = run(&mut |res, ar| {
            g.stage_text(text, mask, rows, inp.len).unwrap();
            g.stage_size(res, ar, rows).unwrap();
            g.stage_inputs(&x, &t, rows).unwrap();
            g.run(rows, StepKind::Plain).unwrap();
            g.output(rows).to_vec()
        });
        let want = run(&mut |res, ar| {
            c.stage_text(text, mask, rows, inp.len).unwrap();
            c.stage_size(res, ar, rows).unwrap();
            c.stage_inputs(&x, &t, rows).unwrap();
            c.run(rows, StepKind::Plain).unwrap();
            c.output(rows).to_vec()
        });
        let err = rel_l2(&got, &want);
        println!("micro-conditions {res:?} / {ar:?}: device vs CPU relative L2 {err:.2e} (bound 2e-3)");
        assert!(err < 2e-3, "device vs CPU with micro-conditions: {err}");
        outs.push(want);
    }
    let apart = rel_l2(&outs[0], &outs[1]);
    assert!(apart > 20.0 * 2e-3, "the conditions change the output by only {apart}");
    // Sampling: the pipeline's conditions (the trained size) staged by the engine.
    let opts = PixArtOptions { max_text_len: 6, ..options(PixArtSampler::DpmSolver, 4, 4.5, PixArtCache::None, 1) };
    let (pos, neg) = (embeddings("prompt_embeds"), embeddings("negative_embeds"));
    let req = PixArtRequest { prompt: &pos, negative: Some(&neg), noise: None, seed: 7, first_index: 0 };
    let mut gpu = PixArtEngine::new_gpu(Arc::clone(&ms), &opts, EmuDevice::new).unwrap_or_else(|e| panic!("{e}"));
    let mut cpu = PixArtEngine::new(Arc::clone(&ms), &opts).unwrap();
    let (mut a, mut b) = (vec![0.0; 2 * cfg.image_elems()], vec![0.0; 2 * cfg.image_elems()]);
    gpu.sample(&req, &mut a, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    cpu.sample(&req, &mut b, &mut |_| {}).unwrap();
    let err = rel_l2(&a, &b);
    println!("micro-conditioned guided sampling, 4 DPM-Solver++ steps: device vs CPU {err:.2e} (bound 5e-3)");
    assert!(err < 5e-3, "micro-conditioned sampling: {err}");
    // Another latent size than the trained square: CPU only.
    let opts = PixArtGpuOptions { max_rows: 2, max_text_len: 6, cache: PixArtCache::None };
    let wide = Arc::new(PixArtModel::load_at(&tiny(), Some((8, 12))).unwrap());
    let e = PixArtGpu::new(wide, &opts, EmuDevice::new).err().expect("refused").to_string();
    assert!(e.contains("8×12") && e.contains("--backend cpu"), "{e}");
}
