//! The CPU reference backend: f32, multi-threaded, every buffer in one arena planned at
//! construction, weights read straight from the mapped checkpoint. After `new`, a forward
//! pass performs no heap allocation.

pub mod gemm;
pub mod math;
pub mod pool;

use std::sync::Arc;

use crate::config::{DitConfig, FREQ_DIM};
use crate::embed;
use crate::error::{Error, Result};
use crate::forward::{self, Act, Activation, DitOps, Linear, Modulation};
use crate::plan::{Arena, BufId, Dt, Plan};
use crate::weights::{DitModel, TRef};
use gemm::{BMat, Gemm, Gemmer};
use pool::{split, SendPtr, ThreadPool};

/// How to size a CPU engine.
#[derive(Clone, Debug)]
pub struct CpuOptions {
    /// Largest number of images per request.
    pub max_batch: usize,
    /// Whether requests use classifier-free guidance (doubles the model batch).
    pub guidance: bool,
    /// Worker threads including the caller; 0 means all available cores.
    pub threads: usize,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            max_batch: 1,
            guidance: false,
            threads: 0,
        }
    }
}

/// Buffer ids of the CPU forward pass.
struct Bufs {
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
}

/// Rows (model batch) a plan must hold for `opts`.
pub fn planned_rows(opts: &CpuOptions) -> usize {
    opts.max_batch * if opts.guidance { 2 } else { 1 }
}

/// The memory plan of the CPU forward pass for `cfg`.
fn plan(cfg: &DitConfig, rows: usize, threads: usize) -> (Plan, Bufs) {
    let (n, c, m) = (cfg.tokens(), cfg.hidden_size, cfg.mlp_hidden());
    let (i, p2) = (cfg.input_size, cfg.patch_size * cfg.patch_size);
    let mut p = Plan::new(format!("CPU forward plan ({rows} rows, {threads} threads)"));
    let bufs = Bufs {
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
        tfreq: p.add("t_freq", &[rows, FREQ_DIM], Dt::F32),
        temb: p.add("t_hidden", &[rows, c], Dt::F32),
        c: p.add("c", &[rows, c], Dt::F32),
        silu_c: p.add("silu_c", &[rows, c], Dt::F32),
        modv: p.add("modulation", &[rows, 6 * c], Dt::F32),
        gemm_scratch: p.add("gemm_scratch", &[threads, gemm::SCRATCH_PER_THREAD], Dt::F32),
        gemm_packed_a: p.add(
            "gemm_packed_a",
            &[gemm::packed_a_len(rows * n, c.max(m).max(cfg.patch_dim()).max(FREQ_DIM))],
            Dt::F32,
        ),
        attn_scratch: p.add("attn_scores", &[threads, n * n], Dt::F32),
    };
    (p, bufs)
}

/// Plans (without allocating) the CPU forward for a model: for `inspect` and memory checks.
pub fn plan_for(model: &DitModel, opts: &CpuOptions) -> Plan {
    let threads = resolve_threads(opts.threads);
    let (mut p, _) = plan(&model.config, planned_rows(opts).max(1), threads);
    add_weight_notes(&mut p, model);
    p
}

fn add_weight_notes(p: &mut Plan, model: &DitModel) {
    p.outside("weights, memory-mapped file(s)", model.file_bytes());
    p.outside("weights converted to f32 at load", model.store.owned_bytes());
}

