//! The VAE decoder on the CPU: the [`VaeOps`] of the decoder graph (src/vae/graph.rs) in f32,
//! NHWC activations (one row of channels per pixel), every buffer in one arena planned for a
//! fixed latent size, 3×3 convolutions as GEMMs over an implicit im2col operand (the nearest
//! 2× upsample fused into the following conv), so a decode allocates nothing.

use std::sync::Arc;

use super::graph::{self, Conv, Kernel, VaeAct, VaeOps, WORK_BUFFERS};
use super::{Attention, VaeModel, WeightBias, GN_EPS};
use crate::cpu::gemm::{self, BMat, Conv3, Gemm, Gemmer};
use crate::cpu::math;
use crate::cpu::pool::{split, SendPtr, ThreadPool};
use crate::error::{Error, Result};
use crate::isa::Isa;
use crate::plan::{Arena, BufId, Dt, Plan};

/// Pixels per f32 partial sum in GroupNorm statistics (then folded into f64).
const STAT_BLOCK: usize = 32;

/// The CPU decoder's arena buffers.
struct DecoderBuffers {
    /// [`VaeAct::Latent`].
    latent: BufId,
    /// [`VaeAct::PostQuant`].
    post_quant: BufId,
    /// [`VaeAct::Work`].
    work: [BufId; WORK_BUFFERS],
    /// [`VaeAct::Image`], NHWC.
    image: BufId,
    /// The attention's projections, its output before `to_out` and its score matrix.
    attn_q: BufId,
    attn_k: BufId,
    attn_v: BufId,
    attn_out: BufId,
    attn_scores: BufId,
    /// GroupNorm: per-channel centre, scale, shift (3·C), per-thread f32 block sums and
    /// f64 totals.
    norm_channel: BufId,
    norm_block_sums: BufId,
    norm_thread_sums: BufId,
    gemm_scratch: BufId,
    gemm_packed_a: BufId,
}

/// A VAE decoder for one latent size, ready to decode any number of latents.
pub struct VaeDecoder {
    model: Arc<VaeModel>,
    /// The latent's (height, width).
    latent: (usize, usize),
    plan: Plan,
    arena: Arena,
    pool: ThreadPool,
    gemmer: Gemmer,
    buffers: DecoderBuffers,
    /// The widest activation's channels (rows of the GroupNorm buffers).
    max_channels: usize,
}

impl VaeDecoder {
    /// Plans and allocates everything a decode of `latent`×`latent` latents needs, with
    /// `threads` workers (0: all cores).
    pub fn new(model: Arc<VaeModel>, latent: usize, threads: usize) -> Result<Self> {
        Self::new_hw(model, (latent, latent), threads)
    }

    /// [`new`](Self::new) for latents of (height, width), which need not be square.
    pub fn new_hw(model: Arc<VaeModel>, latent: (usize, usize), threads: usize) -> Result<Self> {
        let cfg = &model.config;
        let (lh, lw) = latent;
        if lh == 0 || lh > 1024 || lw == 0 || lw > 1024 {
            return Err(Error::invalid("latent size", format!("{lh}×{lw}: expected 1 to 1024 per side")));
        }
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        let (lc, cm, oc) = (cfg.latent_channels, cfg.mid_channels(), cfg.out_channels);
        let l2 = lh * lw;
        let biggest = cfg.largest_activation_hw(latent);
        let (oh, ow) = (cfg.out_side(lh), cfg.out_side(lw));
        let max_channels = cfg.block_out_channels.iter().copied().max().unwrap_or(1).max(oc);
        let attn_px = if cfg.mid_attention { l2 } else { 0 };
        let mut plan = Plan::new(format!("VAE decoder, latent {lh}×{lw} → {oh}×{ow}, {threads} threads"));
        let buffers = DecoderBuffers {
            latent: plan.add("latent", &[l2, lc], Dt::F32),
            post_quant: plan.add("post_quant", &[l2, lc], Dt::F32),
            work: std::array::from_fn(|i| plan.add(format!("act{i}"), &[biggest], Dt::F32)),
            image: plan.add("image (NHWC)", &[oh * ow, oc], Dt::F32),
            attn_q: plan.add("attn_q", &[attn_px, cm], Dt::F32),
            attn_k: plan.add("attn_k", &[attn_px, cm], Dt::F32),
            attn_v: plan.add("attn_v", &[attn_px, cm], Dt::F32),
            attn_out: plan.add("attn_o", &[attn_px, cm], Dt::F32),
            attn_scores: plan.add("attn_scores", &[attn_px, attn_px], Dt::F32),
            norm_channel: plan.add("gn_channel", &[3, max_channels], Dt::F32),
            norm_block_sums: plan.add("gn_block_sums", &[threads, max_channels], Dt::F32),
            norm_thread_sums: plan.add("gn_thread_sums", &[threads, max_channels], Dt::F64),
            gemm_scratch: plan.add("gemm_scratch", &[threads, gemm::SCRATCH_PER_THREAD], Dt::F32),
            gemm_packed_a: plan.add("gemm_packed_a", &[gemm::packed_a_len(attn_px.max(1), cm)], Dt::F32),
        };
        plan.outside("VAE weights (mapped or converted once)", model.store.owned_bytes());
        let arena = Arena::new(&plan)?;
        let pool = ThreadPool::new(threads).map_err(|e| Error::invalid("threads", format!("cannot start: {e}")))?;
        let gemmer = Gemmer::new(Isa::from_env()?);
        Ok(VaeDecoder { model, latent, plan, arena, pool, gemmer, buffers, max_channels })
    }

