//! The sampling engine: a model, a diffusion schedule and every buffer a request needs,
//! all planned and allocated when the engine is built. [`SamplingEngine::sample`] runs the
//! whole reverse process — classifier-free guidance, DDPM or DDIM steps, reproducible noise —
//! into caller-provided memory and allocates nothing, however often it is called.
//!
//! The sampling loop is written once, here, against [`SamplingBackend`]: the loop validates
//! the request, stops on an interrupt, picks and checks each step's kind by the caching policy
//! ([`policy::step_kind`], [`policy::check_step`]), reports progress and refuses a non-finite
//! result; a backend stages the request and carries out each step. [`Engine`] runs it on the
//! CPU reference backend ([`crate::cpu::CpuBackend`]), [`crate::gpu::GpuEngine`] on the GPU
//! pipeline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::DitConfig;
use crate::diffusion::{Sampler, Schedule};
use crate::error::{Error, Result};
use crate::forward::StepKind;
use crate::policy::{self, CacheMode, IccForm};
use crate::weights::DitModel;

/// Re-exported from [`crate::policy`], where the caching policy lives.
pub use crate::policy::FullSteps;

/// Which ε channels classifier-free guidance mixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuidedChannels {
    /// The official `forward_with_cfg`: output channels 0..3 only (reference doc A.10);
    /// reproduces DiT's published samples.
    OfficialThree,
    /// Every ε channel, as diffusers' pipeline does.
    All,
}

/// How an engine samples; fixed when it is built.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Largest number of images per request.
    pub max_batch: usize,
    /// Respacing spec: "250" (DiT's default), "50", "ddim50", … ("" = all 1000 steps).
    pub respacing: String,
    pub sampler: Sampler,
    /// Guidance scale s ≥ 1; exactly 1 runs without the unconditional half.
    pub cfg_scale: f32,
    pub guided_channels: GuidedChannels,
    /// CPU threads (0: all cores).
    pub threads: usize,
    /// The CPU instruction-set path; `None`: `ICDIT_CPU_ISA`, or the best this CPU runs.
    pub isa: Option<crate::isa::Isa>,
    /// Caching policy: none, naive reuse, or increment-calibrated with factors.
    pub cache: CacheMode,
    /// Which steps are full under a caching policy.
    pub full_steps: FullSteps,
    /// Refuse to build the engine when its memory (both arenas plus the loaded weights)
    /// would exceed this many bytes; the machine's available memory is always checked.
    pub max_memory: Option<u64>,
    /// Scan each step's model output (and the updated latents) for NaN or Inf; on a hit,
    /// run that step again with every op checked and fail with an error naming the step,
    /// the block and the operation (and a non-finite weight tensor, if that is the cause).
    /// The scan costs one pass over the output per step.
    pub check_finite: bool,
    /// How calibrated steps compute icc's linears: [`IccForm::Auto`] is the direct form on the
    /// CPU (the only one it computes) and the projected form in the GPU pipeline.
    pub icc_form: IccForm,
    /// GPU pipeline: each calibrated linear as one fused low-rank launch (kernels/lowrank.cu;
    /// the default) or as the two fused GEMMs it replaces (`false`, kept for comparison).
    pub fused_lowrank: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_batch: 1,
            respacing: "250".into(),
            sampler: Sampler::Ddpm,
            cfg_scale: 4.0,
            guided_channels: GuidedChannels::OfficialThree,
            threads: 0,
            isa: None,
            cache: CacheMode::None,
            full_steps: FullSteps::Period(2),
            max_memory: None,
            check_finite: true,
            icc_form: IccForm::Auto,
            fused_lowrank: true,
        }
    }
}

impl EngineOptions {
    /// Checks the options against a model and builds the schedule they ask for.
    pub fn validate(&self, cfg: &DitConfig) -> Result<Schedule> {
        if self.max_batch == 0 || self.max_batch > MAX_BATCH {
            return Err(Error::invalid(
                "max batch",
                format!("{}: must be 1 to {MAX_BATCH} images per call", self.max_batch),
            ));
        }
        if !(self.cfg_scale.is_finite() && self.cfg_scale >= 1.0) {
            return Err(Error::invalid("cfg scale", format!("{}: must be a number ≥ 1", self.cfg_scale)));
        }
        if let Sampler::Ddim { eta } = self.sampler {
            if !(eta.is_finite() && eta >= 0.0) {
                return Err(Error::invalid("DDIM eta", format!("{eta}: must be ≥ 0")));
            }
        }
        if self.cfg_scale > 1.0 && cfg.label_rows() <= cfg.num_classes {
            return Err(Error::invalid(
                "cfg scale",
                "this model has no null class (trained without label dropout), so it cannot be guided; use 1",
            ));
        }
        let schedule = Schedule::new(&self.respacing)?;
        if self.cache.keeps_caches() {
            self.full_steps.validate(schedule.len())?;
        }
        Ok(schedule)
    }

