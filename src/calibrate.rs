//! Calibration of the rank-r factors (reference doc E.8–E.10): plain SVD, or channel-aware
//! SVD (CA-SVD) whose weight is scaled on both sides by per-channel activation magnitudes
//! measured on a calibration set noised at random timesteps, exactly as icc computes them.

use std::sync::Arc;

use faer::Mat;
use serde::Serialize;

use crate::cpu::{CpuEngine, CpuOptions};
use crate::diffusion::Schedule;
use crate::error::{Error, Result};
use crate::factors::{FactorInfo, Factors, LayerType};
use crate::forward::{Slot, StepKind};
use crate::policy::CacheMode;
use crate::tensorfile::TensorFile;
use crate::weights::DitModel;

/// How the factors are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Truncated SVD of W.
    Svd,
    /// Truncated SVD of diag(l)·W·diag(r) with l, r from activation magnitudes.
    CaSvd,
    /// As CA-SVD, with l, r from the magnitudes of the change of each activation over one
    /// DDIM step (icc's "delta_mag").
    CdSvd,
}

impl Method {
    /// The spaced indices of the "50" respacing a calibration timestep may take: icc draws
    /// `randint(0, 50)` for CA-SVD and `randint(1, 50)` for CD-SVD (which steps to t − 1).
    fn first_index(self) -> usize {
        match self {
            Method::CdSvd => 1,
            _ => 0,
        }
    }
}

/// The respacing icc's statistics use.
const STATS_SPEC: &str = "50";

/// A calibration set: clean samples x₀, labels (after label dropout), the original
/// timesteps to noise them at, and the noise (reference doc E.9, steps 1–4).
pub struct CalibSet {
    pub latents: Vec<f32>,
    pub labels: Vec<i64>,
    pub timesteps: Vec<i64>,
    pub noise: Vec<f32>,
}

impl CalibSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Reads `latents` (M, C, H, W) and `labels` (M) from a safetensors file; `timesteps`
    /// (original, 0..=999) and `noise` are drawn from `seed` when absent: a uniform spaced
    /// index of the "50" respacing (icc's `randint(0, 50)`, or `randint(1, 50)` for CD-SVD)
    /// and standard normals.
    pub fn load(path: &std::path::Path, model: &DitModel, seed: u64, method: Method) -> Result<CalibSet> {
        let cfg = &model.config;
        let f = TensorFile::open(path)?;
        let (shape, latents) = f.read_f32("latents")?;
        let m = shape.first().copied().unwrap_or(0);
        let want = [m, cfg.in_channels, cfg.input_size, cfg.input_size];
        if shape != want || m == 0 {
            return Err(Error::Shape {
                path: path.into(),
                tensor: "latents".into(),
                expected: want.to_vec(),
                found: shape,
            });
        }
        let labels = f.read_i64("labels")?;
        if labels.0 != [m] {
            return Err(Error::Shape {
                path: path.into(),
                tensor: "labels".into(),
                expected: vec![m],
                found: labels.0,
            });
        }
        if let Some(bad) = labels.1.iter().find(|&&l| l < 0 || l as usize >= cfg.label_rows()) {
            return Err(Error::invalid(
                "calibration labels",
                format!("{}: label {bad} is outside 0..={}", path.display(), cfg.null_class()),
            ));
        }
        let drawn = Self::draws(cfg, m, seed, method.first_index());
        let timesteps = if f.get("timesteps").is_some() {
            let (s, t) = f.read_i64("timesteps")?;
            if s != [m] || t.iter().any(|&t| !(0..1000).contains(&t)) {
                return Err(Error::invalid(
                    "calibration timesteps",
                    format!("{}: expected {m} original timesteps in 0..=999", path.display()),
                ));
            }
            t
        } else {
            drawn.0
        };
        let noise = if f.get("noise").is_some() {
            let (s, n) = f.read_f32("noise")?;
            if s != want {
                return Err(Error::Shape {
                    path: path.into(),
                    tensor: "noise".into(),
                    expected: want.to_vec(),
                    found: s,
                });
            }
            n
        } else {
            drawn.1
        };
        Ok(CalibSet { latents, labels: labels.1, timesteps, noise })
    }

    /// A set from clean samples and labels, with seeded timesteps and noise.
    pub fn from_samples(
        latents: Vec<f32>,
        labels: Vec<i64>,
        cfg: &crate::DitConfig,
        seed: u64,
        method: Method,
    ) -> CalibSet {
        let (timesteps, noise) = Self::draws(cfg, labels.len(), seed, method.first_index());
        CalibSet { latents, labels, timesteps, noise }
    }

    /// Seeded timesteps and noise for `m` samples.
    fn draws(cfg: &crate::DitConfig, m: usize, seed: u64, first: usize) -> (Vec<i64>, Vec<f32>) {
        let map = crate::diffusion::space_timesteps(STATS_SPEC).expect("valid spec");
        let idx = crate::noise::class_labels(seed ^ 0x7469_6d65, 0, m, map.len() - first);
        let timesteps = idx.iter().map(|&k| map[first + k as usize] as i64).collect();
        let img = cfg.image_elems();
        let mut noise = vec![0.0; m * img];
        for (r, chunk) in noise.chunks_mut(img).enumerate() {
            crate::noise::fill_normal(seed, r as u64, 1, chunk);
        }
        (timesteps, noise)
    }
}