    /// Runs on the given instruction-set path instead of the one `new` chose.
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.gemmer = Gemmer::new(isa);
        self
    }
    /// The instruction-set path the decoder runs.
    pub fn isa(&self) -> Isa {
        self.gemmer.isa()
    }
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    pub fn model(&self) -> &VaeModel {
        &self.model
    }
    /// The latent's height (its side, for a square decoder).
    pub fn latent_side(&self) -> usize {
        self.latent.0
    }
    /// The image's height (its side, for a square decoder).
    pub fn out_side(&self) -> usize {
        self.model.config.out_side(self.latent.0)
    }
    /// The image's (height, width).
    pub fn out_hw(&self) -> (usize, usize) {
        (self.model.config.out_side(self.latent.0), self.model.config.out_side(self.latent.1))
    }
    /// Floats of one latent (C, h, w).
    pub fn latent_len(&self) -> usize {
        self.model.config.latent_channels * self.latent.0 * self.latent.1
    }
    /// Floats of one decoded image (C, H, W).
    pub fn image_len(&self) -> usize {
        let (h, w) = self.out_hw();
        self.model.config.out_channels * h * w
    }

    /// Decodes one latent (C, h, w), as the sampler produced it (before the scaling factor
    /// is undone), into an image (C, H, W) of floats nominally in [−1, 1], not clamped.
    pub fn decode(&mut self, latent: &[f32], image: &mut [f32]) -> Result<()> {
        if latent.len() != self.latent_len() || image.len() != self.image_len() {
            return Err(Error::invalid(
                "VAE decode",
                format!(
                    "latent of {} floats and image of {} (expected {} = {}×{}×{} and {})",
                    latent.len(),
                    image.len(),
                    self.latent_len(),
                    self.model.config.latent_channels,
                    self.latent.0,
                    self.latent.1,
                    self.image_len()
                ),
            ));
        }
        let model = Arc::clone(&self.model);
        let cfg = &model.config;
        let l = self.latent;
        let lat = self.slice(self.buffers.latent, l.0 * l.1 * cfg.latent_channels);
        graph::stage_latents(&model, l, latent, |i, z| lat[i] = z)?;
        graph::decode(self, &model, l)?;
        let (oh, ow) = self.out_hw();
        let oc = cfg.out_channels;
        let px = oh * ow;
        let out = self.slice(self.buffers.image, px * oc);
        graph::unstage_images(out, oc, px, image)
    }

    /// The arena buffer of a graph activation.
    fn buffer(&self, act: VaeAct) -> BufId {
        let b = &self.buffers;
        match act {
            VaeAct::Latent => b.latent,
            VaeAct::PostQuant => b.post_quant,
            VaeAct::Work(i) => b.work[i],
            VaeAct::Image => b.image,
        }
    }

    fn gemm(&self, g: &Gemm) {
        let sb = self.plan.get(self.buffers.gemm_scratch);
        let pb = self.plan.get(self.buffers.gemm_packed_a);
        // SAFETY: scratch and packed-A are only touched inside GEMM calls, one at a time.
        let (scratch, packed) = unsafe {
            (
                std::slice::from_raw_parts_mut(self.arena.f32_ptr(sb), sb.elems()),
                std::slice::from_raw_parts_mut(self.arena.f32_ptr(pb), pb.elems()),
            )
        };
        self.gemmer.run(&self.pool, scratch, packed, g);
    }

    /// dst = src·Wᵀ + bias (+ add) over `px` rows of `c` features: an attention linear.
    fn linear(&self, src: &[f32], weights: &WeightBias, px: usize, c: usize, dst: BufId, add: Option<&[f32]>) {
        let (dp, _) = self.ptr(dst);
        self.gemm(&Gemm {
            m: px,
            n: c,
            k: c,
            a: src,
            a_minus: None,
            lda: c,
            conv: None,
            b: BMat::weight(self.model.weight(weights.weight), c),
            bias: Some(self.model.weight(weights.bias)),
            add: add.map(|a| (a, c)),
            act: gemm::Act::None,
            c: dp,
            ldc: c,
        });
    }

    fn par(&self, total: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
        self.pool.par(total, f)
    }

    fn ptr(&self, id: BufId) -> (SendPtr, usize) {
        let b = self.plan.get(id);
        (SendPtr(self.arena.f32_ptr(b)), b.elems())
    }

    /// A read view of the first `len` floats of a buffer.
    fn view(&self, id: BufId, len: usize) -> &[f32] {
        let (p, n) = self.ptr(id);
        assert!(len <= n, "VAE buffer {} too small", self.plan.get(id).name);
        // SAFETY: in bounds; callers never write a buffer while a view of it is in use.
        unsafe { std::slice::from_raw_parts(p.get(), len) }
    }

    #[allow(clippy::mut_from_ref)]
    fn slice(&self, id: BufId, len: usize) -> &mut [f32] {
        let (p, n) = self.ptr(id);
        assert!(len <= n, "VAE buffer {} too small", self.plan.get(id).name);
        // SAFETY: in bounds; used only for a buffer no other view is reading.
        unsafe { std::slice::from_raw_parts_mut(p.get(), len) }
    }
}