fn resolve_threads(threads: usize) -> usize {
    if threads > 0 {
        threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// A DiT ready to run on the CPU.
pub struct CpuEngine {
    model: Arc<DitModel>,
    pool: ThreadPool,
    gemm: Gemmer,
    plan: Plan,
    arena: Arena,
    bufs: Bufs,
    max_rows: usize,
    freqs: [f32; FREQ_DIM / 2],
    /// Staged request: timesteps (as f32, as the model casts them) and labels.
    t: Vec<f32>,
    y: Vec<usize>,
}

impl CpuEngine {
    /// Plans and allocates everything a forward pass will need.
    pub fn new(model: Arc<DitModel>, opts: &CpuOptions) -> Result<Self> {
        let max_rows = planned_rows(opts);
        if max_rows == 0 {
            return Err(Error::invalid("max batch", "must be at least 1"));
        }
        let threads = resolve_threads(opts.threads);
        if threads > 1024 {
            return Err(Error::invalid("threads", format!("{threads} is more than 1024")));
        }
        let (mut plan, bufs) = plan(&model.config, max_rows, threads);
        add_weight_notes(&mut plan, &model);
        let arena = Arena::new(&plan)?;
        let pool = ThreadPool::new(threads).map_err(|e| Error::invalid("threads", format!("cannot start {threads} threads: {e}")))?;
        let freqs = embed::timestep_freqs(model.numerics);
        Ok(CpuEngine {
            model,
            pool,
            gemm: Gemmer::detect(),
            plan,
            arena,
            bufs,
            max_rows,
            freqs,
            t: vec![0.0; max_rows],
            y: vec![0; max_rows],
        })
    }

    /// Uses the portable GEMM kernel instead of the SIMD one (for cross-checks).
    pub fn with_portable_gemm(mut self) -> Self {
        self.gemm = Gemmer::portable();
        self
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
    pub fn gemm_kernel(&self) -> &'static str {
        self.gemm.name
    }

    /// One model evaluation: `x` (B, Cin, I, I), `t` original timesteps 0..=999, `y` labels
    /// (the null class allowed) → `out` (B, Cout, I, I). Allocates nothing.
    pub fn forward(&mut self, x: &[f32], t: &[i64], y: &[i64], out: &mut [f32]) -> Result<()> {
        let rows = self.stage(x, t, y)?;
        let need = rows * self.model.config.output_elems();
        if out.len() != need {
            return Err(Error::invalid(
                "output buffer",
                format!("has {} elements, expected {need} ({rows} × Cout × I × I)", out.len()),
            ));
        }
        let (cfg, eps) = (self.model.config, self.model.mlp_norm_eps);
        forward::forward(self, &cfg, eps, rows);
        out.copy_from_slice(&self.slice(self.bufs.image)[..need]);
        Ok(())
    }

    /// Validates a request and copies it into the arena; returns the row count.
    fn stage(&mut self, x: &[f32], t: &[i64], y: &[i64]) -> Result<usize> {
        let cfg = &self.model.config;
        let rows = t.len();
        if rows == 0 || rows > self.max_rows {
            return Err(Error::invalid(
                "batch",
                format!("{rows} rows; this engine was planned for 1..={} rows", self.max_rows),
            ));
        }
        if y.len() != rows || x.len() != rows * cfg.image_elems() {
            return Err(Error::invalid(
                "request shapes",
                format!(
                    "x has {} elements, t {} and y {}; expected {rows} × {} × {} × {} for x and {rows} for t and y",
                    x.len(),
                    t.len(),
                    y.len(),
                    cfg.in_channels,
                    cfg.input_size,
                    cfg.input_size
                ),
            ));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("x", format!("element {i} is {}", x[i])));
        }
        for (r, (&tr, &yr)) in t.iter().zip(y).enumerate() {
            if !(0..1000).contains(&tr) {
                return Err(Error::invalid("timestep", format!("t[{r}] = {tr}; expected 0..=999")));
            }
            let labels = cfg.label_rows() as i64;
            if !(0..labels).contains(&yr) {
                return Err(Error::invalid(
                    "class label",
                    format!(
                        "y[{r}] = {yr}; expected 0..{} (or {} for unconditional)",
                        cfg.num_classes,
                        cfg.null_class()
                    ),
                ));
            }
            self.t[r] = tr as f32;
            self.y[r] = yr as usize;
        }
        self.slice_mut(self.bufs.input)[..x.len()].copy_from_slice(x);
        Ok(rows)
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
        }
    }

    /// C = A·Wᵀ (+ bias, activation) with A, C arena buffers and W a weight.
    fn gemm(&mut self, a: BufId, w: TRef, bias: TRef, c: BufId, m: usize, n: usize, k: usize, act: gemm::Act) {
        let (ap, alen) = self.ptr(a);
        let (cp, clen) = self.ptr(c);
        assert!(a != c && m * k <= alen && m * n <= clen, "GEMM operands");
        // SAFETY: a and c are distinct arena buffers; the scratch buffer is a third.
        let a_slice = unsafe { std::slice::from_raw_parts(ap.get(), m * k) };
        let (sp, slen) = self.ptr(self.bufs.gemm_scratch);
        let (pp, plen) = self.ptr(self.bufs.gemm_packed_a);
        let (scratch, packed) = unsafe {
            (std::slice::from_raw_parts_mut(sp.get(), slen), std::slice::from_raw_parts_mut(pp.get(), plen))
        };
        let g = Gemm {
            m,
            n,
            k,
            a: a_slice,
            lda: k,
            b: BMat::weight(self.model.w(w), k),
            bias: Some(self.model.w(bias)),
            act,
            c: cp,
            ldc: n,
        };
        self.gemm.run(&self.pool, scratch, packed, &g);
    }

    /// Runs `f(range)` over `0..total` split across the pool.
    fn par(&self, total: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
        let threads = self.pool.threads();
        if total < 64 || threads == 1 {
            f(0..total);
        } else {
            self.pool.run(&|tid| f(split(total, threads, tid, 1)));
        }
    }
}

