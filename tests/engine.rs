//! The Engine API (allocation-freedom is in no_alloc.rs): determinism across runs, thread
//! counts and batch composition, and clear errors for impossible settings.

mod common;

use std::sync::Arc;

use common::fixture;
use icdit::{DitModel, Engine, EngineOptions, Error, LoadOptions, Request, Sampler};

fn model() -> Arc<DitModel> {
    Arc::new(DitModel::load(&fixture("hd72/official.safetensors"), &LoadOptions::default()).unwrap())
}

fn opts(batch: usize, sampler: Sampler, threads: usize) -> EngineOptions {
    EngineOptions { max_batch: batch, respacing: "25".into(), sampler, cfg_scale: 3.0, threads, ..Default::default() }
}

fn run(engine: &mut Engine, classes: &[i64], seed: u64, first: u64) -> Vec<f32> {
    let img = engine.model().config.image_elems();
    let mut out = vec![0.0; classes.len() * img];
    let req = Request { first_index: first, ..Request::new(classes, seed) };
    engine.sample(&req, &mut out, &mut |_| {}).unwrap();
    out
}

/// On every CPU path this machine runs: the same bits on a repeat and with 1, 2 or 3 threads.
#[test]
fn same_seed_same_bits_across_runs_and_thread_counts() {
    let m = model();
    let classes = [0i64, 3, 7, 2];
    for isa in common::isas("determinism") {
        let on = |threads| EngineOptions { isa: Some(isa), ..opts(4, Sampler::Ddpm, threads) };
        let mut one = Engine::new(Arc::clone(&m), &on(1)).unwrap();
        let a = run(&mut one, &classes, 42, 0);
        assert_eq!(a, run(&mut one, &classes, 42, 0), "{isa}: repeat on one engine");
        for threads in [2, 3] {
            let mut more = Engine::new(Arc::clone(&m), &on(threads)).unwrap();
            assert_eq!(a, run(&mut more, &classes, 42, 0), "{isa}: 1 vs {threads} threads");
        }
        assert_ne!(a, run(&mut one, &classes, 43, 0), "{isa}: another seed");
    }
}

#[test]
fn an_image_does_not_depend_on_its_batch() {
    let m = model();
    let img = m.config.image_elems();
    let mut engine = Engine::new(Arc::clone(&m), &opts(4, Sampler::Ddpm, 2)).unwrap();
    let classes = [4i64, 8, 1, 6];
    let whole = run(&mut engine, &classes, 9, 0);
    for k in 0..4 {
        let alone = run(&mut engine, &classes[k..k + 1], 9, k as u64);
        assert_eq!(alone, whole[k * img..(k + 1) * img], "image {k} alone vs in the batch");
    }
    // A batch starting at image 2 reproduces images 2 and 3.
    assert_eq!(run(&mut engine, &classes[2..], 9, 2), whole[2 * img..]);
}

#[test]
fn guidance_scale_one_runs_unguided() {
    let m = model();
    let mut o = opts(2, Sampler::Ddim { eta: 0.0 }, 2);
    o.cfg_scale = 1.0;
    let mut plain = Engine::new(Arc::clone(&m), &o).unwrap();
    let guided_rows = Engine::new(Arc::clone(&m), &opts(2, Sampler::Ddim { eta: 0.0 }, 2)).unwrap();
    // The unguided engine plans half the model rows.
    assert!(plain.arena_bytes() < guided_rows.arena_bytes());
    let out = run(&mut plain, &[1, 2], 0, 0);
    assert!(out.iter().all(|v| v.is_finite()));
}

