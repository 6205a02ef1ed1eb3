//! PixArt-α on the GPU pipeline's device (issue 23): [`PixArtGpu`] runs the forward pass
//! written once in [`crate::pixart::forward`] as kernel launches, from one arena planned before
//! anything is allocated — the f16 weights and icc factors, the caption's cross-attention K/V
//! of every block (computed once per request), the adaLN-single conditioning, the activations
//! and every block's cache slots. It serves the same calls as the CPU's
//! [`PixArtCpu`](crate::pixart::PixArtCpu) (stage the caption, stage the inputs, run a pass of a
//! step kind, read the output), so [`PixArtEngine`](crate::pixart::PixArtEngine)'s sampling loop
//! drives either (`PixArtRunner`).
//!
//! What runs on the device: the caption projection and every block's K/V; per pass the
//! timestep embedding, adaLN-single and every modulation vector; the whole transformer
//! (DiT's GEMM with its fused epilogues, LayerNorm-modulate, gated residuals, the flash
//! self-attention at head dim 72 or `attention_rows_f16` at other head dims, the masked
//! cross-attention of kernels/pixart.cu, icc's fused low-rank kernel or its two-GEMM fallback
//! in the direct form); unpatchify; guidance and the DPM-Solver++/DDIM update
//! (`PixArtDeviceSteps`: the latents stay on the device; each step uploads its timesteps and
//! update numbers and replays the recorded graph of its step kind, for full-size requests).
//!
//! Files: this one (the backend, uploads, staging, passes), `plan.rs` (the arena), `ops.rs`
//! (`PixArtOps` as launches), `steps.rs` (sampling steps on the device, the engine on it).
//!
//! Precision as DiT's pipeline: weights, activations and caches f16; GEMMs and reductions
//! accumulate in f32; the residual stream, the timestep embedding, t_mod and the output f32.

mod ops;
mod plan;
mod steps;

pub use steps::PixArtGpuEngine;

use std::sync::Arc;

use crate::embed;
use crate::error::{Error, Result};
use crate::forward::StepKind;
use crate::gpu::launch;
use crate::gpu::pipeline::F16Staging;
use crate::gpu::{f16, DevSlice, DevType, Device};
use crate::pixart::checks;
use crate::pixart::forward as pforward;
use crate::pixart::{Layer, PixArtCache, PixArtModel};
use crate::plan::{BufId, Plan};
use ops::Pass;

/// The sampler's numbers of a step, uploaded before it with the rows' timesteps.
const STEP_IN: usize = 6;
/// Request state slots of the first step whose model output / updated latents were not finite.
const BAD_OUTPUT: i32 = 1;
const BAD_LATENTS: i32 = 2;

/// How to size a PixArt forward pass on a device.
#[derive(Clone, Debug)]
pub struct PixArtGpuOptions {
    /// Model rows (images, twice that under guidance).
    pub max_rows: usize,
    /// Longest caption (tokens) a request may give.
    pub max_text_len: usize,
    pub cache: PixArtCache,
}

impl Default for PixArtGpuOptions {
    fn default() -> Self {
        PixArtGpuOptions { max_rows: 1, max_text_len: 120, cache: PixArtCache::None }
    }
}

/// A cached linear's factors on the device.
#[derive(Clone, Copy, Debug)]
struct DevFactors {
    down: BufId,
    up: BufId,
    rank: usize,
}

