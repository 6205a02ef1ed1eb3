//! The VAE decoder on the CPU: f32, NHWC activations (one row of channels per pixel), every
//! buffer in one arena planned for a fixed latent size, 3×3 convolutions as GEMMs over an
//! implicit im2col operand (the nearest 2× upsample fused into the following conv), so a
//! decode allocates nothing.

use std::sync::Arc;

use super::{Attention, Resnet, VaeModel, Wb, GN_EPS};
use crate::cpu::gemm::{self, BMat, Conv3, Gemm, Gemmer};
use crate::cpu::isa::Isa;
use crate::cpu::math;
use crate::cpu::pool::{split, SendPtr, ThreadPool};
use crate::error::{Error, Result};
use crate::plan::{Arena, BufId, Dt, Plan};

/// Pixels per f32 partial sum in GroupNorm statistics (then folded into f64).
const STAT_BLOCK: usize = 32;

struct Bufs {
    /// The scaled latent, NHWC, and the post_quant_conv output.
    lat: BufId,
    lat2: BufId,
    /// Four activation buffers of the largest stage; each op reads some, writes another.
    big: [BufId; 4],
    q: BufId,
    k: BufId,
    v: BufId,
    o: BufId,
    scores: BufId,
    /// GroupNorm: per-channel centre, scale, shift (3·C), per-thread f32 block sums and
    /// f64 totals.
    gn: BufId,
    gn_acc: BufId,
    gn_tot: BufId,
    scratch: BufId,
    packed: BufId,
}

/// A VAE decoder for one latent size, ready to decode any number of latents.
pub struct VaeDecoder {
    model: Arc<VaeModel>,
    latent: usize,
    plan: Plan,
    arena: Arena,
    pool: ThreadPool,
    gemmer: Gemmer,
    b: Bufs,
    cmax: usize,
}

