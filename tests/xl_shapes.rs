//! DiT-XL/2 at 256 and 512 px load from official-layout files (written here with seeded
//! random weights, since the real checkpoints cannot be downloaded in CI) and the 256 one
//! runs a forward pass at full size.

use std::sync::Arc;

use icdit::tensorfile::FloatType;
use icdit::weights::write_random_official;
use icdit::{CpuEngine, CpuOptions, DitConfig, DitModel, LoadOptions};

fn roundtrip(cfg: &DitConfig, dtype: FloatType, tag: &str) -> DitModel {
    let path = std::env::temp_dir().join(format!("icdit-xl-{tag}-{}.safetensors", std::process::id()));
    write_random_official(&path, cfg, 1, dtype).unwrap();
    let model = DitModel::load(&path, &LoadOptions::default());
    let _ = std::fs::remove_file(&path); // the mapping stays valid after unlink
    model.unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn xl2_256_and_512_load_and_run() {
    let xl = DitConfig::xl2_256();
    let model = roundtrip(&xl, FloatType::F16, "256");
    assert_eq!(model.config, xl);
    assert_eq!(model.dtypes.get("f16"), Some(&292));

    // Batch 1 forward at full size: finite, non-trivial, label-dependent.
    let model = Arc::new(model);
    let mut engine = CpuEngine::new(
        Arc::clone(&model),
        &CpuOptions { max_batch: 1, guidance: true, threads: 0, ..Default::default() },
    )
    .unwrap();
    let x: Vec<f32> = (0..2 * xl.image_elems()).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    let mut out = vec![0.0; 2 * xl.output_elems()];
    engine.forward(&x, &[500, 500], &[207, 1000], &mut out).unwrap();
    let (a, b) = out.split_at(xl.output_elems());
    assert!(out.iter().all(|v| v.is_finite()));
    let diff: f32 = a.iter().zip(b).map(|(p, q)| (p - q).abs()).sum::<f32>() / a.len() as f32;
    assert!(diff > 1e-3, "conditional and unconditional outputs should differ (mean |Δ| {diff})");
    drop(engine);
    drop(model);

    let xl512 = DitConfig::family("XL/2", 64).unwrap();
    let model = roundtrip(&xl512, FloatType::BF16, "512");
    assert_eq!(model.config, xl512);
    assert_eq!(model.config.tokens(), 1024);
    assert_eq!(model.config.param_count(), 675_129_632 + 768 * 1152);
}
