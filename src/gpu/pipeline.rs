//! The GPU pipeline: the whole DiT sampler on a [`Device`] — the CUDA GPU or its CPU
//! emulation — from one arena planned before anything is allocated.
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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::launch::{self, GemmAct, GemmOut, GemmSpec, SamplerMode, SamplerParams};
use super::{f16, DevSlice, DevType, Device};
use crate::config::{DitConfig, FREQ_DIM};
use crate::diffusion::{Sampler, Schedule};
use crate::embed;
use crate::engine::{validate_request, EngineOptions, GuidedChannels, Request, Step};
use crate::error::{Error, Result};
use crate::factors::{Factors, LayerType};
use crate::forward::{self, Act, Activation, ConditioningOps, DitOps, Linear, ModChunk, Norm, Slot, StepKind};
use crate::plan::{BufId, Dt, Plan};
use crate::policy;
use crate::weights::{DitModel, TRef};

/// Elements converted to f16 per upload while the weights are staged (2 MiB).
const STAGING: usize = 1 << 20;
/// f32 values per step in the sampler's coefficient table (see kernels/sampler.cu).
const COEFFS: usize = 12;
/// Ints of device-side request state: step index, seed (lo, hi), first image index (lo, hi),
/// then the first step whose model output ([`BAD_OUTPUT`]) or latents ([`BAD_LATENTS`]) held
/// NaN or ±Inf (−1: none).
const STATE: usize = 8;
const BAD_OUTPUT: usize = 5;
const BAD_LATENTS: usize = 6;

/// One block's weights.
struct BlockW {
    qkv_w: BufId,
    qkv_b: BufId,
    proj_w: BufId,
    proj_b: BufId,
    fc1_w: BufId,
    fc1_b: BufId,
    fc2_w: BufId,
    fc2_b: BufId,
}

/// One block's rank-r factors: `down` of (q|k|v stacked, proj, fc1, fc2), `up` per layer
/// type in [`LayerType::ALL`] order.
struct BlockF {
    down: [BufId; 4],
    up: [BufId; 6],
    ranks: [usize; 6],
    /// q, k and v's up factors as one block-diagonal (3C, r_q + r_k + r_v) matrix, planned when
    /// the engine's rows are few (see `MERGED_QKV_UP_ROWS`): one GEMM instead of three.
    qkv_up: Option<BufId>,
}

/// Up to this many model rows (tokens × images, guidance included) the calibrated q, k and v
/// share one up-projection GEMM against a block-diagonal factor: at 512 rows (DiT-XL/2 batch 1)
/// three launches of (512 × 1152, k = 128) took 3 × 10.8 µs on an H200, and the launches, not
/// the FLOPs, set the time; the merged GEMM does 3× the multiply-adds (the zero blocks), which
/// stops paying at a few thousand rows (2048 rows: 3 × 14.9 µs against ≈ 45 µs merged).
const MERGED_QKV_UP_ROWS: usize = 1024;

struct Bufs {
    patch_w: BufId,
    patch_b: BufId,
    pos: BufId,
    t0_w: BufId,
    t0_b: BufId,
    t2_w: BufId,
    t2_b: BufId,
    table: BufId,
    /// Every block's adaLN weights, then the final layer's: (depth·6C + 2C, C).
    ada_w: BufId,
    ada_b: BufId,
    final_w: BufId,
    final_b: BufId,
    freqs: BufId,
    blocks: Vec<BlockW>,
    factors: Vec<BlockF>,
    cache: Vec<[BufId; 8]>,
    patches: BufId,
    x: BufId,
    h: BufId,
    qkv: BufId,
    attn: BufId,
    y: BufId,
    mlp: BufId,
    out: BufId,
    model_out: BufId,
    lowrank: Option<BufId>,
    t_all: BufId,
    labels: BufId,
    tfreq: BufId,
    temb_h: BufId,
    temb: BufId,
    silu_c: BufId,
    mod_all: BufId,
    mod_cur: BufId,
    latents: BufId,
    coeffs: BufId,
    state: BufId,
    split_ws: BufId,
}

/// Width of one row of the modulation buffers: every block's 6C, then the final layer's 2C.
fn mod_width(cfg: &DitConfig) -> usize {
    forward::modulation_width(cfg)
}

