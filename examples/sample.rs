//! Sampling from Rust with the allocation-free Engine API.
//!
//!     cargo run --release --example sample [WEIGHTS]
//!
//! WEIGHTS defaults to a small test model shipped with the sources. Every buffer is planned
//! and allocated by `Engine::new`; each `sample` call after that allocates nothing.

use std::sync::Arc;

use icdit::{DitModel, Engine, EngineOptions, LoadOptions, Request, Sampler};

fn main() -> Result<(), icdit::Error> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hd72/official.safetensors").into());
    let model = Arc::new(DitModel::load(path.as_ref(), &LoadOptions::default())?);
    let cfg = model.config;

    // Up to 4 images per request, DDIM over DiT's "50" respacing, guidance scale 4.
    let opts = EngineOptions {
        max_batch: 4,
        respacing: "50".into(),
        sampler: Sampler::Ddim { eta: 0.0 },
        cfg_scale: 4.0,
        ..Default::default()
    };
    let mut engine = Engine::new(model, &opts)?;
    for plan in engine.plans() {
        print!("{plan}");
    }

    let classes = [1i64, 2, 3, 4];
    let mut latents = vec![0.0f32; classes.len() * cfg.image_elems()];
    for seed in 0..3 {
        let start = std::time::Instant::now();
        let mut steps = 0;
        engine.sample(&Request::new(&classes, seed), &mut latents, &mut |_step| steps += 1)?;
        let rms = (latents.iter().map(|v| v * v).sum::<f32>() / latents.len() as f32).sqrt();
        println!("seed {seed}: {steps} steps in {:.1} ms, latent rms {rms:.3}", start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(())
}