struct Buffers {
    /// Per layer ([`Layer::index`]): weight (out, in) and bias, f16.
    linears: Vec<(BufId, BufId)>,
    patch_w: BufId,
    patch_b: BufId,
    pos: BufId,
    /// Every block's scale_shift_table, then the final one, f32.
    tables: BufId,
    freqs: BufId,
    /// Per layer index, icc's factors of the cached linears.
    factors: Vec<Option<DevFactors>>,
    input: BufId,
    /// This step's six update numbers, then the timestep of every row (f32).
    step_in: BufId,
    tfreq: BufId,
    temb_h: BufId,
    emb: BufId,
    silu_emb: BufId,
    tmod: BufId,
    modv: BufId,
    text: BufId,
    cap_h: BufId,
    cap: BufId,
    mask_bias: BufId,
    /// Per block, cross-attention's K and V of the caption, (rows, L, C) f16.
    cross: Vec<[BufId; 2]>,
    patches: BufId,
    x: BufId,
    /// The residual stream rounded to f16 (the input of cross-attention's q).
    xh: BufId,
    h: BufId,
    /// q | k | v, (rows, N, 3C).
    qkv: BufId,
    attn: BufId,
    y: BufId,
    mlp: BufId,
    out: BufId,
    image: BufId,
    /// (rows, C) ones: the gate of an ungated residual add.
    ones: BufId,
    /// The 1024-MS model's micro-condition embedding per row, (rows, C) f16, added to `emb` by
    /// the GEMM that makes it; `None` for models without micro-conditions.
    size_emb: Option<BufId>,
    /// Per block, the cache slots in [`Slot::ALL`] order (q, k and v's outputs share one
    /// (rows, N, 3C) buffer); empty without caching.
    cache: Vec<[BufId; 14]>,
    /// The two-GEMM calibrated path's rank-r intermediate.
    lowrank: Option<BufId>,
    split_ws: BufId,
    /// Sampling on the device: the request's latents and last x̂₀ (images, C, S, S), and the
    /// request state (i32: the step, the first step whose model output or latents were not
    /// finite, −1 while none).
    latents: BufId,
    x0: BufId,
    state: BufId,
}

/// A PixArt-α transformer on a device, ready to run passes.
pub struct PixArtGpu<D: Device> {
    model: Arc<PixArtModel>,
    /// One recorded sampling step per step kind of the cache policy, for full-size requests
    /// (declared before `dev`: dropped while the device still exists), and the (caption
    /// length, images, guided) they were recorded for.
    graphs: Vec<(StepKind, D::Graph)>,
    graph_key: Option<(usize, usize, bool)>,
    dev: D,
    plan: Plan,
    bufs: Buffers,
    max_rows: usize,
    max_text_len: usize,
    text_len: usize,
    cache: PixArtCache,
    cached_rows: Option<usize>,
    /// Host staging of the caption (f16), its mask bias and the output.
    text_host: Vec<f16>,
    bias_host: Vec<f32>,
    out_host: Vec<f32>,
    /// Sampling on the device: every step's six update numbers, the request's images,
    /// guidance, and the host staging of a step's numbers and timesteps.
    coeffs_host: Vec<f32>,
    images: usize,
    guided: bool,
    cfg_scale: f32,
    step_host: Vec<f32>,
    /// Micro-conditions: rows staged by [`PixArtGpu::stage_size`], their embedding computed
    /// on the host (f32, then f16 for the upload), its scratch, and the sinusoid's frequencies.
    size_rows: usize,
    size_host: Vec<f32>,
    size_h16: Vec<f16>,
    size_scratch: Vec<f32>,
    freqs: [f32; crate::config::FREQ_DIM / 2],
}

