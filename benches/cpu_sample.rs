//! End-to-end sampling on the CPU: the bundled model's default request (DDIM 50, guidance 4,
//! one image per class) under each cache policy, and — when `ICDIT_BENCH_XL_SAMPLE=1`, since
//! one iteration takes minutes on a small CPU — a 50-step DDIM sample of one DiT-XL/2 image
//! (random weights) without caching and with period-2 icc at rank 128. Throughput counts the
//! MACs of the schedule (icc's accounting, 2 FLOPs per MAC, guidance doubling the rows).
//! Run: `cargo bench --bench cpu_sample`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use icdit::calibrate::{self_calibrated_factors, Method};
use icdit::quality::sample_set;
use icdit::{CacheMode, DitConfig, DitModel, EngineOptions, Factors, FullSteps, LoadOptions, Sampler};

fn ddim50(cache: CacheMode, max_batch: usize) -> EngineOptions {
    EngineOptions {
        max_batch,
        respacing: "ddim50".into(),
        sampler: Sampler::Ddim { eta: 0.0 },
        cfg_scale: 4.0,
        threads: 0,
        cache,
        full_steps: FullSteps::Period(2),
        ..Default::default()
    }
}

/// MACs of one request: steps × (mean MACs per step) × 2 rows (guidance) × images.
fn request_flops(model: &Arc<DitModel>, opts: &EngineOptions, images: usize) -> u64 {
    let engine = icdit::Engine::new(Arc::clone(model), opts).expect("engine");
    let ranks = match &opts.cache {
        CacheMode::Icc(f) => f.ranks(),
        _ => Vec::new(),
    };
    let kinds: Vec<_> = (0..engine.steps()).map(|i| engine.step_kind(i)).collect();
    let steps = kinds.len() as f64;
    let (mean, _) = icdit::cost::schedule_macs(&model.config, kinds.into_iter(), &ranks);
    (2.0 * mean * steps * 2.0 * images as f64) as u64
}

fn bundled(c: &mut Criterion) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/icdit-shapes-32.safetensors");
    let model = Arc::new(DitModel::load(&path, &LoadOptions::default()).expect("bundled model"));
    let classes: Vec<i64> = (0..model.config.num_classes as i64).collect();
    let factors = Arc::new(self_calibrated_factors(&model, Method::CaSvd, 16, 32, 0, 0).expect("factors"));
    let mut group = c.benchmark_group("cpu/sample_bundled_ddim50_10images");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    for (name, cache) in
        [("none", CacheMode::None), ("reuse_p2", CacheMode::Reuse), ("icc_casvd_r16_p2", CacheMode::Icc(factors))]
    {
        let opts = ddim50(cache, classes.len());
        group.throughput(Throughput::Elements(request_flops(&model, &opts, classes.len())));
        group.bench_function(name, |b| b.iter(|| sample_set(&model, &opts, &classes, 0).expect("sample")));
    }
    group.finish();
}

fn xl2(c: &mut Criterion) {
    if std::env::var("ICDIT_BENCH_XL_SAMPLE").as_deref() != Ok("1") {
        println!("cpu/sample_xl2_ddim50: skipped (one iteration takes minutes on a CPU; set ICDIT_BENCH_XL_SAMPLE=1)");
        return;
    }
    let model = Arc::new(DitModel::random(&DitConfig::xl2_256(), 0).expect("model"));
    let factors = Arc::new(Factors::random(&model, 128, 1).expect("factors"));
    let mut group = c.benchmark_group("cpu/sample_xl2_ddim50_1image");
    group.sample_size(10).measurement_time(Duration::from_secs(60));
    for (name, cache) in [("none", CacheMode::None), ("icc_r128_p2", CacheMode::Icc(factors))] {
        let opts = ddim50(cache, 1);
        group.throughput(Throughput::Elements(request_flops(&model, &opts, 1)));
        group.bench_function(name, |b| b.iter(|| sample_set(&model, &opts, &[207], 0).expect("sample")));
    }
    group.finish();
}

criterion_group!(benches, bundled, xl2);
criterion_main!(benches);
