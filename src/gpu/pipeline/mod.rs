//! The GPU pipeline: the whole DiT sampler on a [`Device`] — the CUDA GPU or its CPU
//! emulation — from one arena planned before anything is allocated. [`GpuBackend`] is the
//! [`SamplingBackend`] the sampling loop drives; [`GpuEngine`] is that loop on it. The arena's
//! plan is in `plan.rs`, the uploads made at build in `upload.rs`, the forward pass's
//! operations as kernel launches in `ops.rs`.
//!
//! The arena holds the model's weights in f16 (converted once at build from the mapped
//! checkpoint through a fixed staging buffer), the rank-r factors in f16, every block's cache
//! slots in f16, the activations, the per-request conditioning and the sampler state. The
//! forward pass is the same [`forward::forward`] the CPU backend runs, its operations carried
//! out by kernels (kernels/*.cu).
//!
//! **Conditioning is computed once per request.** c depends only on (timestep, label), so the
//! timestep embedding, the label embedding and every block's adaLN modulation for all steps of
//! a request come from one batched pass at its start: one GEMM of (steps · rows) × C against
//! all blocks' adaLN weights stacked (a third of DiT-XL/2's bytes, read once per request
//! instead of once per step). Each step then copies its slice into the current modulation.
//!
//! **Per-step state lives in device memory** (the step index, the seed, the first image
//! index): the step-selection and sampler kernels read it there and a one-thread kernel
//! advances it, so a step's launches do not change from step to step and nothing waits for
//! the host until the request's result is copied back.
//!
//! Precision: weights, activations and caches in f16, every GEMM and reduction accumulating
//! in f32; the residual stream x in f32 (each block adds two small gated updates to it, which
//! f16 would round away: keeping it in f32 halves the error of a forward pass for 1/16 more
//! bytes); the latents, the model output and the sampler arithmetic in f32; the timestep
//! embedding's output and c in f32 until SiLU(c) is rounded for the modulation GEMM.

mod ops;
mod plan;
mod upload;

pub use plan::plan_for;
pub(crate) use upload::F16Staging;

use std::cell::Cell;
use std::sync::Arc;

use super::launch::{self, GemmSpec, SamplerMode, SamplerParams};
use super::{DevSlice, DevType, Device};
use crate::diffusion::{Sampler, Schedule};
use crate::engine::{EngineOptions, GuidedChannels, Request, SamplingBackend, SamplingEngine};
use crate::error::{Error, Result};
use crate::forward::{self, StepKind};
use crate::plan::{BufId, Plan};
use crate::policy::{self, IccForm};
use crate::weights::DitModel;
use ops::{Pass, RequestConditioning};
use plan::{mod_width, DeviceBuffers, IccLayout, BAD_LATENTS, BAD_OUTPUT, STATE};

/// The GPU pipeline as a backend of the sampling loop: the device, its arena and the recorded
/// step graphs, with the model, schedule and options they were built for.
pub struct GpuBackend<D: Device> {
    model: Arc<DitModel>,
    /// One recorded step per step kind the options use, for requests of `max_batch` images
    /// (declared before `dev`: dropped while the device still exists).
    graphs: Vec<(StepKind, D::Graph)>,
    dev: D,
    plan: Plan,
    buffers: DeviceBuffers,
    schedule: Schedule,
    opts: EngineOptions,
    max_rows: usize,
    /// Rows of the last full step, whose activations the caches hold.
    cached_rows: Option<usize>,
    /// Host staging of small per-request uploads (planned at build).
    t_host: Vec<f32>,
    labels_host: Vec<i32>,
    /// Images of the request being sampled.
    images: usize,
    /// How calibrated linears are computed.
    icc: IccLayout,
    /// Kernel launches of each recorded step kind.
    launches: Vec<(StepKind, StepLaunches)>,
    /// GEMMs sent to gemm.cu's kernels though the device runs the Hopper kernel, and the first
    /// one's reason ([`GpuEngine::gemm_fallbacks`]).
    gemm_fallbacks: Cell<(u64, Option<&'static str>)>,
}

/// Device time of one kind of op over a profiled forward pass ([`GpuEngine::profile_step`]).
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    /// "attention", "calibrated linear", "residual + LayerNorm-modulate", …
    pub op: &'static str,
    /// Milliseconds, all of the pass's ops of this kind together.
    pub ms: f32,
    /// How many ops of this kind the pass ran.
    pub count: usize,
}

