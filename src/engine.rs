//! The sampling engine: a model, a diffusion schedule and every buffer a request needs,
//! all planned and allocated when the engine is built. [`Engine::sample`] runs the whole
//! reverse process — classifier-free guidance, DDPM or DDIM steps, reproducible noise —
//! into caller-provided memory and allocates nothing, however often it is called.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::DitConfig;
use crate::cpu::{CpuEngine, CpuOptions};
use crate::diffusion::{self, Sampler, Schedule, Variance};
use crate::error::{Error, Result};
use crate::forward::StepKind;
use crate::limits::MemoryNeed;
use crate::noise;
use crate::plan::{Arena, BufId, Dt, Plan};
use crate::policy::{self, CacheMode};
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
    pub isa: Option<crate::cpu::Isa>,
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

struct Bufs {
    x: BufId,
    model_in: BufId,
    model_out: BufId,
    eps: BufId,
    noise: BufId,
}

/// Largest `max_batch` an engine accepts; larger requests are split into calls by the caller.
pub const MAX_BATCH: usize = 1 << 16;

/// A model plus a sampler, ready to serve requests.
///
/// An engine is `Send` (it can move to another thread) but not shared: `sample` takes
/// `&mut self` because the arena is the engine's working memory. Several engines may share
/// one `Arc<DitModel>` — the weights are read-only — each with its own arenas and threads.
pub struct Engine {
    backend: CpuEngine,
    schedule: Schedule,
    opts: EngineOptions,
    plan: Plan,
    arena: Arena,
    bufs: Bufs,
    t: Vec<i64>,
    y: Vec<i64>,
    interrupt: Option<Arc<AtomicBool>>,
}

impl Engine {
    /// The memory an engine for `model` and `opts` would hold, item by item (the loaded
    /// weights, the CPU forward arena, the sampler arena), computed without allocating.
    pub fn memory_need(model: &DitModel, opts: &EngineOptions) -> Result<MemoryNeed> {
        let schedule = opts.validate(&model.config)?;
        let cpu = CpuOptions {
            max_batch: opts.max_batch,
            guidance: opts.cfg_scale > 1.0,
            threads: opts.threads,
            cache: opts.cache.clone(),
            isa: opts.isa,
        };
        crate::cpu::check_plan_size(&model.config, crate::cpu::planned_rows(&cpu))?;
        let mut need = MemoryNeed::default();
        need.held("weights, memory-mapped file(s)", model.file_bytes() as u64);
        need.held("weights converted to f32 at load", model.store.owned_bytes() as u64);
        let p = crate::cpu::plan_for(model, &cpu);
        need.alloc(p.title.clone(), p.total_bytes() as u64);
        let (img, out) = (model.config.image_elems(), model.config.output_elems());
        let n = opts.max_batch;
        let rows = crate::cpu::planned_rows(&cpu);
        let sampler = [(n, img), (rows, img), (rows, out), (n, img), (n, img)]
            .iter()
            .fold(0u64, |acc, &(a, b)| acc.saturating_add(crate::limits::bytes_of(&[a, b], 4)));
        need.alloc(format!("sampler state ({n} images, {} steps)", schedule.len()), sampler);
        Ok(need)
    }

    /// A flag that, once set (from a signal handler or another thread), makes
    /// [`sample`](Engine::sample) stop before its next step with [`Error::Interrupted`].
    pub fn set_interrupt(&mut self, flag: Option<Arc<AtomicBool>>) {
        self.interrupt = flag;
    }

    /// Validates the options, builds the schedule, checks the planned memory against
    /// `max_memory` and the memory available, and allocates every buffer.
    pub fn new(model: Arc<DitModel>, opts: &EngineOptions) -> Result<Self> {
        let cfg = model.config;
        Self::memory_need(&model, opts)?.check("the sampling engine", opts.max_memory)?;
        let schedule = opts.validate(&cfg)?;
        let guided = opts.cfg_scale > 1.0;
        let rows = opts.max_batch * if guided { 2 } else { 1 };
        let backend = CpuEngine::new(
            model,
            &CpuOptions {
                max_batch: opts.max_batch,
                guidance: guided,
                threads: opts.threads,
                cache: opts.cache.clone(),
                isa: opts.isa,
            },
        )?;
        let (img, out) = (cfg.image_elems(), cfg.output_elems());
        let mut plan = Plan::new(format!(
            "sampler state ({} images, {} steps, {})",
            opts.max_batch,
            schedule.len(),
            if guided { "guided" } else { "unguided" }
        ));
        let n = opts.max_batch;
        let bufs = Bufs {
            x: plan.add("latents", &[n, img], Dt::F32),
            model_in: plan.add("model_input", &[rows, img], Dt::F32),
            model_out: plan.add("model_output", &[rows, out], Dt::F32),
            eps: plan.add("guided_eps", &[n, img], Dt::F32),
            noise: plan.add("step_noise", &[n, img], Dt::F32),
        };
        let arena = Arena::new(&plan)?;
        Ok(Engine {
            backend,
            schedule,
            opts: opts.clone(),
            plan,
            arena,
            bufs,
            t: vec![0; rows],
            y: vec![0; rows],
            interrupt: None,
        })
    }

