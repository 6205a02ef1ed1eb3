//! Samplers against the official DiT diffusion code (tests/fixtures/diffusion, made by
//! tools/make_diffusion_fixtures.py): respacing lists, every schedule array, DDIM with and
//! without guidance, DDPM with learned and fixed variance, DDIM with η = 1, each from the
//! same z and per-step noise. Tolerance: relative L2 ≤ 1e-4 (the bar); measured
//! errors are printed. The official f32 run itself differs from f64 by ~2e-6.

mod common;

use std::sync::Arc;

use common::{assert_close, fixture};
use icdit::cpu::Isa;
use icdit::diffusion::{self, space_timesteps, Schedule, Variance};
use icdit::tensorfile::TensorFile;
use icdit::{DitModel, Engine, EngineOptions, GuidedChannels, LoadOptions, Request, Sampler};

const TOL: f64 = 1e-4;

fn file(name: &str) -> TensorFile {
    TensorFile::open(&fixture(&format!("diffusion/{name}"))).unwrap()
}

fn f32s(f: &TensorFile, name: &str) -> Vec<f32> {
    f.read_f32(name).unwrap().1
}

fn f64s(f: &TensorFile, name: &str) -> Vec<f64> {
    let e = f.get(name).unwrap();
    f.bytes(e).chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
}

fn model(name: &str) -> Arc<DitModel> {
    Arc::new(DitModel::load(&fixture(&format!("{name}/official.safetensors")), &LoadOptions::default()).unwrap())
}

/// Runs a whole sampling loop from the fixture's z (and step noise).
fn sample(
    model: Arc<DitModel>,
    sampler: Sampler,
    cfg: f32,
    labels: &[i64],
    z: &[f32],
    noise: Option<&[f32]>,
) -> Vec<(Isa, Vec<f32>)> {
    common::isas("sampling")
        .into_iter()
        .map(|isa| (isa, sample_on(Arc::clone(&model), sampler, cfg, labels, z, noise, isa)))
        .collect()
}

/// Asserts every path's sample is within `tol` of the official one.
fn assert_all_close(what: &str, outs: &[(Isa, Vec<f32>)], expected: &[f32], tol: f64) {
    for (isa, out) in outs {
        assert_close(&format!("{what} ({isa})"), out, expected, tol);
    }
}

fn sample_on(
    model: Arc<DitModel>,
    sampler: Sampler,
    cfg: f32,
    labels: &[i64],
    z: &[f32],
    noise: Option<&[f32]>,
    isa: Isa,
) -> Vec<f32> {
    let opts = EngineOptions {
        max_batch: labels.len(),
        respacing: "10".into(),
        sampler,
        cfg_scale: cfg,
        guided_channels: GuidedChannels::OfficialThree,
        threads: 2,
        isa: Some(isa),
        ..Default::default()
    };
    let mut engine = Engine::new(model, &opts).unwrap();
    let mut out = vec![0.0; z.len()];
    let req = Request { noise: Some(z), step_noise: noise, ..Request::new(labels, 0) };
    engine.sample(&req, &mut out, &mut |_| {}).unwrap();
    out
}

/// The official noise covers all 2n rows under guidance; the conditional rows are the first n.
fn first_rows(noise: &[f32], steps: usize, rows: usize, keep: usize) -> Vec<f32> {
    let per = noise.len() / (steps * rows);
    (0..steps).flat_map(|s| noise[(s * rows) * per..(s * rows + keep) * per].to_vec()).collect()
}