fn plan(cfg: &DitConfig, max_rows: usize, steps: usize, factors: Option<&Factors>, caching: bool) -> (Plan, Bufs) {
    let (c, n, m, d) = (cfg.hidden_size, cfg.tokens(), cfg.mlp_hidden(), cfg.depth);
    let fin = cfg.patch_size * cfg.patch_size * cfg.out_channels();
    let mw = mod_width(cfg);
    let h = Dt::F16;
    let mut p = Plan::new(format!("GPU pipeline ({max_rows} rows, {steps} steps)"));
    let blocks = (0..d)
        .map(|i| BlockW {
            qkv_w: p.add(format!("blocks.{i}.qkv.w"), &[3 * c, c], h),
            qkv_b: p.add(format!("blocks.{i}.qkv.b"), &[3 * c], h),
            proj_w: p.add(format!("blocks.{i}.proj.w"), &[c, c], h),
            proj_b: p.add(format!("blocks.{i}.proj.b"), &[c], h),
            fc1_w: p.add(format!("blocks.{i}.fc1.w"), &[m, c], h),
            fc1_b: p.add(format!("blocks.{i}.fc1.b"), &[m], h),
            fc2_w: p.add(format!("blocks.{i}.fc2.w"), &[c, m], h),
            fc2_b: p.add(format!("blocks.{i}.fc2.b"), &[c], h),
        })
        .collect();
    let factor_bufs = factors.map_or_else(Vec::new, |f| {
        f.blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let ranks = LayerType::ALL.map(|t| b.get(t).rank);
                let down = [
                    p.add(format!("factors.{i}.qkv.down"), &[b.qkv_rank(), c], h),
                    p.add(format!("factors.{i}.proj.down"), &[ranks[3], c], h),
                    p.add(format!("factors.{i}.fc1.down"), &[ranks[4], c], h),
                    p.add(format!("factors.{i}.fc2.down"), &[ranks[5], m], h),
                ];
                let up = LayerType::ALL.map(|t| {
                    let (out, _) = t.shape(c, m);
                    p.add(format!("factors.{i}.{}.up", t.name()), &[out, b.get(t).rank], h)
                });
                let qkv_up = (max_rows * n <= MERGED_QKV_UP_ROWS)
                    .then(|| p.add(format!("factors.{i}.qkv.up (block-diagonal)"), &[3 * c, b.qkv_rank()], h));
                BlockF { down, up, ranks, qkv_up }
            })
            .collect()
    });
    let cache = if caching {
        (0..d)
            .map(|i| Slot::ALL.map(|s| p.add(format!("cache.{i}.{}", s.name()), &[max_rows, n, s.width(cfg)], h)))
            .collect()
    } else {
        Vec::new()
    };
    let lowrank = factors.map(|f| {
        let (qkv, one) = f.max_ranks();
        p.add("icc_lowrank", &[max_rows, n, qkv.max(one)], h)
    });
    let cond = steps * max_rows;
    let bufs = Bufs {
        patch_w: p.add("patch.w", &[c, cfg.patch_dim()], h),
        patch_b: p.add("patch.b", &[c], h),
        pos: p.add("pos_embed", &[n, c], h),
        t0_w: p.add("t_mlp.0.w", &[c, FREQ_DIM], h),
        t0_b: p.add("t_mlp.0.b", &[c], h),
        t2_w: p.add("t_mlp.2.w", &[c, c], h),
        t2_b: p.add("t_mlp.2.b", &[c], h),
        table: p.add("label_table", &[cfg.label_rows(), c], h),
        ada_w: p.add("adaLN.w (all blocks, final)", &[mw, c], h),
        ada_b: p.add("adaLN.b (all blocks, final)", &[mw], h),
        final_w: p.add("final.w", &[fin, c], h),
        final_b: p.add("final.b", &[fin], h),
        freqs: p.add("t_freqs", &[FREQ_DIM / 2], Dt::F32),
        blocks,
        factors: factor_bufs,
        cache,
        patches: p.add("patches", &[max_rows, n, cfg.patch_dim()], h),
        x: p.add("x (residual stream)", &[max_rows, n, c], Dt::F32),
        h: p.add("h", &[max_rows, n, c], h),
        qkv: p.add("qkv", &[max_rows, n, 3 * c], h),
        attn: p.add("attn", &[max_rows, n, c], h),
        y: p.add("y", &[max_rows, n, c], h),
        mlp: p.add("mlp", &[max_rows, n, m], h),
        out: p.add("final_out", &[max_rows, n, fin], Dt::F32),
        model_out: p.add("model_output", &[max_rows, cfg.output_elems()], Dt::F32),
        lowrank,
        t_all: p.add("timesteps (steps × rows)", &[cond], Dt::F32),
        labels: p.add("labels", &[max_rows], Dt::I32),
        tfreq: p.add("t_freq", &[cond, FREQ_DIM], h),
        temb_h: p.add("t_hidden", &[cond, c], h),
        temb: p.add("t_emb", &[cond, c], Dt::F32),
        silu_c: p.add("silu_c", &[cond, c], h),
        mod_all: p.add("modulation (steps × rows)", &[cond, mw], h),
        mod_cur: p.add("modulation (this step)", &[max_rows, mw], h),
        latents: p.add("latents", &[max_rows, cfg.image_elems()], Dt::F32),
        coeffs: p.add("sampler coefficients", &[steps, COEFFS], Dt::F32),
        state: p.add("request state", &[STATE], Dt::I32),
        split_ws: p.add("GEMM split-k partial sums", &[launch::SPLIT_WORKSPACE_ELEMS], Dt::F32),
    };
    (p, bufs)
}

/// Plans (without allocating) the GPU pipeline for a model and options: for `inspect` and
/// memory checks.
pub fn plan_for(model: &DitModel, opts: &EngineOptions) -> Result<Plan> {
    let schedule = opts.validate(&model.config)?;
    let factors = opts.cache.factors().map(|f| f.as_ref());
    let rows = opts.max_batch * if opts.cfg_scale > 1.0 { 2 } else { 1 };
    Ok(plan(&model.config, rows, schedule.len(), factors, opts.cache.keeps_caches()).0)
}

