//! Sampling PixArt-α: [`PixArtEngine`] stages a request (prompt and negative
//! embeddings, initial latents), computes the caption's cross-attention K/V once, and lets
//! the sampling loop of [`crate::engine::run_steps`] drive its steps: the model call over
//! [negative, positive] rows, guidance on all channels with the variance half dropped, and
//! the DPM-Solver++ or DDIM update. Every buffer is allocated when the engine is built. The
//! model passes run on a [`PixArtRunner`]: the CPU backend ([`PixArtCpu`], the default) or the
//! GPU pipeline's device ([`crate::gpu::pixart::PixArtGpu`]). The loop is this file's for both;
//! guidance and the sampler update run here on the host for the CPU, and on the device for a
//! backend that keeps the latents there ([`PixArtDeviceSteps`]).

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::cpu::{PixArtCache, PixArtCpu, PixArtCpuOptions};
use super::sampler::{PixArtSampler, PixArtSchedule};
use super::weights::PixArtModel;
use crate::engine::{run_steps, Step, StepLoop};
use crate::error::{Error, Result};
use crate::forward::StepKind;
use crate::isa::Isa;
use crate::noise;
use crate::policy::FullSteps;
use crate::tensorfile::TensorFile;

/// Prompt embeddings as `icdit encode` writes them: `prompt_embeds` f32 (B, L, D) and
/// `attention_mask` i64 (B, L) of 0/1.
#[derive(Clone, Debug)]
pub struct Embeddings {
    pub embeds: Vec<f32>,
    pub mask: Vec<i64>,
    /// Prompts.
    pub rows: usize,
    /// Tokens per prompt.
    pub len: usize,
    /// Features per token.
    pub dim: usize,
}

impl Embeddings {
    pub fn new(embeds: Vec<f32>, mask: Vec<i64>, rows: usize, len: usize, dim: usize) -> Result<Self> {
        if rows == 0 || len == 0 || dim == 0 || embeds.len() != rows * len * dim || mask.len() != rows * len {
            return Err(Error::invalid(
                "prompt embeddings",
                format!(
                    "{} values and {} mask values for {rows} prompts × {len} tokens × {dim}",
                    embeds.len(),
                    mask.len()
                ),
            ));
        }
        Ok(Embeddings { embeds, mask, rows, len, dim })
    }

    /// Reads an embeddings file (the tensors `prompt_embeds` and `attention_mask`).
    pub fn load(path: &Path) -> Result<Self> {
        let f = TensorFile::open(path)?;
        let (shape, embeds) = f.read_f32("prompt_embeds")?;
        let bad = |reason: String| Error::Layout { path: path.to_path_buf(), reason };
        let [rows, len, dim] = shape[..] else {
            return Err(bad(format!("`prompt_embeds` has shape {shape:?}; expected [prompts, tokens, features]")));
        };
        let (mshape, mask) = f.read_i64("attention_mask")?;
        if mshape != [rows, len] {
            return Err(bad(format!(
                "`attention_mask` has shape {mshape:?}; expected [{rows}, {len}] (as prompt_embeds)"
            )));
        }
        if let Some(i) = mask.iter().position(|&m| m != 0 && m != 1) {
            return Err(bad(format!("`attention_mask` element {i} is {}; masks are 0 or 1", mask[i])));
        }
        if let Some(i) = embeds.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!("`prompt_embeds` element {i} is not finite")));
        }
        Embeddings::new(embeds, mask, rows, len, dim)
    }
}

/// How a PixArt engine samples; fixed when it is built.
#[derive(Clone, Debug)]
pub struct PixArtOptions {
    /// Largest number of images per request.
    pub max_batch: usize,
    /// Longest caption (tokens) a request may give (PixArt-α: 120).
    pub max_text_len: usize,
    pub sampler: PixArtSampler,
    pub steps: usize,
    /// Guidance scale ≥ 1; guidance is on above 1 (PixArt-α: 4.5).
    pub cfg_scale: f32,
    pub threads: usize,
    pub isa: Option<Isa>,
    pub cache: PixArtCache,
    /// Which steps are full under a caching policy.
    pub full_steps: FullSteps,
}

