//! PixArt-α on the CPU backend against diffusers 0.42.1 (fixtures by
//! `tools/make_pixart_fixtures.py`): the transformer forward (f32, f16, bf16 weights, a
//! partial caption mask), DPM-Solver++ 2M and DDIM trajectories with and without guidance,
//! the caching policies' basic properties, errors, and the `forward` / `sample` commands.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::pixart::{
    cpu_forward, embeddings, exact_factors, forward_in, load, noise, options, sample, sample_tiny, tiny,
};
use common::{assert_close, fixture, icdit, p, rel_l2, TempDir};
use icdit::forward::StepKind;
use icdit::pixart::{
    PixArtCache, PixArtCpu, PixArtCpuOptions, PixArtEngine, PixArtFactors, PixArtModel, PixArtRequest, PixArtRunner,
    PixArtSampler, PixArtSchedule,
};
use icdit::tensorfile::{write_safetensors, TensorFile};

fn reference(name: &str) -> Vec<f32> {
    TensorFile::open(&fixture("pixart/forward_out.safetensors")).unwrap().read_f32(name).unwrap().1
}

/// f32 weights: the forward matches diffusers within 1e-5 relative L2 (measured 1.0e-6),
/// on one thread and on two. Image 0's caption mask is partial: ignoring it changes the
/// output by far more than the tolerance.
#[test]
fn forward_matches_diffusers() {
    let model = load(&tiny());
    let want = reference("out");
    let inp = forward_in();
    let mut cpu = PixArtCpu::new(
        Arc::clone(&model),
        &PixArtCpuOptions { max_rows: 2, max_text_len: inp.len, threads: 1, ..Default::default() },
    )
    .unwrap();
    let mut unmasked = vec![0.0; want.len()];
    cpu.forward(&inp.x, &inp.t, &inp.text, &vec![1; inp.mask.len()], inp.len, None, &mut unmasked).unwrap();
    let err = rel_l2(&unmasked, &want);
    assert!(err > 1e-3, "the caption mask made no difference ({err:.3e})");
    for threads in [1, 2] {
        assert_close(&format!("forward, f32 weights, {threads} threads"), &cpu_forward(&model, threads), &want, 1e-5);
    }
}

/// f16 and bf16 weights are converted to f32 at load: the output matches diffusers run with
/// the same rounded weights in f32 within 1e-5.
#[test]
fn forward_f16_bf16_weights() {
    for (dir, name) in [("pixart/tiny_f16", "out_f16"), ("pixart/tiny_bf16", "out_bf16")] {
        let model = load(&fixture(dir));
        assert_eq!(
            model.dtypes.keys().copied().collect::<Vec<_>>(),
            vec![if name == "out_f16" { "f16" } else { "bf16" }]
        );
        assert_close(&format!("forward, {name}"), &cpu_forward(&model, 2), &reference(name), 1e-5);
    }
}

fn sampling(name: &str) -> (Vec<usize>, Vec<usize>, Vec<f32>) {
    let f = TensorFile::open(&fixture("pixart/sampling.safetensors")).unwrap();
    let ts = f.read_i64(&format!("{name}_timesteps")).unwrap().1.iter().map(|&t| t as usize).collect();
    let (shape, traj) = f.read_f32(&format!("{name}_trajectory")).unwrap_or_default();
    (ts, shape, traj)
}

fn engine(sampler: PixArtSampler, steps: usize, cfg: f32, cache: PixArtCache, period: usize) -> PixArtEngine {
    PixArtEngine::new(load(&tiny()), &options(sampler, steps, cfg, cache, period)).unwrap_or_else(|e| panic!("{e}"))
}

/// DPM-Solver++'s and DDIM's timesteps are diffusers' (20-step default included).
#[test]
fn timesteps_match_diffusers() {
    for (name, sampler, steps) in [
        ("dpm", PixArtSampler::DpmSolver, 6),
        ("dpm_unguided", PixArtSampler::DpmSolver, 5),
        ("dpm20", PixArtSampler::DpmSolver, 20),
        ("ddim", PixArtSampler::Ddim, 6),
    ] {
        let (want, _, _) = sampling(name);
        assert_eq!(PixArtSchedule::new(sampler, steps).unwrap().timesteps, want, "{name}");
    }
}