/// Kernel launches of one sampling step of a kind: the whole step (the step's modulation
/// copy, the forward pass, the sampler update, the finiteness checks and the step advance) and
/// one transformer block of it (block 1, or 0 in a one-block model: block 0 also holds the
/// first LayerNorm, which every later block gets fused into the previous block's last
/// residual update).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepLaunches {
    pub step: u64,
    pub block: u64,
}

impl<D: Device> GpuBackend<D> {
    /// [`GpuEngine::new`].
    fn new(model: Arc<DitModel>, opts: &EngineOptions, open: impl FnOnce(&Plan) -> Result<D>) -> Result<Self> {
        let cfg = model.config;
        let schedule = opts.validate(&cfg)?;
        if !launch::ATTENTION_HEAD_DIMS.contains(&(cfg.head_dim() as i32)) {
            return Err(Error::invalid(
                "GPU pipeline",
                format!(
                    "head dim {} ({} channels / {} heads): the attention kernels are built for head dims {:?}",
                    cfg.head_dim(),
                    cfg.hidden_size,
                    cfg.num_heads,
                    launch::ATTENTION_HEAD_DIMS
                ),
            ));
        }
        opts.cache.check_depth(cfg.depth)?;
        let factors = opts.cache.factors().cloned();
        let max_rows = opts.model_rows(opts.max_batch);
        let icc = IccLayout::resolve(&cfg, opts, factors.as_deref())?;
        let (mut plan, buffers) = plan::plan(&cfg, max_rows, schedule.len(), factors.as_deref(), &opts.cache, icc);
        plan.outside("weights, memory-mapped file(s) on the host", model.file_bytes());
        // Kernels index within one buffer with 32-bit ints (the arena itself may be larger).
        if let Some(big) = plan.buffers().iter().find(|b| i32::try_from(b.elems()).is_err()) {
            return Err(Error::invalid(
                "GPU pipeline",
                format!(
                    "buffer `{}` would hold {} elements, past what 32-bit kernel indices address; lower the batch",
                    big.name,
                    big.elems()
                ),
            ));
        }
        let dev = open(&plan)?;
        // The Hopper GEMM's first-use check, in the split-K workspace before anything uses it.
        launch::check_sm90(&dev, dev.slice::<f32>(plan.get(buffers.split_ws))?)?;
        let steps = schedule.len();
        let mut backend = GpuBackend {
            model,
            graphs: Vec::new(),
            dev,
            plan,
            buffers,
            schedule,
            opts: opts.clone(),
            max_rows,
            cached_rows: None,
            t_host: vec![0.0; steps * max_rows],
            labels_host: vec![0; max_rows],
            images: 0,
            icc,
            launches: Vec::new(),
            gemm_fallbacks: Cell::new((0, None)),
        };
        backend.upload_weights()?;
        if let Some(f) = &factors {
            backend.upload_factors(f)?;
        }
        backend.upload_constants()?;
        backend.dev.synchronize()?;
        backend.capture_steps()?;
        Ok(backend)
    }

