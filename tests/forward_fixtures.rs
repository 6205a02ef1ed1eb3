//! The CPU forward pass against outputs of the official PyTorch DiT (tests/fixtures,
//! made by tools/make_fixtures.py). Tolerance: relative L2 ≤ 1e-5 against PyTorch's f32
//! output (the bar); the f32-vs-f64 error of PyTorch itself is ~1.2e-6.

mod common;

use std::sync::Arc;

use common::{assert_close, fixture, reference, rel_l2};
use icdit::cpu::{Isa, IsaKind};
use icdit::{CpuEngine, CpuOptions, DitModel, Layout, LoadOptions, Numerics};

const TOL: f64 = 1e-5;

/// The forward pass on CPU path `isa` (`None`: the engine's default choice).
fn run_on(model: Arc<DitModel>, refr: &common::Reference, isa: Option<Isa>) -> Vec<f32> {
    let rows = refr.t.len();
    let opts = CpuOptions { max_batch: rows, guidance: false, threads: 2, isa, ..Default::default() };
    let mut engine = CpuEngine::new(Arc::clone(&model), &opts).unwrap();
    let mut out = vec![0.0; rows * model.config.output_elems()];
    engine.forward(&refr.x, &refr.t, &refr.y, &mut out).unwrap();
    out
}

fn run(model: DitModel, refr: &common::Reference) -> Vec<f32> {
    run_on(Arc::new(model), refr, None)
}

fn load(rel: &str, numerics: Numerics) -> DitModel {
    DitModel::load(&fixture(rel), &LoadOptions { num_heads: None, numerics }).unwrap_or_else(|e| panic!("{e}"))
}

fn check_official(name: &str) {
    let refr = reference(&format!("{name}/forward.safetensors"));
    let model = load(&format!("{name}/official.safetensors"), Numerics::Official);
    assert_eq!(model.layout, Layout::Official);
    let model = Arc::new(model);
    // Every CPU path this machine runs; the SIMD ones must agree bit for bit.
    let mut simd: Option<(Isa, Vec<f32>)> = None;
    for isa in common::isas(name) {
        let out = run_on(Arc::clone(&model), &refr, Some(isa));
        assert_close(&format!("{name} official vs PyTorch f32 ({isa})"), &out, &refr.out, TOL);
        if let Some(f64_out) = &refr.out_f64 {
            println!("{name} ({isa}): error against PyTorch f64 {:.3e}", rel_l2(&out, f64_out));
        }
        if isa.kind() == IsaKind::Scalar {
            continue;
        }
        match &simd {
            None => simd = Some((isa, out)),
            Some((first, bits)) => assert!(
                out.iter().zip(bits).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}: the {isa} and {first} paths differ (they sum in one order with FMA)"
            ),
        }
    }
}

#[test]
fn hd72_matches_official() {
    check_official("hd72");
}

#[test]
fn p4_nosigma_matches_official() {
    check_official("p4_nosigma");
}

#[test]
fn rgb_h6_matches_official() {
    check_official("rgb_h6");
}

/// Both layouts of the same weights give the same output (official numerics).
#[test]
fn diffusers_layout_equals_official_layout() {
    for name in ["hd72", "p4_nosigma"] {
        let refr = reference(&format!("{name}/forward.safetensors"));
        let official = run(load(&format!("{name}/official.safetensors"), Numerics::Official), &refr);
        let model = load(&format!("{name}/diffusers"), Numerics::Official);
        assert_eq!(model.layout, Layout::Diffusers);
        let diffusers = run(model, &refr);
        let err = rel_l2(&diffusers, &official);
        println!("{name}: diffusers layout vs official layout: relative L2 {err:.3e}");
        // The recomputed pos_embed equals the stored one bit for bit and q/k/v are only
        // concatenated, so the arithmetic is identical.
        assert_eq!(diffusers, official, "{name}: layouts disagree");
        assert_close(&format!("{name} diffusers layout vs PyTorch"), &diffusers, &refr.out, TOL);
    }
}

/// The explicit diffusers numerics reproduce diffusers' own DiTTransformer2DModel.
#[test]
fn diffusers_numerics_match_diffusers() {
    for name in ["hd72", "p4_nosigma"] {
        let refr = reference(&format!("{name}/forward_diffusers.safetensors"));
        let out = run(load(&format!("{name}/diffusers"), Numerics::Diffusers), &refr);
        assert_close(&format!("{name} diffusers numerics vs diffusers"), &out, &refr.out, TOL);
        // And they are materially different from the official numerics.
        let official = reference(&format!("{name}/forward.safetensors"));
        assert!(rel_l2(&out, &official.out) > 1e-2, "{name}: variants should differ");
    }
}

/// f16 and bf16 checkpoints load and match PyTorch run on the same rounded weights.
#[test]
fn half_precision_weights_match_official() {
    for dt in ["f16", "bf16"] {
        let refr = reference(&format!("rgb_h6/forward_{dt}.safetensors"));
        let model = load(&format!("rgb_h6/official_{dt}.safetensors"), Numerics::Official);
        assert_eq!(model.dtypes.get(dt).copied(), Some(model.dtypes.values().sum()));
        let out = run(model, &refr);
        assert_close(&format!("rgb_h6 {dt} weights vs PyTorch"), &out, &refr.out, TOL);
    }
}

/// A batch computed whole equals its rows computed one at a time (no cross-row leaks).
#[test]
fn rows_are_independent() {
    let refr = reference("hd72/forward.safetensors");
    let model = Arc::new(load("hd72/official.safetensors", Numerics::Official));
    let whole = run(load("hd72/official.safetensors", Numerics::Official), &refr);
    let mut engine = CpuEngine::new(
        Arc::clone(&model),
        &CpuOptions { max_batch: 4, guidance: false, threads: 2, ..Default::default() },
    )
    .unwrap();
    let (xi, oi) = (model.config.image_elems(), model.config.output_elems());
    for r in 0..refr.t.len() {
        let mut out = vec![0.0; oi];
        engine.forward(&refr.x[r * xi..(r + 1) * xi], &refr.t[r..r + 1], &refr.y[r..r + 1], &mut out).unwrap();
        let err = rel_l2(&out, &whole[r * oi..(r + 1) * oi]);
        assert!(err < 1e-6, "row {r}: batch-of-one differs from batched ({err:.3e})");
    }
}