/// Whole sampling runs against diffusers' schedulers driving the transformer: DPM-Solver++
/// 2M at guidance 4.5 (6 steps) and unguided (5 steps), DDIM at 4.5 (6 steps). Every step's
/// x̂₀ (the previews) and the final latents within 1e-4 relative L2 (measured 0.5–1.5e-6);
/// DPM-Solver++'s last preview is the result.
#[test]
fn sampling_matches_diffusers() {
    let f = TensorFile::open(&fixture("pixart/sampling.safetensors")).unwrap();
    for (name, sampler, steps, cfg) in [
        ("dpm", PixArtSampler::DpmSolver, 6, 4.5),
        ("dpm_unguided", PixArtSampler::DpmSolver, 5, 1.0),
        ("ddim", PixArtSampler::Ddim, 6, 4.5),
    ] {
        let (_, shape, traj) = sampling(name);
        let x0s = f.read_f32(&format!("{name}_x0")).unwrap().1;
        let img = traj.len() / shape[0];
        let mut e = engine(sampler, steps, cfg, PixArtCache::None, 1);
        let (pos, neg, z) = (embeddings("prompt_embeds"), embeddings("negative_embeds"), noise());
        let req = PixArtRequest { prompt: &pos, negative: Some(&neg), noise: Some(&z), seed: 0, first_index: 0 };
        let (mut out, mut preview) = (vec![0.0; img], vec![0.0; img]);
        let mut seen = 0;
        e.sample_previewed(&req, &mut out, &mut preview, &mut |step, x0| {
            assert_eq!(step.timestep, e_timestep(name, step.index));
            assert_close(&format!("{name}: x̂₀ of step {}", step.index), x0, &x0s[step.index * img..][..img], 1e-4);
            seen += 1;
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seen, steps);
        if sampler == PixArtSampler::DpmSolver {
            // Its last step goes to σ = 0; DDIM's goes to ᾱ[0] < 1 instead.
            assert_eq!(out, preview, "{name}: the last x̂₀ is the result");
        }
        assert_close(&format!("{name}: final latents"), &out, &traj[traj.len() - img..], 1e-4);
        assert_eq!(sample(&mut e), out, "{name}: sample and sample_previewed agree");
    }
}

fn e_timestep(name: &str, index: usize) -> usize {
    sampling(name).0[index]
}

/// Caching: with period 1 every step is full, which equals no caching (tolerance 1e-6,
/// measured 0); icc with exact full-rank factors equals no caching within float error
/// (tolerance 1e-4, measured ~1e-6); reuse at period 2 differs from it (rel. L2 > 1e-3)
/// and icc with exact factors is closer than reuse.
#[test]
fn caching_policies() {
    let dir = TempDir::new("pixart-factors");
    let factors = Arc::new(PixArtFactors::load(&exact_factors(&dir), &load(&tiny())).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(factors.max_rank(), 32);
    let none = sample(&mut engine(PixArtSampler::DpmSolver, 6, 4.5, PixArtCache::None, 1));
    for cache in [PixArtCache::Reuse, PixArtCache::Icc(Arc::clone(&factors))] {
        let got = sample(&mut engine(PixArtSampler::DpmSolver, 6, 4.5, cache.clone(), 1));
        assert_close(&format!("{} period 1 vs none", cache.policy()), &got, &none, 1e-6);
    }
    let mut icc_engine = engine(PixArtSampler::DpmSolver, 6, 4.5, PixArtCache::Icc(Arc::clone(&factors)), 3);
    let kinds: Vec<StepKind> = (0..6).map(|i| icc_engine.step_kind(i)).collect();
    use StepKind::{Calibrated, Full};
    assert_eq!(kinds, [Full, Calibrated, Calibrated, Full, Calibrated, Calibrated]);
    let icc = sample(&mut icc_engine);
    let icc_err = assert_close("icc, exact factors, period 3 vs none", &icc, &none, 1e-4);
    let reuse = sample(&mut engine(PixArtSampler::DpmSolver, 6, 4.5, PixArtCache::Reuse, 2));
    let reuse_err = rel_l2(&reuse, &none);
    println!("reuse, period 2 vs none: relative L2 {reuse_err:.3e}");
    assert!(reuse_err > 1e-3 && reuse_err > 100.0 * icc_err, "reuse {reuse_err:.3e}, icc {icc_err:.3e}");
}

/// `icdit forward` on the pipeline folder writes diffusers' output (1e-5).
#[test]
fn cli_forward() {
    let dir = TempDir::new("pixart-cli-forward");
    let out = dir.join("out.safetensors");
    let input = fixture("pixart/forward_in.safetensors");
    let (ok, err) = icdit(&["forward", "--weights", p(&tiny()), "--input", p(&input), "--out", p(&out)]);
    assert!(ok, "{err}");
    let got = TensorFile::open(&out).unwrap().read_f32("out").unwrap();
    assert_eq!(got.0, vec![2, 8, 8, 8]);
    assert_close("icdit forward", &got.1, &reference("out"), 1e-5);
}

/// `icdit sample` from embeddings files and given noise: the latents are diffusers' (1e-4)
/// for DPM-Solver++ and DDIM; with icc factors and a VAE it writes a grid; `--compare`
/// writes one grid row per policy.
#[test]
fn cli_sample() {
    let dir = TempDir::new("pixart-cli-sample");
    let z = fixture("pixart/noise.safetensors");
    for (name, sampler) in [("dpm", "dpm-solver"), ("ddim", "ddim")] {
        let lat = dir.join(format!("{name}.safetensors"));
        let (ok, err) = sample_tiny(
            "6",
            &["--noise", p(&z), "--sampler", sampler, "--cfg", "4.5", "--threads", "2", "--out-latents", p(&lat)],
        );
        assert!(ok, "{err}");
        let (_, shape, traj) = sampling(name);
        let img = traj.len() / shape[0];
        let got = TensorFile::open(&lat).unwrap().read_f32("latents").unwrap();
        assert_eq!(got.0, vec![2, 4, 8, 8]);
        assert_close(&format!("icdit sample --sampler {sampler}"), &got.1, &traj[traj.len() - img..], 1e-4);
    }
    let (factors, vae) = (exact_factors(&dir), fixture("vae/new"));
    let grid = dir.join("grid.png");
    let (ok, err) = sample_tiny(
        "4",
        &["--cache", "icc", "--period", "2", "--factors", p(&factors), "--vae", p(&vae), "--grid", p(&grid)],
    );
    assert!(ok, "{err}");
    assert!(std::fs::read(&grid).unwrap().starts_with(b"\x89PNG"), "{err}");
    // --compare: one grid row per policy, distances to `none` printed.
    let cmp = dir.join("compare.png");
    let (ok, err) = sample_tiny(
        "4",
        &["--compare", "none,reuse,icc", "--factors", p(&factors), "--vae", p(&vae), "--grid", p(&cmp)],
    );
    assert!(ok, "{err}");
    assert!(err.contains("reuse: relative L2 of the latents to `none`") && err.contains("icc: relative L2"), "{err}");
    assert!(std::fs::read(&cmp).unwrap().starts_with(b"\x89PNG"), "{err}");
}

/// A copy of the tiny pipeline whose transformer config is edited by `edit`.
fn edited_pipeline(dir: &Path, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let root = dir.join("pipe");
    std::fs::create_dir_all(root.join("transformer")).unwrap();
    std::fs::copy(tiny().join("model_index.json"), root.join("model_index.json")).unwrap();
    let w = "transformer/diffusion_pytorch_model.safetensors";
    std::fs::copy(tiny().join(w), root.join(w)).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("transformer/config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(root.join("transformer/config.json"), cfg.to_string()).unwrap();
    root
}

/// Bad input is a clear error naming what is wrong.
#[test]
fn errors() {
    let dir = TempDir::new("pixart-errors");
    let err = |r: icdit::Result<PixArtModel>| r.err().map(|e| e.to_string()).unwrap_or_default();
    // No transformer/.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(tiny().join("model_index.json"), empty.join("model_index.json")).unwrap();
    let e = err(PixArtModel::load(&empty));
    assert!(e.contains("transformer/config.json"), "{e}");
    // A tensor of the wrong shape (the config says another caption width).
    let e = err(PixArtModel::load(&edited_pipeline(&dir.join("a"), |c| c["caption_channels"] = 16.into())));
    assert!(e.contains("caption_projection.linear_1.weight") && e.contains("16"), "{e}");
    // The 1024-MS model's micro-conditions (on by default at sample_size 128) need hidden / 3
    // wide embeddings: this model's hidden size 32 cannot hold them.
    let e = err(PixArtModel::load(&edited_pipeline(&dir.join("b"), |c| c["use_additional_conditions"] = true.into())));
    assert!(e.contains("use_additional_conditions") && e.contains("divisible by 3"), "{e}");
    let e = err(PixArtModel::load(&edited_pipeline(&dir.join("c"), |c| c["sample_size"] = 128.into())));
    assert!(e.contains("use_additional_conditions"), "{e}");
    // A scheduler config asking for another DPM-Solver variant.
    let pipe = edited_pipeline(&dir.join("d"), |_| {});
    std::fs::create_dir_all(pipe.join("scheduler")).unwrap();
    let sched = std::fs::read_to_string(tiny().join("scheduler/scheduler_config.json")).unwrap();
    let sched = sched.replace("\"solver_order\": 2", "\"solver_order\": 3");
    std::fs::write(pipe.join("scheduler/scheduler_config.json"), sched).unwrap();
    let e = err(PixArtModel::load(&pipe));
    assert!(e.contains("solver_order is 3"), "{e}");
    // CLI: an unknown backend, missing negative embeddings, embeddings of the wrong width.
    let pe = fixture("pixart/prompt_embeds.safetensors");
    let (lat, weights) = (dir.join("l.safetensors"), tiny());
    let run_sample =
        |rest: &[&str]| icdit(&[&["sample", "--weights", p(&weights), "--out-latents", p(&lat)], rest].concat());
    let (ok, e) = run_sample(&["--prompt-embeds", p(&pe), "--backend", "gpu"]);
    assert!(!ok && e.contains("expected cpu, cuda or emu"), "{e}");
    let (ok, e) = run_sample(&["--prompt-embeds", p(&pe)]);
    assert!(!ok && e.contains("--negative-embeds") && e.contains("no text_encoder/"), "{e}");
    let narrow = dir.join("narrow.safetensors");
    write_safetensors(
        &narrow,
        &[("prompt_embeds", &[1, 3, 5], &[0.5; 15])],
        &[("attention_mask", &[1, 3], &[1, 1, 0])],
        None,
    )
    .unwrap();
    let (ok, e) = run_sample(&["--prompt-embeds", p(&narrow), "--cfg", "1"]);
    assert!(!ok && e.contains("caption_channels is 24"), "{e}");
    let (ok, e) = run_sample(&["--prompt-embeds", p(&pe), "--cache", "icc", "--cfg", "1"]);
    assert!(!ok && e.contains("--factors"), "{e}");
}

/// Caching against an independent Python implementation of the definition (forward hooks on
/// diffusers' modules, tools/make_pixart_fixtures.py): 6 guided DPM-Solver++ steps under icc
/// with random rank-4 factors (period 3) and under reuse (period 2). Tolerance 1e-4 relative
/// L2 on the final latents (measured ~1e-6); each differs from no caching by > 1e-3.
#[test]
fn caching_matches_python_reference() {
    let f = TensorFile::open(&fixture("pixart/sampling.safetensors")).unwrap();
    let factors = Arc::new(
        PixArtFactors::load(&fixture("pixart/factors_rank4.safetensors"), &load(&tiny()))
            .unwrap_or_else(|e| panic!("{e}")),
    );
    assert_eq!(factors.max_rank(), 4);
    let none = sample(&mut engine(PixArtSampler::DpmSolver, 6, 4.5, PixArtCache::None, 1));
    for (name, cache, period) in
        [("icc_period3", PixArtCache::Icc(factors), 3), ("reuse_period2", PixArtCache::Reuse, 2)]
    {
        let want = f.read_f32(name).unwrap().1;
        let got = sample(&mut engine(PixArtSampler::DpmSolver, 6, 4.5, cache, period));
        assert_close(name, &got, &want, 1e-4);
        let vs_none = rel_l2(&got, &none);
        println!("{name} vs no caching: relative L2 {vs_none:.3e}");
        assert!(vs_none > 1e-3, "{name} should differ from no caching ({vs_none:.3e})");
    }
}

/// `icdit calibrate --method svd` on the pipeline folder: factors named after the layers at
/// rank min(r, out, in); at full rank icc equals no caching (1e-4, measured ~1e-6), at rank 4
/// it does not (> 1e-3). CA-SVD is refused with a clear error.
#[test]
fn cli_calibrate_svd() {
    let dir = TempDir::new("pixart-calibrate");
    let none = sample(&mut engine(PixArtSampler::DpmSolver, 6, 4.5, PixArtCache::None, 1));
    for (rank, exact) in [("32", true), ("4", false)] {
        let out = dir.join(format!("svd{rank}.safetensors"));
        let (ok, err) =
            icdit(&["calibrate", "--weights", p(&tiny()), "--method", "svd", "--rank", rank, "--out", p(&out)]);
        assert!(ok, "{err}");
        let f = TensorFile::open(&out).unwrap();
        assert_eq!(
            f.get("transformer_blocks.1.ff.net.2.down").unwrap().shape,
            vec![rank.parse::<usize>().unwrap(), 128]
        );
        let factors = Arc::new(PixArtFactors::load(&out, &load(&tiny())).unwrap());
        let got = sample(&mut engine(PixArtSampler::DpmSolver, 6, 4.5, PixArtCache::Icc(factors), 3));
        if exact {
            assert_close("icc, full-rank SVD factors vs none", &got, &none, 1e-4);
        } else {
            let err = rel_l2(&got, &none);
            println!("icc, rank-4 SVD factors vs none: relative L2 {err:.3e}");
            assert!(err > 1e-3, "{err:.3e}");
        }
    }
    let (ok, err) = icdit(&["calibrate", "--weights", p(&tiny()), "--method", "ca-svd", "--out", p(&dir.join("x"))]);
    assert!(!ok && err.contains("--calib-embeds"), "{err}");
}

/// `icdit calibrate --method ca-svd --calib-embeds`: the model samples the prompts, then the
/// channel-weighted factors. At full rank icc equals no caching (1e-4, measured ~1e-6); at
/// rank 4 the factors differ from plain SVD's (the weighting acts) and the file is the same
/// bytes for the same seed.
#[test]
fn cli_calibrate_ca_svd() {
    let dir = TempDir::new("pixart-ca-svd");
    let (pe, ne) = (fixture("pixart/prompt_embeds.safetensors"), fixture("pixart/negative_embeds.safetensors"));
    let weights = tiny();
    let run = |rank: &str, name: &str, method: &str| {
        let out = dir.join(name);
        let mut args =
            vec!["calibrate", "--weights", p(&weights), "--method", method, "--rank", rank, "--out", p(&out)];
        if method == "ca-svd" {
            args.extend(["--calib-embeds", p(&pe), "--negative-embeds", p(&ne), "--threads", "2"]);
        }
        let (ok, err) = icdit(&args);
        assert!(ok, "{err}");
        out
    };
    let full = Arc::new(PixArtFactors::load(&run("32", "full.safetensors", "ca-svd"), &load(&tiny())).unwrap());
    let none = sample(&mut engine(PixArtSampler::DpmSolver, 6, 4.5, PixArtCache::None, 1));
    let got = sample(&mut engine(PixArtSampler::DpmSolver, 6, 4.5, PixArtCache::Icc(full), 3));
    assert_close("icc, full-rank CA-SVD factors vs none", &got, &none, 1e-4);
    let (ca, ca2, svd) = (
        run("4", "ca.safetensors", "ca-svd"),
        run("4", "ca2.safetensors", "ca-svd"),
        run("4", "svd.safetensors", "svd"),
    );
    assert_eq!(std::fs::read(&ca).unwrap(), std::fs::read(&ca2).unwrap(), "same seed, same factors");
    let name = "transformer_blocks.0.ff.net.0.proj.down";
    let (a, b) = (TensorFile::open(&ca).unwrap(), TensorFile::open(&svd).unwrap());
    let (a, b) = (a.read_f32(name).unwrap().1, b.read_f32(name).unwrap().1);
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(diff > 1e-3, "CA-SVD's factors equal plain SVD's ({diff:.3e})");
}

/// A sharded transformer (two files and `diffusion_pytorch_model.safetensors.index.json`)
/// loads and gives the same output as the single file.
#[test]
fn sharded_weights() {
    let dir = TempDir::new("pixart-shards");
    let pipe = dir.join("pipe");
    std::fs::create_dir_all(pipe.join("transformer")).unwrap();
    std::fs::copy(tiny().join("model_index.json"), pipe.join("model_index.json")).unwrap();
    std::fs::copy(tiny().join("transformer/config.json"), pipe.join("transformer/config.json")).unwrap();
    let f = TensorFile::open(&tiny().join("transformer/diffusion_pytorch_model.safetensors")).unwrap();
    let mut names: Vec<String> = f.names().map(str::to_string).collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (part, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", part + 1);
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = chunk
            .iter()
            .map(|n| {
                let (s, d) = f.read_f32(n).unwrap();
                (n.clone(), s, d)
            })
            .collect();
        let views: Vec<(&str, &[usize], &[f32])> =
            tensors.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())).collect();
        write_safetensors(&pipe.join("transformer").join(&file), &views, &[], None).unwrap();
        for n in chunk {
            map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(pipe.join("transformer/diffusion_pytorch_model.safetensors.index.json"), index.to_string()).unwrap();
    let model = load(&pipe);
    assert_eq!(model.store_files(), 2);
    assert_close("forward, sharded weights", &cpu_forward(&model, 1), &reference("out"), 1e-5);
}

/// `icdit sample --prompt`: the prompts go through the folder's text encoder (opened only
/// then). The tiny pipeline joined with the tiny T5 (d_model 64 against caption channels 24)
/// reaches the encoder and is refused with both widths named; without a text encoder, a
/// prompt is refused naming the missing folder, and guidance without negative embeddings says
/// what to pass.
#[test]
fn cli_sample_from_prompts() {
    let dir = TempDir::new("pixart-cli-prompt");
    let pipe = dir.join("pipe");
    std::fs::create_dir_all(&pipe).unwrap();
    for (name, from) in [
        ("model_index.json", tiny().join("model_index.json")),
        ("transformer", tiny().join("transformer")),
        ("scheduler", tiny().join("scheduler")),
        ("text_encoder", fixture("t5/text_encoder")),
        ("tokenizer", fixture("t5/tokenizer")),
    ] {
        std::os::unix::fs::symlink(std::fs::canonicalize(from).unwrap(), pipe.join(name)).unwrap();
    }
    let latents = dir.join("latents.safetensors");
    let base = ["sample", "--steps", "2", "--out-latents", p(&latents)];
    let (ok, err) = icdit(&[&base[..], &["--weights", p(&pipe), "--prompt", "a red square", "--cfg", "1"]].concat());
    assert!(!ok && err.contains("64") && err.contains("24"), "{err}");
    assert!(!latents.exists(), "no output after a refused request");
    let (ok, err) = icdit(&[&base[..], &["--weights", p(&tiny()), "--prompt", "a red square", "--cfg", "1"]].concat());
    assert!(!ok && err.contains("tokenizer"), "{err}");
    let embeds = fixture("pixart/prompt_embeds.safetensors");
    let (ok, err) = icdit(&[&base[..], &["--weights", p(&tiny()), "--prompt-embeds", p(&embeds)]].concat());
    assert!(!ok && err.contains("--negative-embeds") && err.contains("text_encoder"), "{err}");
}