    /// Records one step of each kind the policy uses, for full-size requests: the step's
    /// modulation copy, the forward pass, the sampler update and the step advance, all
    /// reading the step index from device memory, so every step of a kind replays one graph.
    fn capture_steps(&mut self) -> Result<()> {
        let mut kinds: Vec<StepKind> = Vec::new();
        for i in 0..self.schedule.len() {
            let k = self.opts.step_kind(i);
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
        let (n, rows) = (self.opts.max_batch, self.max_rows);
        let params = self.sampler_params(n);
        let counted = (self.model.config.depth > 1) as usize;
        for kind in kinds {
            self.dev.begin_capture()?;
            let before = self.dev.launches();
            let recorded = self.step_launches(kind, rows, n, &params, Some(counted));
            let step = self.dev.launches() - before;
            let graph = self.dev.end_capture();
            let block = recorded?;
            self.graphs.push((kind, graph?));
            self.launches.push((kind, StepLaunches { step, block }));
        }
        self.cached_rows = None;
        Ok(())
    }

    /// Stages a synthetic full-size request for timing steps of `kind` (labels 0, 1, …, noise
    /// from seed 0, its conditioning, and a full step first for the cached kinds); the index of
    /// the kind's graph and how many steps of it the schedule leaves room for.
    fn prepare_timing(&mut self, kind: StepKind) -> Result<(usize, usize)> {
        let cfg = self.model.config;
        let (n, rows, steps) = (self.opts.max_batch, self.max_rows, self.schedule.len());
        let find = |k: StepKind| self.graphs.iter().position(|g| g.0 == k);
        let g = find(kind).ok_or_else(|| {
            Error::invalid("time step", format!("{kind:?} steps are not part of this engine's cache policy"))
        })?;
        let full = find(self.opts.cache.full_kind());
        let needs_full = matches!(kind, StepKind::Calibrated | StepKind::Reuse | StepKind::Forecast);
        let room = if needs_full { steps - 1 } else { steps }.max(1);
        self.upload_request(n, rows, |r| (r % cfg.num_classes) as i32, 0, 0)?;
        let b = &self.buffers;
        launch::normal_f32(
            &self.dev,
            self.slice(b.latents)?,
            self.slice(b.state)?,
            n as i32,
            cfg.image_elems() as i32,
            0,
        )?;
        self.conditioning(steps * rows, rows)?;
        if needs_full {
            let f = full.ok_or_else(|| Error::invalid("time step", "no full step recorded"))?;
            self.dev.launch_graph(&self.graphs[f].1)?;
        }
        Ok((g, room))
    }

    /// [`GpuEngine::time_step`].
    fn time_step(&mut self, kind: StepKind, iters: usize) -> Result<f32> {
        let (g, room) = self.prepare_timing(kind)?;
        let iters = iters.clamp(1, room);
        let start = self.dev.record_event()?;
        for _ in 0..iters {
            self.dev.launch_graph(&self.graphs[g].1)?;
        }
        let end = self.dev.record_event()?;
        let ms = self.dev.elapsed_ms(&start, &end)?;
        self.dev.synchronize()?;
        self.cached_rows = None;
        Ok(ms / iters as f32)
    }

    /// [`GpuEngine::profile_step`].
    fn profile_step(&mut self, kind: StepKind) -> Result<Vec<OpTime>> {
        self.prepare_timing(kind)?;
        let (n, rows) = (self.opts.max_batch, self.max_rows);
        let cfg = self.model.config;
        let eps = self.model.mlp_norm_eps;
        let start = self.dev.record_event()?;
        self.select_step(rows, self.schedule.len())?;
        let ops = {
            let mut pass = Pass::profiled(&*self, n);
            forward::forward(&mut pass, &cfg, eps, rows, kind);
            pass.finish_profile()?
        };
        let end = self.dev.record_event()?;
        self.dev.synchronize()?;
        self.cached_rows = None;
        let mut times: Vec<OpTime> = Vec::new();
        for (what, a, b) in &ops {
            let ms = self.dev.elapsed_ms(a, b)?;
            match times.iter_mut().find(|t| t.op == *what) {
                Some(t) => {
                    t.ms += ms;
                    t.count += 1;
                }
                None => times.push(OpTime { op: what, ms, count: 1 }),
            }
        }
        let total = self.dev.elapsed_ms(&start, &end)?;
        let ops_ms: f32 = times.iter().map(|t| t.ms).sum();
        times.push(OpTime { op: "between ops (step selection, gaps)", ms: (total - ops_ms).max(0.0), count: 1 });
        Ok(times)
    }

    fn sampler_params(&self, n: usize) -> SamplerParams {
        let cfg = &self.model.config;
        let guided = self.opts.guided();
        SamplerParams {
            images: n as i32,
            cin: cfg.in_channels as i32,
            cout: cfg.out_channels() as i32,
            hw: (cfg.input_size * cfg.input_size) as i32,
            guided_channels: match (guided, self.opts.guided_channels) {
                (false, _) => 0,
                (true, GuidedChannels::OfficialThree) => cfg.out_channels().min(3) as i32,
                (true, GuidedChannels::All) => cfg.in_channels as i32,
            },
            cfg_scale: self.opts.cfg_scale,
            mode: match self.opts.sampler {
                Sampler::Ddim { .. } => SamplerMode::Ddim,
                Sampler::Ddpm if cfg.learn_sigma => SamplerMode::DdpmLearned,
                Sampler::Ddpm => SamplerMode::DdpmFixed,
            },
            steps: self.schedule.len() as i32,
        }
    }

    /// The launches of one sampling step of `kind` for `n` images (`rows` model rows); the
    /// number of them that belong to block `count` (0 when `None`).
    fn step_launches(
        &mut self,
        kind: StepKind,
        rows: usize,
        n: usize,
        params: &SamplerParams,
        count: Option<usize>,
    ) -> Result<u64> {
        self.select_step(rows, self.schedule.len())?;
        let block = self.run_forward(rows, n, kind, count)?;
        let b = &self.buffers;
        let cfg = &self.model.config;
        if self.opts.check_finite {
            let len = (rows * cfg.output_elems()) as i32;
            launch::check_finite_f32(
                &self.dev,
                self.slice(b.model_out)?,
                len,
                self.slice(b.state)?,
                BAD_OUTPUT as i32,
            )?;
        }
        // Every step also keeps its x̂₀ (one more write of the images) for previews.
        launch::sampler_step_keep_x0(
            &self.dev,
            self.slice(b.latents)?,
            self.slice(b.model_out)?,
            self.slice(b.coeffs)?,
            self.slice(b.state)?,
            params,
            Some(self.slice(b.x0)?),
        )?;
        if self.opts.check_finite {
            let len = (n * cfg.image_elems()) as i32;
            launch::check_finite_f32(&self.dev, self.slice(b.latents)?, len, self.slice(b.state)?, BAD_LATENTS as i32)?;
        }
        launch::step_advance(&self.dev, self.slice(b.state)?)?;
        Ok(block)
    }

    /// The plan's buffer `id` as device elements of `T`.
    fn slice<T: DevType>(&self, id: BufId) -> Result<DevSlice<T>> {
        self.dev.slice::<T>(self.plan.get(id))
    }

    /// One fused GEMM, split along k into the planned workspace when that fills the GPU better.
    fn gemm(&self, g: &GemmSpec) -> Result<()> {
        if self.dev.gemm_sm90() {
            if let Some(why) = launch::sm90_unsupported(g) {
                let (n, first) = self.gemm_fallbacks.get();
                self.gemm_fallbacks.set((n + 1, first.or(Some(why))));
            }
        }
        launch::gemm_ws(&self.dev, g, Some(self.slice(self.buffers.split_ws)?))
    }

    /// Uploads a request's labels ([classes; null…] when `rows` > `n`), the timestep of every
    /// (step, row) and the request state.
    fn upload_request(
        &mut self,
        n: usize,
        rows: usize,
        class: impl Fn(usize) -> i32,
        seed: u64,
        first: u64,
    ) -> Result<()> {
        let (null, steps) = (self.model.config.null_class() as i32, self.schedule.len());
        for r in 0..n {
            self.labels_host[r] = class(r);
            if rows > n {
                self.labels_host[n + r] = null;
            }
        }
        for (s, k) in (0..steps).rev().enumerate() {
            let t = self.schedule.timestep_map[k] as f32;
            self.t_host[s * rows..][..rows].fill(t);
        }
        let b = &self.buffers;
        self.dev.upload(self.slice::<i32>(b.labels)?.sub(0, rows)?, &self.labels_host[..rows])?;
        self.dev.upload(self.slice::<f32>(b.t_all)?.sub(0, steps * rows)?, &self.t_host[..steps * rows])?;
        self.put_state(seed, first)
    }

    /// Writes the request state (step 0, seed, first image index) to the device.
    fn put_state(&self, seed: u64, first: u64) -> Result<()> {
        let mut st = [0i32; STATE];
        st[1] = seed as u32 as i32;
        st[2] = (seed >> 32) as u32 as i32;
        st[3] = first as u32 as i32;
        st[4] = (first >> 32) as u32 as i32;
        st[BAD_OUTPUT] = -1;
        st[BAD_LATENTS] = -1;
        self.dev.upload(self.slice::<i32>(self.buffers.state)?, &st)
    }

    /// The conditioning pass: `count` = steps × rows (timestep, label) pairs, row i using
    /// label i mod rows, into every block's modulation for every step.
    fn conditioning(&self, count: usize, rows: usize) -> Result<()> {
        let mut ops = RequestConditioning::new(self, rows);
        forward::conditioning(&mut ops, count);
        ops.finish().map_or(Ok(()), Err)
    }

    /// Copies the current step's modulation (step index in device memory) for `rows` rows.
    fn select_step(&self, rows: usize, steps: usize) -> Result<()> {
        let per = (rows * mod_width(&self.model.config)) as i32;
        let b = &self.buffers;
        launch::select_step_f16(
            &self.dev,
            self.slice(b.mod_cur)?,
            self.slice(b.mod_all)?,
            self.slice(b.state)?,
            per,
            steps as i32,
        )
    }

    /// One forward pass of `kind` over `rows` rows whose images are rows mod `images` of the
    /// latents, into the model output buffer; the launches of block `count` (0 when `None`).
    fn run_forward(&mut self, rows: usize, images: usize, kind: StepKind, count: Option<usize>) -> Result<u64> {
        let cfg = self.model.config;
        let eps = self.model.mlp_norm_eps;
        let (err, block) = {
            let mut pass = Pass::new(&*self, images, count);
            forward::forward(&mut pass, &cfg, eps, rows, kind);
            pass.finish()
        };
        if let Some(e) = err {
            return Err(e);
        }
        if kind.refreshes_caches() {
            self.cached_rows = Some(rows);
        }
        Ok(block)
    }

    /// The step-order rules ([`policy::check_step`]) against this engine's caches.
    fn check_kind(&self, kind: StepKind, rows: usize) -> Result<()> {
        policy::check_step(kind, &self.opts.cache, self.cached_rows, rows)
    }

    /// [`GpuEngine::forward_step`].
    fn forward_step(&mut self, x: &[f32], t: &[i64], y: &[i64], out: &mut [f32], kind: StepKind) -> Result<()> {
        let cfg = self.model.config;
        let rows = t.len();
        if rows == 0 || rows > self.max_rows {
            return Err(Error::invalid(
                "batch",
                format!("{rows} rows; this engine was planned for 1..={}", self.max_rows),
            ));
        }
        if y.len() != rows || x.len() != rows * cfg.image_elems() || out.len() != rows * cfg.output_elems() {
            return Err(Error::invalid(
                "request shapes",
                format!(
                    "x {}, t {}, y {}, out {} elements; expected {rows} × {} for x, {rows} for t and y, {rows} × {} for out",
                    x.len(),
                    t.len(),
                    y.len(),
                    out.len(),
                    cfg.image_elems(),
                    cfg.output_elems()
                ),
            ));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("x", format!("element {i} is {}", x[i])));
        }
        for r in 0..rows {
            if !(0..1000).contains(&t[r]) {
                return Err(Error::invalid("timestep", format!("t[{r}] = {}; expected 0..=999", t[r])));
            }
            if !(0..cfg.label_rows() as i64).contains(&y[r]) {
                return Err(Error::invalid(
                    "class label",
                    format!(
                        "y[{r}] = {}; expected 0..{} (or {} for unconditional)",
                        y[r],
                        cfg.num_classes,
                        cfg.null_class()
                    ),
                ));
            }
            self.t_host[r] = t[r] as f32;
            self.labels_host[r] = y[r] as i32;
        }
        self.check_kind(kind, rows)?;
        if matches!(kind, StepKind::TaylorFull | StepKind::Forecast) {
            return Err(Error::invalid(
                "step kind",
                format!(
                    "{kind} steps take their numbers from the sampling step index: the GPU pipeline runs them only inside a sampling request"
                ),
            ));
        }
        let b = &self.buffers;
        self.dev.upload(self.slice::<f32>(b.latents)?.sub(0, x.len())?, x)?;
        self.dev.upload(self.slice::<f32>(b.t_all)?.sub(0, rows)?, &self.t_host[..rows])?;
        self.dev.upload(self.slice::<i32>(b.labels)?.sub(0, rows)?, &self.labels_host[..rows])?;
        self.put_state(0, 0)?;
        self.conditioning(rows, rows)?;
        self.select_step(rows, 1)?;
        self.run_forward(rows, rows, kind, None)?;
        let mo = self.slice::<f32>(self.buffers.model_out)?.sub(0, out.len())?;
        self.dev.download(mo, out)
    }
}

