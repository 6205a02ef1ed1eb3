//! The CPU reference backend: f32, multi-threaded, every buffer in one arena planned at
//! construction, weights read straight from the mapped checkpoint. After `new`, a forward
//! pass performs no heap allocation.

pub mod gemm;
pub mod math;
mod ops;
pub mod pool;
mod probe;
pub mod sampling;

pub use crate::isa::{self, Isa, IsaKind};
pub use crate::policy::CacheMode;
pub use probe::NonFiniteAt;
pub use sampling::{CpuBackend, Engine};

use std::sync::Arc;

use crate::config::{DitConfig, FREQ_DIM};
use crate::embed;
use crate::engine::EngineOptions;
use crate::error::{Error, Result};
use crate::factors::LayerType;
use crate::forward::{self, chunk, Act, ModChunk, Norm, Slot, StepKind};
use crate::plan::{Arena, BufId, Dt, Plan};
use crate::policy::{self, ForecastStep};
use crate::weights::DitModel;
use gemm::{BMat, Gemm, Gemmer};
use pool::{SendPtr, ThreadPool};

/// Single operations [`CpuEngine::bench_op`] can time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchOp {
    /// Multi-head self-attention over the qkv buffer (softmax(q kᵀ/√d) v per head).
    Attention,
    /// LayerNorm (eps 1e-6, no affine) fused with the adaLN modulation.
    NormModulate,
}

/// How to size a CPU engine.
#[derive(Clone, Debug)]
pub struct CpuOptions {
    /// Largest number of images per request.
    pub max_batch: usize,
    /// Whether requests use classifier-free guidance (doubles the model batch).
    pub guidance: bool,
    /// Worker threads including the caller; 0 means all available cores.
    pub threads: usize,
    /// Block caches and factors to plan for.
    pub cache: CacheMode,
    /// The instruction-set path; `None`: `ICDIT_CPU_ISA`, or the best this CPU runs.
    pub isa: Option<Isa>,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions { max_batch: 1, guidance: false, threads: 0, cache: CacheMode::None, isa: None }
    }
}

impl CpuOptions {
    /// The forward pass a sampling engine built with `opts` runs: its batch, guidance,
    /// threads, caches and instruction-set path.
    pub fn for_sampling(opts: &EngineOptions) -> Self {
        CpuOptions {
            max_batch: opts.max_batch,
            guidance: opts.guided(),
            threads: opts.threads,
            cache: opts.cache.clone(),
            isa: opts.isa,
        }
    }
}

/// Buffer ids of the CPU forward pass.
struct ForwardBuffers {
    input: BufId,
    patches: BufId,
    x: BufId,
    h: BufId,
    qkv: BufId,
    attn: BufId,
    y: BufId,
    mlp: BufId,
    out: BufId,
    image: BufId,
    tfreq: BufId,
    temb: BufId,
    c: BufId,
    silu_c: BufId,
    modv: BufId,
    gemm_scratch: BufId,
    gemm_packed_a: BufId,
    attn_scratch: BufId,
    /// Per block, the cache slots the policy keeps (in `Slot::ALL` order; all eight for reuse
    /// and icc, `proj_y` and `fc2_y` for fora); empty without them.
    cache: Vec<[Option<BufId>; 8]>,
    /// Per block, the Taylor factors of the attention and MLP branch outputs:
    /// (order + 1, rows, N, C) each, D_i at i·rows·N·C; empty unless the policy is taylor.
    forecast: Vec<[BufId; 2]>,
    /// The rank-r projection (x − x_s)·downᵀ of calibrated steps.
    lowrank: Option<BufId>,
    /// icc's factors packed once into the GEMM's B panels ([`gemm::Gemmer::pack_b_whole`]),
    /// and where each block's sit in that buffer: calibrated steps read them as they are
    /// instead of packing every factor on every step (on each thread).
    factors_packed: Option<BufId>,
    packed_at: Vec<PackedFactors>,
}

/// Element offsets of a block's factors in the packed-factor buffer: q, k and v's stacked
/// `down` (one B operand, n = r_q + r_k + r_v), every layer's `up` (n = out features,
/// k = rank) and the `down` of proj, fc1 and fc2 (n = rank, k = in features), by
/// [`LayerType`] index (q, k and v's own `down` are not used on their own).
#[derive(Clone, Copy, Debug, Default)]
struct PackedFactors {
    qkv_down: usize,
    down: [usize; 6],
    up: [usize; 6],
}

