//! The embedding layer (`icdit::session`, wrapped by the C ABI and the Python package) and
//! per-step previews: same bytes as the Engine API, x̂₀ previews that end at the result,
//! cancellation, re-planning for a new guidance scale, and errors that name the argument.

use std::sync::Arc;

use icdit::image::{to_nhwc_u8, Rounding};
use icdit::session::{default_weights, Session, SessionOptions, SessionRequest};
use icdit::{DitModel, Engine, EngineOptions, Error, LoadOptions, Request, Sampler};

/// A short schedule keeps the tests fast; the bundled model's own settings otherwise.
fn short() -> SessionOptions {
    SessionOptions { steps: Some(4), max_batch: 3, ..Default::default() }
}

fn engine_opts(cfg: f32) -> EngineOptions {
    EngineOptions {
        max_batch: 3,
        respacing: "4".into(),
        sampler: Sampler::Ddim { eta: 0.0 },
        cfg_scale: cfg,
        ..Default::default()
    }
}

#[test]
fn session_pixels_are_the_engine_apis_bytes() {
    let mut s = Session::open(&short()).unwrap();
    let info = s.info();
    assert_eq!((info.num_classes, info.image_channels, info.image_side, info.steps), (10, 3, 32, 4));
    assert_eq!(s.options().cfg_scale, 4.0, "the bundled model recommends guidance 4");
    let classes = [1i64, 2];
    let mut pixels = vec![0u8; 2 * info.pixel_len()];
    s.sample_pixels(&SessionRequest::new(&classes, 7), &mut pixels, &mut |_, _| {}).unwrap();

    let model = Arc::new(DitModel::load(&default_weights(), &LoadOptions::default()).unwrap());
    let mut engine = Engine::new(model, &engine_opts(4.0)).unwrap();
    let mut latents = vec![0.0; 2 * info.latent_len()];
    engine.sample(&Request::new(&classes, 7), &mut latents, &mut |_| {}).unwrap();
    let mut want = vec![0u8; pixels.len()];
    to_nhwc_u8(&latents, 2, 3, 32, Rounding::Dit, &mut want);
    assert_eq!(pixels, want);
    let distinct = want.iter().collect::<std::collections::BTreeSet<_>>().len();
    assert!(distinct > 50, "the reference is a real image ({distinct} distinct values)");

    let mut lat = vec![0.0; latents.len()];
    s.sample_latents(&SessionRequest::new(&classes, 7), &mut lat, &mut |_, _| {}).unwrap();
    assert_eq!(lat, latents);
}

#[test]
fn previews_are_x0_and_end_at_the_result() {
    let mut s = Session::open(&short()).unwrap();
    let classes = [3i64, 5];
    let n = s.info().latent_len() * 2;
    let mut seen: Vec<(usize, Vec<f32>, Vec<u8>)> = Vec::new();
    let mut out = vec![0.0; n];
    let req = SessionRequest { preview: true, ..SessionRequest::new(&classes, 1) };
    s.sample_latents(&req, &mut out, &mut |step, p| {
        let p = p.expect("a preview every step");
        seen.push((step.index, p.latents.to_vec(), p.pixels.expect("pixel-space model").to_vec()));
    })
    .unwrap();
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().enumerate().all(|(i, s)| s.0 == i && s.1.len() == n && s.2.len() == n));
    // DDIM's last step is x̂₀ itself.
    assert_eq!(seen[3].1, out);
    // Early estimates are blurrier but already images, and differ from the final one.
    assert!(seen[0].1.iter().all(|v| v.is_finite()));
    assert_ne!(seen[0].1, out);
    let mut px = vec![0u8; n];
    to_nhwc_u8(&seen[1].1, 2, 3, 32, Rounding::Dit, &mut px);
    assert_eq!(px, seen[1].2);
    // A preview does not change the result.
    let mut plain = vec![0.0; n];
    s.sample_latents(&SessionRequest::new(&classes, 1), &mut plain, &mut |_, p| assert!(p.is_none())).unwrap();
    assert_eq!(plain, out);
}