fn err_of(r: Result<Engine, Error>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn impossible_settings_are_refused() {
    let m = model();
    let mut o = opts(1, Sampler::Ddpm, 1);
    o.respacing = "ddim300".into();
    assert!(err_of(Engine::new(Arc::clone(&m), &o)).contains("ddim300"));
    o.respacing = "0".into();
    assert!(err_of(Engine::new(Arc::clone(&m), &o)).contains("respacing"));
    let mut o = opts(1, Sampler::Ddpm, 1);
    o.cfg_scale = 0.5;
    assert!(err_of(Engine::new(Arc::clone(&m), &o)).contains("cfg scale"));
    o.cfg_scale = f32::NAN;
    assert!(err_of(Engine::new(Arc::clone(&m), &o)).contains("cfg scale"));
    let mut o = opts(0, Sampler::Ddpm, 1);
    assert!(err_of(Engine::new(Arc::clone(&m), &o)).contains("max batch"));
    o = opts(1, Sampler::Ddim { eta: -1.0 }, 1);
    assert!(err_of(Engine::new(Arc::clone(&m), &o)).contains("eta"));

    let mut engine = Engine::new(Arc::clone(&m), &opts(2, Sampler::Ddpm, 1)).unwrap();
    let img = m.config.image_elems();
    let mut out = vec![0.0; 2 * img];
    let e = engine.sample(&Request::new(&[1, 10], 0), &mut out, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("class 10"), "{e}");
    let e = engine.sample(&Request::new(&[1, 2, 3], 0), &mut vec![0.0; 3 * img], &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("1..=2"), "{e}");
    let z = vec![0.0; img];
    let req = Request { noise: Some(&z), ..Request::new(&[1, 2], 0) };
    let e = engine.sample(&req, &mut out, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("noise"), "{e}");
    let mut z = vec![0.0; 2 * img];
    z[5] = f32::INFINITY;
    let req = Request { noise: Some(&z), ..Request::new(&[1, 2], 0) };
    let e = engine.sample(&req, &mut out, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("not finite"), "{e}");
}

/// The sampling loop conditions several steps at once (`CpuEngine::condition_ahead`: one
/// modulation GEMM over steps × rows rows): each step's pass gives the bits of a standalone
/// `forward_step` with that step's timesteps, under every kind of step icc schedules; steps
/// outside what was conditioned are refused, and the non-finite probe after such a pass runs
/// (on that step's own conditioning) without disturbing the engine.
#[test]
fn conditioning_ahead_gives_each_steps_own_bits() {
    use icdit::forward::StepKind;
    use icdit::{CacheMode, CpuEngine, CpuOptions, Factors};
    let m = model();
    let cfg = m.config;
    let factors = Arc::new(Factors::load(&fixture("icc/factors_casvd_r8.safetensors"), &m).unwrap());
    let opts = CpuOptions { max_batch: 1, guidance: true, threads: 2, cache: CacheMode::Icc(factors), isa: None };
    let (mut each, mut ahead) =
        (CpuEngine::new(Arc::clone(&m), &opts).unwrap(), CpuEngine::new(Arc::clone(&m), &opts).unwrap());
    let rows = 2;
    assert!(ahead.ahead_steps(rows) >= 5, "{} steps ahead at 2 rows", ahead.ahead_steps(rows));
    let ts = [999i64, 700, 400, 100, 3];
    let y = [3i64, cfg.null_class() as i64];
    let kinds = [StepKind::Full, StepKind::Calibrated, StepKind::Reuse, StepKind::Calibrated, StepKind::Full];
    ahead.condition_ahead(&ts, &y).unwrap();
    let out_len = rows * cfg.output_elems();
    let (mut a, mut b) = (vec![0.0f32; out_len], vec![0.0f32; out_len]);
    for (j, (&t, &kind)) in ts.iter().zip(&kinds).enumerate() {
        let x: Vec<f32> =
            (0..rows * cfg.image_elems()).map(|i| ((i * 37 + j * 11) % 101) as f32 / 50.0 - 1.0).collect();
        each.forward_step(&x, &[t, t], &y, &mut a, kind).unwrap();
        ahead.forward_step_ahead(&x, j, &mut b, kind).unwrap();
        assert!(a.iter().any(|&v| v != 0.0), "step {j}: a trivial output");
        assert!(a == b, "step {j} ({kind:?}, t = {t}): conditioned ahead differs from a standalone pass");
    }
    let x = vec![0.5f32; rows * cfg.image_elems()];
    let err = ahead.forward_step_ahead(&x, 5, &mut b, StepKind::Plain).unwrap_err().to_string();
    assert!(err.contains("conditioned step") && err.contains("hold 5"), "{err}");
    let err = ahead.condition_ahead(&[500; 40], &y).unwrap_err().to_string();
    assert!(err.contains("40 steps"), "{err}");
    let err = ahead.condition_ahead(&[500, 1000], &y).unwrap_err().to_string();
    assert!(err.contains("t[2] = 1000"), "{err}");
    // A finite pass on step 3, probed: nothing found, and the probe ends the steps held ahead.
    ahead.condition_ahead(&ts, &y).unwrap();
    ahead.forward_step_ahead(&x, 3, &mut b, StepKind::Plain).unwrap();
    assert!(ahead.locate_non_finite(rows, StepKind::Plain).is_none());
    assert!(ahead.forward_step_ahead(&x, 4, &mut b, StepKind::Plain).is_err());
    each.forward_step(&x, &[100, 100], &y, &mut a, StepKind::Plain).unwrap();
    ahead.forward_step(&x, &[100, 100], &y, &mut b, StepKind::Plain).unwrap();
    assert!(a == b, "a standalone pass after the probe differs");
}