/// A DiT sampler on a device: the GPU counterpart of [`crate::engine::Engine`], with the same
/// options, requests and results.
pub struct GpuEngine<D: Device> {
    model: Arc<DitModel>,
    /// One recorded step per step kind the options use, for requests of `max_batch` images
    /// (declared before `dev`: dropped while the device still exists).
    graphs: Vec<(StepKind, D::Graph)>,
    dev: D,
    plan: Plan,
    bufs: Bufs,
    schedule: Schedule,
    opts: EngineOptions,
    max_rows: usize,
    /// Rows of the last full step, whose activations the caches hold.
    cached_rows: Option<usize>,
    /// Set from a signal handler or another thread: `sample` stops before its next step.
    interrupt: Option<Arc<AtomicBool>>,
    /// Host staging of small per-request uploads (planned at build).
    t_host: Vec<f32>,
    labels_host: Vec<i32>,
}

impl<D: Device> GpuEngine<D> {
    /// Validates the options, plans the arena, opens the device on it (`open` receives the
    /// plan, so a device can refuse before allocating) and uploads weights and factors.
    pub fn new(model: Arc<DitModel>, opts: &EngineOptions, open: impl FnOnce(&Plan) -> Result<D>) -> Result<Self> {
        let cfg = model.config;
        let schedule = opts.validate(&cfg)?;
        if cfg.head_dim() as i32 != launch::ATTENTION_HEAD_DIM {
            return Err(Error::invalid(
                "GPU pipeline",
                format!(
                    "head dim {} ({} channels / {} heads): the attention kernel is built for head dim {} only",
                    cfg.head_dim(),
                    cfg.hidden_size,
                    cfg.num_heads,
                    launch::ATTENTION_HEAD_DIM
                ),
            ));
        }
        opts.cache.check_depth(cfg.depth)?;
        let factors = opts.cache.factors().cloned();
        let guided = opts.cfg_scale > 1.0;
        let max_rows = opts.max_batch * if guided { 2 } else { 1 };
        let caching = opts.cache.keeps_caches();
        let (mut plan, bufs) = plan(&cfg, max_rows, schedule.len(), factors.as_deref(), caching);
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
        let steps = schedule.len();
        let mut engine = GpuEngine {
            model,
            graphs: Vec::new(),
            dev,
            plan,
            bufs,
            schedule,
            opts: opts.clone(),
            max_rows,
            cached_rows: None,
            interrupt: None,
            t_host: vec![0.0; steps * max_rows],
            labels_host: vec![0; max_rows],
        };
        engine.upload_weights()?;
        if let Some(f) = &factors {
            engine.upload_factors(f)?;
        }
        engine.upload_constants()?;
        engine.dev.synchronize()?;
        engine.capture_steps()?;
        Ok(engine)
    }