impl<D: Device> SamplingBackend for GpuBackend<D> {
    fn model(&self) -> &Arc<DitModel> {
        &self.model
    }

    fn options(&self) -> &EngineOptions {
        &self.opts
    }

    fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    fn cached_rows(&self) -> Option<usize> {
        self.cached_rows
    }

    /// Refuses given per-step noise (the device draws its own), uploads the labels, every
    /// step's timesteps and the request state, uploads or draws the initial latents and runs
    /// the request's conditioning pass.
    fn stage(&mut self, req: &Request) -> Result<()> {
        if req.step_noise.is_some() {
            return Err(Error::invalid(
                "step noise",
                "the GPU pipeline draws the per-step noise on the device; given per-step noise is supported by the CPU backend only",
            ));
        }
        let cfg = self.model.config;
        let (n, img, steps) = (req.classes.len(), cfg.image_elems(), self.schedule.len());
        let rows = self.opts.model_rows(n);
        self.upload_request(n, rows, |r| req.classes[r] as i32, req.seed, req.first_index)?;
        let b = &self.buffers;
        let latents = self.slice::<f32>(b.latents)?;
        match req.noise {
            Some(z) => self.dev.upload(latents.sub(0, n * img)?, z)?,
            None => launch::normal_f32(&self.dev, latents, self.slice(b.state)?, n as i32, img as i32, 0)?,
        }
        self.conditioning(steps * rows, rows)?;
        self.images = n;
        Ok(())
    }

