//! Exactness of the caching policies on a real (fixture) model: period 1 is no caching
//! bit for bit, full-rank factors make icc equal to full compute, rank 0 is naive reuse,
//! FORA-style block reuse is naive reuse and Taylor order 0 is block reuse, bit for bit.

mod common;

use std::sync::Arc;

use common::{fixture, rel_l2};
use icdit::factors::{FactorInfo, LayerType};
use icdit::{CacheMode, DitModel, Engine, EngineOptions, Factors, Forecast, FullSteps, LoadOptions, Request, Sampler};

fn model() -> Arc<DitModel> {
    Arc::new(DitModel::load(&fixture("hd72/official.safetensors"), &LoadOptions::default()).unwrap())
}

fn sample(m: &Arc<DitModel>, cache: CacheMode, period: usize) -> Vec<f32> {
    let opts = EngineOptions {
        max_batch: 2,
        respacing: "20".into(),
        sampler: Sampler::Ddim { eta: 0.0 },
        cfg_scale: 4.0,
        threads: 2,
        cache,
        full_steps: FullSteps::Period(period),
        ..Default::default()
    };
    let mut e = Engine::new(Arc::clone(m), &opts).unwrap();
    let mut out = vec![0.0; 2 * m.config.image_elems()];
    e.sample(&Request::new(&[3, 7], 11), &mut out, &mut |_| {}).unwrap();
    out
}

/// Exact factorisations: W = W·I (r = in) or I·W (r = out), whichever rank is min(out, in).
fn exact_factors(m: &DitModel) -> Factors {
    let (c, mh) = (m.config.hidden_size, m.config.mlp_hidden());
    let eye = |n: usize| -> Vec<f32> { (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect() };
    let layers = m
        .tensors
        .blocks
        .iter()
        .map(|b| {
            let qkv = m.w(b.qkv_w);
            LayerType::ALL.map(|t| {
                let w: Vec<f32> = match t {
                    LayerType::Q => qkv[..c * c].to_vec(),
                    LayerType::K => qkv[c * c..2 * c * c].to_vec(),
                    LayerType::V => qkv[2 * c * c..].to_vec(),
                    LayerType::Proj => m.w(b.proj_w).to_vec(),
                    LayerType::Fc1 => m.w(b.fc1_w).to_vec(),
                    LayerType::Fc2 => m.w(b.fc2_w).to_vec(),
                };
                let (out, inp) = t.shape(c, mh);
                if inp <= out {
                    (w, eye(inp), inp) // up = W (out, in), down = I
                } else {
                    (eye(out), w, out) // up = I, down = W (out, in)
                }
            })
        })
        .collect();
    Factors::from_parts(m, FactorInfo { method: "exact".into(), ..Default::default() }, layers).unwrap()
}

fn zero_rank_factors(m: &DitModel) -> Factors {
    let layers = (0..m.config.depth).map(|_| LayerType::ALL.map(|_| (Vec::new(), Vec::new(), 0))).collect();
    Factors::from_parts(m, FactorInfo { method: "zero".into(), ..Default::default() }, layers).unwrap()
}

#[test]
fn period_one_is_no_caching_bit_for_bit() {
    let m = model();
    let plain = sample(&m, CacheMode::None, 1);
    assert_eq!(sample(&m, CacheMode::Reuse, 1), plain, "reuse, period 1");
    let f = Arc::new(zero_rank_factors(&m));
    assert_eq!(sample(&m, CacheMode::Icc(f), 1), plain, "icc, period 1");
}

#[test]
fn period_one_is_no_caching_bit_for_bit_under_fora_and_taylor() {
    let m = model();
    let plain = sample(&m, CacheMode::None, 1);
    assert_eq!(sample(&m, CacheMode::Fora, 1), plain, "fora, period 1");
    for order in 0..=2 {
        let taylor = CacheMode::Taylor(Forecast { order, warmup: 2 });
        assert_eq!(sample(&m, taylor, 1), plain, "taylor order {order}, period 1");
    }
}

/// FORA's cached step is our reuse step (attention and MLP branch outputs reused under the
/// current gates); fora keeps 2 of reuse's 8 slots, and its full step is a plain pass.
#[test]
fn fora_is_naive_reuse_and_taylor_order_zero_is_fora() {
    let m = model();
    let plain = sample(&m, CacheMode::None, 1);
    for period in [2, 3] {
        let fora = sample(&m, CacheMode::Fora, period);
        assert_eq!(fora, sample(&m, CacheMode::Reuse, period), "fora vs reuse, period {period}");
        let order0 = sample(&m, CacheMode::Taylor(Forecast { order: 0, warmup: 0 }), period);
        assert_eq!(order0, fora, "taylor order 0 vs fora, period {period}");
        let mut errors = vec![("fora", rel_l2(&fora, &plain))];
        for order in [1, 2] {
            let t = sample(&m, CacheMode::Taylor(Forecast { order, warmup: 0 }), period);
            errors.push((["", "taylor 1", "taylor 2"][order], rel_l2(&t, &plain)));
            assert_ne!(t, fora, "taylor order {order} forecasts, period {period}");
        }
        println!("period {period}: relative L2 against full compute {errors:?}");
        assert!(errors.iter().all(|e| e.1 > 1e-4 && e.1.is_finite()), "{errors:?}");
    }
}

#[test]
fn full_rank_icc_equals_full_compute() {
    let m = model();
    let plain = sample(&m, CacheMode::None, 1);
    let icc = sample(&m, CacheMode::Icc(Arc::new(exact_factors(&m))), 2);
    let reuse = sample(&m, CacheMode::Reuse, 2);
    let (e_icc, e_reuse) = (rel_l2(&icc, &plain), rel_l2(&reuse, &plain));
    println!("period 2: full-rank icc vs full {e_icc:.3e}; reuse vs full {e_reuse:.3e}");
    assert!(e_icc <= 1e-5, "full-rank icc differs from full compute by {e_icc:.3e}");
    assert!(e_reuse > 1e-3, "reuse should differ from full compute");
}

#[test]
fn rank_zero_icc_is_naive_reuse() {
    let m = model();
    let icc0 = sample(&m, CacheMode::Icc(Arc::new(zero_rank_factors(&m))), 3);
    assert_eq!(icc0, sample(&m, CacheMode::Reuse, 3));
}

#[test]
fn factor_files_round_trip_and_are_checked_against_the_model() {
    let m = model();
    let f = exact_factors(&m);
    let path = std::env::temp_dir().join(format!("icdit-factors-{}.safetensors", std::process::id()));
    let mut info = f.info.clone();
    info.model_fingerprint = Some(icdit::factors::fingerprint(&m));
    let f = f.with_info(info);
    f.save(&path).unwrap();
    let back = Factors::load(&path, &m).unwrap();
    assert_eq!(back.ranks(), f.ranks());
    // Another model (same shapes, other weights) is refused by fingerprint.
    let other = DitModel::random(&m.config, 5).unwrap();
    let err = Factors::load(&path, &other).unwrap_err().to_string();
    assert!(err.contains("made for another model"), "{err}");
    // A model of another shape is refused by shape.
    let p4 = DitModel::load(&fixture("p4_nosigma/official.safetensors"), &LoadOptions::default()).unwrap();
    let err = Factors::load(&path, &p4).unwrap_err().to_string();
    println!("{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    let _ = std::fs::remove_file(&path);
}