/// Rows the conditioning buffers hold at least: the sampling loop conditions
/// ⌊AHEAD_ROWS / rows⌋ steps at once ([`CpuEngine::condition_ahead`]), so that at small
/// batches one modulation GEMM reads the adaLN weights (0.8 GB in f32 at DiT-XL/2 size) for
/// several steps instead of for each. 32 rows (16 steps at batch 1 with guidance) hold 25 MB
/// of modulation vectors at DiT-XL/2 size (16 rows: 12.5 MB and twice the weight reads).
pub const AHEAD_ROWS: usize = 32;

/// Rows the conditioning buffers of a plan for `rows` model rows hold.
fn conditioning_rows(rows: usize) -> usize {
    rows.max(AHEAD_ROWS)
}

/// Rows (model batch) a plan must hold for `opts`.
pub fn planned_rows(opts: &CpuOptions) -> usize {
    opts.max_batch.saturating_mul(if opts.guidance { 2 } else { 1 })
}

/// Refuses a row count whose buffers could not even be sized: every product the CPU plan
/// forms must stay far below the address space (real limits are checked against memory
/// by [`crate::limits`]; this only keeps the size arithmetic from overflowing).
pub fn check_plan_size(cfg: &DitConfig, rows: usize) -> Result<()> {
    let (n, c, m) = (cfg.tokens() as u128, cfg.hidden_size as u128, cfg.mlp_hidden() as u128);
    let widest = [3 * c, m, cfg.patch_dim() as u128, (cfg.patch_size * cfg.patch_size * cfg.out_channels()) as u128]
        .into_iter()
        .max()
        .unwrap_or(0);
    let r = rows as u128;
    let image = (cfg.out_channels().max(cfg.in_channels) as u128) * (cfg.input_size as u128).pow(2);
    let largest =
        [(r + 16) * n * widest.max(FREQ_DIM as u128), r * image, 1024 * n * (n + 2 * c), r * 6 * c].into_iter().max();
    if largest.unwrap_or(0) > (1u128 << 56) {
        return Err(Error::invalid(
            "batch",
            format!("{rows} model rows of a {}-token, width-{widest} model cannot be planned: the buffers would not fit in memory", n),
        ));
    }
    Ok(())
}