#[test]
fn respacing_matches_official() {
    let text = std::fs::read_to_string(fixture("diffusion/respacing.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (spec, list) in v["specs"].as_object().unwrap() {
        let want: Vec<usize> = list.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(space_timesteps(spec).unwrap(), want, "spec {spec}");
    }
    for bad in v["invalid"].as_array().unwrap() {
        let spec = bad["spec"].as_str().unwrap();
        let err = space_timesteps(spec).expect_err(spec);
        println!("{spec}: {err}");
    }
    for n in v["ddim_valid_counts"].as_array().unwrap() {
        assert!(space_timesteps(&format!("ddim{n}")).is_ok(), "ddim{n}");
    }
}

#[test]
fn schedules_match_official() {
    for spec in ["", "50", "ddim50", "250"] {
        let f = file(&format!("schedule_{spec}.safetensors"));
        let s = Schedule::new(spec).unwrap();
        let map: Vec<usize> = f.read_i64("timestep_map").unwrap().1.iter().map(|&t| t as usize).collect();
        assert_eq!(s.timestep_map, map, "{spec}");
        for (name, ours) in [
            ("betas", &s.betas),
            ("alphas_cumprod", &s.alphas_cumprod),
            ("alphas_cumprod_prev", &s.alphas_cumprod_prev),
            ("posterior_variance", &s.posterior_variance),
            ("posterior_log_variance_clipped", &s.posterior_log_variance_clipped),
            ("posterior_mean_coef1", &s.posterior_mean_coef1),
            ("posterior_mean_coef2", &s.posterior_mean_coef2),
            ("sqrt_recip_alphas_cumprod", &s.sqrt_recip_alphas_cumprod),
            ("sqrt_recipm1_alphas_cumprod", &s.sqrt_recipm1_alphas_cumprod),
        ] {
            let want = f64s(&f, name);
            let worst = ours.iter().zip(&want).map(|(a, b)| ((a - b) / b.abs().max(1e-300)).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-12, "{spec}/{name}: worst relative difference {worst:e}");
        }
    }
}

#[test]
fn ddim_matches_official_with_and_without_guidance() {
    let f = file("ddim_hd72.safetensors");
    let m = model("hd72");
    let ddim = Sampler::Ddim { eta: 0.0 };
    let out = sample(Arc::clone(&m), ddim, 1.0, &f.read_i64("y").unwrap().1, &f32s(&f, "z"), None);
    assert_all_close("DDIM η=0, no guidance", &out, &f32s(&f, "sample"), TOL);
    let out = sample(m, ddim, 4.0, &f.read_i64("y_cfg").unwrap().1, &f32s(&f, "z_cfg"), None);
    assert_all_close("DDIM η=0, guidance 4", &out, &f32s(&f, "sample_cfg"), TOL);
}

#[test]
fn ddpm_learned_sigma_with_guidance_matches_official() {
    let f = file("ddpm_hd72.safetensors");
    let noise = first_rows(&f32s(&f, "step_noise"), 10, 4, 2);
    let out = sample(model("hd72"), Sampler::Ddpm, 4.0, &f.read_i64("y").unwrap().1, &f32s(&f, "z"), Some(&noise));
    assert_all_close("DDPM learned range, guidance 4", &out, &f32s(&f, "sample"), TOL);
}

#[test]
fn ddpm_single_step_mean_and_log_variance() {
    let f = file("ddpm_hd72.safetensors");
    let k = f.read_i64("step_k").unwrap().1[0] as usize;
    let c = Schedule::new("10").unwrap().coeffs(k);
    let (x, eps, out) = (f32s(&f, "x_step"), f32s(&f, "step_eps"), f32s(&f, "step_model_out"));
    let (img, hw) = (4 * 64, 64);
    let (mut mean, mut logv) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    for r in 0..4 {
        let var = &out[(r * 8 + 4) * hw..][..img];
        for i in 0..img {
            let (m, l) = diffusion::ddpm_mean_logvar(&c, x[r * img + i], eps[r * img + i], Variance::Learned(var), i);
            mean[r * img + i] = m;
            logv[r * img + i] = l;
        }
    }
    assert_close("DDPM step mean", &mean, &f32s(&f, "step_mean"), 1e-6);
    assert_close("DDPM step log-variance", &logv, &f32s(&f, "step_log_variance"), 1e-6);
}

#[test]
fn ddpm_fixed_variance_matches_official() {
    let f = file("ddpm_p4_nosigma.safetensors");
    let out = sample(
        model("p4_nosigma"),
        Sampler::Ddpm,
        1.0,
        &f.read_i64("y").unwrap().1,
        &f32s(&f, "z"),
        Some(&f32s(&f, "step_noise")),
    );
    assert_all_close("DDPM fixed-large variance", &out, &f32s(&f, "sample"), TOL);
}

#[test]
fn ddim_eta_one_matches_official() {
    let f = file("ddim_eta_hd72.safetensors");
    let out = sample(
        model("hd72"),
        Sampler::Ddim { eta: 1.0 },
        1.0,
        &f.read_i64("y").unwrap().1,
        &f32s(&f, "z"),
        Some(&f32s(&f, "step_noise")),
    );
    assert_all_close("DDIM η=1", &out, &f32s(&f, "sample"), TOL);
}
