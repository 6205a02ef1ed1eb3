//! The CPU reference sampler: the [`SamplingBackend`] the sampling loop drives on the host.
//! Each step runs one forward pass of [`CpuEngine`], scans its output for NaN or Inf (naming
//! the block when it finds one), mixes classifier-free guidance, draws the step's noise and
//! applies the DDPM or DDIM update, all in f32 on the sampler's own arena.

use std::sync::Arc;

use super::{CpuEngine, CpuOptions, Isa};
use crate::diffusion::{self, Sampler, Schedule, Variance};
use crate::engine::{EngineOptions, GuidedChannels, Request, SamplingBackend, SamplingEngine};
use crate::error::{Error, Result};
use crate::forward::StepKind;
use crate::limits::MemoryNeed;
use crate::noise;
use crate::plan::{Arena, BufId, Dt, Plan};
use crate::policy::{self, IccForm};
use crate::weights::DitModel;

/// The sampler state's buffers in the sampler arena.
struct SamplerBuffers {
    /// x_t of the conditional images, (B, Cin, I, I).
    latents: BufId,
    /// What the model sees: [x; x] under guidance, (rows, Cin, I, I).
    model_input: BufId,
    /// The model's ε (and variance channels), (rows, Cout, I, I).
    model_output: BufId,
    /// ε after guidance, (B, Cin, I, I).
    guided_eps: BufId,
    /// This step's noise, (B, Cin, I, I).
    step_noise: BufId,
}

/// The CPU backend of a sampling engine: the forward pass ([`CpuEngine`]) plus the host-side
/// sampler state, planned and allocated at build.
pub struct CpuBackend {
    forward: CpuEngine,
    schedule: Schedule,
    opts: EngineOptions,
    plan: Plan,
    arena: Arena,
    buffers: SamplerBuffers,
    /// The model call's labels, one per row.
    y: Vec<i64>,
    /// Images of the request being sampled.
    images: usize,
    /// Timesteps of the steps conditioned ahead, and which steps the forward pass holds the
    /// conditioning of: (first step index, count) of this request.
    ahead_t: Vec<i64>,
    ahead: Option<(usize, usize)>,
}

impl CpuBackend {
    /// [`Engine::memory_need`](Engine::memory_need).
    fn memory_need(model: &DitModel, opts: &EngineOptions) -> Result<MemoryNeed> {
        let schedule = opts.validate(&model.config)?;
        let cpu = CpuOptions::for_sampling(opts);
        super::check_plan_size(&model.config, super::planned_rows(&cpu))?;
        let mut need = MemoryNeed::default();
        need.held("weights, memory-mapped file(s)", model.file_bytes() as u64);
        need.held("weights converted to f32 at load", model.store.owned_bytes() as u64);
        let p = super::plan_for(model, &cpu);
        need.alloc(p.title.clone(), p.total_bytes() as u64);
        let (img, out) = (model.config.image_elems(), model.config.output_elems());
        let n = opts.max_batch;
        let rows = super::planned_rows(&cpu);
        let sampler = [(n, img), (rows, img), (rows, out), (n, img), (n, img)]
            .iter()
            .fold(0u64, |acc, &(a, b)| acc.saturating_add(crate::limits::bytes_of(&[a, b], 4)));
        need.alloc(format!("sampler state ({n} images, {} steps)", schedule.len()), sampler);
        Ok(need)
    }

    /// [`Engine::new`](Engine::new).
    fn new(model: Arc<DitModel>, opts: &EngineOptions) -> Result<Self> {
        let cfg = model.config;
        Self::memory_need(&model, opts)?.check("the sampling engine", opts.max_memory)?;
        let schedule = opts.validate(&cfg)?;
        if matches!(opts.icc_form, IccForm::Folded | IccForm::Projected) {
            return Err(Error::invalid(
                "icc form",
                format!(
                    "{}: the CPU backend computes icc's direct form only (what the official code computes); use direct or auto",
                    opts.icc_form
                ),
            ));
        }
        let rows = opts.model_rows(opts.max_batch);
        let forward = CpuEngine::new(model, &CpuOptions::for_sampling(opts))?;
        let (img, out) = (cfg.image_elems(), cfg.output_elems());
        let mut plan = Plan::new(format!(
            "sampler state ({} images, {} steps, {})",
            opts.max_batch,
            schedule.len(),
            if opts.guided() { "guided" } else { "unguided" }
        ));
        let n = opts.max_batch;
        let buffers = SamplerBuffers {
            latents: plan.add("latents", &[n, img], Dt::F32),
            model_input: plan.add("model_input", &[rows, img], Dt::F32),
            model_output: plan.add("model_output", &[rows, out], Dt::F32),
            guided_eps: plan.add("guided_eps", &[n, img], Dt::F32),
            step_noise: plan.add("step_noise", &[n, img], Dt::F32),
        };
        let arena = Arena::new(&plan)?;
        Ok(CpuBackend {
            forward,
            schedule,
            opts: opts.clone(),
            plan,
            arena,
            buffers,
            y: vec![0; rows],
            images: 0,
            ahead_t: vec![0; super::AHEAD_ROWS],
            ahead: None,
        })
    }