/// The memory plan of the CPU forward pass for `cfg`.
fn plan(cfg: &DitConfig, rows: usize, threads: usize, cache: &CacheMode) -> (Plan, ForwardBuffers) {
    let (n, c, m) = (cfg.tokens(), cfg.hidden_size, cfg.mlp_hidden());
    let (i, p2) = (cfg.input_size, cfg.patch_size * cfg.patch_size);
    let mut p = Plan::new(format!("CPU forward plan ({rows} rows, {threads} threads)"));
    let cr = conditioning_rows(rows);
    let bufs = ForwardBuffers {
        input: p.add("input", &[rows, cfg.in_channels, i, i], Dt::F32),
        patches: p.add("patches", &[rows, n, cfg.patch_dim()], Dt::F32),
        x: p.add("x", &[rows, n, c], Dt::F32),
        h: p.add("h", &[rows, n, c], Dt::F32),
        qkv: p.add("qkv", &[rows, n, 3 * c], Dt::F32),
        attn: p.add("attn", &[rows, n, c], Dt::F32),
        y: p.add("y", &[rows, n, c], Dt::F32),
        mlp: p.add("mlp", &[rows, n, m], Dt::F32),
        out: p.add("final_out", &[rows, n, p2 * cfg.out_channels()], Dt::F32),
        image: p.add("output", &[rows, cfg.out_channels(), i, i], Dt::F32),
        tfreq: p.add("t_freq", &[cr, FREQ_DIM], Dt::F32),
        temb: p.add("t_hidden", &[cr, c], Dt::F32),
        c: p.add("c", &[cr, c], Dt::F32),
        silu_c: p.add("silu_c", &[cr, c], Dt::F32),
        modv: p.add("modulation", &[cr, forward::modulation_width(cfg)], Dt::F32),
        gemm_scratch: p.add("gemm_scratch", &[threads, gemm::SCRATCH_PER_THREAD], Dt::F32),
        gemm_packed_a: p.add(
            "gemm_packed_a",
            &[gemm::packed_a_len(rows * n, c.max(m).max(cfg.patch_dim()).max(FREQ_DIM))],
            Dt::F32,
        ),
        attn_scratch: p.add("attn_scratch", &[threads, ops::attention_scratch(n, cfg.head_dim())], Dt::F32),
        cache: Vec::new(),
        forecast: Vec::new(),
        lowrank: None,
        factors_packed: None,
        packed_at: Vec::new(),
    };
    let mut bufs = bufs;
    let kept = |s: Slot| match cache {
        CacheMode::None | CacheMode::Taylor(_) => false,
        CacheMode::Reuse | CacheMode::Icc(_) => true,
        CacheMode::Fora => matches!(s, Slot::ProjY | Slot::Fc2Y),
    };
    if Slot::ALL.iter().any(|&s| kept(s)) {
        bufs.cache = (0..cfg.depth)
            .map(|i| {
                Slot::ALL.map(|s| {
                    kept(s).then(|| p.add(format!("cache.{i}.{}", s.name()), &[rows, n, s.width(cfg)], Dt::F32))
                })
            })
            .collect();
    }
    if let Some(f) = cache.forecast() {
        bufs.forecast = (0..cfg.depth)
            .map(|i| ["attn", "mlp"].map(|b| p.add(format!("taylor.{i}.{b}"), &[f.order + 1, rows, n, c], Dt::F32)))
            .collect();
    }
    if let Some(f) = cache.factors() {
        let (qkv_rank, one_rank) = f.max_ranks();
        bufs.lowrank = Some(p.add("icc_lowrank", &[rows, n, qkv_rank.max(one_rank)], Dt::F32));
        let mut len = 0;
        let mut at = |n: usize, k: usize| {
            let o = len;
            len += gemm::packed_b_len(n, k);
            o
        };
        bufs.packed_at = f
            .blocks
            .iter()
            .map(|b| {
                let mut pf = PackedFactors { qkv_down: at(b.qkv_rank(), c), ..Default::default() };
                for t in LayerType::ALL {
                    let ((out, inp), rank) = (t.shape(c, m), b.get(t).rank);
                    if matches!(t, LayerType::Proj | LayerType::Fc1 | LayerType::Fc2) {
                        pf.down[t as usize] = at(rank, inp);
                    }
                    pf.up[t as usize] = at(out, rank);
                }
                pf
            })
            .collect();
        bufs.factors_packed = Some(p.add("icc_factors_packed", &[len.max(1)], Dt::F32));
    }
    (p, bufs)
}

/// Plans (without allocating) the CPU forward for a model: for `inspect` and memory checks.
pub fn plan_for(model: &DitModel, opts: &CpuOptions) -> Plan {
    let threads = resolve_threads(opts.threads).min(1024);
    let rows = planned_rows(opts).max(1);
    if check_plan_size(&model.config, rows).is_err() {
        let mut p = Plan::new(format!("CPU forward plan ({rows} rows): too large to plan"));
        p.add("unplannable", &[usize::MAX], Dt::F32);
        return p;
    }
    let (mut p, _) = plan(&model.config, rows, threads, &opts.cache);
    add_weight_notes(&mut p, model);
    p
}

fn add_weight_notes(p: &mut Plan, model: &DitModel) {
    p.outside("weights, memory-mapped file(s)", model.file_bytes());
    p.outside("weights converted to f32 at load", model.store.owned_bytes());
}