impl VaeOps for VaeDecoder {
    /// A GEMM over the image's pixels: the weight (cout, cin·k²) as stored, the source read
    /// through an implicit im2col for a 3×3 kernel, bias and residual in the epilogue.
    fn conv(
        &mut self,
        weights: &WeightBias,
        shape: Conv,
        src: VaeAct,
        dst: VaeAct,
        residual: Option<VaeAct>,
    ) -> Result<()> {
        let Conv { kernel, h, w, cin, cout } = shape;
        let (k, conv) = match kernel {
            Kernel::OneByOne => (cin, None),
            Kernel::ThreeByThree { upsample } => (9 * cin, Some(Conv3 { h, w, up2: upsample })),
        };
        let px = shape.pixels();
        let (dp, _) = self.ptr(self.buffer(dst));
        self.gemm(&Gemm {
            m: px,
            n: cout,
            k,
            a: self.view(self.buffer(src), shape.src_pixels() * cin),
            a_minus: None,
            lda: cin,
            conv,
            b: BMat::weight(self.model.weight(weights.weight), k),
            bias: Some(self.model.weight(weights.bias)),
            add: residual.map(|r| (self.view(self.buffer(r), px * cout), cout)),
            act: gemm::Act::None,
            c: dp,
            ldc: cout,
        });
        Ok(())
    }

