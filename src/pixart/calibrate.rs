//! Channel-aware SVD (CA-SVD) factors for PixArt-α, our definition after icc's DiT statistics
//! (reference doc E.8–E.10 of the DiT reference, applied to the PixArt layer set): the model
//! samples x₀ for calibration prompts itself (full compute), each sample is noised at a
//! seeded timestep of DDIM's 50-step grid, and one full forward with its prompt (conditional,
//! unguided) records every cached linear's input and output. Per sample and channel the mean
//! |activation| over tokens, min-max normalised over channels (+1e-6), averaged per batch and
//! summed over batches, gives magnitudes m; the layer's left (output) and right (input)
//! vectors are (m / batches)^0.5 floored at max/1000, plus 1e-6, and
//! diag(l)·W·diag(r) = U S Vᵀ gives up = diag(1/l)·U_r·S_r, down = V_rᵀ·diag(1/r).

use std::path::Path;
use std::sync::Arc;

use super::cpu::{PixArtCache, PixArtCpu, PixArtCpuOptions};
use super::engine::{Embeddings, PixArtEngine, PixArtOptions, PixArtRequest};
use super::factors::SvdLayer;
use super::forward::{slots, Slot};
use super::sampler::{PixArtSampler, PixArtSchedule};
use super::weights::{Layer, PixArtModel};
use crate::error::{Error, Result};
use crate::forward::StepKind;

/// Prompts per batch of the sampling and statistics passes.
const BATCH: usize = 8;
/// Timesteps calibration samples are noised at: DDIM's 50-step grid.
const GRID_STEPS: usize = 50;

/// The rows `range` of an embeddings set, as their own set.
pub(crate) fn rows_of(e: &Embeddings, range: std::ops::Range<usize>) -> Result<Embeddings> {
    let (row, len) = (e.len * e.dim, e.len);
    Embeddings::new(
        e.embeds[range.start * row..range.end * row].to_vec(),
        e.mask[range.start * len..range.end * len].to_vec(),
        range.len(),
        e.len,
        e.dim,
    )
}