    /// Records one step of each kind the policy uses, for full-size requests: the step's
    /// modulation copy, the forward pass, the sampler update and the step advance, all
    /// reading the step index from device memory, so every step of a kind replays one graph.
    fn capture_steps(&mut self) -> Result<()> {
        let mut kinds: Vec<StepKind> = Vec::new();
        for i in 0..self.schedule.len() {
            let k = policy::step_kind(&self.opts.cache, &self.opts.full_steps, i);
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
        let (n, rows) = (self.opts.max_batch, self.max_rows);
        let params = self.sampler_params(n);
        for kind in kinds {
            self.dev.begin_capture()?;
            let recorded = self.step_launches(kind, rows, n, &params);
            let graph = self.dev.end_capture();
            recorded?;
            self.graphs.push((kind, graph?));
        }
        self.cached_rows = None;
        Ok(())
    }

    /// Milliseconds per step of `kind` for a full-size request, between device events over
    /// `iters` replays of its recorded graph (at most the schedule's steps), after the
    /// request's conditioning pass and, for cached kinds, one full step. The request is
    /// synthetic (labels 0, 1, …, noise from seed 0); for benchmarks (`icdit bench-gpu`).
    pub fn time_step(&mut self, kind: StepKind, iters: usize) -> Result<f32> {
        let cfg = self.model.config;
        let (n, rows, steps) = (self.opts.max_batch, self.max_rows, self.schedule.len());
        let find = |k: StepKind| self.graphs.iter().position(|g| g.0 == k);
        let g = find(kind).ok_or_else(|| {
            Error::invalid("time step", format!("{kind:?} steps are not part of this engine's cache policy"))
        })?;
        let full = find(StepKind::Full);
        let needs_full = matches!(kind, StepKind::Calibrated | StepKind::Reuse);
        let iters = iters.clamp(1, if needs_full { steps - 1 } else { steps }.max(1));
        self.stage_request(n, rows, |r| (r % cfg.num_classes) as i32, 0, 0)?;
        let b = &self.bufs;
        launch::normal_f32(&self.dev, self.s(b.latents)?, self.s(b.state)?, n as i32, cfg.image_elems() as i32, 0)?;
        self.conditioning(steps * rows, rows)?;
        if needs_full {
            let f = full.ok_or_else(|| Error::invalid("time step", "no full step recorded"))?;
            self.dev.launch_graph(&self.graphs[f].1)?;
        }
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

    /// Number of recorded step graphs (one per step kind the policy uses).
    pub fn graph_count(&self) -> usize {
        self.graphs.len()
    }

    fn sampler_params(&self, n: usize) -> SamplerParams {
        let cfg = &self.model.config;
        let guided = self.opts.cfg_scale > 1.0;
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

    /// The launches of one sampling step of `kind` for `n` images (`rows` model rows).
    fn step_launches(&mut self, kind: StepKind, rows: usize, n: usize, params: &SamplerParams) -> Result<()> {
        self.select_step(rows, self.schedule.len())?;
        self.run_forward(rows, n, kind)?;
        let b = &self.bufs;
        let cfg = &self.model.config;
        if self.opts.check_finite {
            let len = (rows * cfg.output_elems()) as i32;
            launch::check_finite_f32(&self.dev, self.s(b.model_out)?, len, self.s(b.state)?, BAD_OUTPUT as i32)?;
        }
        launch::sampler_step_f32(
            &self.dev,
            self.s(b.latents)?,
            self.s(b.model_out)?,
            self.s(b.coeffs)?,
            self.s(b.state)?,
            params,
        )?;
        if self.opts.check_finite {
            let len = (n * cfg.image_elems()) as i32;
            launch::check_finite_f32(&self.dev, self.s(b.latents)?, len, self.s(b.state)?, BAD_LATENTS as i32)?;
        }
        launch::step_advance(&self.dev, self.s(b.state)?)
    }

    /// A flag that, once set, makes [`GpuEngine::sample`] stop before its next step with
    /// [`Error::Interrupted`] (the device finishes what was issued).
    pub fn set_interrupt(&mut self, flag: Option<Arc<AtomicBool>>) {
        self.interrupt = flag;
    }

    pub fn device(&self) -> &D {
        &self.dev
    }
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    pub fn model(&self) -> &Arc<DitModel> {
        &self.model
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
    pub fn arena_bytes(&self) -> usize {
        self.plan.total_bytes()
    }

    fn s<T: DevType>(&self, id: BufId) -> Result<DevSlice<T>> {
        self.dev.slice::<T>(self.plan.get(id))
    }

    /// One fused GEMM, split along k into the planned workspace when that fills the GPU better.
    fn gemm(&self, g: &GemmSpec) -> Result<()> {
        launch::gemm_ws(&self.dev, g, Some(self.s(self.bufs.split_ws)?))
    }

    /// Converts `src` to f16 through the staging buffer and uploads it at `dst`.
    fn put_f16(&self, dst: DevSlice<f16>, src: &[f32], staging: &mut [f16]) -> Result<()> {
        if src.len() != dst.len() {
            return Err(Error::invalid("GPU upload", format!("{} values for {dst:?}", src.len())));
        }
        let per = staging.len();
        for (i, chunk) in src.chunks(per).enumerate() {
            let st = &mut staging[..chunk.len()];
            for (h, &v) in st.iter_mut().zip(chunk) {
                *h = f16::from_f32(v);
            }
            self.dev.upload(dst.sub(i * per, chunk.len())?, st)?;
        }
        Ok(())
    }

    fn upload_weights(&mut self) -> Result<()> {
        let model = Arc::clone(&self.model);
        let t = &model.tensors;
        let (c, d) = (model.config.hidden_size, model.config.depth);
        let mut staging = vec![f16::ZERO; STAGING];
        let b = &self.bufs;
        let mut pairs: Vec<(BufId, TRef)> = vec![
            (b.patch_w, t.patch_w),
            (b.patch_b, t.patch_b),
            (b.pos, t.pos_embed),
            (b.t0_w, t.t_mlp0_w),
            (b.t0_b, t.t_mlp0_b),
            (b.t2_w, t.t_mlp2_w),
            (b.t2_b, t.t_mlp2_b),
            (b.table, t.label_table),
            (b.final_w, t.final_w),
            (b.final_b, t.final_b),
        ];
        for (bw, bt) in b.blocks.iter().zip(&t.blocks) {
            pairs.extend([
                (bw.qkv_w, bt.qkv_w),
                (bw.qkv_b, bt.qkv_b),
                (bw.proj_w, bt.proj_w),
                (bw.proj_b, bt.proj_b),
                (bw.fc1_w, bt.fc1_w),
                (bw.fc1_b, bt.fc1_b),
                (bw.fc2_w, bt.fc2_w),
                (bw.fc2_b, bt.fc2_b),
            ]);
        }
        for (id, r) in pairs {
            self.put_f16(self.s(id)?, model.w(r), &mut staging)?;
        }
        // adaLN: every block's (6C, C) then the final (2C, C), one matrix.
        let (aw, ab) = (self.s::<f16>(b.ada_w)?, self.s::<f16>(b.ada_b)?);
        for (i, bt) in t.blocks.iter().enumerate() {
            self.put_f16(aw.sub(i * 6 * c * c, 6 * c * c)?, model.w(bt.ada_w), &mut staging)?;
            self.put_f16(ab.sub(i * 6 * c, 6 * c)?, model.w(bt.ada_b), &mut staging)?;
        }
        self.put_f16(aw.sub(d * 6 * c * c, 2 * c * c)?, model.w(t.final_ada_w), &mut staging)?;
        self.put_f16(ab.sub(d * 6 * c, 2 * c)?, model.w(t.final_ada_b), &mut staging)?;
        Ok(())
    }

    fn upload_factors(&mut self, f: &Factors) -> Result<()> {
        let mut staging = vec![f16::ZERO; STAGING];
        for (bf, blk) in self.bufs.factors.iter().zip(&f.blocks) {
            self.put_f16(self.s(bf.down[0])?, f.w(blk.qkv_down), &mut staging)?;
            for (j, t) in [LayerType::Proj, LayerType::Fc1, LayerType::Fc2].into_iter().enumerate() {
                self.put_f16(self.s(bf.down[j + 1])?, f.w(blk.get(t).down), &mut staging)?;
            }
            for (j, t) in LayerType::ALL.into_iter().enumerate() {
                self.put_f16(self.s(bf.up[j])?, f.w(blk.get(t).up), &mut staging)?;
            }
            if let Some(id) = bf.qkv_up {
                // Rows g·C .. (g+1)·C hold group g's up factor at its columns of the shared
                // low-rank product; zeros elsewhere (exact zeros in every product).
                let c = self.model.config.hidden_size;
                let r_total = blk.qkv_rank();
                let mut merged = vec![0.0f32; 3 * c * r_total];
                let mut r0 = 0;
                for (g, t) in [LayerType::Q, LayerType::K, LayerType::V].into_iter().enumerate() {
                    let (up, r) = (f.w(blk.get(t).up), blk.get(t).rank);
                    for row in 0..c {
                        merged[(g * c + row) * r_total + r0..][..r].copy_from_slice(&up[row * r..(row + 1) * r]);
                    }
                    r0 += r;
                }
                self.put_f16(self.s(id)?, &merged, &mut staging)?;
            }
        }
        Ok(())
    }

    /// The timestep frequencies and the sampler's per-step coefficients.
    fn upload_constants(&mut self) -> Result<()> {
        let freqs = embed::timestep_freqs(self.model.numerics);
        self.dev.upload(self.s::<f32>(self.bufs.freqs)?, &freqs)?;
        let eta = match self.opts.sampler {
            Sampler::Ddim { eta } => eta,
            Sampler::Ddpm => 0.0,
        };
        let steps = self.schedule.len();
        let mut table = vec![0.0f32; steps * COEFFS];
        for s in 0..steps {
            let row = launch::sampler_coeffs(&self.schedule.coeffs(steps - 1 - s), eta);
            table[s * COEFFS..][..COEFFS].copy_from_slice(&row);
        }
        self.dev.upload(self.s::<f32>(self.bufs.coeffs)?, &table)
    }

    /// Uploads a request's labels ([classes; null…] when `rows` > `n`), the timestep of every
    /// (step, row) and the request state.
    fn stage_request(
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
        let b = &self.bufs;
        self.dev.upload(self.s::<i32>(b.labels)?.sub(0, rows)?, &self.labels_host[..rows])?;
        self.dev.upload(self.s::<f32>(b.t_all)?.sub(0, steps * rows)?, &self.t_host[..steps * rows])?;
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
        self.dev.upload(self.s::<i32>(self.bufs.state)?, &st)
    }

    /// The conditioning of a request ([`forward::conditioning`]): `count` = steps × rows
    /// (timestep, label) pairs, pair i using label i mod rows, into every block's modulation
    /// for every step.
    fn conditioning(&self, count: usize, rows: usize) -> Result<()> {
        let mut ops = RequestConditioning { engine: self, label_rows: rows, err: None };
        forward::conditioning(&mut ops, count);
        ops.err.map_or(Ok(()), Err)
    }

    /// Copies the current step's modulation (step index in device memory) for `rows` rows.
    fn select_step(&self, rows: usize, steps: usize) -> Result<()> {
        let per = (rows * mod_width(&self.model.config)) as i32;
        let b = &self.bufs;
        launch::select_step_f16(&self.dev, self.s(b.mod_cur)?, self.s(b.mod_all)?, self.s(b.state)?, per, steps as i32)
    }

    /// One forward pass of `kind` over `rows` rows whose images are rows mod `images` of the
    /// latents, into the model output buffer.
    fn run_forward(&mut self, rows: usize, images: usize, kind: StepKind) -> Result<()> {
        let cfg = self.model.config;
        let eps = self.model.mlp_norm_eps;
        let err = {
            let mut pass = Pass { e: &*self, images, err: None };
            forward::forward(&mut pass, &cfg, eps, rows, kind);
            pass.err
        };
        if let Some(e) = err {
            return Err(e);
        }
        if kind == StepKind::Full {
            self.cached_rows = Some(rows);
        }
        Ok(())
    }

    /// The step-order rules ([`policy::check_step`]) against this engine's caches.
    fn check_kind(&self, kind: StepKind, rows: usize) -> Result<()> {
        policy::check_step(kind, &self.opts.cache, self.cached_rows, rows)
    }

    /// One model evaluation, as [`crate::CpuEngine::forward_step`]: `x` (B, Cin, I, I),
    /// `t` original timesteps, `y` labels (the null class allowed) → `out` (B, Cout, I, I).
    /// Synchronises with the device (it copies the result back).
    pub fn forward_step(&mut self, x: &[f32], t: &[i64], y: &[i64], out: &mut [f32], kind: StepKind) -> Result<()> {
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
        let b = &self.bufs;
        self.dev.upload(self.s::<f32>(b.latents)?.sub(0, x.len())?, x)?;
        self.dev.upload(self.s::<f32>(b.t_all)?.sub(0, rows)?, &self.t_host[..rows])?;
        self.dev.upload(self.s::<i32>(b.labels)?.sub(0, rows)?, &self.labels_host[..rows])?;
        self.put_state(0, 0)?;
        self.conditioning(rows, rows)?;
        self.select_step(rows, 1)?;
        self.run_forward(rows, rows, kind)?;
        let mo = self.s::<f32>(self.bufs.model_out)?.sub(0, out.len())?;
        self.dev.download(mo, out)
    }

    /// Samples `req.classes.len()` images into `out`, as [`crate::engine::Engine::sample`]
    /// does (same noise, labels, guidance and sampler), every step on the device; the host
    /// waits only for the final copy. `progress` runs as each step is issued.
    pub fn sample(&mut self, req: &Request, out: &mut [f32], progress: &mut dyn FnMut(Step)) -> Result<()> {
        let cfg = self.model.config;
        let steps = self.schedule.len();
        validate_request(&cfg, steps, self.opts.max_batch, req, out.len())?;
        if req.step_noise.is_some() {
            return Err(Error::invalid(
                "step noise",
                "the GPU pipeline draws the per-step noise on the device; given per-step noise is supported by the CPU backend only",
            ));
        }
        let n = req.classes.len();
        let img = cfg.image_elems();
        let guided = self.opts.cfg_scale > 1.0;
        let rows = if guided { 2 * n } else { n };
        self.stage_request(n, rows, |r| req.classes[r] as i32, req.seed, req.first_index)?;
        let b = &self.bufs;
        let latents = self.s::<f32>(b.latents)?;
        match req.noise {
            Some(z) => self.dev.upload(latents.sub(0, n * img)?, z)?,
            None => launch::normal_f32(&self.dev, latents, self.s(b.state)?, n as i32, img as i32, 0)?,
        }
        self.conditioning(steps * rows, rows)?;
        let params = self.sampler_params(n);
        let full_size = n == self.opts.max_batch;
        for (index, k) in (0..steps).rev().enumerate() {
            if self.interrupt.as_ref().is_some_and(|f| f.load(Ordering::Relaxed)) {
                self.dev.synchronize()?;
                return Err(Error::Interrupted {
                    done: format!("{index} of {steps} steps of a {n}-image request were done"),
                });
            }
            let kind = policy::step_kind(&self.opts.cache, &self.opts.full_steps, index);
            self.check_kind(kind, rows)?;
            match self.graphs.iter().find(|g| g.0 == kind).filter(|_| full_size) {
                Some((_, graph)) => {
                    self.dev.launch_graph(graph)?;
                    if kind == StepKind::Full {
                        self.cached_rows = Some(rows);
                    }
                }
                None => self.step_launches(kind, rows, n, &params)?,
            }
            progress(Step { index, total: steps, timestep: self.schedule.timestep_map[k] });
        }
        self.dev.download(self.s::<f32>(self.bufs.latents)?.sub(0, n * img)?, out)?;
        if self.opts.check_finite {
            let mut st = [0i32; STATE];
            self.dev.download(self.s::<i32>(self.bufs.state)?, &mut st)?;
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
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("sample", format!("element {i} of the result is not finite")));
        }
        Ok(())
    }
}

/// The conditioning of a whole request on the device ([`ConditioningOps`]): every step's
/// (timestep, label) pairs at once, `rows` = steps × rows of the request. Launch errors are
/// kept (the first one) and returned when the pass ends.
struct RequestConditioning<'a, D: Device> {
    engine: &'a GpuEngine<D>,
    /// Rows of one step: pair i uses label i mod label_rows.
    label_rows: usize,
    err: Option<Error>,
}

impl<D: Device> RequestConditioning<'_, D> {
    fn run(&mut self, f: impl FnOnce(&Self) -> Result<()>) {
        if self.err.is_none() {
            if let Err(e) = f(self) {
                self.err = Some(e);
            }
        }
    }
}

impl<D: Device> ConditioningOps for RequestConditioning<'_, D> {
    fn embed_conditioning(&mut self, count: usize) {
        self.run(|p| {
            let e = p.engine;
            let cfg = &e.model.config;
            let (c, b) = (cfg.hidden_size, &e.bufs);
            let cnt = count as i32;
            launch::timestep_freq_f16(&e.dev, e.s(b.tfreq)?, e.s(b.t_all)?, e.s(b.freqs)?, cnt)?;
            let mut g = GemmSpec::new(
                GemmOut::F16(e.s(b.temb_h)?),
                e.s(b.tfreq)?,
                e.s(b.t0_w)?,
                cnt,
                c as i32,
                FREQ_DIM as i32,
            );
            g.bias = Some(e.s(b.t0_b)?);
            g.act = GemmAct::Silu;
            e.gemm(&g)?;
            let mut g =
                GemmSpec::new(GemmOut::F32(e.s(b.temb)?), e.s(b.temb_h)?, e.s(b.t2_w)?, cnt, c as i32, c as i32);
            g.bias = Some(e.s(b.t2_b)?);
            e.gemm(&g)?;
            launch::condition_silu_f16(
                &e.dev,
                e.s(b.silu_c)?,
                e.s(b.temb)?,
                e.s(b.table)?,
                e.s(b.labels)?,
                cnt,
                p.label_rows as i32,
                c as i32,
                cfg.label_rows() as i32,
            )?;
            Ok(())
        });
    }