impl Default for PixArtOptions {
    fn default() -> Self {
        PixArtOptions {
            max_batch: 1,
            max_text_len: 120,
            sampler: PixArtSampler::DpmSolver,
            steps: 20,
            cfg_scale: 4.5,
            threads: 0,
            isa: None,
            cache: PixArtCache::None,
            full_steps: FullSteps::Period(2),
        }
    }
}

impl PixArtOptions {
    pub fn guided(&self) -> bool {
        self.cfg_scale > 1.0
    }
    pub fn model_rows(&self, images: usize) -> usize {
        if self.guided() {
            2 * images
        } else {
            images
        }
    }
}

/// One request: the prompts' embeddings (one image per prompt), the negative prompt's (one
/// row for all images, or one per image; needed under guidance), and the initial latents.
#[derive(Clone, Copy, Debug)]
pub struct PixArtRequest<'a> {
    pub prompt: &'a Embeddings,
    pub negative: Option<&'a Embeddings>,
    /// Initial latents z, (B, C, H, W) at the model's latent size; `None`: drawn from `seed` (image k from (seed, k)).
    pub noise: Option<&'a [f32]>,
    pub seed: u64,
    pub first_index: u64,
}

/// What the PixArt sampling loop needs from a backend of the forward pass: the CPU's
/// [`PixArtCpu`] or the device's [`crate::gpu::pixart::PixArtGpu`].
pub trait PixArtRunner {
    fn model(&self) -> &Arc<PixArtModel>;
    /// Model rows a pass takes at most.
    fn max_rows(&self) -> usize;
    /// Longest caption (tokens) a request may give.
    fn max_text_len(&self) -> usize;
    /// Stages a request's captions (rows, L, D) and masks (rows, L) and computes what depends
    /// on them only (the caption projection, every block's cross-attention K and V).
    fn stage_text(&mut self, text: &[f32], mask: &[i64], rows: usize, len: usize) -> Result<()>;
    /// Stages the micro-conditions of `rows` rows (models with `use_additional_conditions`):
    /// `resolution` (rows, 2) as (height, width) in pixels, `aspect` (rows) = height / width;
    /// their embeddings are computed once per request.
    fn stage_size(&mut self, resolution: &[f32], aspect: &[f32], rows: usize) -> Result<()>;
    /// Stages a pass's latents (rows, C, S, S) and timesteps.
    fn stage_inputs(&mut self, x: &[f32], t: &[f32], rows: usize) -> Result<()>;
    /// One forward pass of `kind` over the staged rows.
    fn run(&mut self, rows: usize, kind: StepKind) -> Result<()>;
    /// The last pass's output, (rows, Cout, S, S).
    fn output(&self, rows: usize) -> &[f32];
    /// Rows of the last full step, whose activations the caches hold.
    fn cached_rows(&self) -> Option<usize>;
    /// A backend that keeps the latents on its device and runs guidance and the sampler update
    /// there too (the GPU pipeline); `None`: the engine does both on the host (the CPU).
    fn device_steps(&mut self) -> Option<&mut dyn PixArtDeviceSteps> {
        None
    }

    /// One plain forward pass of `rows = t.len()` rows (the `icdit forward` command): stages
    /// the captions `text` (rows, len, D) and masks (rows, len), the micro-conditions `size`
    /// (resolution (rows, 2) in pixels, aspect ratio (rows); models with
    /// `use_additional_conditions`) and the latents x (rows, C, H, W), runs, and copies the
    /// output into `out` (rows, Cout, H, W).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        x: &[f32],
        t: &[f32],
        text: &[f32],
        mask: &[i64],
        len: usize,
        size: Option<(&[f32], &[f32])>,
        out: &mut [f32],
    ) -> Result<()> {
        let rows = t.len();
        self.stage_text(text, mask, rows, len)?;
        if let Some((resolution, aspect)) = size {
            self.stage_size(resolution, aspect, rows)?;
        }
        self.stage_inputs(x, t, rows)?;
        self.run(rows, StepKind::Plain)?;
        let got = self.output(rows);
        if out.len() != got.len() {
            return Err(Error::invalid("output buffer", format!("{} values, expected {}", out.len(), got.len())));
        }
        out.copy_from_slice(got);
        Ok(())
    }
}