impl DitOps for CpuEngine {
    fn embed_patches(&mut self, rows: usize) {
        let cfg = &self.model.config;
        let (p, g, cin, isz) = (cfg.patch_size, cfg.grid(), cfg.in_channels, cfg.input_size);
        let (n, pd, c) = (cfg.tokens(), cfg.patch_dim(), cfg.hidden_size);
        let (inp, _) = self.ptr(self.bufs.input);
        let (pat, _) = self.ptr(self.bufs.patches);
        // Patch vector order is (channel, kh, kw), channel slowest (reference doc A.1).
        self.par(rows * n, |range| {
            for tok in range {
                let (r, t) = (tok / n, tok % n);
                let (gi, gj) = (t / g, t % g);
                for ch in 0..cin {
                    for a in 0..p {
                        for b in 0..p {
                            // SAFETY: indices are within the planned input/patch buffers,
                            // and each token writes only its own patch row.
                            unsafe {
                                let src = ((r * cin + ch) * isz + gi * p + a) * isz + gj * p + b;
                                *pat.get().add(tok * pd + (ch * p + a) * p + b) = *inp.get().add(src);
                            }
                        }
                    }
                }
            }
        });
        let t = &self.model.tensors;
        let (pw, pb, pe) = (t.patch_w, t.patch_b, t.pos_embed);
        self.gemm(self.bufs.patches, pw, pb, self.bufs.x, rows * n, c, pd, gemm::Act::None);
        let pos = self.model.w(pe);
        let (x, _) = self.ptr(self.bufs.x);
        self.par(rows * n, |range| {
            for tok in range {
                // SAFETY: each token updates its own row of x.
                let row = unsafe { std::slice::from_raw_parts_mut(x.get().add(tok * c), c) };
                math::add(row, &pos[(tok % n) * c..][..c]);
            }
        });
    }

    fn embed_conditioning(&mut self, rows: usize) {
        let c = self.model.config.hidden_size;
        let freqs = self.freqs;
        for r in 0..rows {
            let t = self.t[r];
            embed::timestep_embedding(t, &freqs, &mut self.slice_mut(self.bufs.tfreq)[r * FREQ_DIM..][..FREQ_DIM]);
        }
        let tw = &self.model.tensors;
        let (w0, b0, w2, b2, table) = (tw.t_mlp0_w, tw.t_mlp0_b, tw.t_mlp2_w, tw.t_mlp2_b, tw.label_table);
        self.gemm(self.bufs.tfreq, w0, b0, self.bufs.temb, rows, c, FREQ_DIM, gemm::Act::None);
        for v in &mut self.slice_mut(self.bufs.temb)[..rows * c] {
            *v = math::silu(*v);
        }
        self.gemm(self.bufs.temb, w2, b2, self.bufs.c, rows, c, c, gemm::Act::None);
        let model = Arc::clone(&self.model);
        let table = model.w(table);
        for r in 0..rows {
            let y = self.y[r];
            let cr = &mut self.slice_mut(self.bufs.c)[r * c..][..c];
            for (v, e) in cr.iter_mut().zip(&table[y * c..][..c]) {
                *v += e;
            }
        }
        let (cb, sc) = (self.bufs.c, self.bufs.silu_c);
        for k in 0..rows * c {
            let v = self.slice(cb)[k];
            self.slice_mut(sc)[k] = math::silu(v);
        }
    }