/// icc's "mag" statistics: per block and slot, the accumulated per-channel magnitudes and
/// the number of batches.
pub struct Stats {
    pub mag: Vec<[Vec<f32>; 8]>,
    pub batches: usize,
}

/// Runs one full-compute forward per batch of noised calibration samples and accumulates
/// the statistics from the activations the full step leaves in the caches (E.9). For
/// CD-SVD the statistics are of the change of each activation between that forward (at
/// spaced index k of the "50" respacing) and a second one at k − 1, after one DDIM step.
pub fn collect_stats(
    model: &Arc<DitModel>,
    set: &CalibSet,
    batch: usize,
    threads: usize,
    method: Method,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Stats> {
    let cfg = model.config;
    if batch == 0 {
        return Err(Error::invalid("calibration batch", "must be at least 1"));
    }
    let mut engine = CpuEngine::new(
        Arc::clone(model),
        &CpuOptions { max_batch: batch, guidance: false, threads, cache: CacheMode::Reuse, isa: None },
    )?;
    let full = Schedule::new("")?;
    let spaced = Schedule::new(STATS_SPEC)?;
    let (img, n) = (cfg.image_elems(), cfg.tokens());
    let delta = method == Method::CdSvd;
    // The spaced index of every sample's timestep (CD-SVD steps from it to the one before).
    let spaced_index: Vec<usize> = if delta {
        set.timesteps
            .iter()
            .map(|&t| match spaced.timestep_map.iter().position(|&s| s as i64 == t) {
                Some(k) if k >= 1 => Ok(k),
                _ => Err(Error::invalid(
                    "calibration timesteps",
                    format!("cd-svd needs timesteps of the \"{STATS_SPEC}\" respacing other than 0; {t} is not one"),
                )),
            })
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let mut mag: Vec<[Vec<f32>; 8]> = (0..cfg.depth).map(|_| Slot::ALL.map(|s| vec![0.0f32; s.width(&cfg)])).collect();
    let mut saved: Vec<[Vec<f32>; 8]> = if delta {
        (0..cfg.depth).map(|_| Slot::ALL.map(|s| vec![0.0f32; batch * n * s.width(&cfg)])).collect()
    } else {
        Vec::new()
    };
    let mut out = vec![0.0f32; batch * cfg.output_elems()];
    let mut xt = vec![0.0f32; batch * img];
    let mut t1 = vec![0i64; batch];
    let zeros = vec![0.0f32; img];
    let batches = set.len() / batch; // icc drops the last partial batch
    if batches == 0 {
        return Err(Error::invalid(
            "calibration set",
            format!("{} samples is fewer than one batch of {batch}", set.len()),
        ));
    }
    for bi in 0..batches {
        let rows = bi * batch..(bi + 1) * batch;
        // q_sample: x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, coefficients cast to f32 as torch does.
        for (j, r) in rows.clone().enumerate() {
            let t = set.timesteps[r] as usize;
            let (a, b) = (full.alphas_cumprod[t].sqrt() as f32, (1.0 - full.alphas_cumprod[t]).sqrt() as f32);
            for e in 0..img {
                xt[j * img + e] = a * set.latents[r * img + e] + b * set.noise[r * img + e];
            }
        }
        let labels = &set.labels[rows.clone()];
        engine.forward_step(&xt, &set.timesteps[rows.clone()], labels, &mut out, StepKind::Full)?;
        if delta {
            for (i, block) in saved.iter_mut().enumerate() {
                for (slot, dst) in Slot::ALL.iter().zip(block.iter_mut()) {
                    dst.copy_from_slice(engine.cache_slot(i, *slot).expect("a full step filled the caches"));
                }
            }
            // One DDIM (η = 0) step per sample from its spaced index k to k − 1, with the
            // model's ε (channels 0..Cin), then the second forward at k − 1.
            let out_img = cfg.output_elems();
            for (j, r) in rows.clone().enumerate() {
                let k = spaced_index[r];
                let eps = &out[j * out_img..j * out_img + img];
                crate::diffusion::ddim_step(&spaced.coeffs(k), 0.0, &mut xt[j * img..(j + 1) * img], eps, &zeros);
                t1[j] = spaced.timestep_map[k - 1] as i64;
            }
            engine.forward_step(&xt, &t1, labels, &mut out, StepKind::Full)?;
        }
        for (i, block) in mag.iter_mut().enumerate() {
            for (s, (slot, acc)) in Slot::ALL.iter().zip(block.iter_mut()).enumerate() {
                let x = engine.cache_slot(i, *slot).expect("a full step filled the caches");
                let prev = delta.then(|| saved[i][s].as_slice());
                accumulate(x, prev, batch, n, slot.width(&cfg), acc);
            }
        }
        progress(bi + 1, batches);
    }
    Ok(Stats { mag, batches })
}

/// Per sample: mean over tokens of |x| (or of |x − prev|), min-max normalised over
/// channels (+1e-6 both sides); then the batch mean is added to `acc`.
pub(crate) fn accumulate(x: &[f32], prev: Option<&[f32]>, rows: usize, n: usize, d: usize, acc: &mut [f32]) {
    let mut m = vec![0.0f64; d];
    let mut batch_sum = vec![0.0f32; d];
    for r in 0..rows {
        m.iter_mut().for_each(|v| *v = 0.0);
        for tok in 0..n {
            let row = &x[(r * n + tok) * d..][..d];
            match prev {
                None => m.iter_mut().zip(row).for_each(|(v, &e)| *v += e.abs() as f64),
                Some(p) => {
                    let prow = &p[(r * n + tok) * d..][..d];
                    m.iter_mut().zip(row).zip(prow).for_each(|((v, &e), &q)| *v += (e - q).abs() as f64);
                }
            }
        }
        let mean: Vec<f32> = m.iter().map(|v| (v / n as f64) as f32).collect();
        let (lo, hi) = mean.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        for (s, v) in batch_sum.iter_mut().zip(&mean) {
            *s += (v - lo + 1e-6) / (hi - lo + 1e-6);
        }
    }
    for (a, s) in acc.iter_mut().zip(&batch_sum) {
        *a += s / rows as f32;
    }
}

/// icc's `shift2ratio`: clamp from below at max/R.
pub(crate) fn floor_at_ratio(v: &mut [f32], ratio: f32) {
    let max = v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let floor = max / ratio;
    for x in v.iter_mut() {
        *x = x.max(floor);
    }
}

/// The left (output) and right (input) weight vectors of every layer, E.10: (mag/cnt)^0.5,
/// floored at max/1000; qkv's output vector is split into q, k, v chunks before flooring,
/// and q, k, v share one input vector. Then icc's in-place ε (trap 12): every left vector
/// gets +1e-6 once, the shared right vector of q/k/v +1e-6 per use (so q, k, v see
/// +1e-6, +2e-6, +3e-6 as f32 additions).
pub fn weight_vectors(stats: &Stats, c: usize) -> Vec<[(Vec<f32>, Vec<f32>); 6]> {
    const ALPHA: f32 = 0.5;
    const RATIO: f32 = 1000.0;
    let cnt = stats.batches as f32;
    let vec_of = |m: &Vec<f32>| -> Vec<f32> { m.iter().map(|v| (v / cnt).powf(ALPHA)).collect() };
    stats
        .mag
        .iter()
        .map(|b| {
            let get = |s: Slot| vec_of(&b[s as usize]);
            let floored = |mut v: Vec<f32>| {
                floor_at_ratio(&mut v, RATIO);
                v
            };
            let qkv_y = get(Slot::QkvY);
            let mut right_qkv = floored(get(Slot::QkvX));
            let left = |v: Vec<f32>| {
                let mut v = floored(v);
                v.iter_mut().for_each(|x| *x += 1e-6);
                v
            };
            let lq = left(qkv_y[..c].to_vec());
            let lk = left(qkv_y[c..2 * c].to_vec());
            let lv = left(qkv_y[2 * c..].to_vec());
            let mut shared = || {
                right_qkv.iter_mut().for_each(|x| *x += 1e-6);
                right_qkv.clone()
            };
            let (rq, rk, rv) = (shared(), shared(), shared());
            let eps = |mut v: Vec<f32>| {
                v.iter_mut().for_each(|x| *x += 1e-6);
                v
            };
            [
                (lq, rq),
                (lk, rk),
                (lv, rv),
                (left(get(Slot::ProjY)), eps(floored(get(Slot::ProjX)))),
                (left(get(Slot::Fc1Y)), eps(floored(get(Slot::Fc1X)))),
                (left(get(Slot::Fc2Y)), eps(floored(get(Slot::Fc2X)))),
            ]
        })
        .collect()
}

/// Quality of one layer's factorisation.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub block: usize,
    pub layer: LayerType,
    pub rank: usize,
    /// Σ S[:r] / Σ S of the (scaled) matrix that was factorised.
    pub energy: f64,
    /// ‖W − up·down‖_F / ‖W‖_F.
    pub rel_error: f64,
    /// The same error weighted by diag(l)·(·)·diag(r) (equals rel_error for plain SVD).
    pub rel_error_weighted: f64,
}

/// (up, down, energy kept, relative error, channel-weighted relative error) of a factorisation.
pub type Factorized = (Vec<f32>, Vec<f32>, f64, f64, f64);
/// A block's (left, right) weight vectors per layer type, for CA-SVD.
pub type WeightVectors = [(Vec<f32>, Vec<f32>); 6];

/// Factorises W (out, in) at `rank`, optionally scaled by (left, right) vectors (E.8):
/// W' = diag(l)·W·diag(r) = U S Vᵀ; up = diag(1/l)·U_r·S_r, down = V_rᵀ·diag(1/r).
pub fn factorize(
    w: &[f32],
    out: usize,
    inp: usize,
    rank: usize,
    vectors: Option<(&[f32], &[f32])>,
) -> Result<Factorized> {
    let (l, r) = match vectors {
        Some((l, r)) => (l.to_vec(), r.to_vec()),
        None => (vec![1.0; out], vec![1.0; inp]),
    };
    let scaled = Mat::<f32>::from_fn(out, inp, |i, j| l[i] * w[i * inp + j] * r[j]);
    let svd = scaled.thin_svd().map_err(|e| Error::invalid("SVD", format!("did not converge: {e:?}")))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let k = s.nrows();
    let total: f64 = (0..k).map(|i| s[i] as f64).sum();
    let kept: f64 = (0..rank.min(k)).map(|i| s[i] as f64).sum();
    // Reciprocals then multiply, as icc's diag(l).inverse() @ U does.
    let (il, ir): (Vec<f32>, Vec<f32>) = (l.iter().map(|x| 1.0 / x).collect(), r.iter().map(|x| 1.0 / x).collect());
    let mut up = vec![0.0f32; out * rank];
    let mut down = vec![0.0f32; rank * inp];
    for i in 0..out {
        for j in 0..rank {
            up[i * rank + j] = il[i] * u[(i, j)] * s[j];
        }
    }
    for j in 0..rank {
        for c in 0..inp {
            down[j * inp + c] = v[(c, j)] * ir[c];
        }
    }
    // Reconstruction errors, plain and channel-weighted, in f64.
    let (mut num, mut den, mut wnum, mut wden) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for i in 0..out {
        for c in 0..inp {
            let mut ab = 0.0f64;
            for j in 0..rank {
                ab += up[i * rank + j] as f64 * down[j * inp + c] as f64;
            }
            let wv = w[i * inp + c] as f64;
            let e = wv - ab;
            let scale = (l[i] * r[c]) as f64;
            num += e * e;
            den += wv * wv;
            wnum += (e * scale).powi(2);
            wden += (wv * scale).powi(2);
        }
    }
    let energy = if total > 0.0 { kept / total } else { 1.0 };
    Ok((up, down, energy, (num / den.max(1e-300)).sqrt(), (wnum / wden.max(1e-300)).sqrt()))
}

/// Computes the factors of every block at `ranks[type]`, with weight vectors for CA-SVD.
/// Layers are factorised on `threads` threads; `progress(done, total)` reports.
pub fn compute_factors(
    model: &DitModel,
    ranks: [usize; 6],
    vectors: Option<&[WeightVectors]>,
    threads: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<(Vec<[crate::factors::LayerData; 6]>, Vec<LayerReport>)> {
    let cfg = &model.config;
    let (c, m) = (cfg.hidden_size, cfg.mlp_hidden());
    for (t, &r) in LayerType::ALL.iter().zip(&ranks) {
        let (o, i) = t.shape(c, m);
        if r > o.min(i) {
            return Err(Error::invalid("rank", format!("{} rank {r} is larger than min({o}, {i})", t.name())));
        }
    }
    let jobs: Vec<(usize, usize)> = (0..cfg.depth).flat_map(|b| (0..6).map(move |t| (b, t))).collect();
    let total = jobs.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let next = std::sync::atomic::AtomicUsize::new(0);
    type Out = (usize, usize, Result<(Vec<f32>, Vec<f32>, f64, f64, f64)>);
    let results: Vec<Out> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(b, t)) = jobs.get(j) else { break };
                        let lt = LayerType::ALL[t];
                        let (o, i) = lt.shape(c, m);
                        let bt = &model.tensors.blocks[b];
                        let w: &[f32] = match lt {
                            LayerType::Q => &model.w(bt.qkv_w)[..c * c],
                            LayerType::K => &model.w(bt.qkv_w)[c * c..2 * c * c],
                            LayerType::V => &model.w(bt.qkv_w)[2 * c * c..],
                            LayerType::Proj => model.w(bt.proj_w),
                            LayerType::Fc1 => model.w(bt.fc1_w),
                            LayerType::Fc2 => model.w(bt.fc2_w),
                        };
                        let vecs = vectors.map(|v| (v[b][t].0.as_slice(), v[b][t].1.as_slice()));
                        mine.push((b, t, factorize(w, o, i, ranks[t], vecs)));
                        let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        progress(d, total);
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("factorisation thread")).collect()
    });
    let mut layers: Vec<[crate::factors::LayerData; 6]> =
        (0..cfg.depth).map(|_| std::array::from_fn(|_| (Vec::new(), Vec::new(), 0))).collect();
    let mut report = Vec::with_capacity(total);
    for (b, t, r) in results {
        let (up, down, energy, rel_error, rel_error_weighted) = r?;
        layers[b][t] = (up, down, ranks[t]);
        report.push(LayerReport {
            block: b,
            layer: LayerType::ALL[t],
            rank: ranks[t],
            energy,
            rel_error,
            rel_error_weighted,
        });
    }
    report.sort_by_key(|r| (r.block, r.layer as usize));
    Ok((layers, report))
}

