//! The CPU implementation of [`PixArtOps`]: f32, multi-threaded, every buffer in one arena
//! planned at construction, weights read from the mapped checkpoint. After `new`, staging a
//! request and running forward passes allocate nothing.

use std::sync::Arc;

use super::factors::PixArtFactors;
use super::forward::{self, modulation_offset, modulation_width, slots, Act, PixArtOps, Slot};
use super::weights::{Layer, PixArtModel};
use crate::config::{Numerics, FREQ_DIM};
use crate::cpu::gemm::{self, BMat, Gemm, Gemmer};
use crate::cpu::math;
use crate::cpu::pool::{split, SendPtr, ThreadPool};
use crate::embed;
use crate::error::{Error, Result};
use crate::forward::{Activation, ModChunk, Norm, StepKind};
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
        };
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
        let img = self.model.config.image_elems();
        if rows == 0 || rows > self.max_rows || x.len() != rows * img || t.len() != rows {
            return Err(Error::invalid(
                "model input",
                format!(
                    "{rows} rows ({} latent values, {} timesteps) for an engine of {} rows of {img}",
                    x.len(),
                    t.len(),
                    self.max_rows
                ),
            ));
        }
        let input = self.bufs.input;
        self.buf_mut(input)[..rows * img].copy_from_slice(x);
        self.t[..rows].copy_from_slice(t);
        Ok(())
    }

    /// Stages the caption of `rows` rows: `text` (rows, L, D) and `mask` (rows, L) of 0/1,
    /// then runs the caption projection and every block's cross-attention K and V (once per
    /// request).
    pub fn stage_text(&mut self, text: &[f32], mask: &[i64], rows: usize, len: usize) -> Result<()> {
        let d = self.model.config.caption_channels;
        if len == 0 || len > self.max_text_len {
            return Err(Error::invalid(
                "text length",
                format!("{len} tokens; this engine takes 1 to {}", self.max_text_len),
            ));
        }
        if rows == 0 || rows > self.max_rows || text.len() != rows * len * d || mask.len() != rows * len {
            return Err(Error::invalid(
                "caption",
                format!(
                    "{} embedding values and {} mask values for {rows} rows of {len} tokens × {d}",
                    text.len(),
                    mask.len()
                ),
            ));
        }
        if let Some(i) = mask.iter().position(|&v| v != 0 && v != 1) {
            return Err(Error::invalid("attention mask", format!("element {i} is {}; masks are 0 or 1", mask[i])));
        }
        let (tb, mb) = (self.bufs.text, self.bufs.mask_bias);
        self.buf_mut(tb)[..text.len()].copy_from_slice(text);
        for (b, &m) in self.buf_mut(mb).iter_mut().zip(mask) {
            *b = (1 - m) as f32 * -10000.0;
        }
        self.text_len = len;
        self.encode_caption(rows);
        Ok(())
    }

    /// One forward pass of `kind` over the staged rows (after [`stage_text`](Self::stage_text)
    /// and [`stage_inputs`](Self::stage_inputs)); the output is [`output`](Self::output).
    pub fn run(&mut self, rows: usize, kind: StepKind) -> Result<()> {
        if self.text_len == 0 {
            return Err(Error::invalid("caption", "no caption staged before the forward pass"));
        }
        let policy = self.cache.policy();
        if kind != StepKind::Plain && !policy.step_kinds().contains(&kind) {
            return Err(Error::invalid("step kind", format!("a {} step under cache policy {policy}", kind.name())));
        }
        if matches!(kind, StepKind::Calibrated | StepKind::Reuse) && self.cached_rows != Some(rows) {
            return Err(Error::invalid(
                "step kind",
                format!("a {} step needs a full step with the same {rows} rows before it", kind.name()),
            ));
        }
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

    /// Convenience: one plain forward pass on `rows` rows (the `icdit forward` command).
    pub fn forward(
        &mut self,
        x: &[f32],
        t: &[f32],
        text: &[f32],
        mask: &[i64],
        len: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let rows = t.len();
        self.stage_text(text, mask, rows, len)?;
        self.stage_inputs(x, t, rows)?;
        self.run(rows, StepKind::Plain)?;
        if out.len() != rows * self.model.config.out_elems() {
            return Err(Error::invalid(
                "output buffer",
                format!("{} values, expected {}", out.len(), rows * self.model.config.out_elems()),
            ));
        }
        out.copy_from_slice(self.output(rows));
        Ok(())
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

impl PixArtOps for PixArtCpu {
    fn encode_caption(&mut self, rows: usize) {
        let m = rows * self.text_len;
        let (text, cap_h, cap) = (self.bufs.text, self.bufs.cap_h, self.bufs.cap);
        self.linear_raw(Layer::Caption1, text, cap_h, m, gemm::Act::GeluTanh);
        self.linear_raw(Layer::Caption2, cap_h, cap, m, gemm::Act::None);
        for i in 0..self.model.config.depth {
            let [k, v] = self.bufs.cross[i];
            self.linear_raw(Layer::K2(i), cap, k, m, gemm::Act::None);
            self.linear_raw(Layer::V2(i), cap, v, m, gemm::Act::None);
        }
    }

    fn conditioning(&mut self, rows: usize) {
        let cfg = self.model.config;
        let c = cfg.hidden_size();
        let (tf, temb, emb, silu_emb, tmod, modv) =
            (self.bufs.tfreq, self.bufs.temb, self.bufs.emb, self.bufs.silu_emb, self.bufs.tmod, self.bufs.modv);
        let freqs = self.freqs;
        for r in 0..rows {
            let t = self.t[r];
            embed::timestep_embedding(t, &freqs, &mut self.buf_mut(tf)[r * FREQ_DIM..(r + 1) * FREQ_DIM]);
        }
        self.linear_raw(Layer::Time1, tf, temb, rows, gemm::Act::None);
        for v in &mut self.buf_mut(temb)[..rows * c] {
            *v = math::silu(*v);
        }
        self.linear_raw(Layer::Time2, temb, emb, rows, gemm::Act::None);
        // SAFETY: emb is read while silu_emb (distinct) is written.
        let e = unsafe { self.view(emb) };
        for (s, &v) in unsafe { self.view_mut(silu_emb) }[..rows * c].iter_mut().zip(e) {
            *s = math::silu(v);
        }
        self.linear_raw(Layer::AdaLn, silu_emb, tmod, rows, gemm::Act::None);
        let width = modulation_width(&cfg);
        let (tm, e) = unsafe { (self.view(tmod), self.view(emb)) };
        let model = Arc::clone(&self.model);
        // SAFETY: the modulation buffer is distinct from t_mod and emb.
        let out = unsafe { self.view_mut(modv) };
        for r in 0..rows {
            let row = &mut out[r * width..(r + 1) * width];
            for (i, &table) in model.tensors.block_tables.iter().enumerate() {
                let table = model.w(table);
                for ((o, &a), &b) in row[6 * i * c..6 * (i + 1) * c].iter_mut().zip(table).zip(&tm[r * 6 * c..]) {
                    *o = a + b;
                }
            }
            let table = model.w(model.tensors.final_table);
            for (j, o) in row[6 * cfg.depth * c..].iter_mut().enumerate() {
                *o = table[j] + e[r * c + j % c];
            }
        }
    }

    fn embed_patches(&mut self, rows: usize) {
        let cfg = self.model.config;
        let (p, g, cin, s, c, n) =
            (cfg.patch_size, cfg.grid(), cfg.in_channels, cfg.sample_size, cfg.hidden_size(), cfg.tokens());
        let pd = cin * p * p;
        let (input, patches) = (self.bufs.input, self.bufs.patches);
        // SAFETY: input is read, patches written.
        let x = unsafe { self.view(input) };
        let pt = unsafe { self.view_mut(patches) };
        for r in 0..rows {
            for t in 0..n {
                let (gi, gj) = (t / g, t % g);
                let row = &mut pt[(r * n + t) * pd..][..pd];
                for ch in 0..cin {
                    for a in 0..p {
                        for b in 0..p {
                            row[(ch * p + a) * p + b] = x[((r * cin + ch) * s + gi * p + a) * s + gj * p + b];
                        }
                    }
                }
            }
        }
        let t = &self.model.tensors;
        let (w, b, pos) = (self.model.w(t.patch_w), self.model.w(t.patch_b), self.model.w(t.pos_embed));
        let pt = unsafe { self.view(patches) };
        let (xp, _) = self.ptr(self.bufs.x);
        for r in 0..rows {
            let c_ptr = SendPtr(unsafe { xp.get().add(r * n * c) });
            self.gemm(&pt[r * n * pd..(r + 1) * n * pd], None, n, pd, w, Some(b), c, Some(pos), gemm::Act::None, c_ptr);
        }
    }

    fn norm_modulate(&mut self, dst: Act, norm: Norm, rows: usize) {
        let cfg = self.model.config;
        let (n, c, width) = (cfg.tokens(), cfg.hidden_size(), modulation_width(&cfg));
        let (shift, scale) = (modulation_offset(norm.shift, &cfg), modulation_offset(norm.scale, &cfg));
        let isa = self.gemm.isa();
        // SAFETY: x and the modulation are read; dst (distinct) written, a token per job.
        let (x, m) = unsafe { (self.view(self.bufs.x), self.view(self.bufs.modv)) };
        let (d, _) = self.ptr(self.act_buf(dst));
        self.par(rows * n, |range| {
            for tok in range {
                let r = tok / n;
                let out = unsafe { std::slice::from_raw_parts_mut(d.get().add(tok * c), c) };
                let mv = &m[r * width..];
                math::layer_norm_modulate(
                    isa,
                    &x[tok * c..(tok + 1) * c],
                    &mv[shift..shift + c],
                    &mv[scale..scale + c],
                    norm.eps,
                    out,
                );
            }
        });
    }

    fn linear(&mut self, layer: Layer, src: Act, dst: Act, act: Activation, rows: usize) {
        let m = rows * self.model.config.tokens();
        self.linear_raw(layer, self.act_buf(src), self.act_buf(dst), m, gemm_act(act));
    }

    fn linear_gelu_keep_pre(&mut self, layer: Layer, src: Act, pre: Act, post: Act, rows: usize) {
        self.linear(layer, src, pre, Activation::None, rows);
        let isa = self.gemm.isa();
        let len = rows * self.model.config.tokens() * layer.shape(&self.model.config).0;
        // SAFETY: pre is read, post (distinct) written.
        let s = unsafe { self.view(self.act_buf(pre)) };
        let (d, _) = self.ptr(self.act_buf(post));
        let out = unsafe { std::slice::from_raw_parts_mut(d.get(), len) };
        math::gelu_into(isa, &s[..len], out);
    }

    fn linear_calibrated(&mut self, layer: Layer, src: Act, dst: Act, act: Activation, rows: usize) {
        let PixArtCache::Icc(factors) = &self.cache else { unreachable!("run() checks calibrated steps have factors") };
        let factors = Arc::clone(factors);
        let (i, xs, ys) = slots(layer).expect("only cached linears are calibrated");
        let (out, inp) = layer.shape(&self.model.config);
        let m = rows * self.model.config.tokens();
        let f = factors.get(layer).expect("factors load every cached layer");
        let low = self.bufs.lowrank.expect("planned with icc");
        // SAFETY: src and the caches are read; lowrank and dst (distinct) written.
        let (x, x_s, y_s) = unsafe {
            (
                self.view(self.act_buf(src)),
                self.view(self.act_buf(Act::Cache(i, xs))),
                self.view(self.act_buf(Act::Cache(i, ys))),
            )
        };
        let (lp, _) = self.ptr(low);
        self.gemm(
            &x[..m * inp],
            Some(&x_s[..m * inp]),
            m,
            inp,
            factors.w(f.down),
            None,
            f.rank,
            None,
            gemm::Act::None,
            lp,
        );
        let t = unsafe { self.view(low) };
        let (dp, _) = self.ptr(self.act_buf(dst));
        self.gemm(
            &t[..m * f.rank],
            None,
            m,
            f.rank,
            factors.w(f.up),
            None,
            out,
            Some(&y_s[..m * out]),
            gemm_act(act),
            dp,
        );
    }

    /// The CPU computes icc's direct form: nothing to keep.
    fn refresh_base(&mut self, _layer: Layer, _rows: usize) {}

    fn copy(&mut self, src: Act, dst: Act, rows: usize) {
        let len = rows * self.model.config.tokens() * self.model.config.hidden_size();
        // SAFETY: distinct buffers.
        let s = unsafe { self.view(self.act_buf(src)) };
        let (d, _) = self.ptr(self.act_buf(dst));
        unsafe { std::slice::from_raw_parts_mut(d.get(), len) }.copy_from_slice(&s[..len]);
    }

    fn self_attention(&mut self, q: Act, k: Act, v: Act, dst: Act, rows: usize) {
        let n = self.model.config.tokens();
        self.attention_rows(self.act_buf(q), self.act_buf(k), self.act_buf(v), self.act_buf(dst), rows, n, None);
    }

    fn cross_attention(&mut self, block: usize, q: Act, dst: Act, rows: usize) {
        let [k, v] = self.bufs.cross[block];
        let len = self.text_len;
        self.attention_rows(self.act_buf(q), k, v, self.act_buf(dst), rows, len, Some(self.bufs.mask_bias));
    }

    fn gated_residual(&mut self, src: Act, gate: ModChunk, rows: usize) {
        let cfg = self.model.config;
        let (n, c, width) = (cfg.tokens(), cfg.hidden_size(), modulation_width(&cfg));
        let gate = modulation_offset(gate, &cfg);
        let isa = self.gemm.isa();
        // SAFETY: src and the modulation are read; x (distinct) written, a token per job.
        let (s, m) = unsafe { (self.view(self.act_buf(src)), self.view(self.bufs.modv)) };
        let (x, _) = self.ptr(self.bufs.x);
        self.par(rows * n, |range| {
            for tok in range {
                let r = tok / n;
                let xr = unsafe { std::slice::from_raw_parts_mut(x.get().add(tok * c), c) };
                math::gated_add(isa, xr, &m[r * width + gate..][..c], &s[tok * c..(tok + 1) * c]);
            }
        });
    }

    fn residual(&mut self, src: Act, rows: usize) {
        let len = rows * self.model.config.tokens() * self.model.config.hidden_size();
        let isa = self.gemm.isa();
        // SAFETY: distinct buffers.
        let s = unsafe { self.view(self.act_buf(src)) };
        let (x, _) = self.ptr(self.bufs.x);
        math::add(isa, unsafe { std::slice::from_raw_parts_mut(x.get(), len) }, &s[..len]);
    }

    fn unpatchify(&mut self, rows: usize) {
        let cfg = self.model.config;
        let (p, g, co, s, n) = (cfg.patch_size, cfg.grid(), cfg.out_channels, cfg.sample_size, cfg.tokens());
        // SAFETY: out is read, image written.
        let out = unsafe { self.view(self.bufs.out) };
        let image = self.bufs.image;
        let img = unsafe { self.view_mut(image) };
        for r in 0..rows {
            for t in 0..n {
                let (gi, gj) = (t / g, t % g);
                let tok = r * n + t;
                for a in 0..p {
                    for b in 0..p {
                        for ch in 0..co {
                            img[((r * co + ch) * s + gi * p + a) * s + gj * p + b] =
                                out[(tok * p * p + a * p + b) * co + ch];
                        }
                    }
                }
            }
        }
    }
}