/// CA-SVD factors at rank min(`rank`, out, in) calibrated on `prompts` (x₀ sampled with
/// DPM-Solver++ over `steps` steps, guided at 4.5 by `negative` when given, else unguided),
/// written to `path`. `progress(done, total)` counts batches of both passes.
#[allow(clippy::too_many_arguments)]
pub fn calibrate_ca_svd(
    model: &Arc<PixArtModel>,
    prompts: &Embeddings,
    negative: Option<&Embeddings>,
    steps: usize,
    rank: usize,
    seed: u64,
    threads: usize,
    path: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<SvdLayer>> {
    if rank == 0 {
        return Err(Error::invalid("rank", "must be at least 1"));
    }
    let stats = ca_svd_statistics(model, prompts, negative, steps, seed, threads, progress)?;
    ca_svd_factors(model, &stats, rank, seed, path)
}

/// CA-SVD's channel magnitudes of every cache slot ([`calibrate_ca_svd`]'s passes 1 and 2),
/// reusable for factors at several ranks.
pub struct CaSvdStats {
    /// Per block, per [`Slot::ALL`], the summed per-batch magnitudes.
    mag: Vec<Vec<Vec<f32>>>,
    batches: usize,
    prompts: usize,
}

/// Samples x₀ for `prompts` and records the channel magnitudes (see [`calibrate_ca_svd`]).
pub fn ca_svd_statistics(
    model: &Arc<PixArtModel>,
    prompts: &Embeddings,
    negative: Option<&Embeddings>,
    steps: usize,
    seed: u64,
    threads: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CaSvdStats> {
    let cfg = model.config;
    if negative.is_some_and(|e| e.rows != 1) {
        return Err(Error::invalid(
            "negative embeddings",
            "calibration takes one negative prompt (1 row) for all prompts",
        ));
    }
    let n = prompts.rows;
    let batches = n.div_ceil(BATCH);
    let total = 2 * batches;
    // 1. x₀ for every prompt, at full compute.
    let opts = PixArtOptions {
        max_batch: n.min(BATCH),
        max_text_len: prompts.len,
        sampler: PixArtSampler::DpmSolver,
        steps,
        cfg_scale: if negative.is_some() { 4.5 } else { 1.0 },
        threads,
        ..Default::default()
    };
    let mut engine = PixArtEngine::new(Arc::clone(model), &opts)?;
    let img = cfg.image_elems();
    let mut x0 = vec![0.0f32; n * img];
    for b in 0..batches {
        let range = b * BATCH..((b + 1) * BATCH).min(n);
        let chunk = rows_of(prompts, range.clone())?;
        let req = PixArtRequest { prompt: &chunk, negative, noise: None, seed, first_index: range.start as u64 };
        engine.sample(&req, &mut x0[range.start * img..range.end * img], &mut |_| {})?;
        progress(b + 1, total);
    }
    drop(engine);
    // 2. Statistics of one full forward per sample at a seeded grid timestep.
    let grid = PixArtSchedule::new(PixArtSampler::Ddim, GRID_STEPS)?;
    let picks = crate::noise::class_labels(seed ^ 0x7069_7861, 0, n, GRID_STEPS);
    let mut cpu = PixArtCpu::new(
        Arc::clone(model),
        &PixArtCpuOptions {
            max_rows: n.min(BATCH),
            max_text_len: prompts.len,
            threads,
            cache: PixArtCache::Reuse,
            isa: None,
        },
    )?;
    let (tokens, depth) = (cfg.tokens(), cfg.depth);
    let mut mag: Vec<Vec<Vec<f32>>> =
        (0..depth).map(|_| Slot::ALL.iter().map(|s| vec![0.0f32; s.width(&cfg)]).collect()).collect();
    let (mut xt, mut eps, mut t) = (vec![0.0f32; BATCH * img], vec![0.0f32; img], vec![0.0f32; BATCH]);
    for b in 0..batches {
        let range = b * BATCH..((b + 1) * BATCH).min(n);
        let rows = range.len();
        for (j, r) in range.clone().enumerate() {
            let step = grid.timesteps[picks[r] as usize];
            let a = grid.alphas_cumprod[step];
            let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
            crate::noise::fill_normal(seed ^ 0x6361_6c69, r as u64, 1, &mut eps);
            for ((x, &c), &e) in xt[j * img..(j + 1) * img].iter_mut().zip(&x0[r * img..(r + 1) * img]).zip(&eps) {
                *x = sa * c + sb * e;
            }
            t[j] = step as f32;
        }
        let chunk = rows_of(prompts, range.clone())?;
        cpu.stage_text(&chunk.embeds, &chunk.mask, rows, chunk.len)?;
        if cfg.use_additional_conditions {
            // The 1024-MS model's conditions, as the sampling pass had them.
            let (res, ar) = super::micro::pipeline_conditions(&cfg);
            let res: Vec<f32> = res.iter().copied().cycle().take(2 * rows).collect();
            cpu.stage_size(&res, &vec![ar; rows], rows)?;
        }
        cpu.stage_inputs(&xt[..rows * img], &t[..rows], rows)?;
        cpu.run(rows, StepKind::Full)?;
        for (i, block) in mag.iter_mut().enumerate() {
            for (slot, acc) in Slot::ALL.iter().zip(block.iter_mut()) {
                let x = cpu.cache_slot(i, *slot).ok_or_else(|| Error::invalid("calibration", "no caches"))?;
                crate::calibrate::accumulate(x, None, rows, tokens, slot.width(&cfg), acc);
            }
        }
        progress(batches + b + 1, total);
    }
    Ok(CaSvdStats { mag, batches, prompts: n })
}

/// Pass 3 of [`calibrate_ca_svd`]: weight vectors from the statistics and factors at rank
/// min(`rank`, out, in), written to `path`.
pub fn ca_svd_factors(
    model: &PixArtModel,
    stats: &CaSvdStats,
    rank: usize,
    seed: u64,
    path: &Path,
) -> Result<Vec<SvdLayer>> {
    if rank == 0 {
        return Err(Error::invalid("rank", "must be at least 1"));
    }
    let cfg = model.config;
    let (mag, batches, n) = (&stats.mag, stats.batches, stats.prompts);
    let vector = |m: &[f32]| -> Vec<f32> {
        let mut v: Vec<f32> = m.iter().map(|x| (x / batches as f32).powf(0.5)).collect();
        crate::calibrate::floor_at_ratio(&mut v, 1000.0);
        v.iter_mut().for_each(|x| *x += 1e-6);
        v
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut report = Vec::new();
    for (i, block) in mag.iter().enumerate() {
        for layer in Layer::cached(i) {
            let (_, xs, ys) = slots(layer).ok_or_else(|| Error::invalid("calibration", "not a cached layer"))?;
            let (l, r) = (vector(&block[ys.index()]), vector(&block[xs.index()]));
            let (out, inp) = layer.shape(&cfg);
            let k = rank.min(out).min(inp);
            let (up, down, energy, rel_error, _) =
                crate::calibrate::factorize(model.linear(layer).0, out, inp, k, Some((&l, &r)))?;
            let name = layer.name();
            tensors.push((format!("{name}.up"), vec![out, k], up));
            tensors.push((format!("{name}.down"), vec![k, inp], down));
            report.push(SvdLayer { name, rank: k, energy, rel_error });
        }
    }
    let views: Vec<(&str, &[usize], &[f32])> =
        tensors.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())).collect();
    let meta = [
        ("method".to_string(), "ca-svd".to_string()),
        ("calib_prompts".to_string(), n.to_string()),
        ("seed".to_string(), seed.to_string()),
    ];
    crate::tensorfile::write_safetensors(path, &views, &[], Some(meta.into_iter().collect()))?;
    Ok(report)
}
