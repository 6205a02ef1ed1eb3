//! Per-request overhead of the C ABI over the Rust API, in one process, on the bundled model.
//!
//!     cargo run --release -p icdit-c --example overhead -- [ROUNDS] [STEPS] [IMAGES]
//!
//! Each round makes one request through the Rust API (`icdit::Engine::sample` into f32
//! latents) and one through `icdit_sample_pixels`, called exactly as a C program calls it.
//! Prints each interface's median wall time and, measured within each C call so that the
//! load of a shared machine cancels out, the median time the C call spent outside the
//! engine's sampling loop (argument checks, the lock, panic guard, uint8 conversion).

use std::ptr::null_mut;
use std::sync::Arc;
use std::time::Instant;

use icdit::session::{default_weights, recommended};
use icdit::{DitModel, Engine, EngineOptions, LoadOptions, Request, Sampler};
use icdit_c::*;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let arg = |i: usize, d: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (rounds, steps, images) = (arg(1, 21), arg(2, 25), arg(3, 1));
    let classes: Vec<i64> = (0..images as i64).map(|i| i % 10).collect();

    let model = Arc::new(DitModel::load(&default_weights(), &LoadOptions::default()).expect("bundled model"));
    let rec = recommended(&model).expect("metadata");
    assert_eq!(rec.sampler.as_deref(), Some("ddim"));
    let opts = EngineOptions {
        max_batch: images,
        respacing: steps.to_string(),
        sampler: Sampler::Ddim { eta: 0.0 },
        cfg_scale: rec.cfg.unwrap_or(4.0),
        ..Default::default()
    };
    let mut engine = Engine::new(model, &opts).expect("engine");
    let mut latents = vec![0f32; images * 3072];

    let mut o = std::mem::MaybeUninit::<IcditOptions>::uninit();
    // SAFETY: the calls below follow include/icdit.h.
    let handle = unsafe {
        icdit_options_default(o.as_mut_ptr());
        let mut o = o.assume_init();
        o.steps = steps as u32;
        o.max_batch = images as u32;
        let mut h = null_mut();
        assert_eq!(icdit_open(&o, &mut h, null_mut(), 0), IcditStatus::Ok);
        h
    };
    let mut pixels = vec![0u8; images * 3072];
    let req = IcditRequest {
        classes: classes.as_ptr(),
        count: images,
        seed: 0,
        first_index: 0,
        cfg: 0.0,
        progress: None,
        preview: None,
        user: null_mut(),
    };
    let (mut rust, mut c, mut outside) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..=rounds {
        let t = Instant::now();
        engine.sample(&Request::new(&classes, 0), &mut latents, &mut |_| {}).expect("Rust API");
        let r = t.elapsed().as_secs_f64();
        let t = Instant::now();
        // SAFETY: as above.
        let status = unsafe { icdit_sample_pixels(handle, &req, pixels.as_mut_ptr(), pixels.len()) };
        let total = t.elapsed().as_secs_f64();
        assert_eq!(status, IcditStatus::Ok);
        // SAFETY: no call in progress.
        let inside = unsafe { icdit_c::testing::last_engine_seconds(handle) };
        if round > 0 {
            rust.push(r);
            c.push(total);
            outside.push(total - inside);
        }
    }
    let mut want = vec![0u8; pixels.len()];
    icdit::image::to_nhwc_u8(&latents, images, 3, 32, icdit::image::Rounding::Dit, &mut want);
    assert_eq!(pixels, want, "the C ABI and the Rust API gave different bytes");
    // SAFETY: closed once.
    unsafe { icdit_close(handle) };
    println!("bundled model, {steps} steps, {images} image(s), {rounds} rounds (same bytes from both)");
    println!("  Rust API  Engine::sample        median {:9.3} ms", median(&mut rust) * 1e3);
    println!("  C ABI     icdit_sample_pixels   median {:9.3} ms", median(&mut c) * 1e3);
    println!("  C ABI time outside the engine's loop: median {:.1} µs", median(&mut outside) * 1e6);
}