/// The sampling steps of a backend that keeps a request's latents on its device: the same
/// update as [`PixArtSchedule::step`], from the six numbers of
/// [`PixArtSchedule::update_coeffs`] per step.
pub trait PixArtDeviceSteps {
    /// Takes every step's six numbers (steps × 6), once, when the engine is built.
    fn set_schedule(&mut self, coeffs: &[f32]) -> Result<()>;
    /// Takes a request's initial latents (images, C, S, S) after its caption was staged.
    fn begin(&mut self, latents: &[f32], images: usize, guided: bool, cfg_scale: f32) -> Result<()>;
    /// Step `index`: the model pass of `kind` at `timestep` over [negative…, positive…] rows
    /// (guided) or the images, guidance on every channel, the update of the latents.
    fn step(&mut self, index: usize, timestep: f32, kind: StepKind) -> Result<()>;
    /// The current latents, (images, C, S, S).
    fn latents(&mut self, out: &mut [f32]) -> Result<()>;
    /// The last step's x̂₀, same layout.
    fn denoised(&mut self, out: &mut [f32]) -> Result<()>;
    /// After a request's steps: the first step whose model output (or updated latents) held a
    /// NaN or ±Inf, and which of the two.
    fn first_non_finite(&mut self) -> Result<Option<(usize, &'static str)>>;
}

impl PixArtRunner for PixArtCpu {
    fn model(&self) -> &Arc<PixArtModel> {
        PixArtCpu::model(self)
    }
    fn max_rows(&self) -> usize {
        PixArtCpu::max_rows(self)
    }
    fn max_text_len(&self) -> usize {
        PixArtCpu::max_text_len(self)
    }
    fn stage_text(&mut self, text: &[f32], mask: &[i64], rows: usize, len: usize) -> Result<()> {
        PixArtCpu::stage_text(self, text, mask, rows, len)
    }
    fn stage_size(&mut self, resolution: &[f32], aspect: &[f32], rows: usize) -> Result<()> {
        PixArtCpu::stage_size(self, resolution, aspect, rows)
    }
    fn stage_inputs(&mut self, x: &[f32], t: &[f32], rows: usize) -> Result<()> {
        PixArtCpu::stage_inputs(self, x, t, rows)
    }
    fn run(&mut self, rows: usize, kind: StepKind) -> Result<()> {
        PixArtCpu::run(self, rows, kind)
    }
    fn output(&self, rows: usize) -> &[f32] {
        PixArtCpu::output(self, rows)
    }
    fn cached_rows(&self) -> Option<usize> {
        PixArtCpu::cached_rows(self)
    }
}

/// Everything but the interrupt flag: the step loop's view of a staged request.
struct Core<M> {
    runner: M,
    schedule: PixArtSchedule,
    opts: PixArtOptions,
    /// x_t, (B, C, S, S).
    latents: Vec<f32>,
    /// ε after guidance, (B, C, S, S).
    eps: Vec<f32>,
    /// The last step's x̂₀ (DPM-Solver++ reads the previous one; previews show it).
    x0: Vec<f32>,
    /// What the model sees: [x; x] under guidance.
    model_in: Vec<f32>,
    t: Vec<f32>,
    /// Staged caption rows [negative…, positive…] and their masks.
    text: Vec<f32>,
    mask: Vec<i64>,
    /// Micro-conditions per row (models with `use_additional_conditions`): (height, width) in
    /// pixels and height / width, of the size sampled.
    resolution: Vec<f32>,
    aspect: Vec<f32>,
    images: usize,
}

/// A PixArt-α transformer plus a sampler, ready to serve requests; its passes run on `M`
/// (the CPU backend by default).
pub struct PixArtEngine<M: PixArtRunner = PixArtCpu> {
    core: Core<M>,
    interrupt: Option<Arc<AtomicBool>>,
}

impl PixArtOptions {
    /// Checks the options and builds their schedule.
    pub fn validate(&self) -> Result<PixArtSchedule> {
        if !(self.cfg_scale.is_finite() && self.cfg_scale >= 1.0) {
            return Err(Error::invalid("cfg scale", format!("{}: must be a number ≥ 1", self.cfg_scale)));
        }
        if self.max_batch == 0 || self.max_batch > 1 << 15 {
            return Err(Error::invalid("max batch", format!("{}: must be 1 to 32768 images", self.max_batch)));
        }
        let schedule = PixArtSchedule::new(self.sampler, self.steps)?;
        if !matches!(self.cache, PixArtCache::None) {
            self.full_steps.validate(schedule.len())?;
        }
        Ok(schedule)
    }
}

impl PixArtEngine<PixArtCpu> {
    /// An engine on the CPU backend.
    pub fn new(model: Arc<PixArtModel>, opts: &PixArtOptions) -> Result<Self> {
        opts.validate()?;
        let rows = opts.model_rows(opts.max_batch);
        let cpu = PixArtCpu::new(
            model,
            &PixArtCpuOptions {
                max_rows: rows,
                max_text_len: opts.max_text_len,
                threads: opts.threads,
                cache: opts.cache.clone(),
                isa: opts.isa,
            },
        )?;
        Self::with_runner(cpu, opts)
    }