    pub fn model(&self) -> &Arc<DitModel> {
        self.backend.model()
    }
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }
    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }
    pub fn steps(&self) -> usize {
        self.schedule.len()
    }
    /// The model backend's plan and the sampler's.
    pub fn plans(&self) -> [&Plan; 2] {
        [self.backend.plan(), &self.plan]
    }
    /// Bytes of all planned memory (both arenas).
    pub fn arena_bytes(&self) -> usize {
        self.backend.plan().total_bytes() + self.plan.total_bytes()
    }
    pub fn threads(&self) -> usize {
        self.backend.threads()
    }
    /// The CPU instruction-set path the model runs on.
    pub fn isa(&self) -> crate::cpu::Isa {
        self.backend.isa()
    }

    fn buf(&mut self, id: BufId) -> &mut [f32] {
        let b = self.plan.get(id);
        // SAFETY: the arena was sized by this plan; `&mut self` excludes other borrows.
        unsafe { std::slice::from_raw_parts_mut(self.arena.f32_ptr(b), b.elems()) }
    }

    /// Two distinct sampler buffers at once.
    fn bufs2(&mut self, a: BufId, b: BufId) -> (&mut [f32], &[f32]) {
        assert_ne!(a, b);
        let (pa, pb) = (self.plan.get(a), self.plan.get(b));
        // SAFETY: distinct buffers of the same arena never overlap.
        unsafe {
            (
                std::slice::from_raw_parts_mut(self.arena.f32_ptr(pa), pa.elems()),
                std::slice::from_raw_parts(self.arena.f32_ptr(pb), pb.elems()),
            )
        }
    }

    /// Samples `req.classes.len()` images into `out` ((B, C, I, I) latents or pixels in
    /// [−1, 1] for pixel-space models). Allocates nothing. `progress` runs after each step.
    pub fn sample(&mut self, req: &Request, out: &mut [f32], progress: &mut dyn FnMut(Step)) -> Result<()> {
        let cfg = self.backend.model().config;
        let n = req.classes.len();
        let img = cfg.image_elems();
        validate_request(&cfg, self.schedule.len(), self.opts.max_batch, req, out.len())?;
        let guided = self.opts.cfg_scale > 1.0;
        let rows = if guided { 2 * n } else { n };
        let steps = self.schedule.len();

        // Initial latents: given, or drawn from stream step 0 of each image.
        match req.noise {
            Some(z) => self.buf(self.bufs.x)[..n * img].copy_from_slice(z),
            None => {
                let x = self.buf(self.bufs.x);
                for r in 0..n {
                    noise::fill_normal(req.seed, req.first_index + r as u64, 0, &mut x[r * img..(r + 1) * img]);
                }
            }
        }
        // Labels: [classes; null…] under guidance (reference doc A.10).
        for r in 0..n {
            self.y[r] = req.classes[r];
            if guided {
                self.y[n + r] = cfg.null_class() as i64;
            }
        }
        let stochastic = match self.opts.sampler {
            Sampler::Ddpm => true,
            Sampler::Ddim { eta } => eta > 0.0,
        };
        for (index, k) in (0..steps).rev().enumerate() {
            if self.interrupt.as_ref().is_some_and(|f| f.load(Ordering::Relaxed)) {
                return Err(Error::Interrupted {
                    done: format!("{index} of {steps} steps of a {n}-image request were done"),
                });
            }
            let timestep = self.schedule.timestep_map[k];
            self.t[..rows].fill(timestep as i64);
            // The model sees [x; x]: forward_with_cfg duplicates the conditional half.
            {
                let (min, x) = self.bufs2(self.bufs.model_in, self.bufs.x);
                min[..n * img].copy_from_slice(&x[..n * img]);
                if guided {
                    min.copy_within(0..n * img, n * img);
                }
            }
            {
                let b = &self.bufs;
                let (pin, pout) = (self.plan.get(b.model_in), self.plan.get(b.model_out));
                // SAFETY: two distinct sampler buffers; the backend has its own arena.
                let (min, mout) = unsafe {
                    (
                        std::slice::from_raw_parts(self.arena.f32_ptr(pin), rows * img),
                        std::slice::from_raw_parts_mut(self.arena.f32_ptr(pout), rows * cfg.output_elems()),
                    )
                };
                let kind = self.step_kind(index);
                self.backend.forward_step(min, &self.t[..rows], &self.y[..rows], mout, kind)?;
                if self.opts.check_finite && mout.iter().any(|v| !v.is_finite()) {
                    let (location, cause) = match self.backend.locate_non_finite(rows, kind) {
                        Some(at) => (at.location, at.tensor.map(|t| format!(": {t}")).unwrap_or_default()),
                        None => ("the model output (not reproduced when the step was run again)".into(), String::new()),
                    };
                    return Err(Error::NonFinite { step: index, steps, timestep, location, cause });
                }
            }
            self.guide(n);
            if stochastic && k != 0 {
                let noise = self.buf(self.bufs.noise);
                match req.step_noise {
                    Some(s) => noise[..n * img].copy_from_slice(&s[index * n * img..(index + 1) * n * img]),
                    None => {
                        for r in 0..n {
                            let dst = &mut noise[r * img..(r + 1) * img];
                            noise::fill_normal(req.seed, req.first_index + r as u64, index as u32 + 1, dst);
                        }
                    }
                }
            }
            self.step(k, n);
            if self.opts.check_finite && self.buf(self.bufs.x)[..n * img].iter().any(|v| !v.is_finite()) {
                return Err(Error::NonFinite {
                    step: index,
                    steps,
                    timestep,
                    location: "the sampler update of the latents".into(),
                    cause: format!(
                        " (the model output was finite; is guidance scale {} too large?)",
                        self.opts.cfg_scale
                    ),
                });
            }
            progress(Step { index, total: steps, timestep });
        }
        out.copy_from_slice(&self.buf(self.bufs.x)[..n * img]);
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("sample", format!("element {i} of the result is not finite")));
        }
        Ok(())
    }

    /// The kind of model call at sampling step `index` under the engine's policy.
    pub fn step_kind(&self, index: usize) -> StepKind {
        self.opts.step_kind(index)
    }

    /// ε for the conditional rows: guided where configured, the conditional output
    /// elsewhere (reference doc A.10).
    fn guide(&mut self, n: usize) {
        let cfg = self.backend.model().config;
        let (hw, cin, cout) = (cfg.input_size * cfg.input_size, cfg.in_channels, cfg.out_channels());
        let (s, guided) = (self.opts.cfg_scale, self.opts.cfg_scale > 1.0);
        let guided_ch = match self.opts.guided_channels {
            GuidedChannels::OfficialThree => cout.min(3),
            GuidedChannels::All => cin,
        };
        let (eps, out) = self.bufs2(self.bufs.eps, self.bufs.model_out);
        for r in 0..n {
            for ch in 0..cin {
                let cond = &out[(r * cout + ch) * hw..][..hw];
                let dst = &mut eps[(r * cin + ch) * hw..][..hw];
                if guided && ch < guided_ch {
                    let unc = &out[((n + r) * cout + ch) * hw..][..hw];
                    for ((d, &c), &u) in dst.iter_mut().zip(cond).zip(unc) {
                        *d = u + s * (c - u);
                    }
                } else {
                    dst.copy_from_slice(cond);
                }
            }
        }
    }

    /// One sampler step on every conditional image.
    fn step(&mut self, k: usize, n: usize) {
        let cfg = self.backend.model().config;
        let (hw, cin, cout) = (cfg.input_size * cfg.input_size, cfg.in_channels, cfg.out_channels());
        let img = cin * hw;
        let c = self.schedule.coeffs(k);
        let sampler = self.opts.sampler;
        let b = &self.bufs;
        let (px, pe, pn, po) =
            (self.plan.get(b.x), self.plan.get(b.eps), self.plan.get(b.noise), self.plan.get(b.model_out));
        // SAFETY: four distinct buffers of the sampler arena; x is the only one written.
        let (x, eps, noise, out) = unsafe {
            (
                std::slice::from_raw_parts_mut(self.arena.f32_ptr(px), px.elems()),
                std::slice::from_raw_parts(self.arena.f32_ptr(pe), pe.elems()),
                std::slice::from_raw_parts(self.arena.f32_ptr(pn), pn.elems()),
                std::slice::from_raw_parts(self.arena.f32_ptr(po), po.elems()),
            )
        };
        for r in 0..n {
            let (xr, er, nr) = (&mut x[r * img..][..img], &eps[r * img..][..img], &noise[r * img..][..img]);
            match sampler {
                Sampler::Ddpm => {
                    // Variance channels Cin..2·Cin of the conditional row.
                    let var = if cfg.learn_sigma {
                        Variance::Learned(&out[(r * cout + cin) * hw..][..img])
                    } else {
                        Variance::FixedLarge
                    };
                    diffusion::ddpm_step(&c, xr, er, var, nr);
                }
                Sampler::Ddim { eta } => diffusion::ddim_step(&c, eta, xr, er, nr),
            }
        }
    }
}

/// Checks a request against a model, an engine's batch limit and its step count.
pub(crate) fn validate_request(
    cfg: &DitConfig,
    steps: usize,
    max_batch: usize,
    req: &Request,
    out_len: usize,
) -> Result<()> {
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