#[test]
fn ddpm_previews_match_the_samplers_own_x0() {
    // Under DDPM the last step is deterministic (no noise at k = 0): mean = coef1·x̂₀ + coef2·x
    // with coef1 = 1, coef2 = 0 at the first timestep, so the result is the last x̂₀.
    let mut s = Session::open(&SessionOptions { sampler: Some("ddpm".into()), ..short() }).unwrap();
    let mut last = Vec::new();
    let mut out = vec![0.0; s.info().latent_len()];
    let req = SessionRequest { preview: true, ..SessionRequest::new(&[4], 2) };
    s.sample_latents(&req, &mut out, &mut |_, p| last = p.unwrap().latents.to_vec()).unwrap();
    let rel = icdit::quality::rel_l2(&last, &out);
    assert!(rel < 1e-6, "last DDPM x̂₀ vs result: relative L2 {rel}");
}

#[test]
fn cancel_stops_the_next_request_once() {
    let mut s = Session::open(&short()).unwrap();
    let mut out = vec![0u8; s.info().pixel_len()];
    s.cancel();
    let e = s.sample_pixels(&SessionRequest::new(&[1], 0), &mut out, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, Error::Interrupted { .. }), "{e}");
    // From the step callback (another thread would set the same flag).
    let flag = s.interrupt_flag();
    let mut steps = 0;
    let e = s
        .sample_pixels(&SessionRequest::new(&[1], 0), &mut out, &mut |_, _| {
            steps += 1;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        })
        .unwrap_err();
    assert!(matches!(e, Error::Interrupted { .. }) && steps == 1, "{e} after {steps} steps");
    s.sample_pixels(&SessionRequest::new(&[1], 0), &mut out, &mut |_, _| {}).unwrap();
}

#[test]
fn a_new_guidance_scale_replans_and_matches_a_fresh_engine() {
    let mut s = Session::open(&short()).unwrap();
    let n = s.info().latent_len();
    let mut out = vec![0.0; n];
    for cfg in [1.0f32, 2.5] {
        let req = SessionRequest { cfg: Some(cfg), ..SessionRequest::new(&[6], 3) };
        s.sample_latents(&req, &mut out, &mut |_, _| {}).unwrap();
        let model = Arc::clone(s.model());
        let mut e = Engine::new(model, &engine_opts(cfg)).unwrap();
        let mut want = vec![0.0; n];
        e.sample(&Request::new(&[6], 3), &mut want, &mut |_| {}).unwrap();
        assert_eq!(out, want, "cfg {cfg}");
    }
    // A request without a scale goes back to the one the session was opened with.
    s.sample_latents(&SessionRequest::new(&[6], 3), &mut out, &mut |_, _| {}).unwrap();
    assert_eq!(s.options().cfg_scale, 4.0);
}