    pub fn threads(&self) -> usize {
        self.core.runner.threads()
    }
    pub fn isa(&self) -> Isa {
        self.core.runner.isa()
    }
}

impl<M: PixArtRunner> PixArtEngine<M> {
    /// An engine whose passes run on `runner`, which must take the options' rows (twice the
    /// batch under guidance), caption length and cache policy.
    pub fn with_runner(runner: M, opts: &PixArtOptions) -> Result<Self> {
        let schedule = opts.validate()?;
        let rows = opts.model_rows(opts.max_batch);
        if runner.max_rows() < rows || runner.max_text_len() < opts.max_text_len {
            return Err(Error::invalid(
                "PixArt engine",
                format!(
                    "the backend takes {} rows of {} caption tokens; these options need {rows} rows of {}",
                    runner.max_rows(),
                    runner.max_text_len(),
                    opts.max_text_len
                ),
            ));
        }
        let mut runner = runner;
        if let Some(d) = runner.device_steps() {
            let coeffs: Vec<f32> = (0..schedule.len()).flat_map(|i| schedule.update_coeffs(i)).collect();
            d.set_schedule(&coeffs)?;
        }
        let cfg = runner.model().config;
        let img = cfg.image_elems();
        let b = opts.max_batch;
        Ok(PixArtEngine {
            core: Core {
                runner,
                schedule,
                opts: opts.clone(),
                latents: vec![0.0; b * img],
                eps: vec![0.0; b * img],
                x0: vec![0.0; b * img],
                model_in: vec![0.0; rows * img],
                t: vec![0.0; rows],
                text: vec![0.0; rows * opts.max_text_len * cfg.caption_channels],
                mask: vec![0; rows * opts.max_text_len],
                resolution: vec![0.0; 2 * rows],
                aspect: vec![0.0; rows],
                images: 0,
            },
            interrupt: None,
        })
    }

    pub fn model(&self) -> &Arc<PixArtModel> {
        self.core.runner.model()
    }
    pub fn options(&self) -> &PixArtOptions {
        &self.core.opts
    }
    pub fn schedule(&self) -> &PixArtSchedule {
        &self.core.schedule
    }
    /// The backend of the forward pass.
    pub fn runner(&self) -> &M {
        &self.core.runner
    }
    /// The kind of model call at sampling step `index`.
    pub fn step_kind(&self, index: usize) -> StepKind {
        self.core.step_kind(index)
    }

    /// See [`crate::SamplingEngine::set_interrupt`].
    pub fn set_interrupt(&mut self, flag: Option<Arc<AtomicBool>>) {
        self.interrupt = flag;
    }

    /// Samples one image per prompt into `out` ((B, C, S, S) latents). Allocates nothing.
    pub fn sample(&mut self, req: &PixArtRequest, out: &mut [f32], progress: &mut dyn FnMut(Step)) -> Result<()> {
        self.run(req, out, None, &mut |s, _| progress(s))
    }

    /// As [`sample`](PixArtEngine::sample), and after each step writes that step's x̂₀ (the
    /// model's estimate of the clean latents, same layout as `out`) into `preview` and passes
    /// it to `on_step`; after the last step x̂₀ is the result. Allocates nothing.
    pub fn sample_previewed(
        &mut self,
        req: &PixArtRequest,
        out: &mut [f32],
        preview: &mut [f32],
        on_step: &mut dyn FnMut(Step, &[f32]),
    ) -> Result<()> {
        crate::engine::check_preview(preview, out)?;
        self.run(req, out, Some(preview), on_step)
    }

