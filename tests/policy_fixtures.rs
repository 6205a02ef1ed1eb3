//! FORA-style block reuse and TaylorSeer-style forecasting against our Python reference of
//! each (tests/fixtures/policies, made by tools/make_policy_fixtures.py from the papers'
//! formulas on tools/dit_torch.py): DDIM over "10" with guidance 4, from the icc fixture's z,
//! at several periods, orders and warm-ups. Tolerance: relative L2 ≤ 1e-4 against each
//! reference sample (measured on this machine: 8.1e-7 to 8.4e-7, the level of full compute
//! against the reference, 8.4e-7).

mod common;

use std::sync::Arc;

use common::{assert_close, fixture, rel_l2};
use icdit::tensorfile::TensorFile;
use icdit::{CacheMode, DitModel, Engine, EngineOptions, Forecast, FullSteps, LoadOptions, Request, Sampler};

fn run(m: &Arc<DitModel>, cache: CacheMode, period: usize, z: &[f32], y: &[i64]) -> Vec<f32> {
    let opts = EngineOptions {
        max_batch: y.len(),
        respacing: "10".into(),
        sampler: Sampler::Ddim { eta: 0.0 },
        cfg_scale: 4.0,
        threads: 2,
        cache,
        full_steps: FullSteps::Period(period),
        ..Default::default()
    };
    let mut e = Engine::new(Arc::clone(m), &opts).unwrap();
    let mut out = vec![0.0; z.len()];
    let req = Request { noise: Some(z), ..Request::new(y, 0) };
    e.sample(&req, &mut out, &mut |_| {}).unwrap();
    out
}

#[test]
fn fora_and_taylor_match_the_python_reference() {
    let m = Arc::new(DitModel::load(&fixture("hd72/official.safetensors"), &LoadOptions::default()).unwrap());
    let f = TensorFile::open(&fixture("policies/samples_hd72.safetensors")).unwrap();
    let want = |k: &str| f.read_f32(k).unwrap().1;
    let (z, y) = (want("z"), f.read_i64("y").unwrap().1);
    let full = run(&m, CacheMode::None, 1, &z, &y);
    assert_close("full compute vs the reference's", &full, &want("sample_full"), 1e-4);
    let taylor = |order, warmup| CacheMode::Taylor(Forecast { order, warmup });
    let settings = [
        ("fora_p2", CacheMode::Fora, 2),
        ("fora_p3", CacheMode::Fora, 3),
        ("taylor1_p3", taylor(1, 0), 3),
        ("taylor2_p3_w2", taylor(2, 2), 3),
        ("taylor2_p2", taylor(2, 0), 2),
    ];
    for (name, cache, period) in settings {
        let ours = run(&m, cache, period, &z, &y);
        let reference = want(&format!("sample_{name}"));
        println!(
            "{name}: {:.2e} from the reference; {:.4} from full compute",
            rel_l2(&ours, &reference),
            rel_l2(&ours, &full)
        );
        assert_close(&format!("{name} vs the Python reference"), &ours, &reference, 1e-4);
    }
}