impl<D: Device> PixArtGpu<D> {
    /// Plans the arena, opens the device on it (`open`, e.g. `EmuDevice::new`) and uploads
    /// the weights (and factors) in f16.
    pub fn new(
        model: Arc<PixArtModel>,
        opts: &PixArtGpuOptions,
        open: impl FnOnce(&Plan) -> Result<D>,
    ) -> Result<Self> {
        let cfg = model.config;
        let rows = opts.max_rows;
        if rows == 0 || rows > 1 << 15 {
            return Err(Error::invalid("max batch", format!("{rows} model rows: must be 1 to 32768")));
        }
        if opts.max_text_len == 0 || opts.max_text_len > 4096 {
            return Err(Error::invalid("text length", format!("{} tokens: must be 1 to 4096", opts.max_text_len)));
        }
        if cfg.head_dim as i32 > launch::ATTENTION_ROWS_MAX_HEAD_DIM {
            return Err(Error::invalid(
                "GPU pipeline",
                format!(
                    "head dim {}: PixArt's attention kernels take at most {}",
                    cfg.head_dim,
                    launch::ATTENTION_ROWS_MAX_HEAD_DIM
                ),
            ));
        }
        if cfg.hidden_size() % 8 != 0 || cfg.caption_channels % 8 != 0 {
            return Err(Error::invalid(
                "GPU pipeline",
                format!(
                    "hidden size {} and caption channels {} must be multiples of 8 (16-byte rows for the GEMM)",
                    cfg.hidden_size(),
                    cfg.caption_channels
                ),
            ));
        }
        if let PixArtCache::Icc(f) = &opts.cache {
            f.check(&model)?;
        }
        // Latents of another size than the trained square (resolution binning's bins) run on the
        // CPU backend only for now: patchify, the position table and unpatchify here take the
        // square `sample_size` side. (The 1024-MS model at its trained 1024² runs here.)
        if (cfg.height, cfg.width) != (cfg.sample_size, cfg.sample_size) {
            return Err(Error::invalid(
                "GPU pipeline",
                format!(
                    "latent {}×{} differs from the trained {}×{} (`sample_size`): other sizes run on the CPU \
                     backend only for now (--backend cpu)",
                    cfg.height, cfg.width, cfg.sample_size, cfg.sample_size
                ),
            ));
        }
        let (plan, bufs) = plan::plan(&model, rows, opts.max_text_len, &opts.cache);
        if let Some(big) = plan.buffers().iter().find(|b| i32::try_from(b.elems()).is_err()) {
            return Err(Error::invalid(
                "GPU pipeline",
                format!(
                    "buffer `{}` would hold {} elements, past 32-bit kernel indices; lower the batch",
                    big.name,
                    big.elems()
                ),
            ));
        }
        let dev = open(&plan)?;
        launch::check_sm90(&dev, dev.slice::<f32>(plan.get(bufs.split_ws))?)?;
        let l = opts.max_text_len;
        let size_scratch = if cfg.use_additional_conditions { crate::pixart::micro::scratch_len(&model) } else { 0 };
        let mut g = PixArtGpu {
            model,
            graphs: Vec::new(),
            graph_key: None,
            dev,
            plan,
            bufs,
            max_rows: rows,
            max_text_len: l,
            text_len: 0,
            cache: opts.cache.clone(),
            cached_rows: None,
            text_host: vec![f16::ZERO; rows * l * cfg.caption_channels],
            bias_host: vec![0.0; rows * l],
            out_host: vec![0.0; rows * cfg.out_elems()],
            coeffs_host: Vec::new(),
            images: 0,
            guided: false,
            cfg_scale: 1.0,
            step_host: vec![0.0; STEP_IN + rows],
            size_rows: 0,
            size_host: vec![0.0; if cfg.use_additional_conditions { rows * cfg.hidden_size() } else { 0 }],
            size_h16: vec![f16::ZERO; if cfg.use_additional_conditions { rows * cfg.hidden_size() } else { 0 }],
            size_scratch: vec![0.0; size_scratch],
            freqs: embed::timestep_freqs(crate::config::Numerics::Official),
        };
        g.upload()?;
        g.dev.synchronize()?;
        Ok(g)
    }