    fn modulation(&mut self, which: Modulation, rows: usize) {
        let c = self.model.config.hidden_size;
        let (w, b, width) = match which {
            Modulation::Block(i) => {
                let bt = &self.model.tensors.blocks[i];
                (bt.ada_w, bt.ada_b, 6 * c)
            }
            Modulation::Final => (self.model.tensors.final_ada_w, self.model.tensors.final_ada_b, 2 * c),
        };
        // Written with row stride 6C whatever the width, so chunk k is always at k·C.
        let (ap, _) = self.ptr(self.bufs.silu_c);
        let (mp, _) = self.ptr(self.bufs.modv);
        let (sp, slen) = self.ptr(self.bufs.gemm_scratch);
        // SAFETY: three distinct arena buffers.
        let (a, scratch) = unsafe {
            (
                std::slice::from_raw_parts(ap.get(), rows * c),
                std::slice::from_raw_parts_mut(sp.get(), slen),
            )
        };
        let g = Gemm {
            m: rows,
            n: width,
            k: c,
            a,
            lda: c,
            b: BMat::weight(self.model.w(w), c),
            bias: Some(self.model.w(b)),
            act: gemm::Act::None,
            c: mp,
            ldc: 6 * c,
        };
        self.gemm.run(&self.pool, scratch, &mut [], &g);
    }

    fn norm_modulate(&mut self, shift: usize, scale: usize, eps: f32, rows: usize) {
        let (n, c) = (self.model.config.tokens(), self.model.config.hidden_size);
        let (x, _) = self.ptr(self.bufs.x);
        let (h, _) = self.ptr(self.bufs.h);
        let (m, _) = self.ptr(self.bufs.modv);
        self.par(rows * n, |range| {
            for tok in range {
                let r = tok / n;
                // SAFETY: x and modulation are only read; each token writes its own row of h.
                let (xr, hr, sh, sc) = unsafe {
                    (
                        std::slice::from_raw_parts(x.get().add(tok * c), c),
                        std::slice::from_raw_parts_mut(h.get().add(tok * c), c),
                        std::slice::from_raw_parts(m.get().add(r * 6 * c + shift * c), c),
                        std::slice::from_raw_parts(m.get().add(r * 6 * c + scale * c), c),
                    )
                };
                math::layer_norm_modulate(xr, sh, sc, eps, hr);
            }
        });
    }

    fn linear(&mut self, layer: Linear, src: Act, dst: Act, act: Activation, rows: usize) {
        let cfg = &self.model.config;
        let (n, c, mh) = (cfg.tokens(), cfg.hidden_size, cfg.mlp_hidden());
        let fin = cfg.patch_size * cfg.patch_size * cfg.out_channels();
        let t = &self.model.tensors;
        let (w, b, out, k) = match layer {
            Linear::Qkv(i) => (t.blocks[i].qkv_w, t.blocks[i].qkv_b, 3 * c, c),
            Linear::Proj(i) => (t.blocks[i].proj_w, t.blocks[i].proj_b, c, c),
            Linear::Fc1(i) => (t.blocks[i].fc1_w, t.blocks[i].fc1_b, mh, c),
            Linear::Fc2(i) => (t.blocks[i].fc2_w, t.blocks[i].fc2_b, c, mh),
            Linear::Final => (t.final_w, t.final_b, fin, c),
        };
        let act = match act {
            Activation::None => gemm::Act::None,
            Activation::GeluTanh => gemm::Act::GeluTanh,
        };
        self.gemm(self.act_buf(src), w, b, self.act_buf(dst), rows * n, out, k, act);
    }