    /// One sampler buffer.
    fn buffer(&mut self, id: BufId) -> &mut [f32] {
        let b = self.plan.get(id);
        // SAFETY: the arena was sized by this plan; `&mut self` excludes other borrows.
        unsafe { std::slice::from_raw_parts_mut(self.arena.f32_ptr(b), b.elems()) }
    }

    /// Two distinct sampler buffers at once.
    fn buffer_pair(&mut self, a: BufId, b: BufId) -> (&mut [f32], &[f32]) {
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

    /// ε for the conditional rows: guided where configured, the conditional output
    /// elsewhere (reference doc A.10).
    fn guide(&mut self, n: usize) {
        let cfg = self.forward.model().config;
        let (hw, cin, cout) = (cfg.input_size * cfg.input_size, cfg.in_channels, cfg.out_channels());
        let (s, guided) = (self.opts.cfg_scale, self.opts.guided());
        let guided_ch = match self.opts.guided_channels {
            GuidedChannels::OfficialThree => cout.min(3),
            GuidedChannels::All => cin,
        };
        let (eps, out) = self.buffer_pair(self.buffers.guided_eps, self.buffers.model_output);
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

    /// The sampler update of schedule index `k` on every conditional image.
    fn update_latents(&mut self, k: usize, n: usize) {
        let cfg = self.forward.model().config;
        let (hw, cin, cout) = (cfg.input_size * cfg.input_size, cfg.in_channels, cfg.out_channels());
        let img = cin * hw;
        let c = self.schedule.coeffs(k);
        let sampler = self.opts.sampler;
        let b = &self.buffers;
        let (px, pe, pn, po) = (
            self.plan.get(b.latents),
            self.plan.get(b.guided_eps),
            self.plan.get(b.step_noise),
            self.plan.get(b.model_output),
        );
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

impl SamplingBackend for CpuBackend {
    fn model(&self) -> &Arc<DitModel> {
        self.forward.model()
    }

    fn options(&self) -> &EngineOptions {
        &self.opts
    }

    fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    fn cached_rows(&self) -> Option<usize> {
        self.forward.cached_rows()
    }

    fn stage(&mut self, req: &Request) -> Result<()> {
        let cfg = self.forward.model().config;
        let (n, img) = (req.classes.len(), cfg.image_elems());
        // Initial latents: given, or drawn from stream step 0 of each image.
        match req.noise {
            Some(z) => self.buffer(self.buffers.latents)[..n * img].copy_from_slice(z),
            None => {
                let x = self.buffer(self.buffers.latents);
                for r in 0..n {
                    noise::fill_normal(req.seed, req.first_index + r as u64, 0, &mut x[r * img..(r + 1) * img]);
                }
            }
        }
        // Labels: [classes; null…] under guidance (reference doc A.10).
        let guided = self.opts.guided();
        for r in 0..n {
            self.y[r] = req.classes[r];
            if guided {
                self.y[n + r] = cfg.null_class() as i64;
            }
        }
        self.images = n;
        self.ahead = None;
        Ok(())
    }

    /// The model call on [x; x], a finiteness scan of its output (run again op by op to name
    /// the block on a hit), guidance, the step's noise and the sampler update.
    fn step(&mut self, req: &Request, index: usize, k: usize, kind: StepKind) -> Result<()> {
        let cfg = self.forward.model().config;
        let (n, img) = (self.images, cfg.image_elems());
        let rows = self.opts.model_rows(n);
        let steps = self.schedule.len();
        let timestep = self.schedule.timestep_map[k];
        // The model sees [x; x]: forward_with_cfg duplicates the conditional half.
        let guided = self.opts.guided();
        {
            let (min, x) = self.buffer_pair(self.buffers.model_input, self.buffers.latents);
            min[..n * img].copy_from_slice(&x[..n * img]);
            if guided {
                min.copy_within(0..n * img, n * img);
            }
        }
        {
            let b = &self.buffers;
            let (pin, pout) = (self.plan.get(b.model_input), self.plan.get(b.model_output));
            // SAFETY: two distinct sampler buffers; the forward pass has its own arena.
            let (min, mout) = unsafe {
                (
                    std::slice::from_raw_parts(self.arena.f32_ptr(pin), rows * img),
                    std::slice::from_raw_parts_mut(self.arena.f32_ptr(pout), rows * cfg.output_elems()),
                )
            };
            if let Some(f) = self.opts.cache.forecast() {
                self.forward.set_forecast_step(policy::forecast_step(&self.opts.full_steps, f, index));
            }
            // The conditioning of the next few steps at once (CpuEngine::condition_ahead).
            let first = match self.ahead {
                Some((first, count)) if (first..first + count).contains(&index) => first,
                _ => {
                    let count = self.forward.ahead_steps(rows).min(steps - index).min(self.ahead_t.len());
                    for (j, t) in self.ahead_t[..count].iter_mut().enumerate() {
                        *t = self.schedule.timestep_map[k - j] as i64;
                    }
                    self.forward.condition_ahead(&self.ahead_t[..count], &self.y[..rows])?;
                    self.ahead = Some((index, count));
                    index
                }
            };
            self.forward.forward_step_ahead(min, index - first, mout, kind)?;
            if self.opts.check_finite && mout.iter().any(|v| !v.is_finite()) {
                self.ahead = None;
                let (location, cause) = match self.forward.locate_non_finite(rows, kind) {
                    Some(at) => (at.location, at.tensor.map(|t| format!(": {t}")).unwrap_or_default()),
                    None => ("the model output (not reproduced when the step was run again)".into(), String::new()),
                };
                return Err(Error::NonFinite { step: index, steps, timestep, location, cause });
            }
        }
        self.guide(n);
        let stochastic = match self.opts.sampler {
            Sampler::Ddpm => true,
            Sampler::Ddim { eta } => eta > 0.0,
        };
        if stochastic && k != 0 {
            let noise = self.buffer(self.buffers.step_noise);
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
        self.update_latents(k, n);
        if self.opts.check_finite && self.buffer(self.buffers.latents)[..n * img].iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                step: index,
                steps,
                timestep,
                location: "the sampler update of the latents".into(),
                cause: format!(" (the model output was finite; is guidance scale {} too large?)", self.opts.cfg_scale),
            });
        }
        Ok(())
    }

    fn wait(&mut self) -> Result<()> {
        Ok(())
    }

    fn finish(&mut self, out: &mut [f32]) -> Result<()> {
        let len = out.len();
        out.copy_from_slice(&self.buffer(self.buffers.latents)[..len]);
        Ok(())
    }

    fn previews(&self) -> bool {
        true
    }

    /// x̂₀ from the step's input (x_t is still the first rows of `model_input`) and its
    /// guided ε; nothing is kept or computed for it when no preview is asked for.
    fn denoised(&mut self, k: usize, out: &mut [f32]) -> Result<()> {
        let len = out.len();
        let c = self.schedule.coeffs(k);
        let (x, eps) = self.buffer_pair(self.buffers.model_input, self.buffers.guided_eps);
        diffusion::predict_x0(&c, &x[..len], &eps[..len], out);
        Ok(())
    }
}

/// The CPU sampling engine's own accessors and constructor.
/// The sampling engine on the CPU reference backend.
pub type Engine = SamplingEngine<CpuBackend>;

impl SamplingEngine<CpuBackend> {
    /// The memory an engine for `model` and `opts` would hold, item by item (the loaded
    /// weights, the CPU forward arena, the sampler arena), computed without allocating.
    pub fn memory_need(model: &DitModel, opts: &EngineOptions) -> Result<MemoryNeed> {
        CpuBackend::memory_need(model, opts)
    }

    /// Validates the options, builds the schedule, checks the planned memory against
    /// `max_memory` and the memory available, and allocates every buffer.
    pub fn new(model: Arc<DitModel>, opts: &EngineOptions) -> Result<Self> {
        Ok(SamplingEngine::from_backend(CpuBackend::new(model, opts)?))
    }

    /// The model backend's plan and the sampler's.
    pub fn plans(&self) -> [&Plan; 2] {
        let b = self.backend();
        [b.forward.plan(), &b.plan]
    }

    /// Bytes of all planned memory (both arenas).
    pub fn arena_bytes(&self) -> usize {
        let b = self.backend();
        b.forward.plan().total_bytes() + b.plan.total_bytes()
    }

    pub fn threads(&self) -> usize {
        self.backend().forward.threads()
    }

    /// The CPU instruction-set path the model runs on.
    pub fn isa(&self) -> Isa {
        self.backend().forward.isa()
    }
}