    fn modulations(&mut self, count: usize) {
        self.run(|p| {
            let e = p.engine;
            let cfg = &e.model.config;
            let (c, b) = (cfg.hidden_size, &e.bufs);
            let cnt = count as i32;
            let mw = mod_width(cfg) as i32;
            let mut g = GemmSpec::new(GemmOut::F16(e.s(b.mod_all)?), e.s(b.silu_c)?, e.s(b.ada_w)?, cnt, mw, c as i32);
            g.bias = Some(e.s(b.ada_b)?);
            e.gemm(&g)
        });
    }
}

/// One forward pass in flight: the [`DitOps`] of the GPU pipeline. Launch errors are kept
/// (the first one) and returned when the pass ends.
struct Pass<'a, D: Device> {
    e: &'a GpuEngine<D>,
    images: usize,
    err: Option<Error>,
}

impl<D: Device> Pass<'_, D> {
    fn run(&mut self, f: impl FnOnce(&Self) -> Result<()>) {
        if self.err.is_none() {
            if let Err(e) = f(self) {
                self.err = Some(e);
            }
        }
    }

    fn buf(&self, a: Act) -> BufId {
        let b = &self.e.bufs;
        match a {
            Act::X => b.x,
            Act::H => b.h,
            Act::Qkv => b.qkv,
            Act::Attn => b.attn,
            Act::Y => b.y,
            Act::Mlp => b.mlp,
            Act::Out => b.out,
            Act::Cache(i, slot) => b.cache[i][slot as usize],
        }
    }

    fn h(&self, a: Act) -> Result<DevSlice<f16>> {
        self.e.s(self.buf(a))
    }

    /// (weight, bias, out, in) of a linear layer.
    fn layer(&self, layer: Linear) -> (BufId, BufId, usize, usize) {
        let cfg = &self.e.model.config;
        let (c, m) = (cfg.hidden_size, cfg.mlp_hidden());
        let b = &self.e.bufs;
        match layer {
            Linear::Qkv(i) => (b.blocks[i].qkv_w, b.blocks[i].qkv_b, 3 * c, c),
            Linear::Proj(i) => (b.blocks[i].proj_w, b.blocks[i].proj_b, c, c),
            Linear::Fc1(i) => (b.blocks[i].fc1_w, b.blocks[i].fc1_b, m, c),
            Linear::Fc2(i) => (b.blocks[i].fc2_w, b.blocks[i].fc2_b, c, m),
            Linear::Final => (b.final_w, b.final_b, cfg.patch_size * cfg.patch_size * cfg.out_channels(), c),
        }
    }

    /// A chunk of this step's modulation, from its start to the end of the buffer.
    fn chunk(&self, chunk: ModChunk) -> Result<DevSlice<f16>> {
        let all = self.e.s::<f16>(self.e.bufs.mod_cur)?;
        let start = chunk.offset(&self.e.model.config);
        all.sub(start, all.len() - start)
    }

    fn tokens(&self) -> usize {
        self.e.model.config.tokens()
    }
}