    /// The kind of model call at sampling step `index` under these options' policy
    /// ([`policy::step_kind`]).
    pub fn step_kind(&self, index: usize) -> StepKind {
        policy::step_kind(&self.cache, &self.full_steps, index)
    }

    /// Whether requests run classifier-free guidance (scale above 1): the model then sees
    /// each image twice, conditional and unconditional.
    pub fn guided(&self) -> bool {
        self.cfg_scale > 1.0
    }

    /// Model rows for `images` images: twice as many under guidance.
    pub fn model_rows(&self, images: usize) -> usize {
        if self.guided() {
            2 * images
        } else {
            images
        }
    }
}

/// One request: which classes, and where the randomness comes from.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// One class label per image (0..num_classes).
    pub classes: &'a [i64],
    pub seed: u64,
    /// Image index of the first image: noise is keyed by (seed, index), so image k is the
    /// same alone or in any batch, and shards of a large run stay consistent.
    pub first_index: u64,
    /// Optional initial latents z, (B, C, I, I), instead of the generated ones.
    pub noise: Option<&'a [f32]>,
    /// Optional per-step noise, (steps, B, C, I, I) in sampling order, for stochastic samplers.
    pub step_noise: Option<&'a [f32]>,
}

impl<'a> Request<'a> {
    pub fn new(classes: &'a [i64], seed: u64) -> Self {
        Request { classes, seed, first_index: 0, noise: None, step_noise: None }
    }
}

/// Reported to the progress callback after each step.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    /// 0-based step number in sampling order.
    pub index: usize,
    pub total: usize,
    /// The original diffusion timestep the model saw.
    pub timestep: usize,
}

/// Largest `max_batch` an engine accepts; larger requests are split into calls by the caller.
pub const MAX_BATCH: usize = 1 << 16;

/// What the sampling loop ([`SamplingEngine::sample`]) needs from a backend: the CPU
/// reference backend ([`CpuBackend`]) or the GPU pipeline
/// ([`crate::gpu::pipeline::GpuBackend`]). The loop owns validation, interrupts, the step
/// kinds and progress; the backend owns the numbers: staging, the model call, guidance, the
/// noise, the sampler update and the finiteness checks of each step.
pub trait SamplingBackend {
    fn model(&self) -> &Arc<DitModel>;
    /// The options the backend was built with.
    fn options(&self) -> &EngineOptions;
    /// The schedule those options give.
    fn schedule(&self) -> &Schedule;
    /// Rows of the last full step, whose activations the caches hold (`None`: none yet).
    fn cached_rows(&self) -> Option<usize>;
    /// Takes a validated request: its labels ([classes; null…] under guidance) and initial
    /// latents (given, or drawn from noise stream step 0 of each image).
    fn stage(&mut self, req: &Request) -> Result<()>;
    /// Sampling step `index` (0 first) at schedule index `k`, a model call of `kind`: the
    /// forward pass, guidance, the step's noise and the sampler update of the latents. A
    /// backend that checks values per step fails here with [`Error::NonFinite`].
    fn step(&mut self, req: &Request, index: usize, k: usize, kind: StepKind) -> Result<()>;
    /// Called before an interrupted request returns: waits for the work already issued.
    fn wait(&mut self) -> Result<()>;
    /// Copies the request's final latents into `out` (its length validated); a backend that
    /// checks values on the way fails here with [`Error::NonFinite`].
    fn finish(&mut self, out: &mut [f32]) -> Result<()>;
    /// Whether [`denoised`](SamplingBackend::denoised) is implemented (per-step previews).
    fn previews(&self) -> bool {
        false
    }
    /// After [`step`](SamplingBackend::step) `k`: the model's current estimate of the clean
    /// sample, x̂₀ = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε̂ with the step's guided ε̂, into `out`
    /// (the request's size). Only called when [`previews`](SamplingBackend::previews) is true.
    fn denoised(&mut self, k: usize, out: &mut [f32]) -> Result<()> {
        let _ = (k, out);
        Err(Error::invalid("preview", "this backend does not give per-step previews"))
    }
}

/// A preview buffer holds one x̂₀ of the request's size.
pub(crate) fn check_preview(preview: &[f32], out: &[f32]) -> Result<()> {
    if preview.len() != out.len() {
        return Err(Error::invalid(
            "preview buffer",
            format!("{} elements, expected {} (the output's size)", preview.len(), out.len()),
        ));
    }
    Ok(())
}

