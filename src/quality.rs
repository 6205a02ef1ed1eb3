//! What caching costs in sample quality: samples drawn under a caching policy compared with
//! the full-compute samples of the same request (same classes, seed and noise).

use std::sync::Arc;

use crate::cost;
use crate::engine::{EngineOptions, Request};
use crate::error::Result;
use crate::weights::DitModel;

/// Relative L2 distance ‖a − b‖ / ‖b‖ (f64 accumulation).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// PSNR in dB of `a` against `b` for images in [−1, 1] (peak-to-peak 2), both clamped to
/// that range first as a viewer would see them.
pub fn psnr(a: &[f32], b: &[f32]) -> f64 {
    let mse =
        a.iter().zip(b).map(|(&x, &y)| (x.clamp(-1.0, 1.0) as f64 - y.clamp(-1.0, 1.0) as f64).powi(2)).sum::<f64>()
            / a.len().max(1) as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (4.0 / mse).log10()
    }
}

/// Samples `classes` (seed `seed`, image indices from 0) with `opts`, in batches of at most
/// `opts.max_batch`; returns the samples and the mean compute ratio of the schedule against
/// no caching (icc's MAC accounting).
pub fn sample_set(model: &Arc<DitModel>, opts: &EngineOptions, classes: &[i64], seed: u64) -> Result<(Vec<f32>, f64)> {
    sample_set_on(model, opts, classes, seed, crate::backend::Backend::Cpu)
}

/// [`sample_set`] on a chosen backend.
pub fn sample_set_on(
    model: &Arc<DitModel>,
    opts: &EngineOptions,
    classes: &[i64],
    seed: u64,
    backend: crate::backend::Backend,
) -> Result<(Vec<f32>, f64)> {
    let set = sample_set_timed(model, opts, classes, seed, backend)?;
    Ok((set.samples, set.mac_ratio))
}

/// A sample set with what it cost ([`sample_set_timed`]).
pub struct SampleSet {
    pub samples: Vec<f32>,
    /// Mean MACs per step of the schedule against no caching (icc's accounting, src/cost.rs).
    pub mac_ratio: f64,
    /// Wall-clock seconds in the sampling loop, every batch together (the engine's build, its
    /// weight upload and graph recording excluded; on a device, until the result is copied back).
    pub seconds: f64,
}

/// [`sample_set_on`], also timing the sampling calls.
pub fn sample_set_timed(
    model: &Arc<DitModel>,
    opts: &EngineOptions,
    classes: &[i64],
    seed: u64,
    backend: crate::backend::Backend,
) -> Result<SampleSet> {
    let mut engine = crate::backend::AnyEngine::new(Arc::clone(model), opts, backend)?;
    let img = model.config.image_elems();
    let mut out = vec![0.0f32; classes.len() * img];
    let batch = opts.max_batch.max(1);
    let start = std::time::Instant::now();
    for (i, chunk) in classes.chunks(batch).enumerate() {
        let first = i * batch;
        let req = Request { first_index: first as u64, ..Request::new(chunk, seed) };
        engine.sample(&req, &mut out[first * img..(first + chunk.len()) * img], &mut |_| {})?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let ranks = match &opts.cache {
        crate::CacheMode::Icc(f) => f.ranks(),
        _ => Vec::new(),
    };
    let kinds: Vec<_> = (0..engine.steps()).map(|i| engine.step_kind(i)).collect();
    let (_, mac_ratio) = cost::schedule_macs(&model.config, kinds.into_iter(), &ranks);
    Ok(SampleSet { samples: out, mac_ratio, seconds })
}

/// PixArt-α's [`sample_set_timed`]: one image per prompt of `prompt` (batches of
/// `opts.max_batch`, image k's noise from (seed, k)), guided by `negative` when
/// `opts.cfg_scale` > 1, on the CPU backend; the MAC ratio by [`crate::pixart::cost`].
pub fn pixart_sample_set_timed(
    model: &Arc<crate::pixart::PixArtModel>,
    opts: &crate::pixart::PixArtOptions,
    prompt: &crate::pixart::Embeddings,
    negative: Option<&crate::pixart::Embeddings>,
    seed: u64,
) -> Result<SampleSet> {
    use crate::pixart::{calibrate::rows_of, PixArtCache, PixArtEngine, PixArtRequest};
    let mut engine = PixArtEngine::new(Arc::clone(model), opts)?;
    let (n, img, batch) = (prompt.rows, model.config.image_elems(), opts.max_batch.max(1));
    let chunks: Vec<_> =
        (0..n.div_ceil(batch)).map(|b| rows_of(prompt, b * batch..((b + 1) * batch).min(n))).collect::<Result<_>>()?;
    let mut out = vec![0.0f32; n * img];
    let start = std::time::Instant::now();
    for (b, chunk) in chunks.iter().enumerate() {
        let first = b * batch;
        let req = PixArtRequest { prompt: chunk, negative, noise: None, seed, first_index: first as u64 };
        engine.sample(&req, &mut out[first * img..(first + chunk.rows) * img], &mut |_| {})?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let factors = match &opts.cache {
        PixArtCache::Icc(f) => Some(f.as_ref()),
        _ => None,
    };
    let kinds = (0..engine.schedule().len()).map(|i| engine.step_kind(i));
    let mac_ratio = crate::pixart::cost::mac_ratio(&model.config, kinds, prompt.len, factors);
    Ok(SampleSet { samples: out, mac_ratio, seconds })
}