#[test]
fn bad_input_names_the_argument() {
    let what = |r: Result<Session, Error>| match r {
        Err(Error::Invalid { what, .. }) => what,
        Err(e) => panic!("expected an invalid-argument error, got {e}"),
        Ok(_) => panic!("expected an error"),
    };
    assert_eq!(what(Session::open(&SessionOptions { sampler: Some("euler".into()), ..short() })), "sampler");
    assert_eq!(what(Session::open(&SessionOptions { steps: Some(0), ..short() })), "steps");
    assert_eq!(what(Session::open(&SessionOptions { max_batch: 0, ..short() })), "max batch");
    assert_eq!(what(Session::open(&SessionOptions { cache: icdit::CachePolicy::Icc, ..short() })), "factors");
    assert_eq!(what(Session::open(&SessionOptions { vae: Some("x".into()), ..short() })), "vae");
    match Session::open(&SessionOptions { weights: Some("/nonexistent/w.safetensors".into()), ..short() }) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("w.safetensors")),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened a missing file"),
    }
    let mut s = Session::open(&short()).unwrap();
    let mut out = vec![0u8; s.info().pixel_len()];
    let err = |r: icdit::Result<()>| match r {
        Err(Error::Invalid { what, reason }) => format!("{what}: {reason}"),
        other => panic!("{other:?}"),
    };
    assert!(err(s.sample_pixels(&SessionRequest::new(&[10], 0), &mut out, &mut |_, _| {})).starts_with("class:"));
    assert!(err(s.sample_pixels(&SessionRequest::new(&[], 0), &mut out, &mut |_, _| {})).starts_with("classes:"));
    assert!(
        err(s.sample_pixels(&SessionRequest::new(&[1, 2], 0), &mut out, &mut |_, _| {})).starts_with("output buffer:")
    );
    let mut big = vec![0u8; 4 * s.info().pixel_len()];
    assert!(
        err(s.sample_pixels(&SessionRequest::new(&[1, 2, 3, 4], 0), &mut big, &mut |_, _| {})).starts_with("classes:")
    );
    let bad_cfg = SessionRequest { cfg: Some(0.5), ..SessionRequest::new(&[1], 0) };
    assert!(err(s.sample_pixels(&bad_cfg, &mut out, &mut |_, _| {})).starts_with("cfg scale:"));
    // The session still works after every refusal.
    s.sample_pixels(&SessionRequest::new(&[1], 0), &mut out, &mut |_, _| {}).unwrap();
}

#[test]
fn gpu_previews_are_the_cpus_x0_within_the_pipelines_bound() {
    // The GPU pipeline on the emulated device keeps each step's x̂₀ in its sampler update, and
    // DDIM's last one is the result itself. Against the CPU backend's x̂₀: the pipeline's f16
    // error in ε̂ is multiplied by √(1/ᾱ_t − 1) in x̂₀, largest at the first step (t = 999:
    // measured 4.8e-2 relative L2, then 1.3e-2, 1.6e-2, 1.6e-2 — the last is the sample's own
    // error, which tests/gpu_pipeline.rs bounds); a stale, zero or misplaced buffer would be
    // off by about 1. Bound: 0.1 at every step.
    let mut gpu = Session::open(&SessionOptions { backend: icdit::backend::Backend::Emu, ..short() }).unwrap();
    assert!(gpu.info().previews && gpu.thread_bound() && gpu.usable_here());
    let mut cpu = Session::open(&short()).unwrap();
    let classes = [2i64, 7];
    let n = gpu.info().latent_len() * 2;
    let run = |s: &mut Session| {
        let mut seen: Vec<Vec<f32>> = Vec::new();
        let mut out = vec![0.0; n];
        let req = SessionRequest { preview: true, ..SessionRequest::new(&classes, 3) };
        s.sample_latents(&req, &mut out, &mut |_, p| seen.push(p.expect("a preview every step").latents.to_vec()))
            .unwrap();
        (seen, out)
    };
    let ((g, g_out), (c, _)) = (run(&mut gpu), run(&mut cpu));
    assert_eq!((g.len(), c.len()), (4, 4));
    assert_eq!(g[3], g_out, "DDIM's last x̂₀ is the result");
    let rel = |a: &[f32], b: &[f32]| {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
        (num / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>()).sqrt()
    };
    for (i, (gp, cp)) in g.iter().zip(&c).enumerate() {
        let e = rel(gp, cp);
        println!("step {i}: GPU x̂₀ vs CPU x̂₀ relative L2 {e:.2e}");
        assert!(e < 0.1, "step {i}: {e}");
        if i > 0 {
            assert_ne!(g[i], g[i - 1], "step {i}: the preview did not change");
        }
    }
    assert!(rel(&g[0], &g[3]) > 1e-2, "the first preview is not already the result");
}