/// A model plus a sampler on a backend, ready to serve requests.
///
/// An engine is `Send` when its backend is (the CPU engine is: it can move to another
/// thread) but not shared: `sample` takes `&mut self` because the arenas are the engine's
/// working memory. Several engines may share one `Arc<DitModel>` — the weights are
/// read-only — each with its own arenas and threads.
pub struct SamplingEngine<B> {
    backend: B,
    interrupt: Option<Arc<AtomicBool>>,
}

impl<B: SamplingBackend> SamplingEngine<B> {
    /// An engine on a backend that is built and ready.
    pub fn from_backend(backend: B) -> Self {
        SamplingEngine { backend, interrupt: None }
    }

    /// The backend the loop drives.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub(crate) fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    pub fn model(&self) -> &Arc<DitModel> {
        self.backend.model()
    }
    pub fn schedule(&self) -> &Schedule {
        self.backend.schedule()
    }
    pub fn options(&self) -> &EngineOptions {
        self.backend.options()
    }
    pub fn steps(&self) -> usize {
        self.backend.schedule().len()
    }

    /// The kind of model call at sampling step `index` under the engine's policy.
    pub fn step_kind(&self, index: usize) -> StepKind {
        self.backend.options().step_kind(index)
    }

    /// A flag that, once set (from a signal handler or another thread), makes
    /// [`sample`](SamplingEngine::sample) stop before its next step with
    /// [`Error::Interrupted`] (a device first finishes what was issued).
    pub fn set_interrupt(&mut self, flag: Option<Arc<AtomicBool>>) {
        self.interrupt = flag;
    }

    /// Samples `req.classes.len()` images into `out` ((B, C, I, I) latents or pixels in
    /// [−1, 1] for pixel-space models). Allocates nothing. `progress` runs after each step
    /// (on a device: as each step is issued; the host waits only for the final copy).
    pub fn sample(&mut self, req: &Request, out: &mut [f32], progress: &mut dyn FnMut(Step)) -> Result<()> {
        self.run(req, out, None, &mut |step, _| progress(step))
    }

    /// Whether this engine's backend gives per-step previews
    /// ([`sample_previewed`](SamplingEngine::sample_previewed)).
    pub fn previews(&self) -> bool {
        self.backend.previews()
    }

    /// As [`sample`](SamplingEngine::sample), and after each step writes the model's current
    /// x̂₀ (the denoised estimate, same layout as `out`) into the caller's `preview` buffer
    /// and passes it to `on_step`. Allocates nothing; after the last step x̂₀ is the result.
    pub fn sample_previewed(
        &mut self,
        req: &Request,
        out: &mut [f32],
        preview: &mut [f32],
        on_step: &mut dyn FnMut(Step, &[f32]),
    ) -> Result<()> {
        if !self.backend.previews() {
            return Err(Error::invalid("preview", "this backend does not give per-step previews"));
        }
        check_preview(preview, out)?;
        self.run(req, out, Some(preview), on_step)
    }

    /// The sampling loop ([`run_steps`]) on this engine's backend; `preview` (validated by
    /// the caller) receives x̂₀ after each step when given.
    fn run(
        &mut self,
        req: &Request,
        out: &mut [f32],
        preview: Option<&mut [f32]>,
        on_step: &mut dyn FnMut(Step, &[f32]),
    ) -> Result<()> {
        let cfg = self.backend.model().config;
        let (steps, max_batch) = (self.backend.schedule().len(), self.backend.options().max_batch);
        validate_request(&cfg, steps, max_batch, req, out.len())?;
        let n = req.classes.len();
        let rows = self.backend.options().model_rows(n);
        self.backend.stage(req)?;
        let mut steps = BackendSteps { backend: &mut self.backend, req };
        run_steps(&mut steps, n, rows, self.interrupt.as_deref(), preview, on_step)?;
        self.backend.finish(out)?;
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("sample", format!("element {i} of the result is not finite")));
        }
        Ok(())
    }
}

/// The steps of one staged request, as the sampling loop ([`run_steps`]) sees them: a
/// [`SamplingBackend`] with its request (DiT), or another model family's sampler (PixArt-α,
/// [`crate::pixart::PixArtEngine`]).
pub trait StepLoop {
    /// Sampling steps of the request.
    fn steps(&self) -> usize;
    /// The diffusion timestep the model sees at schedule index `k`.
    fn timestep(&self, k: usize) -> usize;
    /// The kind of model call at sampling step `index` (0 first) under the caching policy.
    fn step_kind(&self, index: usize) -> StepKind;
    /// Whether a call of `kind` over `rows` rows may run now (the caches hold a full step
    /// over the same rows when it needs them).
    fn check_step(&self, kind: StepKind, rows: usize) -> Result<()>;
    /// Step `index` at schedule index `k`: model call, guidance and sampler update.
    fn step(&mut self, index: usize, k: usize, kind: StepKind) -> Result<()>;
    /// Waits for the work already issued (an interrupted request).
    fn wait(&mut self) -> Result<()>;
    /// x̂₀ after step `k` into `out` (per-step previews).
    fn denoised(&mut self, k: usize, out: &mut [f32]) -> Result<()>;
}

