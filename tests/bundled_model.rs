//! The bundled default model (weights/icdit-shapes-32.safetensors, a trained pixel-space DiT):
//! sampling is deterministic, and on a trained network increment-calibrated caching beats
//! naive reuse against full compute, the method's central claim.

use std::path::PathBuf;
use std::sync::Arc;

use icdit::calibrate::{self_calibrated_factors, Method};
use icdit::quality::{psnr, rel_l2, sample_set};
use icdit::{CacheMode, DitModel, EngineOptions, FullSteps, LoadOptions, SampleSpace, Sampler};

fn bundled() -> Arc<DitModel> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/icdit-shapes-32.safetensors");
    Arc::new(DitModel::load(&path, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}")))
}

/// The model's recommended sampling (DDIM 50, guidance 4): what `icdit sample` runs.
fn opts(threads: usize, max_batch: usize) -> EngineOptions {
    EngineOptions {
        max_batch,
        respacing: "ddim50".into(),
        sampler: Sampler::Ddim { eta: 0.0 },
        cfg_scale: 4.0,
        threads,
        ..Default::default()
    }
}

/// One image per class.
fn classes(m: &DitModel) -> Vec<i64> {
    (0..m.config.num_classes as i64).collect()
}

#[test]
fn bundled_model_is_a_trained_pixel_model() {
    let m = bundled();
    assert_eq!(m.space, SampleSpace::Pixel);
    assert_eq!((m.config.input_size, m.config.in_channels, m.config.num_classes), (32, 3, 10));
    let names = m.class_names.as_ref().expect("class names in the metadata");
    assert_eq!(names.len(), 10);
}

#[test]
fn sampling_is_deterministic_across_threads_and_batching() {
    let m = bundled();
    let cls = classes(&m);
    let (a, _) = sample_set(&m, &opts(2, 10), &cls, 3).unwrap();
    let (b, _) = sample_set(&m, &opts(2, 10), &cls, 3).unwrap();
    let (c, _) = sample_set(&m, &opts(1, 3), &cls, 3).unwrap();
    assert!(a == b, "two identical runs differ");
    assert!(a == c, "one thread in batches of 3 differs from two threads in one batch");
    let (d, _) = sample_set(&m, &opts(2, 10), &cls, 4).unwrap();
    let diff = rel_l2(&d, &a);
    assert!(diff > 0.1, "another seed gives other images (relative L2 {diff})");
    // Real images: in range, not flat.
    let std = {
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        (a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64).sqrt()
    };
    assert!(std > 0.2 && a.iter().all(|v| v.is_finite()), "sample std {std}");
}

#[test]
fn icc_beats_naive_reuse_on_the_trained_model() {
    let m = bundled();
    let cls = classes(&m);
    let base = opts(0, 10);
    let (full, _) = sample_set(&m, &base, &cls, 0).unwrap();
    let run = |cache: CacheMode| {
        let o = EngineOptions { cache, full_steps: FullSteps::Period(2), ..base.clone() };
        let (s, ratio) = sample_set(&m, &o, &cls, 0).unwrap();
        (rel_l2(&s, &full), psnr(&s, &full), ratio)
    };
    let reuse = run(CacheMode::Reuse);
    let icc = |method, rank, calib| {
        run(CacheMode::Icc(Arc::new(self_calibrated_factors(&m, method, rank, calib, 0, 0).unwrap())))
    };
    let svd8 = icc(Method::Svd, 8, 0);
    let svd16 = icc(Method::Svd, 16, 0);
    let svd32 = icc(Method::Svd, 32, 0);
    let casvd8 = icc(Method::CaSvd, 8, 32);
    let casvd16 = icc(Method::CaSvd, 16, 32);
    for (name, (l2, p, ratio)) in [
        ("reuse", reuse),
        ("icc svd r8", svd8),
        ("icc svd r16", svd16),
        ("icc svd r32", svd32),
        ("icc ca-svd r8", casvd8),
        ("icc ca-svd r16", casvd16),
    ] {
        println!("period 2, {name}: relative L2 to full compute {l2:.4} ({:.3} of reuse's), PSNR {p:.2} dB, compute ratio {ratio:.3}", l2 / reuse.0);
    }
    // Measured (dev VM, 2026-12-03, the current bundled model): reuse 0.1573; ca-svd r8 0.1495
    // (0.950×), ca-svd r16 0.0743 (0.472×); plain svd r8 0.1687 (1.073×), r16 0.1600 (1.017×),
    // r32 0.0910 (0.578×). So icc beats naive reuse at rank 8 and up with channel-aware SVD, the
    // paper's method, and with plain SVD only from rank 32: on this model plain SVD's
    // rank-8 and rank-16 corrections are no better than none (not asserted; recorded in
    // docs/caching-quality.md). The assertions keep a margin under each measured ratio: the
    // computation is deterministic, so only kernel rounding (≈1e-6) can move them.
    assert!(casvd8.0 < 0.98 * reuse.0, "icc ca-svd r8 {:.4} vs reuse {:.4}", casvd8.0, reuse.0);
    assert!(casvd16.0 < 0.55 * reuse.0, "icc ca-svd r16 {:.4} vs reuse {:.4}", casvd16.0, reuse.0);
    assert!(svd32.0 < 0.65 * reuse.0, "icc svd r32 {:.4} vs reuse {:.4}", svd32.0, reuse.0);
    // Channel-aware SVD against plain SVD at equal rank: 0.886× at rank 8, 0.464× at rank 16.
    assert!(casvd8.0 < 0.93 * svd8.0, "ca-svd r8 {:.4} vs svd r8 {:.4}", casvd8.0, svd8.0);
    assert!(casvd16.0 < 0.55 * svd16.0, "ca-svd r16 {:.4} vs svd r16 {:.4}", casvd16.0, svd16.0);
}