    /// Replays the recorded step of `kind` for a full-size request, or issues the same
    /// launches for a smaller one. The step index, the seed and the first image index live in
    /// device memory (the step advances itself), so `req`, `index` and `k` are not read here.
    fn step(&mut self, _req: &Request, _index: usize, _k: usize, kind: StepKind) -> Result<()> {
        let n = self.images;
        let rows = self.opts.model_rows(n);
        let full_size = n == self.opts.max_batch;
        match self.graphs.iter().find(|g| g.0 == kind).filter(|_| full_size) {
            Some((_, graph)) => {
                self.dev.launch_graph(graph)?;
                if kind.refreshes_caches() {
                    self.cached_rows = Some(rows);
                }
            }
            None => {
                let params = self.sampler_params(n);
                self.step_launches(kind, rows, n, &params, None)?;
            }
        }
        Ok(())
    }

    fn wait(&mut self) -> Result<()> {
        self.dev.synchronize()
    }

    fn previews(&self) -> bool {
        true
    }

    /// Copies the x̂₀ the step's sampler update kept (the host waits for the step).
    fn denoised(&mut self, _k: usize, out: &mut [f32]) -> Result<()> {
        self.dev.download(self.slice::<f32>(self.buffers.x0)?.sub(0, out.len())?, out)
    }