/// A DiT backend with the request it staged.
struct BackendSteps<'a, 'r, B> {
    backend: &'a mut B,
    req: &'a Request<'r>,
}

impl<B: SamplingBackend> StepLoop for BackendSteps<'_, '_, B> {
    fn steps(&self) -> usize {
        self.backend.schedule().len()
    }
    fn timestep(&self, k: usize) -> usize {
        self.backend.schedule().timestep_map[k]
    }
    fn step_kind(&self, index: usize) -> StepKind {
        let opts = self.backend.options();
        policy::step_kind(&opts.cache, &opts.full_steps, index)
    }
    fn check_step(&self, kind: StepKind, rows: usize) -> Result<()> {
        policy::check_step(kind, &self.backend.options().cache, self.backend.cached_rows(), rows)
    }
    fn step(&mut self, index: usize, k: usize, kind: StepKind) -> Result<()> {
        self.backend.step(self.req, index, k, kind)
    }
    fn wait(&mut self) -> Result<()> {
        self.backend.wait()
    }
    fn denoised(&mut self, k: usize, out: &mut [f32]) -> Result<()> {
        self.backend.denoised(k, out)
    }
}

/// THE sampling loop, written once: for each step in sampling order (schedule index k from
/// the last down to 0), stop on an interrupt, pick the step's kind by the caching policy and
/// check it may follow the last, run it, and report it (with x̂₀ when `preview` is given).
/// `images` images over `rows` model rows were staged by the caller.
pub fn run_steps<L: StepLoop + ?Sized>(
    l: &mut L,
    images: usize,
    rows: usize,
    interrupt: Option<&AtomicBool>,
    mut preview: Option<&mut [f32]>,
    on_step: &mut dyn FnMut(Step, &[f32]),
) -> Result<()> {
    let steps = l.steps();
    for (index, k) in (0..steps).rev().enumerate() {
        if interrupt.is_some_and(|f| f.load(Ordering::Relaxed)) {
            l.wait()?;
            return Err(Error::Interrupted {
                done: format!("{index} of {steps} steps of a {images}-image request were done"),
            });
        }
        let kind = l.step_kind(index);
        l.check_step(kind, rows)?;
        l.step(index, k, kind)?;
        let step = Step { index, total: steps, timestep: l.timestep(k) };
        match preview.as_deref_mut() {
            Some(buf) => {
                l.denoised(k, buf)?;
                on_step(step, buf);
            }
            None => on_step(step, &[]),
        }
    }
    Ok(())
}

/// Checks a request against a model, an engine's batch limit and its step count.
fn validate_request(cfg: &DitConfig, steps: usize, max_batch: usize, req: &Request, out_len: usize) -> Result<()> {
    let n = req.classes.len();
    let img = cfg.image_elems();
    if n == 0 || n > max_batch {
        return Err(Error::invalid("batch", format!("{n} images; this engine was built for 1..={}", max_batch)));
    }
    for (i, &c) in req.classes.iter().enumerate() {
        if c < 0 || c as usize >= cfg.num_classes {
            return Err(Error::invalid(
                "class",
                format!(
                    "class {c} (image {i}) is not one of the model's {} classes 0..{}",
                    cfg.num_classes,
                    cfg.num_classes - 1
                ),
            ));
        }
    }
    if out_len != n * img {
        return Err(Error::invalid("output buffer", format!("{out_len} elements, expected {}", n * img)));
    }
    if let Some(z) = req.noise {
        if z.len() != n * img {
            return Err(Error::invalid("noise", format!("{} elements, expected {n} × {img}", z.len())));
        }
        if let Some(i) = z.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("noise", format!("element {i} is not finite")));
        }
    }
    if let Some(s) = req.step_noise {
        let want = steps * n * img;
        if s.len() != want {
            return Err(Error::invalid(
                "step noise",
                format!("{} elements, expected {} steps × {n} × {img}", s.len(), steps),
            ));
        }
        if let Some(i) = s.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("step noise", format!("element {i} is not finite")));
        }
    }
    Ok(())
}