impl VaeDecoder {
    /// Plans and allocates everything a decode of `latent`×`latent` latents needs, with
    /// `threads` workers (0: all cores).
    pub fn new(model: Arc<VaeModel>, latent: usize, threads: usize) -> Result<Self> {
        let cfg = &model.config;
        if latent == 0 || latent > 1024 {
            return Err(Error::invalid("latent size", format!("{latent}: expected 1 to 1024")));
        }
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        let (lc, cm, oc) = (cfg.latent_channels, cfg.mid_channels(), cfg.out_channels);
        let l2 = latent * latent;
        let (biggest, side) = (cfg.largest_activation(latent), cfg.out_side(latent));
        let cmax = cfg.block_out_channels.iter().copied().max().unwrap_or(1).max(oc);
        let attn_px = if cfg.mid_attention { l2 } else { 0 };
        let mut plan = Plan::new(format!("VAE decoder, latent {latent}×{latent} → {side}×{side}, {threads} threads"));
        let b = Bufs {
            lat: plan.add("latent", &[l2, lc], Dt::F32),
            lat2: plan.add("post_quant", &[l2, lc], Dt::F32),
            big: std::array::from_fn(|i| plan.add(format!("act{i}"), &[biggest], Dt::F32)),
            q: plan.add("attn_q", &[attn_px, cm], Dt::F32),
            k: plan.add("attn_k", &[attn_px, cm], Dt::F32),
            v: plan.add("attn_v", &[attn_px, cm], Dt::F32),
            o: plan.add("attn_o", &[attn_px, cm], Dt::F32),
            scores: plan.add("attn_scores", &[attn_px, attn_px], Dt::F32),
            gn: plan.add("gn_channel", &[3, cmax], Dt::F32),
            gn_acc: plan.add("gn_block_sums", &[threads, cmax], Dt::F32),
            gn_tot: plan.add("gn_thread_sums", &[threads, cmax], Dt::F64),
            scratch: plan.add("gemm_scratch", &[threads, gemm::SCRATCH_PER_THREAD], Dt::F32),
            packed: plan.add("gemm_packed_a", &[gemm::packed_a_len(attn_px.max(1), cm)], Dt::F32),
        };
        plan.outside("VAE weights (mapped or converted once)", model.store.owned_bytes());
        let arena = Arena::new(&plan)?;
        let pool = ThreadPool::new(threads).map_err(|e| Error::invalid("threads", format!("cannot start: {e}")))?;
        Ok(VaeDecoder { model, latent, plan, arena, pool, gemmer: Gemmer::new(Isa::from_env()?), b, cmax })
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
    pub fn latent_side(&self) -> usize {
        self.latent
    }
    pub fn out_side(&self) -> usize {
        self.model.config.out_side(self.latent)
    }
    /// Floats of one latent (C, h, w).
    pub fn latent_len(&self) -> usize {
        self.model.config.latent_channels * self.latent * self.latent
    }
    /// Floats of one decoded image (C, H, W).
    pub fn image_len(&self) -> usize {
        self.model.config.out_channels * self.out_side() * self.out_side()
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
                    self.latent,
                    self.latent,
                    self.image_len()
                ),
            ));
        }
        if let Some(i) = latent.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("latents", format!("value {} at index {i} is not finite", latent[i])));
        }
        let model = Arc::clone(&self.model);
        let (cfg, t) = (&model.config, &model.t);
        let (lc, l) = (cfg.latent_channels, self.latent);
        let l2 = l * l;
        // z = latent / scaling + shift (a division, as DiT's sample.py does), to NHWC.
        let (scale, shift) = (cfg.scaling_factor as f32, cfg.shift_factor as f32);
        let lat = self.slice(self.b.lat, l2 * lc);
        for p in 0..l2 {
            for ch in 0..lc {
                lat[p * lc + ch] = latent[ch * l2 + p] / scale + shift;
            }
        }
        let z = match &t.post_quant {
            Some(pq) => {
                self.conv1x1(self.b.lat, l2, lc, pq, lc, self.b.lat2, None);
                self.b.lat2
            }
            None => self.b.lat,
        };
        let cm = cfg.mid_channels();
        let mut x = self.b.big[0];
        self.conv3(z, l, lc, false, &t.conv_in, cm, x, None);
        x = self.resnet(&t.mid[0], l, x);
        if let Some(a) = &t.attn {
            x = self.attention(a, l2, cm, x);
        }
        x = self.resnet(&t.mid[1], l, x);
        let mut side = l;
        for (i, blk) in t.up.iter().enumerate() {
            for r in &blk.resnets {
                x = self.resnet(r, side, x);
            }
            if let Some(up) = &blk.upsample {
                let c = cfg.up_channels(i).1;
                let [dst, ..] = self.others(&[x]);
                side *= 2;
                self.conv3(x, side, c, true, up, c, dst, None);
                x = dst;
            }
        }
        let (c0, oc) = (cfg.block_out_channels[0], cfg.out_channels);
        let [tn, out, ..] = self.others(&[x]);
        let px = side * side;
        self.group_norm(x, px, c0, &t.norm_out, true, tn);
        self.conv3(tn, side, c0, false, &t.conv_out, oc, out, None);
        let o = self.slice(out, px * oc);
        for (p, row) in o.chunks_exact(oc).enumerate() {
            for (ch, &v) in row.iter().enumerate() {
                image[ch * px + p] = v;
            }
        }
        if let Some(i) = image.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "VAE output",
                format!("value {} at index {i} is not finite (do the VAE weights hold NaN or Inf?)", image[i]),
            ));
        }
        Ok(())
    }

    /// ResnetBlock2D: h = conv1(SiLU(GN1(x))); out = conv2(SiLU(GN2(h))) + (x or shortcut(x)).
    fn resnet(&self, r: &Resnet, side: usize, x: BufId) -> BufId {
        let [t, h, s, ..] = self.others(&[x]);
        let px = side * side;
        self.group_norm(x, px, r.cin, &r.norm1, true, t);
        self.conv3(t, side, r.cin, false, &r.conv1, r.cout, h, None);
        self.group_norm(h, px, r.cout, &r.norm2, true, t);
        let res = match &r.shortcut {
            Some(sc) => {
                self.conv1x1(x, px, r.cin, sc, r.cout, s, None);
                s
            }
            None => x,
        };
        self.conv3(t, side, r.cout, false, &r.conv2, r.cout, h, Some(res));
        h
    }

    /// The mid block's single-head self-attention with its residual.
    fn attention(&self, a: &Attention, px: usize, c: usize, x: BufId) -> BufId {
        let [t, out, ..] = self.others(&[x]);
        self.group_norm(x, px, c, &a.norm, false, t);
        self.conv1x1(t, px, c, &a.q, c, self.b.q, None);
        self.conv1x1(t, px, c, &a.k, c, self.b.k, None);
        self.conv1x1(t, px, c, &a.v, c, self.b.v, None);
        let (q, k, v) = (self.view(self.b.q, px * c), self.view(self.b.k, px * c), self.view(self.b.v, px * c));
        let (sp, _) = self.ptr(self.b.scores);
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
        let (op, _) = self.ptr(self.b.o);
        self.gemm(&Gemm {
            m: px,
            n: c,
            k: px,
            a: self.view(self.b.scores, px * px),
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
        self.conv1x1(self.b.o, px, c, &a.out, c, out, Some(x));
        out
    }

    /// dst = conv3×3(src) + bias (+ add), `side`×`side` output pixels; with `up2` the source
    /// is half the side and upsampled on the fly.
    #[allow(clippy::too_many_arguments)]
    fn conv3(
        &self,
        src: BufId,
        side: usize,
        cin: usize,
        up2: bool,
        w: &Wb,
        cout: usize,
        dst: BufId,
        add: Option<BufId>,
    ) {
        let px = side * side;
        let src_px = if up2 { px / 4 } else { px };
        let (dp, _) = self.ptr(dst);
        self.gemm(&Gemm {
            m: px,
            n: cout,
            k: 9 * cin,
            a: self.view(src, src_px * cin),
            a_minus: None,
            lda: cin,
            conv: Some(Conv3 { h: side, w: side, up2 }),
            b: BMat::weight(self.model.w(w.w), 9 * cin),
            bias: Some(self.model.w(w.b)),
            add: add.map(|a| (self.view(a, px * cout), cout)),
            act: gemm::Act::None,
            c: dp,
            ldc: cout,
        });
    }

    /// dst = src·Wᵀ + bias (+ add): a 1×1 convolution or a linear layer over pixels.
    #[allow(clippy::too_many_arguments)]
    fn conv1x1(&self, src: BufId, px: usize, cin: usize, w: &Wb, cout: usize, dst: BufId, add: Option<BufId>) {
        let (dp, _) = self.ptr(dst);
        self.gemm(&Gemm {
            m: px,
            n: cout,
            k: cin,
            a: self.view(src, px * cin),
            a_minus: None,
            lda: cin,
            conv: None,
            b: BMat::weight(self.model.w(w.w), cin),
            bias: Some(self.model.w(w.b)),
            add: add.map(|a| (self.view(a, px * cout), cout)),
            act: gemm::Act::None,
            c: dp,
            ldc: cout,
        });
    }

    /// GroupNorm (eps 1e-6, affine) over `px` pixels of `c` channels, then SiLU if `act`.
    /// Two passes (mean, then centred squares) with f32 sums over blocks of pixels folded
    /// into f64, so the statistics are exact to f32 rounding of the inputs.
    fn group_norm(&self, src: BufId, px: usize, c: usize, norm: &Wb, act: bool, dst: BufId) {
        let groups = self.model.config.norm_num_groups;
        let cpg = c / groups;
        let x = self.view(src, px * c);
        let (gn, _) = self.ptr(self.b.gn);
        let cmax = self.cmax;
        let threads = self.pool.threads();
        let isa = self.gemmer.isa();
        let (acc, _) = self.ptr(self.b.gn_acc);
        let tot = SendPtr64(self.arena.f64_ptr(self.plan.get(self.b.gn_tot)));
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
        let (gamma, beta) = (self.model.w(norm.w), self.model.w(norm.b));
        for ch in 0..c {
            let g = ch / cpg;
            // The centre was rounded to f32; correct the variance for that offset exactly.
            let d = center[ch] as f64 - means[g];
            let var = (sums[g] / n - d * d).max(0.0);
            scale[ch] = (gamma[ch] as f64 / (var + GN_EPS as f64).sqrt()) as f32;
            shift[ch] = beta[ch];
        }
        let (dp, _) = self.ptr(dst);
        let (center, scale, shift) = (&*center, &*scale, &*shift);
        self.par(px, |rows| {
            // SAFETY: each thread writes its own pixel rows of dst (distinct from src).
            let out = unsafe { std::slice::from_raw_parts_mut(dp.get().add(rows.start * c), rows.len() * c) };
            math::norm_apply(isa, &x[rows.start * c..rows.end * c], center, scale, shift, act, out);
        });
    }

    /// The big buffers other than `used`, in order.
    fn others(&self, used: &[BufId]) -> [BufId; 3] {
        let mut out = [self.b.big[0]; 3];
        let mut n = 0;
        for &b in &self.b.big {
            if !used.contains(&b) && n < 3 {
                out[n] = b;
                n += 1;
            }
        }
        out
    }

    fn gemm(&self, g: &Gemm) {
        let sb = self.plan.get(self.b.scratch);
        let pb = self.plan.get(self.b.packed);
        // SAFETY: scratch and packed-A are only touched inside GEMM calls, one at a time.
        let (scratch, packed) = unsafe {
            (
                std::slice::from_raw_parts_mut(self.arena.f32_ptr(sb), sb.elems()),
                std::slice::from_raw_parts_mut(self.arena.f32_ptr(pb), pb.elems()),
            )
        };
        self.gemmer.run(&self.pool, scratch, packed, g);
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