    pub fn model(&self) -> &Arc<PixArtModel> {
        &self.model
    }
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    pub fn device(&self) -> &D {
        &self.dev
    }
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }
    pub fn max_text_len(&self) -> usize {
        self.max_text_len
    }
    pub fn cache(&self) -> &PixArtCache {
        &self.cache
    }
    /// Rows of the last full step, whose activations the caches hold.
    pub fn cached_rows(&self) -> Option<usize> {
        self.cached_rows
    }

    fn slice<T: DevType>(&self, id: BufId) -> Result<DevSlice<T>> {
        self.dev.slice::<T>(self.plan.get(id))
    }

    /// Weights and factors in f16, the modulation tables and timestep frequencies in f32, the
    /// ones of the ungated residual.
    fn upload(&mut self) -> Result<()> {
        let model = Arc::clone(&self.model);
        let (cfg, t) = (model.config, &model.tensors);
        let mut staging = F16Staging::new();
        let b = &self.bufs;
        for (layer, &(w, bias)) in Layer::all(cfg.depth).zip(&b.linears) {
            let (lw, lb) = model.linear(layer);
            staging.put(&self.dev, self.slice(w)?, lw)?;
            staging.put(&self.dev, self.slice(bias)?, lb)?;
        }
        staging.put(&self.dev, self.slice(b.patch_w)?, model.w(t.patch_w))?;
        staging.put(&self.dev, self.slice(b.patch_b)?, model.w(t.patch_b))?;
        staging.put(&self.dev, self.slice(b.pos)?, model.w(t.pos_embed))?;
        let c = cfg.hidden_size();
        let tables = self.slice::<f32>(b.tables)?;
        for (i, &tab) in t.block_tables.iter().enumerate() {
            self.dev.upload(tables.sub(6 * i * c, 6 * c)?, model.w(tab))?;
        }
        self.dev.upload(tables.sub(6 * cfg.depth * c, 2 * c)?, model.w(t.final_table))?;
        self.dev.upload(self.slice::<f32>(b.freqs)?, &embed::timestep_freqs(crate::config::Numerics::Official))?;
        let ones = self.slice::<f16>(b.ones)?;
        self.dev.upload(ones, &vec![f16::ONE; ones.len()])?;
        if let PixArtCache::Icc(f) = &self.cache {
            let f = Arc::clone(f);
            for layer in Layer::all(cfg.depth) {
                if let (Some(df), Some(lf)) = (b.factors[layer.index(cfg.depth)], f.get(layer)) {
                    staging.put(&self.dev, self.slice(df.down)?, f.w(lf.down))?;
                    staging.put(&self.dev, self.slice(df.up)?, f.w(lf.up))?;
                }
            }
        }
        Ok(())
    }

    /// Stages `rows` model rows: latents (rows, Cin, S, S) and timesteps.
    pub fn stage_inputs(&mut self, x: &[f32], t: &[f32], rows: usize) -> Result<()> {
        checks::check_inputs(&self.model.config, self.max_rows, x, t, rows)?;
        self.dev.upload(self.slice::<f32>(self.bufs.input)?.sub(0, x.len())?, x)?;
        self.dev.upload(self.slice::<f32>(self.bufs.step_in)?.sub(STEP_IN, rows)?, t)?;
        Ok(())
    }

    /// Stages the caption of `rows` rows — `text` (rows, L, D), `mask` (rows, L) of 0/1 — and
    /// computes the caption projection and every block's cross-attention K and V (once per
    /// request).
    pub fn stage_text(&mut self, text: &[f32], mask: &[i64], rows: usize, len: usize) -> Result<()> {
        checks::check_text(&self.model.config, self.max_rows, self.max_text_len, text, mask, rows, len)?;
        for (h, &v) in self.text_host.iter_mut().zip(text) {
            *h = f16::from_f32(v);
        }
        for (b, &m) in self.bias_host.iter_mut().zip(mask) {
            *b = checks::mask_bias(m);
        }
        let (tb, mb) = (self.bufs.text, self.bufs.mask_bias);
        self.dev.upload(self.slice::<f16>(tb)?.sub(0, text.len())?, &self.text_host[..text.len()])?;
        self.dev.upload(self.slice::<f32>(mb)?.sub(0, mask.len())?, &self.bias_host[..mask.len()])?;
        self.text_len = len;
        let mut pass = Pass::new(self, None);
        pforward::PixArtOps::encode_caption(&mut pass, rows);
        pass.finish()
    }

    /// Stages the micro-conditions of `rows` rows (models with `use_additional_conditions`):
    /// `resolution` (rows, 2) as (height, width) in pixels and `aspect` (rows) = height / width.
    /// Their embedding is computed on the host in f32 (as the CPU backend computes it), once
    /// per request, and uploaded in f16; the conditioning adds it to `emb`.
    pub fn stage_size(&mut self, resolution: &[f32], aspect: &[f32], rows: usize) -> Result<()> {
        let Some(buf) = self.bufs.size_emb else {
            return Err(Error::invalid(
                "micro-conditions",
                "this model has no use_additional_conditions: it takes no resolution or aspect ratio",
            ));
        };
        let c = self.model.config.hidden_size();
        crate::pixart::micro::size_embeddings(
            &self.model,
            resolution,
            aspect,
            rows,
            self.max_rows,
            &self.freqs,
            &mut self.size_scratch,
            &mut self.size_host,
        )?;
        for (h, &v) in self.size_h16.iter_mut().zip(&self.size_host[..rows * c]) {
            *h = f16::from_f32(v);
        }
        self.dev.upload(self.slice::<f16>(buf)?.sub(0, rows * c)?, &self.size_h16[..rows * c])?;
        self.size_rows = rows;
        Ok(())
    }

    /// One forward pass of `kind` over the staged rows (after
    /// [`stage_text`](Self::stage_text) and [`stage_inputs`](Self::stage_inputs)); the output,
    /// copied back, is [`output`](Self::output).
    pub fn run(&mut self, rows: usize, kind: StepKind) -> Result<()> {
        self.pass(rows, kind, None)?;
        let n = rows * self.model.config.out_elems();
        let image = self.slice::<f32>(self.bufs.image)?.sub(0, n)?;
        self.dev.download(image, &mut self.out_host[..n])?;
        Ok(())
    }

    /// Checks and runs the conditioning and a forward pass of `kind` on `rows` rows, their
    /// latents the staged inputs, or the sampler's `images` latents (row r reads image
    /// r mod images).
    fn pass(&mut self, rows: usize, kind: StepKind, images: Option<usize>) -> Result<()> {
        self.check(rows, kind)?;
        self.forward_launches(rows, kind, images)?;
        if kind == StepKind::Full {
            self.cached_rows = Some(rows);
        }
        Ok(())
    }

    /// The conditioning and forward pass's launches (no checks).
    fn forward_launches(&self, rows: usize, kind: StepKind, images: Option<usize>) -> Result<()> {
        let cfg = self.model.config;
        let mut pass = Pass::new(self, images);
        pforward::PixArtOps::conditioning(&mut pass, rows);
        pforward::forward(&mut pass, &cfg, rows, kind);
        pass.finish()
    }

    /// A sampling step's launches on the request's latents: the pass, guidance and the update
    /// with the numbers in `step_in`.
    fn step_launches(&self, kind: StepKind) -> Result<()> {
        let n = self.images;
        let rows = if self.guided { 2 * n } else { n };
        self.forward_launches(rows, kind, Some(n))?;
        let cfg = self.model.config;
        let b = &self.bufs;
        let state = self.slice::<i32>(b.state)?;
        let out_len = (rows * cfg.out_elems()) as i32;
        launch::check_finite_f32(&self.dev, self.slice(b.image)?, out_len, state, BAD_OUTPUT)?;
        launch::pixart_sampler_step_f32(
            &self.dev,
            self.slice(b.latents)?,
            self.slice(b.x0)?,
            self.slice(b.image)?,
            self.slice::<f32>(b.step_in)?.sub(0, STEP_IN)?,
            n as i32,
            cfg.image_elems() as i32,
            cfg.out_elems() as i32,
            self.guided,
            self.cfg_scale,
        )?;
        launch::check_finite_f32(
            &self.dev,
            self.slice(b.latents)?,
            (n * cfg.image_elems()) as i32,
            state,
            BAD_LATENTS,
        )?;
        launch::step_advance(&self.dev, state)
    }

    /// Recorded graphs in use (one per step kind of the cache policy, once a full-size
    /// request has begun).
    pub fn graphs(&self) -> usize {
        self.graphs.len()
    }

    /// A pass of `kind` on `rows` rows may run: a caption staged, rows in range, the kind in
    /// the policy, a full step on the same rows before a cached one.
    fn check(&self, rows: usize, kind: StepKind) -> Result<()> {
        let staged = checks::Staged {
            max_rows: self.max_rows,
            text_len: self.text_len,
            size_rows: self.bufs.size_emb.map(|_| self.size_rows),
            cached_rows: self.cached_rows,
            policy: self.cache.policy(),
        };
        checks::check_pass(&staged, rows, kind)
    }

    /// Device time of one pass of `kind` on `rows` staged rows, in ms: the mean over `iters`
    /// passes between two device events (a full pass first for the cached kinds; nothing is
    /// copied back). For `icdit bench-gpu --pixart`.
    pub fn time_pass(&mut self, rows: usize, kind: StepKind, iters: usize) -> Result<f32> {
        if matches!(kind, StepKind::Calibrated | StepKind::Reuse) {
            self.pass(rows, StepKind::Full, None)?;
        }
        let iters = iters.max(1);
        let start = self.dev.record_event()?;
        for _ in 0..iters {
            self.pass(rows, kind, None)?;
        }
        let end = self.dev.record_event()?;
        self.dev.synchronize()?;
        Ok(self.dev.elapsed_ms(&start, &end)? / iters as f32)
    }

    /// The last pass's output, (rows, Cout, S, S).
    pub fn output(&self, rows: usize) -> &[f32] {
        &self.out_host[..rows * self.model.config.out_elems()]
    }
}