    fn run(
        &mut self,
        req: &PixArtRequest,
        out: &mut [f32],
        preview: Option<&mut [f32]>,
        on_step: &mut dyn FnMut(Step, &[f32]),
    ) -> Result<()> {
        let n = self.core.stage(req, out.len())?;
        let rows = self.core.opts.model_rows(n);
        run_steps(&mut self.core, n, rows, self.interrupt.as_deref(), preview, on_step)?;
        if let Some(d) = self.core.runner.device_steps() {
            d.latents(&mut self.core.latents[..out.len()])?;
            if let Some((step, what)) = d.first_non_finite()? {
                let s = &self.core.schedule;
                return Err(Error::NonFinite {
                    step,
                    steps: s.len(),
                    timestep: s.timesteps[step.min(s.len() - 1)],
                    location: format!("{what} on the device"),
                    cause: String::from(": the weights, the embeddings or the latents overflow"),
                });
            }
        }
        out.copy_from_slice(&self.core.latents[..out.len()]);
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("sample", format!("element {i} of the result is not finite")));
        }
        Ok(())
    }
}

impl<M: PixArtRunner> Core<M> {
    /// Validates and stages a request; returns its number of images.
    fn stage(&mut self, req: &PixArtRequest, out_len: usize) -> Result<usize> {
        let cfg = self.runner.model().config;
        let (p, img) = (req.prompt, cfg.image_elems());
        let n = p.rows;
        if n > self.opts.max_batch {
            return Err(Error::invalid(
                "batch",
                format!("{n} prompts; this engine was built for 1..={}", self.opts.max_batch),
            ));
        }
        if p.dim != cfg.caption_channels {
            return Err(Error::invalid(
                "prompt embeddings",
                format!("{} features per token; this model's caption_channels is {}", p.dim, cfg.caption_channels),
            ));
        }
        if p.len > self.opts.max_text_len {
            return Err(Error::invalid(
                "prompt embeddings",
                format!("{} tokens; this engine takes at most {}", p.len, self.opts.max_text_len),
            ));
        }
        if out_len != n * img {
            return Err(Error::invalid("output buffer", format!("{out_len} elements, expected {}", n * img)));
        }
        let guided = self.opts.guided();
        let (len, d) = (p.len, p.dim);
        let row = len * d;
        if guided {
            let neg = req.negative.ok_or_else(|| {
                Error::invalid(
                    "negative embeddings",
                    "guidance (cfg > 1) needs the negative prompt's embeddings: without a text encoder they must be \
                     given (--negative-embeds, e.g. `icdit encode --prompt \"\"`), or use --cfg 1",
                )
            })?;
            if neg.dim != d || neg.len != len || (neg.rows != 1 && neg.rows != n) {
                return Err(Error::invalid(
                    "negative embeddings",
                    format!(
                        "{} × {} × {}; expected 1 or {n} rows of {len} tokens × {d} (the prompt embeddings' length and width)",
                        neg.rows, neg.len, neg.dim
                    ),
                ));
            }
            // Rows [negative…, positive…], as the pipeline batches them.
            for i in 0..n {
                let j = if neg.rows == 1 { 0 } else { i };
                self.text[i * row..(i + 1) * row].copy_from_slice(&neg.embeds[j * row..(j + 1) * row]);
                self.mask[i * len..(i + 1) * len].copy_from_slice(&neg.mask[j * len..(j + 1) * len]);
            }
            self.text[n * row..2 * n * row].copy_from_slice(&p.embeds);
            self.mask[n * len..2 * n * len].copy_from_slice(&p.mask);
        } else {
            self.text[..n * row].copy_from_slice(&p.embeds);
            self.mask[..n * len].copy_from_slice(&p.mask);
        }
        let rows = self.opts.model_rows(n);
        match req.noise {
            Some(z) => {
                if z.len() != n * img {
                    return Err(Error::invalid("noise", format!("{} elements, expected {n} × {img}", z.len())));
                }
                if let Some(i) = z.iter().position(|v| !v.is_finite()) {
                    return Err(Error::invalid("noise", format!("element {i} is not finite")));
                }
                self.latents[..n * img].copy_from_slice(z);
            }
            None => {
                for i in 0..n {
                    noise::fill_normal(
                        req.seed,
                        req.first_index + i as u64,
                        0,
                        &mut self.latents[i * img..(i + 1) * img],
                    );
                }
            }
        }
        self.runner.stage_text(&self.text[..rows * row], &self.mask[..rows * len], rows, len)?;
        if cfg.use_additional_conditions {
            // The pipeline's added_cond_kwargs: the sampled size in pixels on every row.
            let (res, ar) = super::micro::pipeline_conditions(&cfg);
            for r in 0..rows {
                self.resolution[2 * r..2 * r + 2].copy_from_slice(&res);
            }
            self.aspect[..rows].fill(ar);
            self.runner.stage_size(&self.resolution[..2 * rows], &self.aspect[..rows], rows)?;
        }
        if let Some(d) = self.runner.device_steps() {
            d.begin(&self.latents[..n * img], n, guided, self.opts.cfg_scale)?;
        }
        self.images = n;
        Ok(n)
    }
}