/// Packs every factor of `f` into the planned buffer `buf` at the offsets of `at`.
fn pack_factors(
    gemm: &Gemmer,
    f: &crate::factors::Factors,
    at: &[PackedFactors],
    cfg: &DitConfig,
    arena: &Arena,
    buf: &crate::plan::Buffer,
) {
    // SAFETY: the buffer was planned for exactly these factors and nothing else uses it yet.
    let out = unsafe { std::slice::from_raw_parts_mut(arena.f32_ptr(buf), buf.elems()) };
    let (c, m) = (cfg.hidden_size, cfg.mlp_hidden());
    for (b, pf) in f.blocks.iter().zip(at) {
        gemm.pack_b_whole(BMat::weight(f.w(b.qkv_down), c), b.qkv_rank(), c, &mut out[pf.qkv_down..]);
        for t in LayerType::ALL {
            let ((out_f, inp), l) = (t.shape(c, m), b.get(t));
            if matches!(t, LayerType::Proj | LayerType::Fc1 | LayerType::Fc2) {
                gemm.pack_b_whole(BMat::weight(f.w(l.down), inp), l.rank, inp, &mut out[pf.down[t as usize]..]);
            }
            gemm.pack_b_whole(BMat::weight(f.w(l.up), l.rank), out_f, l.rank, &mut out[pf.up[t as usize]..]);
        }
    }
}