    /// GroupNorm in two passes (mean, then centred squares) with f32 sums over blocks of
    /// pixels folded into f64, so the statistics are exact to f32 rounding of the inputs.
    fn group_norm(
        &mut self,
        norm: &WeightBias,
        px: usize,
        c: usize,
        silu: bool,
        src: VaeAct,
        dst: VaeAct,
    ) -> Result<()> {
        let groups = self.model.config.norm_num_groups;
        let cpg = c / groups;
        let x = self.view(self.buffer(src), px * c);
        let (gn, _) = self.ptr(self.buffers.norm_channel);
        let cmax = self.max_channels;
        let threads = self.pool.threads();
        let isa = self.gemmer.isa();
        let (acc, _) = self.ptr(self.buffers.norm_block_sums);
        let tot = SendPtr64(self.arena.f64_ptr(self.plan.get(self.buffers.norm_thread_sums)));
        // SAFETY (both closures below): thread `tid` writes only row `tid` of the block-sum
        // and total buffers; the centre row of `gn` is only read while they run.
        let stats = |square: bool| {
            self.pool.run(&|tid| unsafe {
                let acc = std::slice::from_raw_parts_mut(acc.get().add(tid * cmax), c);
                let tot = std::slice::from_raw_parts_mut(tot.get().add(tid * cmax), c);
                let center = std::slice::from_raw_parts(gn.get(), c);
                tot.fill(0.0);
                let rows = split(px, threads, tid, 1);
                let mut p = rows.start;
                while p < rows.end {
                    let n = STAT_BLOCK.min(rows.end - p);
                    acc.fill(0.0);
                    math::channel_sums(isa, &x[p * c..(p + n) * c], center, square, acc);
                    for (t, &a) in tot.iter_mut().zip(acc.iter()) {
                        *t += a as f64;
                    }
                    p += n;
                }
            });
        };
        // SAFETY: between the parallel passes only this thread touches the GN buffers.
        let group_totals = |out: &mut [f64]| unsafe {
            out.fill(0.0);
            for tid in 0..threads {
                let tot = std::slice::from_raw_parts(tot.get().add(tid * cmax), c);
                for (ch, &v) in tot.iter().enumerate() {
                    out[ch / cpg] += v;
                }
            }
        };
        let n = (px * cpg) as f64;
        let mut sums = [0.0f64; 1024];
        let sums = &mut sums[..groups.min(1024)];
        // SAFETY: the GN channel buffer holds 3·cmax floats; only this thread uses it here.
        let (center, scale, shift) = unsafe {
            (
                std::slice::from_raw_parts_mut(gn.get(), c),
                std::slice::from_raw_parts_mut(gn.get().add(cmax), c),
                std::slice::from_raw_parts_mut(gn.get().add(2 * cmax), c),
            )
        };
        center.fill(0.0);
        stats(false);
        group_totals(sums);
        let means: [f64; 1024] = std::array::from_fn(|g| if g < sums.len() { sums[g] / n } else { 0.0 });
        for (ch, m) in center.iter_mut().enumerate() {
            *m = means[ch / cpg] as f32;
        }
        stats(true);
        group_totals(sums);
        let (gamma, beta) = (self.model.weight(norm.weight), self.model.weight(norm.bias));
        for ch in 0..c {
            let g = ch / cpg;
            // The centre was rounded to f32; correct the variance for that offset exactly.
            let d = center[ch] as f64 - means[g];
            let var = (sums[g] / n - d * d).max(0.0);
            scale[ch] = (gamma[ch] as f64 / (var + GN_EPS as f64).sqrt()) as f32;
            shift[ch] = beta[ch];
        }
        let (dp, _) = self.ptr(self.buffer(dst));
        let (center, scale, shift) = (&*center, &*scale, &*shift);
        self.par(px, |rows| {
            // SAFETY: each thread writes its own pixel rows of dst (distinct from src).
            let out = unsafe { std::slice::from_raw_parts_mut(dp.get().add(rows.start * c), rows.len() * c) };
            math::norm_apply(isa, &x[rows.start * c..rows.end * c], center, scale, shift, silu, out);
        });
        Ok(())
    }

    /// q, k, v and the output projection as GEMMs, S = q·kᵀ, a scaled row softmax in place,
    /// O = S·v, then `to_out` with the residual in its epilogue.
    fn attention(
        &mut self,
        attn: &Attention,
        px: usize,
        c: usize,
        src: VaeAct,
        residual: VaeAct,
        dst: VaeAct,
    ) -> Result<()> {
        let b = &self.buffers;
        let (attn_q, attn_k, attn_v, attn_out, attn_scores) = (b.attn_q, b.attn_k, b.attn_v, b.attn_out, b.attn_scores);
        let normed = self.view(self.buffer(src), px * c);
        for (weights, out) in [(&attn.q, attn_q), (&attn.k, attn_k), (&attn.v, attn_v)] {
            self.linear(normed, weights, px, c, out, None);
        }
        let (q, k, v) = (self.view(attn_q, px * c), self.view(attn_k, px * c), self.view(attn_v, px * c));
        let (sp, _) = self.ptr(attn_scores);
        self.gemm(&Gemm {
            m: px,
            n: px,
            k: c,
            a: q,
            a_minus: None,
            lda: c,
            conv: None,
            b: BMat { data: k, rs: c, cs: 1 },
            bias: None,
            add: None,
            act: gemm::Act::None,
            c: sp,
            ldc: px,
        });
        let scale = 1.0 / (c as f32).sqrt();
        let isa = self.gemmer.isa();
        self.par(px, |rows| {
            for r in rows {
                // SAFETY: each thread normalises its own rows of the score matrix.
                let row = unsafe { std::slice::from_raw_parts_mut(sp.get().add(r * px), px) };
                math::softmax_scaled(isa, row, scale);
            }
        });
        let (op, _) = self.ptr(attn_out);
        self.gemm(&Gemm {
            m: px,
            n: c,
            k: px,
            a: self.view(attn_scores, px * px),
            a_minus: None,
            lda: px,
            conv: None,
            b: BMat { data: v, rs: 1, cs: c },
            bias: None,
            add: None,
            act: gemm::Act::None,
            c: op,
            ldc: c,
        });
        let residual = self.view(self.buffer(residual), px * c);
        self.linear(self.view(attn_out, px * c), &attn.out, px, c, self.buffer(dst), Some(residual));
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct SendPtr64(*mut f64);
impl SendPtr64 {
    #[inline(always)]
    fn get(self) -> *mut f64 {
        self.0
    }
}
// SAFETY: threads write disjoint rows through it (see `group_norm`).
unsafe impl Send for SendPtr64 {}
unsafe impl Sync for SendPtr64 {}