    fn attention(&mut self, rows: usize) {
        let cfg = &self.model.config;
        let (n, c, heads, d) = (cfg.tokens(), cfg.hidden_size, cfg.num_heads, cfg.head_dim());
        let scale = 1.0 / (d as f32).sqrt();
        let (qkv, qlen) = self.ptr(self.bufs.qkv);
        let (attn, _) = self.ptr(self.bufs.attn);
        let (ss, _) = self.ptr(self.bufs.attn_scratch);
        let (gs, _) = self.ptr(self.bufs.gemm_scratch);
        let gemmer = self.gemm;
        let threads = self.pool.threads();
        // SAFETY (whole closure): qkv is read-only; each (row, head) job writes its own
        // D-column slice of attn; each thread uses its own score and GEMM scratch slices.
        let job = |tid: usize| {
            let qkv = unsafe { std::slice::from_raw_parts(qkv.get(), qlen) };
            let scores = unsafe { std::slice::from_raw_parts_mut(ss.get().add(tid * n * n), n * n) };
            let scratch = unsafe {
                std::slice::from_raw_parts_mut(gs.get().add(tid * gemm::SCRATCH_PER_THREAD), gemm::SCRATCH_PER_THREAD)
            };
            for job in split(rows * heads, threads, tid, 1) {
                let (r, hd) = (job / heads, job % heads);
                let base = r * n * 3 * c + hd * d;
                // S = q·kᵀ: A = q rows (stride 3C), B = k rows (stride 3C).
                gemmer.run_single(
                    scratch,
                    &Gemm {
                        m: n,
                        n,
                        k: d,
                        a: &qkv[base..],
                        lda: 3 * c,
                        b: BMat {
                            data: &qkv[base + c..],
                            rs: 3 * c,
                            cs: 1,
                        },
                        bias: None,
                        act: gemm::Act::None,
                        c: SendPtr(scores.as_mut_ptr()),
                        ldc: n,
                    },
                );
                for row in scores.chunks_exact_mut(n) {
                    math::softmax_scaled(row, scale);
                }
                // O = P·v: B(j = d, p = token) = v[token, d], i.e. rs 1, cs 3C.
                gemmer.run_single(
                    scratch,
                    &Gemm {
                        m: n,
                        n: d,
                        k: n,
                        a: scores,
                        lda: n,
                        b: BMat {
                            data: &qkv[base + 2 * c..],
                            rs: 1,
                            cs: 3 * c,
                        },
                        bias: None,
                        act: gemm::Act::None,
                        c: SendPtr(unsafe { attn.get().add(r * n * c + hd * d) }),
                        ldc: c,
                    },
                );
            }
        };
        self.pool.run(&job);
    }

    fn gated_residual(&mut self, src: Act, gate: usize, rows: usize) {
        let (n, c) = (self.model.config.tokens(), self.model.config.hidden_size);
        let (x, _) = self.ptr(self.bufs.x);
        let (s, _) = self.ptr(self.act_buf(src));
        let (m, _) = self.ptr(self.bufs.modv);
        self.par(rows * n, |range| {
            for tok in range {
                let r = tok / n;
                // SAFETY: each token updates its own row of x; src and gate are read-only.
                let (xr, sr, gr) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(x.get().add(tok * c), c),
                        std::slice::from_raw_parts(s.get().add(tok * c), c),
                        std::slice::from_raw_parts(m.get().add(r * 6 * c + gate * c), c),
                    )
                };
                math::gated_add(xr, gr, sr);
            }
        });
    }

    fn unpatchify(&mut self, rows: usize) {
        let cfg = &self.model.config;
        let (p, g, co, isz, n) = (cfg.patch_size, cfg.grid(), cfg.out_channels(), cfg.input_size, cfg.tokens());
        let (out, _) = self.ptr(self.bufs.out);
        let (img, _) = self.ptr(self.bufs.image);
        // img[r, ch, i·p + a, j·p + b] = out[r, i·G + j, (a·p + b)·Cout + ch] (reference doc A.8).
        self.par(rows * n, |range| {
            for tok in range {
                let (r, t) = (tok / n, tok % n);
                let (gi, gj) = (t / g, t % g);
                for a in 0..p {
                    for b in 0..p {
                        for ch in 0..co {
                            // SAFETY: each token writes its own p×p patch of every channel.
                            unsafe {
                                let v = *out.get().add(tok * p * p * co + (a * p + b) * co + ch);
                                *img.get().add(((r * co + ch) * isz + gi * p + a) * isz + gj * p + b) = v;
                            }
                        }
                    }
                }
            }
        });
    }
}
