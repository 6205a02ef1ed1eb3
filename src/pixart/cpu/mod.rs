//! The CPU backend of PixArt-α: f32, multi-threaded, every buffer in one arena planned at
//! construction, weights read from the mapped checkpoint; the [`PixArtOps`] themselves are in
//! `ops.rs`. After `new`, staging a request and running forward passes allocate nothing.

mod ops;

use std::sync::Arc;

use super::checks;
use super::factors::PixArtFactors;
use super::forward::{self, modulation_width, Act, PixArtOps, Slot};
use super::weights::{Layer, PixArtModel};
use crate::config::{Numerics, FREQ_DIM};
use crate::cpu::gemm::{self, BMat, Gemm, Gemmer};
use crate::cpu::math;
use crate::cpu::pool::{split, SendPtr, ThreadPool};
use crate::embed;
use crate::error::{Error, Result};
use crate::forward::{Activation, StepKind};
use crate::isa::Isa;
use crate::plan::{Arena, BufId, Dt, Plan};
use crate::policy::CachePolicy;

/// Which block caches a PixArt engine keeps.
#[derive(Clone, Debug, Default)]
pub enum PixArtCache {
    #[default]
    None,
    Reuse,
    Icc(Arc<PixArtFactors>),
}

impl PixArtCache {
    pub fn policy(&self) -> CachePolicy {
        match self {
            PixArtCache::None => CachePolicy::None,
            PixArtCache::Reuse => CachePolicy::Reuse,
            PixArtCache::Icc(_) => CachePolicy::Icc,
        }
    }
}

/// How to size a PixArt CPU forward pass.
#[derive(Clone, Debug)]
pub struct PixArtCpuOptions {
    /// Model rows (images, twice that under guidance).
    pub max_rows: usize,
    /// Longest caption (tokens) a request may give.
    pub max_text_len: usize,
    /// Worker threads including the caller; 0: all cores.
    pub threads: usize,
    pub cache: PixArtCache,
    pub isa: Option<Isa>,
}

impl Default for PixArtCpuOptions {
    fn default() -> Self {
        PixArtCpuOptions { max_rows: 1, max_text_len: 120, threads: 0, cache: PixArtCache::None, isa: None }
    }
}

struct Buffers {
    input: BufId,
    patches: BufId,
    x: BufId,
    h: BufId,
    q: BufId,
    k: BufId,
    v: BufId,
    attn: BufId,
    y: BufId,
    mlp: BufId,
    out: BufId,
    image: BufId,
    tfreq: BufId,
    temb: BufId,
    emb: BufId,
    silu_emb: BufId,
    tmod: BufId,
    modv: BufId,
    text: BufId,
    cap_h: BufId,
    cap: BufId,
    mask_bias: BufId,
    /// Per block, cross-attention's K and V of the caption.
    cross: Vec<[BufId; 2]>,
    gemm_scratch: BufId,
    packed_a: BufId,
    attn_scratch: BufId,
    /// Per block, the 14 cache slots ([`Slot::ALL`] order); empty without caching.
    cache: Vec<[BufId; 14]>,
    /// (x − x_s)·downᵀ of calibrated steps.
    lowrank: Option<BufId>,
    /// The micro-conditions' embedding per row (rows, C) and its scratch
    /// (`use_additional_conditions` only).
    size: Option<(BufId, BufId)>,
}

/// A PixArt-α transformer ready to run on the CPU.
pub struct PixArtCpu {
    model: Arc<PixArtModel>,
    pool: ThreadPool,
    gemm: Gemmer,
    plan: Plan,
    arena: Arena,
    bufs: Buffers,
    max_rows: usize,
    max_text_len: usize,
    freqs: [f32; FREQ_DIM / 2],
    /// Staged timesteps (f32, as the model casts them).
    t: Vec<f32>,
    /// Caption length of the staged request.
    text_len: usize,
    /// Rows whose micro-conditions are staged (models with `use_additional_conditions`).
    size_rows: usize,
    cache: PixArtCache,
    cached_rows: Option<usize>,
}