impl<M: PixArtRunner> StepLoop for Core<M> {
    fn steps(&self) -> usize {
        self.schedule.len()
    }

    fn timestep(&self, k: usize) -> usize {
        self.schedule.timesteps[self.schedule.len() - 1 - k]
    }

    fn step_kind(&self, index: usize) -> StepKind {
        let kinds = self.opts.cache.policy().step_kinds();
        match kinds {
            [only] => *only,
            [full, cached] => {
                if self.opts.full_steps.is_full(index) {
                    *full
                } else {
                    *cached
                }
            }
            _ => StepKind::Plain,
        }
    }

    fn check_step(&self, kind: StepKind, rows: usize) -> Result<()> {
        let policy = self.opts.cache.policy();
        if kind != StepKind::Plain && !policy.step_kinds().contains(&kind) {
            return Err(Error::invalid("step kind", format!("a {} step under cache policy {policy}", kind.name())));
        }
        if matches!(kind, StepKind::Calibrated | StepKind::Reuse) && self.runner.cached_rows() != Some(rows) {
            return Err(Error::invalid(
                "step kind",
                format!("a {} step needs a full step with the same {rows} rows before it", kind.name()),
            ));
        }
        Ok(())
    }

    fn step(&mut self, index: usize, _k: usize, kind: StepKind) -> Result<()> {
        let cfg = self.runner.model().config;
        let (n, img) = (self.images, cfg.image_elems());
        let rows = self.opts.model_rows(n);
        let guided = self.opts.guided();
        let timestep = self.schedule.timesteps[index];
        if let Some(d) = self.runner.device_steps() {
            return d.step(index, timestep as f32, kind);
        }
        self.t[..rows].fill(timestep as f32);
        self.model_in[..n * img].copy_from_slice(&self.latents[..n * img]);
        if guided {
            self.model_in.copy_within(0..n * img, n * img);
        }
        self.runner.stage_inputs(&self.model_in[..rows * img], &self.t[..rows], rows)?;
        self.runner.run(rows, kind)?;
        let out = self.runner.output(rows);
        // ε: the first in_channels of each image's output (the variance half dropped), mixed
        // as u + s·(c − u) under guidance (rows [negative…, positive…]).
        let (oimg, s) = (cfg.out_elems(), self.opts.cfg_scale);
        for i in 0..n {
            let eps = &mut self.eps[i * img..(i + 1) * img];
            if guided {
                let (u, c) = (&out[i * oimg..i * oimg + img], &out[(n + i) * oimg..(n + i) * oimg + img]);
                for ((e, &u), &c) in eps.iter_mut().zip(u).zip(c) {
                    *e = u + s * (c - u);
                }
            } else {
                eps.copy_from_slice(&out[i * oimg..i * oimg + img]);
            }
        }
        if let Some(i) = self.eps[..n * img].iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                step: index,
                steps: self.schedule.len(),
                timestep,
                location: format!("the model's guided ε (element {i})"),
                cause: "the weights, the embeddings or the latents overflow".into(),
            });
        }
        self.schedule.step(index, &mut self.latents[..n * img], &self.eps[..n * img], &mut self.x0[..n * img]);
        Ok(())
    }

    fn wait(&mut self) -> Result<()> {
        Ok(())
    }

    fn denoised(&mut self, _k: usize, out: &mut [f32]) -> Result<()> {
        if let Some(d) = self.runner.device_steps() {
            return d.denoised(out);
        }
        out.copy_from_slice(&self.x0[..out.len()]);
        Ok(())
    }
}