/// Factors ready to use, with the method, ranks, settings and report in their metadata.
pub fn build_factors(
    model: &DitModel,
    method: Method,
    ranks: [usize; 6],
    layers: Vec<[crate::factors::LayerData; 6]>,
    report: &[LayerReport],
    settings: serde_json::Value,
) -> Result<Factors> {
    let uniform = ranks.iter().all(|&r| r == ranks[0]).then_some(ranks[0]);
    let info = FactorInfo {
        method: match method {
            Method::Svd => "svd".into(),
            Method::CaSvd => "ca-svd".into(),
            Method::CdSvd => "cd-svd".into(),
        },
        rank: uniform,
        model_fingerprint: Some(crate::factors::fingerprint(model)),
        calibration: serde_json::json!({
            "ranks": LayerType::ALL.iter().zip(&ranks).map(|(t, r)| (t.name(), *r)).collect::<std::collections::BTreeMap<_, _>>(),
            "settings": settings,
            "report": report,
        }),
    };
    Factors::from_parts(model, info, layers)
}

/// A calibration set the model draws itself (`icdit calibrate --calib-self N`): N clean
/// samples at full compute (DDIM over "50", guidance 1.5 as icc's evaluation), labels with
/// icc's 10% dropout, noised at seeded timesteps by the statistics pass. `progress` is
/// called after each batch of up to 16 samples.
pub fn self_calibration_set(
    model: &std::sync::Arc<DitModel>,
    n: usize,
    seed: u64,
    threads: usize,
    method: Method,
    progress: &mut dyn FnMut(usize),
) -> Result<CalibSet> {
    use crate::cpu::Engine;
    use crate::engine::{EngineOptions, Request};
    let cfg = model.config;
    if n == 0 {
        return Err(Error::invalid("--calib-self", "must be at least 1"));
    }
    let classes = crate::noise::class_labels(seed, 0, n, cfg.num_classes);
    let batch = n.min(16);
    let opts = EngineOptions {
        max_batch: batch,
        respacing: "50".into(),
        sampler: crate::Sampler::Ddim { eta: 0.0 },
        cfg_scale: 1.5,
        threads,
        ..Default::default()
    };
    let mut engine = Engine::new(std::sync::Arc::clone(model), &opts)?;
    let img = cfg.image_elems();
    let mut latents = vec![0.0f32; n * img];
    for (i, chunk) in classes.chunks(batch).enumerate() {
        let first = i * batch;
        let req = Request { first_index: first as u64, ..Request::new(chunk, seed) };
        engine.sample(&req, &mut latents[first * img..(first + chunk.len()) * img], &mut |_| {})?;
        progress(i + 1);
    }
    // Label dropout with p = 0.1 (icc's training-style drop before the statistics forward).
    let drop = crate::noise::class_labels(seed ^ 0x64726f70, 0, n, 10);
    let labels: Vec<i64> = classes
        .iter()
        .zip(&drop)
        .map(|(&c, &d)| if d == 0 && cfg.label_rows() > cfg.num_classes { cfg.null_class() as i64 } else { c })
        .collect();
    Ok(CalibSet::from_samples(latents, labels, &cfg, seed, method))
}

/// Uniform-rank factors of `model` in one call: plain SVD, or a channel-aware method
/// self-calibrated on `calib_self` samples (the path `icdit calibrate --calib-self` takes).
pub fn self_calibrated_factors(
    model: &std::sync::Arc<DitModel>,
    method: Method,
    rank: usize,
    calib_self: usize,
    seed: u64,
    threads: usize,
) -> Result<crate::Factors> {
    let ranks = [rank; 6];
    let mut settings = serde_json::json!({ "method": format!("{method:?}"), "seed": seed });
    let vectors = if method != Method::Svd {
        let set = self_calibration_set(model, calib_self, seed, threads, method, &mut |_| {})?;
        settings["calib_self"] = calib_self.into();
        let stats = collect_stats(model, &set, 16, threads, method, &mut |_, _| {})?;
        Some(weight_vectors(&stats, model.config.hidden_size))
    } else {
        None
    };
    let all = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
    let (layers, report) = compute_factors(model, ranks, vectors.as_deref(), all, &|_, _| {})?;
    build_factors(model, method, ranks, layers, &report, settings)
}