fn gemm_act(a: Activation) -> GemmAct {
    match a {
        Activation::None => GemmAct::None,
        Activation::GeluTanh => GemmAct::GeluTanh,
    }
}

impl<D: Device> DitOps for Pass<'_, D> {
    fn embed_patches(&mut self, rows: usize) {
        self.run(|p| {
            let (e, cfg) = (p.e, &p.e.model.config);
            let b = &e.bufs;
            launch::patchify_f16(
                &e.dev,
                e.s(b.patches)?,
                e.s(b.latents)?,
                rows as i32,
                p.images as i32,
                cfg.in_channels as i32,
                cfg.input_size as i32,
                cfg.patch_size as i32,
            )?;
            let (c, n) = (cfg.hidden_size as i32, cfg.tokens() as i32);
            let mut g = GemmSpec::new(
                GemmOut::F32(e.s(b.x)?),
                e.s(b.patches)?,
                e.s(b.patch_w)?,
                rows as i32 * n,
                c,
                cfg.patch_dim() as i32,
            );
            g.bias = Some(e.s(b.patch_b)?);
            g.add = Some((e.s(b.pos)?, c, n));
            e.gemm(&g)
        });
    }

    fn norm_modulate(&mut self, dst: Act, norm: Norm, rows: usize) {
        self.run(|p| {
            let cfg = &p.e.model.config;
            let (r, tokens, c, stride) =
                ((rows * cfg.tokens()) as i32, cfg.tokens() as i32, cfg.hidden_size as i32, mod_width(cfg) as i32);
            let (out, x) = (p.h(dst)?, p.e.s(p.e.bufs.x)?);
            let (shift, scale) = (p.chunk(norm.shift)?, p.chunk(norm.scale)?);
            launch::layernorm_modulate_f32x(&p.e.dev, out, x, shift, scale, r, tokens, c, stride, norm.eps)
        });
    }

    fn residual_norm_modulate(&mut self, src: Act, gate: ModChunk, dst: Act, norm: Norm, rows: usize) {
        // One kernel: the residual update of each row, then its LayerNorm.
        self.run(|p| {
            let cfg = &p.e.model.config;
            let (r, tokens, c, stride) =
                ((rows * cfg.tokens()) as i32, cfg.tokens() as i32, cfg.hidden_size as i32, mod_width(cfg) as i32);
            let (out, x, y) = (p.h(dst)?, p.e.s(p.e.bufs.x)?, p.h(src)?);
            let (gate, shift, scale) = (p.chunk(gate)?, p.chunk(norm.shift)?, p.chunk(norm.scale)?);
            launch::residual_layernorm_modulate_f32x(
                &p.e.dev, out, x, y, gate, stride, shift, scale, r, tokens, c, stride, norm.eps,
            )
        });
    }

    fn linear(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize) {
        self.run(|p| {
            let (w, bias, out, k) = p.layer(layer);
            let m = (rows * p.tokens()) as i32;
            let o = match dst {
                Act::Out => GemmOut::F32(p.e.s(p.e.bufs.out)?),
                _ => GemmOut::F16(p.h(dst)?),
            };
            let mut g = GemmSpec::new(o, p.h(src)?, p.e.s(w)?, m, out as i32, k as i32);
            g.bias = Some(p.e.s(bias)?);
            g.act = gemm_act(act);
            p.e.gemm(&g)
        });
    }

    fn linear_gelu_keep_pre(&mut self, layer: Linear, src: Act, pre: Act, post: Act, rows: usize) {
        // One GEMM writes both: `pre` before its GELU epilogue, `post` after.
        self.run(|p| {
            let (w, bias, out, k) = p.layer(layer);
            let m = (rows * p.tokens()) as i32;
            let mut g = GemmSpec::new(GemmOut::F16(p.h(post)?), p.h(src)?, p.e.s(w)?, m, out as i32, k as i32);
            g.bias = Some(p.e.s(bias)?);
            g.pre = Some(p.h(pre)?);
            g.act = GemmAct::GeluTanh;
            p.e.gemm(&g)
        });
    }

    fn linear_calibrated(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize) {
        self.run(|p| {
            let (i, xs, ys) =
                layer.slots().ok_or_else(|| Error::invalid("GPU pipeline", "only block linears are calibrated"))?;
            let bf = p.e.bufs.factors.get(i).ok_or_else(|| Error::invalid("GPU pipeline", "no factors planned"))?;
            let low_id =
                p.e.bufs.lowrank.ok_or_else(|| Error::invalid("GPU pipeline", "no low-rank buffer planned"))?;
            let (_, _, out, inp) = p.layer(layer);
            let m = (rows * p.tokens()) as i32;
            // (down buffer, parts as (layer-type index, output group))
            let (down, parts): (BufId, &[(usize, usize)]) = match layer {
                Linear::Qkv(_) => (bf.down[0], &[(0, 0), (1, 1), (2, 2)]),
                Linear::Proj(_) => (bf.down[1], &[(3, 0)]),
                Linear::Fc1(_) => (bf.down[2], &[(4, 0)]),
                Linear::Fc2(_) => (bf.down[3], &[(5, 0)]),
                Linear::Final => unreachable!("slots() is None for the final layer"),
            };
            let r_total: usize = parts.iter().map(|&(t, _)| bf.ranks[t]).sum();
            let low = p.e.s::<f16>(low_id)?;
            // T = (x − x_s)·downᵀ, the increment formed while staging, never stored.
            let mut g = GemmSpec::new(GemmOut::F16(low), p.h(src)?, p.e.s(down)?, m, r_total as i32, inp as i32);
            g.a_minus = Some(p.h(Act::Cache(i, xs))?);
            p.e.gemm(&g)?;
            // dst = act(y_s + T·upᵀ) per output group, or for q, k and v at once.
            let group = out / parts.len();
            let (dst_s, ycache) = (p.h(dst)?, p.h(Act::Cache(i, ys))?);
            if let (Linear::Qkv(_), Some(merged)) = (layer, bf.qkv_up) {
                let mut g = GemmSpec::new(GemmOut::F16(dst_s), low, p.e.s(merged)?, m, out as i32, r_total as i32);
                g.add = Some((ycache, out as i32, m));
                g.act = gemm_act(act);
                return p.e.gemm(&g);
            }
            let mut r0 = 0;
            for &(t, grp) in parts {
                let rank = bf.ranks[t];
                let off = grp * group;
                let mut g = GemmSpec::new(
                    GemmOut::F16(dst_s.sub(off, dst_s.len() - off)?),
                    low.sub(r0, low.len() - r0)?,
                    p.e.s(bf.up[t])?,
                    m,
                    group as i32,
                    rank as i32,
                );
                g.lda = r_total as i32;
                g.ldc = out as i32;
                g.add = Some((ycache.sub(off, ycache.len() - off)?, out as i32, m));
                g.act = gemm_act(act);
                p.e.gemm(&g)?;
                r0 += rank;
            }
            Ok(())
        });
    }

    fn attention(&mut self, src: Act, dst: Act, rows: usize) {
        self.run(|p| {
            let cfg = &p.e.model.config;
            launch::attention_f16(
                &p.e.dev,
                p.h(dst)?,
                p.h(src)?,
                rows as i32,
                cfg.tokens() as i32,
                cfg.num_heads as i32,
                cfg.head_dim() as i32,
            )
        });
    }

    fn gated_residual(&mut self, src: Act, gate: ModChunk, rows: usize) {
        self.run(|p| {
            let cfg = &p.e.model.config;
            launch::gated_residual_add_f32x(
                &p.e.dev,
                p.e.s(p.e.bufs.x)?,
                p.h(src)?,
                p.chunk(gate)?,
                (rows * cfg.tokens()) as i32,
                cfg.tokens() as i32,
                cfg.hidden_size as i32,
                mod_width(cfg) as i32,
            )
        });
    }

    fn unpatchify(&mut self, rows: usize) {
        self.run(|p| {
            let (e, cfg) = (p.e, &p.e.model.config);
            launch::unpatchify_f32(
                &e.dev,
                e.s(e.bufs.model_out)?,
                e.s(e.bufs.out)?,
                rows as i32,
                cfg.out_channels() as i32,
                cfg.input_size as i32,
                cfg.patch_size as i32,
            )
        });
    }
}