    /// Copies the latents back (the host's only wait), then reads the step flags the device
    /// set on NaN or ±Inf in a model output or in the latents.
    fn finish(&mut self, out: &mut [f32]) -> Result<()> {
        self.dev.download(self.slice::<f32>(self.buffers.latents)?.sub(0, out.len())?, out)?;
        if self.opts.check_finite {
            let steps = self.schedule.len();
            let mut st = [0i32; STATE];
            self.dev.download(self.slice::<i32>(self.buffers.state)?, &mut st)?;
            let (bad_out, bad_lat) = (st[BAD_OUTPUT], st[BAD_LATENTS]);
            if bad_out >= 0 || bad_lat >= 0 {
                // The model output is checked before the sampler update of the same step.
                let (step, location) = if bad_out >= 0 && (bad_lat < 0 || bad_out <= bad_lat) {
                    (
                        bad_out as usize,
                        "the model output (the GPU pipeline checks whole steps; the CPU backend names the block)",
                    )
                } else {
                    (bad_lat as usize, "the latents after the sampler update")
                };
                return Err(Error::NonFinite {
                    step,
                    steps,
                    timestep: self.schedule.timestep_map[steps - 1 - step.min(steps - 1)],
                    location: location.into(),
                    cause: String::new(),
                });
            }
        }
        Ok(())
    }
}