fn resolve_threads(threads: usize) -> usize {
    if threads > 0 {
        threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

fn gemm_act(a: Activation) -> gemm::Act {
    match a {
        Activation::None => gemm::Act::None,
        Activation::GeluTanh => gemm::Act::GeluTanh,
    }
}

impl PixArtCpu {
    pub fn new(model: Arc<PixArtModel>, opts: &PixArtCpuOptions) -> Result<Self> {
        let cfg = model.config;
        let rows = opts.max_rows;
        if rows == 0 || rows > 1 << 16 {
            return Err(Error::invalid("max batch", format!("{rows} model rows: must be 1 to 65536")));
        }
        if opts.max_text_len == 0 || opts.max_text_len > 4096 {
            return Err(Error::invalid("text length", format!("{} tokens: must be 1 to 4096", opts.max_text_len)));
        }
        let threads = resolve_threads(opts.threads);
        if threads > 1024 {
            return Err(Error::invalid("threads", format!("{threads} is more than 1024")));
        }
        if let PixArtCache::Icc(f) = &opts.cache {
            f.check(&model)?;
        }
        let isa = Isa::resolve(opts.isa)?;
        let (n, c, m, l) = (cfg.tokens(), cfg.hidden_size(), cfg.mlp_hidden(), opts.max_text_len);
        let p = cfg.patch_size;
        let patch_dim = cfg.in_channels * p * p;
        let mut plan = Plan::new(format!("PixArt CPU forward ({rows} rows, {l} text tokens)"));
        let mut add = |name: &str, len: usize| plan.add(name, &[len], Dt::F32);
        let tok = rows * n;
        let widest_k = [m, c, patch_dim, cfg.caption_channels, FREQ_DIM].into_iter().max().unwrap_or(c);
        let mut bufs = Buffers {
            input: add("input", rows * cfg.image_elems()),
            patches: add("patches", tok * patch_dim),
            x: add("x", tok * c),
            h: add("h", tok * c),
            q: add("q", tok * c),
            k: add("k", tok * c),
            v: add("v", tok * c),
            attn: add("attn", tok * c),
            y: add("y", tok * c),
            mlp: add("mlp", tok * m),
            out: add("out", tok * p * p * cfg.out_channels),
            image: add("image", rows * cfg.out_elems()),
            tfreq: add("tfreq", rows * FREQ_DIM),
            temb: add("temb", rows * c),
            emb: add("emb", rows * c),
            silu_emb: add("silu_emb", rows * c),
            tmod: add("tmod", rows * 6 * c),
            modv: add("modulation", rows * modulation_width(&cfg)),
            text: add("text", rows * l * cfg.caption_channels),
            cap_h: add("caption hidden", rows * l * c),
            cap: add("caption", rows * l * c),
            mask_bias: add("mask bias", rows * l),
            cross: (0..cfg.depth)
                .map(|i| {
                    [add(&format!("block {i} cross k"), rows * l * c), add(&format!("block {i} cross v"), rows * l * c)]
                })
                .collect(),
            gemm_scratch: add("gemm scratch", threads * gemm::SCRATCH_PER_THREAD),
            packed_a: add("gemm packed a", gemm::packed_a_len(tok.max(rows * l), widest_k)),
            attn_scratch: add("attention scores", threads * n * n.max(l)),
            cache: Vec::new(),
            lowrank: None,
            size: None,
        };
        if cfg.use_additional_conditions {
            bufs.size = Some((
                add("micro-condition embedding", rows * c),
                add("micro-condition scratch", super::micro::scratch_len(&model)),
            ));
        }
        if !matches!(opts.cache, PixArtCache::None) {
            bufs.cache = (0..cfg.depth)
                .map(|i| Slot::ALL.map(|slot| add(&format!("block {i} cache {slot:?}"), tok * slot.width(&cfg))))
                .collect();
        }
        if let PixArtCache::Icc(f) = &opts.cache {
            bufs.lowrank = Some(add("icc low-rank", tok * f.max_rank().max(1)));
        }
        plan.outside("weights, memory-mapped file(s)", model.file_bytes());
        plan.outside("weights converted to f32 at load", model.owned_bytes());
        let mut need = crate::limits::MemoryNeed::default();
        need.alloc(plan.title.clone(), plan.total_bytes() as u64);
        need.check("the PixArt CPU forward pass", None)?;
        let arena = Arena::new(&plan)?;
        let pool = ThreadPool::new(threads)
            .map_err(|e| Error::invalid("threads", format!("cannot start {threads} threads: {e}")))?;
        Ok(PixArtCpu {
            model,
            pool,
            gemm: Gemmer::new(isa),
            plan,
            arena,
            bufs,
            max_rows: rows,
            max_text_len: l,
            freqs: embed::timestep_freqs(Numerics::Official),
            t: vec![0.0; rows],
            text_len: 0,
            size_rows: 0,
            cache: opts.cache.clone(),
            cached_rows: None,
        })
    }

    pub fn model(&self) -> &Arc<PixArtModel> {
        &self.model
    }
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }
    pub fn max_text_len(&self) -> usize {
        self.max_text_len
    }
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }
    pub fn isa(&self) -> Isa {
        self.gemm.isa()
    }
    pub fn cache(&self) -> &PixArtCache {
        &self.cache
    }
    /// Rows of the last full step, whose activations the caches hold.
    pub fn cached_rows(&self) -> Option<usize> {
        self.cached_rows
    }

    /// Block `block`'s cache slot as the last full step left it ((rows, N, width) of its
    /// rows); `None` without caches or before a full step.
    pub fn cache_slot(&self, block: usize, slot: Slot) -> Option<&[f32]> {
        let rows = self.cached_rows?;
        let id = *self.bufs.cache.get(block)?.get(slot.index())?;
        let len = rows * self.model.config.tokens() * slot.width(&self.model.config);
        // SAFETY: read-only view; no op runs while it is borrowed (&self).
        let all = unsafe { self.view(id) };
        Some(&all[..len])
    }

    fn ptr(&self, id: BufId) -> (SendPtr, usize) {
        let b = self.plan.get(id);
        (SendPtr(self.arena.f32_ptr(b)), b.elems())
    }

    /// A whole buffer, mutable.
    fn buf_mut(&mut self, id: BufId) -> &mut [f32] {
        let (p, n) = self.ptr(id);
        // SAFETY: the arena outlives &mut self; no other view of the buffer is alive.
        unsafe { std::slice::from_raw_parts_mut(p.get(), n) }
    }

    /// A whole buffer, writable through a shared borrow. SAFETY: nothing else reads or
    /// writes the buffer while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn view_mut(&self, id: BufId) -> &mut [f32] {
        let (p, n) = self.ptr(id);
        unsafe { std::slice::from_raw_parts_mut(p.get(), n) }
    }

    /// A whole buffer, read-only. SAFETY: the caller writes no buffer it reads this way.
    unsafe fn view(&self, id: BufId) -> &[f32] {
        let (p, n) = self.ptr(id);
        unsafe { std::slice::from_raw_parts(p.get(), n) }
    }

    fn act_buf(&self, a: Act) -> BufId {
        let b = &self.bufs;
        match a {
            Act::X => b.x,
            Act::H => b.h,
            Act::Q => b.q,
            Act::K => b.k,
            Act::V => b.v,
            Act::Attn => b.attn,
            Act::Y => b.y,
            Act::Mlp => b.mlp,
            Act::Out => b.out,
            Act::Cache(i, slot) => b.cache[i][slot.index()],
        }
    }

    /// Stages `rows` model rows: latents (rows, Cin, S, S) and timesteps.
    pub fn stage_inputs(&mut self, x: &[f32], t: &[f32], rows: usize) -> Result<()> {
        checks::check_inputs(&self.model.config, self.max_rows, x, t, rows)?;
        let input = self.bufs.input;
        self.buf_mut(input)[..x.len()].copy_from_slice(x);
        self.t[..rows].copy_from_slice(t);
        Ok(())
    }

    /// Stages the caption of `rows` rows: `text` (rows, L, D) and `mask` (rows, L) of 0/1,
    /// then runs the caption projection and every block's cross-attention K and V (once per
    /// request).
    pub fn stage_text(&mut self, text: &[f32], mask: &[i64], rows: usize, len: usize) -> Result<()> {
        checks::check_text(&self.model.config, self.max_rows, self.max_text_len, text, mask, rows, len)?;
        let (tb, mb) = (self.bufs.text, self.bufs.mask_bias);
        self.buf_mut(tb)[..text.len()].copy_from_slice(text);
        for (b, &m) in self.buf_mut(mb).iter_mut().zip(mask) {
            *b = checks::mask_bias(m);
        }
        self.text_len = len;
        self.encode_caption(rows);
        Ok(())
    }

    /// Stages the micro-conditions of `rows` rows (models with `use_additional_conditions`):
    /// `resolution` (rows, 2) as (height, width) in pixels and `aspect` (rows) = height / width,
    /// and computes their embeddings (once per request: they do not change over steps).
    pub fn stage_size(&mut self, resolution: &[f32], aspect: &[f32], rows: usize) -> Result<()> {
        let Some((emb, scratch)) = self.bufs.size else {
            return Err(Error::invalid(
                "micro-conditions",
                "this model has no use_additional_conditions: it takes no resolution or aspect ratio",
            ));
        };
        // SAFETY: the embedding and the scratch are distinct buffers, nothing else reads them.
        let (out, tmp) = unsafe { (self.view_mut(emb), self.view_mut(scratch)) };
        super::micro::size_embeddings(&self.model, resolution, aspect, rows, self.max_rows, &self.freqs, tmp, out)?;
        self.size_rows = rows;
        Ok(())
    }

    /// One forward pass of `kind` over the staged rows (after [`stage_text`](Self::stage_text),
    /// [`stage_inputs`](Self::stage_inputs) and, for models with micro-conditions,
    /// [`stage_size`](Self::stage_size)); the output is [`output`](Self::output).
    pub fn run(&mut self, rows: usize, kind: StepKind) -> Result<()> {
        let staged = checks::Staged {
            max_rows: self.max_rows,
            text_len: self.text_len,
            size_rows: self.bufs.size.map(|_| self.size_rows),
            cached_rows: self.cached_rows,
            policy: self.cache.policy(),
        };
        checks::check_pass(&staged, rows, kind)?;
        self.conditioning(rows);
        let cfg = self.model.config;
        forward::forward(self, &cfg, rows, kind);
        if kind == StepKind::Full {
            self.cached_rows = Some(rows);
        }
        Ok(())
    }

    /// The last pass's output, (rows, Cout, S, S).
    pub fn output(&self, rows: usize) -> &[f32] {
        // SAFETY: read-only view; no op runs while it is borrowed (&self).
        let all = unsafe { self.view(self.bufs.image) };
        &all[..rows * self.model.config.out_elems()]
    }

    /// C = act(A·Wᵀ + b (+ add)) over m rows, on the pool.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        a: &[f32],
        a_minus: Option<&[f32]>,
        m: usize,
        k: usize,
        w: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        add: Option<&[f32]>,
        act: gemm::Act,
        c: SendPtr,
    ) {
        let (sp, sl) = self.ptr(self.bufs.gemm_scratch);
        let (pp, pl) = self.ptr(self.bufs.packed_a);
        // SAFETY: the scratch buffers are only used by GEMMs, one at a time.
        let (scratch, packed) =
            unsafe { (std::slice::from_raw_parts_mut(sp.get(), sl), std::slice::from_raw_parts_mut(pp.get(), pl)) };
        let g = Gemm {
            m,
            n,
            k,
            a,
            a_minus,
            lda: k,
            conv: None,
            b: BMat::weight(w, k),
            bias,
            add: add.map(|a| (a, n)),
            act,
            c,
            ldc: n,
        };
        self.gemm.run(&self.pool, scratch, packed, &g);
    }

    /// dst = act(src·Wᵀ + b) of `layer` over m rows of raw buffers.
    fn linear_raw(&self, layer: Layer, src: BufId, dst: BufId, m: usize, act: gemm::Act) {
        let (w, b) = self.model.linear(layer);
        let (out, inp) = layer.shape(&self.model.config);
        // SAFETY: src is read, dst (a distinct buffer) written.
        let a = unsafe { self.view(src) };
        self.gemm(&a[..m * inp], None, m, inp, w, Some(b), out, None, act, self.ptr(dst).0);
    }

    /// An elementwise job over (rows·N) tokens, split across the pool.
    fn par(&self, total: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
        self.pool.par(total, f);
    }

    /// softmax(q·kᵀ·scale + bias)·v per (row, head); k and v have `nk` tokens per row with
    /// row strides `k_row`/`v_row` (0: the same for every row) and the bias `nk` values per row.
    #[allow(clippy::too_many_arguments)]
    fn attention_rows(&self, q: BufId, k: BufId, v: BufId, dst: BufId, rows: usize, nk: usize, bias: Option<BufId>) {
        let cfg = self.model.config;
        let (n, c, heads, d) = (cfg.tokens(), cfg.hidden_size(), cfg.num_heads, cfg.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        let isa = self.gemm.isa();
        let gemmer = self.gemm;
        let threads = self.pool.threads();
        // SAFETY: q, k, v and the bias are read; each (row, head) job writes its own D
        // columns of dst's rows; each thread uses its own score and GEMM scratch.
        let (qs, ks, vs) = unsafe { (self.view(q), self.view(k), self.view(v)) };
        let bias = bias.map(|b| unsafe { self.view(b) });
        let (dp, _) = self.ptr(dst);
        let (ss, _) = self.ptr(self.bufs.attn_scratch);
        let (gs, _) = self.ptr(self.bufs.gemm_scratch);
        let per = n * n.max(self.max_text_len);
        let job = |tid: usize| {
            let scores = unsafe { std::slice::from_raw_parts_mut(ss.get().add(tid * per), n * nk) };
            let scratch = unsafe {
                std::slice::from_raw_parts_mut(gs.get().add(tid * gemm::SCRATCH_PER_THREAD), gemm::SCRATCH_PER_THREAD)
            };
            for job in split(rows * heads, threads, tid, 1) {
                let (r, hd) = (job / heads, job % heads);
                let (qb, kb) = (r * n * c + hd * d, r * nk * c + hd * d);
                let qk = Gemm {
                    m: n,
                    n: nk,
                    k: d,
                    a: &qs[qb..],
                    a_minus: None,
                    lda: c,
                    conv: None,
                    b: BMat { data: &ks[kb..], rs: c, cs: 1 },
                    bias: None,
                    add: None,
                    act: gemm::Act::None,
                    c: SendPtr(scores.as_mut_ptr()),
                    ldc: nk,
                };
                gemmer.run_single(scratch, &qk);
                for row in scores.chunks_exact_mut(nk) {
                    match bias {
                        Some(b) => {
                            for (s, &bv) in row.iter_mut().zip(&b[r * nk..(r + 1) * nk]) {
                                *s = *s * scale + bv;
                            }
                            math::softmax_scaled(isa, row, 1.0);
                        }
                        None => math::softmax_scaled(isa, row, scale),
                    }
                }
                let pv = Gemm {
                    m: n,
                    n: d,
                    k: nk,
                    a: scores,
                    a_minus: None,
                    lda: nk,
                    conv: None,
                    b: BMat { data: &vs[kb..], rs: 1, cs: c },
                    bias: None,
                    add: None,
                    act: gemm::Act::None,
                    c: SendPtr(unsafe { dp.get().add(qb) }),
                    ldc: c,
                };
                gemmer.run_single(scratch, &pv);
            }
        };
        self.pool.run(&job);
    }
}