fn resolve_threads(threads: usize) -> usize {
    if threads > 0 {
        threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// The steps [`CpuEngine::condition_ahead`] conditioned.
#[derive(Clone, Copy, Debug)]
struct Ahead {
    steps: usize,
    rows: usize,
}

/// A DiT ready to run on the CPU.
pub struct CpuEngine {
    model: Arc<DitModel>,
    pool: ThreadPool,
    gemm: Gemmer,
    plan: Plan,
    arena: Arena,
    bufs: ForwardBuffers,
    max_rows: usize,
    freqs: [f32; FREQ_DIM / 2],
    /// Staged request: timesteps (as f32, as the model casts them) and labels, one per
    /// conditioning row.
    t: Vec<f32>,
    y: Vec<usize>,
    /// What the conditioning buffers hold for [`CpuEngine::forward_step_ahead`]: `steps`
    /// steps of `rows` rows each (`None` after anything else wrote them).
    ahead: Option<Ahead>,
    /// The first modulation row of the pass being run (step j of [`Ahead`]: j · rows).
    mod_base: usize,
    cache: CacheMode,
    /// Rows of the last full step, whose activations the caches hold.
    cached_rows: Option<usize>,
    /// Taylor forecasting's numbers for the next pass ([`CpuEngine::set_forecast_step`]).
    forecast_step: ForecastStep,
}

impl CpuEngine {
    /// Plans and allocates everything a forward pass will need.
    pub fn new(model: Arc<DitModel>, opts: &CpuOptions) -> Result<Self> {
        let max_rows = planned_rows(opts);
        if max_rows == 0 {
            return Err(Error::invalid("max batch", "must be at least 1"));
        }
        let threads = resolve_threads(opts.threads);
        let isa = Isa::resolve(opts.isa)?;
        if threads > 1024 {
            return Err(Error::invalid("threads", format!("{threads} is more than 1024")));
        }
        check_plan_size(&model.config, max_rows)?;
        opts.cache.check_depth(model.config.depth)?;
        let (mut plan, bufs) = plan(&model.config, max_rows, threads, &opts.cache);
        add_weight_notes(&mut plan, &model);
        let mut need = crate::limits::MemoryNeed::default();
        need.alloc(plan.title.clone(), plan.total_bytes() as u64);
        need.check("the CPU forward pass", None)?;
        let arena = Arena::new(&plan)?;
        let pool = ThreadPool::new(threads)
            .map_err(|e| Error::invalid("threads", format!("cannot start {threads} threads: {e}")))?;
        let freqs = embed::timestep_freqs(model.numerics);
        let gemm = Gemmer::new(isa);
        if let (Some(f), Some(id)) = (opts.cache.factors(), bufs.factors_packed) {
            pack_factors(&gemm, f, &bufs.packed_at, &model.config, &arena, plan.get(id));
        }
        Ok(CpuEngine {
            model,
            pool,
            gemm,
            plan,
            arena,
            bufs,
            max_rows,
            freqs,
            t: vec![0.0; conditioning_rows(max_rows)],
            y: vec![0; conditioning_rows(max_rows)],
            ahead: None,
            mod_base: 0,
            cache: opts.cache.clone(),
            cached_rows: None,
            forecast_step: ForecastStep::REUSE,
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    pub fn model(&self) -> &Arc<DitModel> {
        &self.model
    }
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }
    /// The instruction-set path the engine runs (its GEMM kernel and elementwise loops).
    pub fn isa(&self) -> Isa {
        self.gemm.isa()
    }
    /// The name of [`CpuEngine::isa`], as reports print it.
    pub fn gemm_kernel(&self) -> &'static str {
        self.gemm.name()
    }

    /// Runs one operation of the forward pass on whatever the engine's buffers hold, for
    /// per-op benchmarks (`benches/cpu_forward.rs`); `rows` ≤ the planned rows. The result is
    /// meaningless; the cost is that of the op inside a forward pass.
    pub fn bench_op(&mut self, op: BenchOp, rows: usize) {
        use forward::DitOps;
        let rows = rows.min(self.max_rows);
        match op {
            BenchOp::Attention => self.attention(Act::Qkv, Act::Attn, rows),
            BenchOp::NormModulate => {
                let (shift, scale) = (ModChunk::block(0, chunk::SHIFT_MSA), ModChunk::block(0, chunk::SCALE_MSA));
                self.norm_modulate(Act::H, Norm { shift, scale, eps: 1e-6 }, rows)
            }
        }
    }

    /// One model evaluation: `x` (B, Cin, I, I), `t` original timesteps 0..=999, `y` labels
    /// (the null class allowed) → `out` (B, Cout, I, I). Allocates nothing.
    pub fn forward(&mut self, x: &[f32], t: &[i64], y: &[i64], out: &mut [f32]) -> Result<()> {
        self.forward_step(x, t, y, out, StepKind::Plain)
    }

    /// A forward pass of the given kind: `Full` refreshes the caches, `Calibrated` and
    /// `Reuse` use them (and need a full step with the same rows before them).
    pub fn forward_step(&mut self, x: &[f32], t: &[i64], y: &[i64], out: &mut [f32], kind: StepKind) -> Result<()> {
        policy::check_step(kind, &self.cache, self.cached_rows, t.len())?;
        let rows = self.stage(x, t, y)?;
        self.check_output(rows, out)?;
        self.ahead = None;
        self.mod_base = 0;
        forward::conditioning(self, rows);
        self.run_pass(rows, out, kind);
        Ok(())
    }

    /// How many steps [`CpuEngine::condition_ahead`] conditions at once for `rows` model rows:
    /// ⌊[`AHEAD_ROWS`] / rows⌋, at least 1.
    pub fn ahead_steps(&self, rows: usize) -> usize {
        (self.t.len() / rows.max(1)).max(1)
    }

    /// Computes the conditioning (timestep and label embedding, every modulation vector) of
    /// `t.len()` steps of one request at once: step j's rows are timestep `t[j]` with the
    /// labels `y`. The modulation GEMM over steps × rows rows reads the adaLN weights once
    /// for all of them, as the GPU pipeline does for a whole request. Each row's values are
    /// those [`CpuEngine::forward_step`] computes (the GEMM sums every element in the same
    /// order whatever the row count). At most [`CpuEngine::ahead_steps`] steps.
    pub fn condition_ahead(&mut self, t: &[i64], y: &[i64]) -> Result<()> {
        let (steps, rows) = (t.len(), y.len());
        if rows == 0 || rows > self.max_rows {
            return Err(Error::invalid(
                "batch",
                format!("{rows} rows; this engine was planned for 1..={} rows", self.max_rows),
            ));
        }
        if steps == 0 || steps > self.ahead_steps(rows) {
            return Err(Error::invalid(
                "conditioned steps",
                format!("{steps} steps of {rows} rows; expected 1..={}", self.ahead_steps(rows)),
            ));
        }
        self.ahead = None;
        for (j, &tj) in t.iter().enumerate() {
            for (r, &yr) in y.iter().enumerate() {
                self.stage_condition(j * rows + r, tj, yr)?;
            }
        }
        forward::conditioning(self, steps * rows);
        self.ahead = Some(Ahead { steps, rows });
        Ok(())
    }

    /// A forward pass of the given kind, as [`CpuEngine::forward_step`], on step `step` of the
    /// last [`CpuEngine::condition_ahead`] (its timestep and labels); `x` holds its rows.
    pub fn forward_step_ahead(&mut self, x: &[f32], step: usize, out: &mut [f32], kind: StepKind) -> Result<()> {
        let Some(ahead) = self.ahead.filter(|a| step < a.steps) else {
            let held = self.ahead.map_or(0, |a| a.steps);
            return Err(Error::invalid(
                "conditioned step",
                format!("step {step} of the steps conditioned ahead, which hold {held}"),
            ));
        };
        let rows = ahead.rows;
        policy::check_step(kind, &self.cache, self.cached_rows, rows)?;
        self.stage_input(x, rows)?;
        self.check_output(rows, out)?;
        self.mod_base = step * rows;
        self.run_pass(rows, out, kind);
        Ok(())
    }

    /// The forward pass proper, on staged inputs and computed conditioning.
    fn run_pass(&mut self, rows: usize, out: &mut [f32], kind: StepKind) {
        let (cfg, eps) = (self.model.config, self.model.mlp_norm_eps);
        forward::forward(self, &cfg, eps, rows, kind);
        if kind.refreshes_caches() {
            self.cached_rows = Some(rows);
        }
        out.copy_from_slice(&self.slice(self.bufs.image)[..out.len()]);
    }

    fn check_output(&self, rows: usize, out: &[f32]) -> Result<()> {
        let need = rows * self.model.config.output_elems();
        if out.len() != need {
            return Err(Error::invalid(
                "output buffer",
                format!("has {} elements, expected {need} ({rows} × Cout × I × I)", out.len()),
            ));
        }
        Ok(())
    }

    /// The numbers the next Taylor-full or forecast pass uses (the sampling loop sets each
    /// step's, [`crate::policy::forecast_step`]); [`ForecastStep::REUSE`] until set.
    pub fn set_forecast_step(&mut self, step: ForecastStep) {
        self.forecast_step = step;
    }

    /// Rows of the last full step, whose activations the caches hold (`None`: none yet).
    pub fn cached_rows(&self) -> Option<usize> {
        self.cached_rows
    }

    /// The activations a full step left in a cache slot: (rows, N, width), for the rows
    /// of the last full step. `None` without caches or before any full step.
    pub fn cache_slot(&self, block: usize, slot: Slot) -> Option<&[f32]> {
        let rows = self.cached_rows?;
        let id = (*self.bufs.cache.get(block)?.get(slot as usize)?)?;
        let len = rows * self.model.config.tokens() * slot.width(&self.model.config);
        Some(&self.slice(id)[..len])
    }

    /// Validates a request and copies it into the arena; returns the row count.
    fn stage(&mut self, x: &[f32], t: &[i64], y: &[i64]) -> Result<usize> {
        let rows = t.len();
        if rows == 0 || rows > self.max_rows {
            return Err(Error::invalid(
                "batch",
                format!("{rows} rows; this engine was planned for 1..={} rows", self.max_rows),
            ));
        }
        if y.len() != rows {
            return Err(Error::invalid(
                "request shapes",
                format!("t has {} elements and y {}; expected {rows} for both", t.len(), y.len()),
            ));
        }
        self.stage_input(x, rows)?;
        for (r, (&tr, &yr)) in t.iter().zip(y).enumerate() {
            self.stage_condition(r, tr, yr)?;
        }
        Ok(rows)
    }

    /// Validates the latents of `rows` rows and copies them into the arena.
    fn stage_input(&mut self, x: &[f32], rows: usize) -> Result<()> {
        let cfg = &self.model.config;
        if x.len() != rows * cfg.image_elems() {
            return Err(Error::invalid(
                "request shapes",
                format!(
                    "x has {} elements; expected {rows} × {} × {} × {}",
                    x.len(),
                    cfg.in_channels,
                    cfg.input_size,
                    cfg.input_size
                ),
            ));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("x", format!("element {i} is {}", x[i])));
        }
        self.slice_mut(self.bufs.input)[..x.len()].copy_from_slice(x);
        Ok(())
    }

    /// Validates one conditioning row's timestep and label and stages them as row `r`.
    fn stage_condition(&mut self, r: usize, t: i64, y: i64) -> Result<()> {
        let cfg = &self.model.config;
        if !(0..1000).contains(&t) {
            return Err(Error::invalid("timestep", format!("t[{r}] = {t}; expected 0..=999")));
        }
        if !(0..cfg.label_rows() as i64).contains(&y) {
            return Err(Error::invalid(
                "class label",
                format!("y[{r}] = {y}; expected 0..{} (or {} for unconditional)", cfg.num_classes, cfg.null_class()),
            ));
        }
        self.t[r] = t as f32;
        self.y[r] = y as usize;
        Ok(())
    }

    fn slice(&self, id: BufId) -> &[f32] {
        let b = self.plan.get(id);
        // SAFETY: the arena was sized by this plan; shared borrow of self.
        unsafe { std::slice::from_raw_parts(self.arena.f32_ptr(b), b.elems()) }
    }

    fn slice_mut(&mut self, id: BufId) -> &mut [f32] {
        let b = self.plan.get(id);
        // SAFETY: as `slice`, and `&mut self` excludes other borrows.
        unsafe { std::slice::from_raw_parts_mut(self.arena.f32_ptr(b), b.elems()) }
    }

    /// Raw access to a buffer for ops that read one buffer while writing another.
    /// The modulation vectors of the pass being run: row r's at r · modulation width.
    fn modulations_ptr(&self) -> SendPtr {
        let (m, _) = self.ptr(self.bufs.modv);
        // SAFETY: mod_base ≤ the conditioning rows − rows: set with a checked step index.
        SendPtr(unsafe { m.get().add(self.mod_base * forward::modulation_width(&self.model.config)) })
    }

    fn ptr(&self, id: BufId) -> (SendPtr, usize) {
        let b = self.plan.get(id);
        (SendPtr(self.arena.f32_ptr(b)), b.elems())
    }

    fn act_buf(&self, a: Act) -> BufId {
        match a {
            Act::X => self.bufs.x,
            Act::H => self.bufs.h,
            Act::Qkv => self.bufs.qkv,
            Act::Attn => self.bufs.attn,
            Act::Y => self.bufs.y,
            Act::Mlp => self.bufs.mlp,
            Act::Out => self.bufs.out,
            Act::Cache(i, slot) => match self.bufs.cache.get(i).and_then(|b| b[slot as usize]) {
                Some(id) => id,
                // check_step refuses every kind whose slots the policy did not plan.
                None => unreachable!("cache slot {} of block {i} is not planned under this policy", slot.name()),
            },
        }
    }

    /// An arena buffer as a read-only slice of `len` elements.
    ///
    /// # Safety
    /// No `&mut` to the same buffer may be alive (ops pass distinct buffers by construction).
    unsafe fn view(&self, id: BufId, len: usize) -> &[f32] {
        let (p, total) = self.ptr(id);
        assert!(len <= total, "view past the end of `{}`", self.plan.get(id).name);
        std::slice::from_raw_parts(p.get(), len)
    }

    /// C = A·Bᵀ (+ bias, + added matrix, activation) on the pool, with the shared scratch.
    fn gemm(&self, g: &Gemm) {
        let (sp, slen) = self.ptr(self.bufs.gemm_scratch);
        let (pp, plen) = self.ptr(self.bufs.gemm_packed_a);
        // SAFETY: the scratch buffers are used by nothing else during the call.
        let (scratch, packed) =
            unsafe { (std::slice::from_raw_parts_mut(sp.get(), slen), std::slice::from_raw_parts_mut(pp.get(), plen)) };
        self.gemm.run(&self.pool, scratch, packed, g);
    }

    /// dst[m, n] = A[m, k]·Wᵀ + b with A, dst arena buffers and W, b a weight and bias.
    #[allow(clippy::too_many_arguments)]
    fn linear_weights(
        &self,
        a: BufId,
        w: &[f32],
        bias: &[f32],
        c: BufId,
        m: usize,
        n: usize,
        k: usize,
        act: gemm::Act,
    ) {
        assert!(a != c, "GEMM input and output alias");
        let (cp, clen) = self.ptr(c);
        assert!(m * n <= clen, "GEMM output too small");
        // SAFETY: a and c are distinct arena buffers.
        let a = unsafe { self.view(a, m * k) };
        self.gemm(&Gemm {
            m,
            n,
            k,
            a,
            a_minus: None,
            lda: k,
            conv: None,
            b: BMat::weight(w, k),
            bias: Some(bias),
            add: None,
            act,
            c: cp,
            ldc: n,
        });
    }

    /// Runs `f(range)` over `0..total` split across the pool.
    fn par(&self, total: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
        self.pool.par(total, f)
    }
}