/// A DiT sampler on a device: the GPU counterpart of [`crate::Engine`], with the same
/// options, requests and results, sampled by the same loop ([`SamplingEngine::sample`]) with
/// every step on the device.
pub type GpuEngine<D> = SamplingEngine<GpuBackend<D>>;

/// The GPU engine's own constructor and accessors.
impl<D: Device> SamplingEngine<GpuBackend<D>> {
    /// Validates the options, plans the arena, opens the device on it (`open` receives the
    /// plan, so a device can refuse before allocating), uploads weights and factors and
    /// records one step graph per step kind.
    pub fn new(model: Arc<DitModel>, opts: &EngineOptions, open: impl FnOnce(&Plan) -> Result<D>) -> Result<Self> {
        Ok(SamplingEngine::from_backend(GpuBackend::new(model, opts, open)?))
    }

    /// One model evaluation, as [`crate::CpuEngine::forward_step`]: `x` (B, Cin, I, I),
    /// `t` original timesteps, `y` labels (the null class allowed) → `out` (B, Cout, I, I).
    /// Synchronises with the device (it copies the result back).
    pub fn forward_step(&mut self, x: &[f32], t: &[i64], y: &[i64], out: &mut [f32], kind: StepKind) -> Result<()> {
        self.backend_mut().forward_step(x, t, y, out, kind)
    }

    /// Milliseconds per step of `kind` for a full-size request, between device events over
    /// `iters` replays of its recorded graph (at most the schedule's steps), after the
    /// request's conditioning pass and, for cached kinds, one full step. The request is
    /// synthetic (labels 0, 1, …, noise from seed 0); for benchmarks (`icdit bench-gpu`).
    pub fn time_step(&mut self, kind: StepKind, iters: usize) -> Result<f32> {
        self.backend_mut().time_step(kind, iters)
    }

    /// Device time of each kind of op in one forward pass of `kind` for a full-size request
    /// (events around every op, launched directly rather than from the recorded graph, so the
    /// sum is a little above [`GpuEngine::time_step`]'s), after the same preparation as
    /// [`GpuEngine::time_step`]; last, the time between the ops. For `icdit bench-gpu`.
    pub fn profile_step(&mut self, kind: StepKind) -> Result<Vec<OpTime>> {
        self.backend_mut().profile_step(kind)
    }

    /// Number of recorded step graphs (one per step kind the policy uses).
    pub fn graph_count(&self) -> usize {
        self.backend().graphs.len()
    }

    /// Kernel launches of a full-size step of `kind` and of one of its blocks, counted when
    /// the step was recorded (`None`: the policy runs no such step).
    pub fn step_launches(&self, kind: StepKind) -> Option<StepLaunches> {
        self.backend().launches.iter().find(|l| l.0 == kind).map(|l| l.1)
    }

    /// The form calibrated steps compute (`Auto` resolved: direct, folded or projected) and
    /// whether each calibrated linear is one fused low-rank launch.
    pub fn icc_form(&self) -> (IccForm, bool) {
        let icc = self.backend().icc;
        (icc.form, icc.fused)
    }

    /// GEMMs (launched, or recorded into a step's graph) that went to the fallback kernels
    /// (gemm.cu) although the device runs the Hopper kernel, and the first one's reason
    /// ([`launch::sm90_unsupported`]): none on DiT shapes with icc ranks that are multiples of 8.
    pub fn gemm_fallbacks(&self) -> (u64, Option<&'static str>) {
        self.backend().gemm_fallbacks.get()
    }

    pub fn device(&self) -> &D {
        &self.backend().dev
    }
    pub fn plan(&self) -> &Plan {
        &self.backend().plan
    }
    pub fn arena_bytes(&self) -> usize {
        self.backend().plan.total_bytes()
    }
}
