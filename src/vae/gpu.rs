//! The VAE decoder on a [`Device`] (a CUDA GPU or the CPU emulation): the same network as
//! [`super::VaeDecoder`], f16 NHWC activations with f32 accumulation, every buffer in one
//! arena planned for a fixed latent size and batch. 3×3 convolutions are implicit GEMMs
//! (`conv3x3_f16`, weights permuted tap-major once at upload, the nearest-2× upsample read
//! through the next convolution's indexing, the residual added in the epilogue); GroupNorm is
//! fused with SiLU; 1×1 convolutions and the mid block's attention are `gemm_fused_f16` calls
//! around a row softmax. The result comes back as f32 (C, H, W) images, or as uint8 NHWC
//! pixels converted on the device ([`GpuVaeDecoder::decode_u8`]), the only bytes that cross
//! to the host on the FID path.

use std::sync::Arc;

use super::{Resnet, VaeModel, Wb, GN_EPS};
use crate::error::{Error, Result};
use crate::gpu::launch::{self, Conv3Spec, ConvWeights, GemmOut, GemmSpec, VaeImage};
use crate::gpu::{f16, DevSlice, DevType, Device};
use crate::image::Rounding;
use crate::plan::{BufId, Dt, Plan};
use crate::weights::TRef;

struct Bufs {
    /// Per weight tensor (in `weights` order), its arena buffer.
    weights: Vec<BufId>,
    lat: BufId,
    lat2: BufId,
    big: [BufId; 4],
    q: BufId,
    k: BufId,
    v: BufId,
    vt: BufId,
    o: BufId,
    scores: BufId,
    probs: BufId,
    out: BufId,
    pixels: BufId,
}

/// A VAE decoder on a device for one latent size and up to `max_images` latents per call.
pub struct GpuVaeDecoder<D: Device> {
    model: Arc<VaeModel>,
    dev: D,
    plan: Plan,
    b: Bufs,
    /// Weight tensor → its index in `b.weights`.
    index: Vec<(TRef, usize)>,
    latent: usize,
    max_images: usize,
    /// Host staging: one batch of latents in NHWC f16, and the f32 NHWC result.
    lat_host: Vec<f16>,
    out_host: Vec<f32>,
    /// The network's launches for n images, recorded as a graph the first time n images are
    /// decoded (index n − 1) and replayed after: one graph launch per decode.
    graphs: Vec<Option<D::Graph>>,
}

/// Every weight tensor the decoder reads, with whether it is a 3×3 convolution weight
/// (permuted tap-major at upload) and its (cout, cin).
fn weight_list(m: &VaeModel) -> Vec<(TRef, Option<(usize, usize)>)> {
    let t = &m.t;
    let cfg = &m.config;
    let mut v = Vec::new();
    let conv3 = |v: &mut Vec<_>, wb: &Wb, cout: usize, cin: usize| {
        v.push((wb.w, Some((cout, cin))));
        v.push((wb.b, None));
    };
    let plain = |v: &mut Vec<_>, wb: &Wb| {
        v.push((wb.w, None));
        v.push((wb.b, None));
    };
    let resnet = |v: &mut Vec<(TRef, Option<(usize, usize)>)>, r: &Resnet| {
        plain(v, &r.norm1);
        v.push((r.conv1.w, Some((r.cout, r.cin))));
        v.push((r.conv1.b, None));
        plain(v, &r.norm2);
        v.push((r.conv2.w, Some((r.cout, r.cout))));
        v.push((r.conv2.b, None));
        if let Some(s) = &r.shortcut {
            plain(v, s);
        }
    };
    if let Some(pq) = &t.post_quant {
        plain(&mut v, pq);
    }
    let cm = cfg.mid_channels();
    conv3(&mut v, &t.conv_in, cm, cfg.latent_channels);
    resnet(&mut v, &t.mid[0]);
    if let Some(a) = &t.attn {
        for wb in [&a.norm, &a.q, &a.k, &a.v, &a.out] {
            plain(&mut v, wb);
        }
    }
    resnet(&mut v, &t.mid[1]);
    for (i, blk) in t.up.iter().enumerate() {
        for r in &blk.resnets {
            resnet(&mut v, r);
        }
        if let Some(up) = &blk.upsample {
            let c = cfg.up_channels(i).1;
            conv3(&mut v, up, c, c);
        }
    }
    plain(&mut v, &t.norm_out);
    conv3(&mut v, &t.conv_out, cfg.out_channels, cfg.block_out_channels[0]);
    v
}

impl<D: Device> GpuVaeDecoder<D> {
    /// Plans the arena for `max_images` latents of side `latent`, opens the device on it and
    /// uploads the weights (f16; 3×3 convolution weights tap-major).
    pub fn new(
        model: Arc<VaeModel>,
        latent: usize,
        max_images: usize,
        open: impl FnOnce(&Plan) -> Result<D>,
    ) -> Result<Self> {
        let cfg = model.config.clone();
        if latent == 0 || latent > 256 || max_images == 0 || max_images > 1024 {
            return Err(Error::invalid(
                "GPU VAE decoder",
                format!("latent side {latent} (1..=256) and {max_images} images per call (1..=1024)"),
            ));
        }
        let (lc, cm, oc) = (cfg.latent_channels, cfg.mid_channels(), cfg.out_channels);
        let l2 = latent * latent;
        let (biggest, side) = (cfg.largest_activation(latent), cfg.out_side(latent));
        let n = max_images;
        if (n * biggest) as u64 > i32::MAX as u64 || (l2 * l2) as u64 > i32::MAX as u64 {
            return Err(Error::invalid(
                "GPU VAE decoder",
                format!("{n} images of {side}×{side}: activations past 32-bit kernel indices; decode fewer per call"),
            ));
        }
        let attn_px = if cfg.mid_attention { l2 } else { 1 };
        let mut plan = Plan::new(format!("GPU VAE decoder, {n} × latent {latent}×{latent} → {side}×{side}"));
        let list = weight_list(&model);
        let mut index = Vec::with_capacity(list.len());
        let weights = list
            .iter()
            .enumerate()
            .map(|(i, (r, _))| {
                index.push((*r, i));
                plan.add(format!("weight.{i}"), &[model.w(*r).len()], Dt::F16)
            })
            .collect();
        let h = Dt::F16;
        let b = Bufs {
            weights,
            lat: plan.add("latent (NHWC)", &[n * l2, lc], h),
            lat2: plan.add("post_quant", &[n * l2, lc], h),
            big: std::array::from_fn(|i| plan.add(format!("act{i}"), &[n * biggest], h)),
            q: plan.add("attn_q", &[attn_px, cm], h),
            k: plan.add("attn_k", &[attn_px, cm], h),
            v: plan.add("attn_v", &[attn_px, cm], h),
            vt: plan.add("attn_v_t", &[cm, attn_px], h),
            o: plan.add("attn_o", &[attn_px, cm], h),
            scores: plan.add("attn_scores", &[attn_px, attn_px], h),
            probs: plan.add("attn_probs", &[attn_px, attn_px], h),
            out: plan.add("image (NHWC f32)", &[n * side * side, oc], Dt::F32),
            pixels: plan.add("pixels (NHWC u8)", &[n * side * side, oc], Dt::U8),
        };
        let dev = open(&plan)?;
        let mut d = GpuVaeDecoder {
            model,
            dev,
            plan,
            b,
            index,
            latent,
            max_images,
            lat_host: vec![f16::ZERO; n * l2 * lc],
            out_host: vec![0.0; n * side * side * oc],
            graphs: Vec::new(),
        };
        d.upload(&list)?;
        Ok(d)
    }

    fn upload(&mut self, list: &[(TRef, Option<(usize, usize)>)]) -> Result<()> {
        let mut staging: Vec<f16> = Vec::new();
        for (i, (r, conv)) in list.iter().enumerate() {
            let src = self.model.w(*r);
            staging.clear();
            match conv {
                // (cout, cin, ky, kx) → (cout, ky, kx, cin)
                Some((cout, cin)) => {
                    staging.resize(src.len(), f16::ZERO);
                    for co in 0..*cout {
                        for ci in 0..*cin {
                            for tap in 0..9 {
                                staging[(co * 9 + tap) * cin + ci] = f16::from_f32(src[(co * cin + ci) * 9 + tap]);
                            }
                        }
                    }
                }
                None => staging.extend(src.iter().map(|&v| f16::from_f32(v))),
            }
            let dst = self.s::<f16>(self.b.weights[i])?;
            self.dev.upload(dst, &staging)?;
        }
        self.dev.synchronize()
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    pub fn model(&self) -> &VaeModel {
        &self.model
    }
    /// Latents per call at most.
    /// Graphs recorded so far (one per batch size decoded).
    pub fn graph_count(&self) -> usize {
        self.graphs.iter().filter(|g| g.is_some()).count()
    }

    pub fn max_images(&self) -> usize {
        self.max_images
    }
    pub fn device(&self) -> &D {
        &self.dev
    }
    pub fn out_side(&self) -> usize {
        self.model.config.out_side(self.latent)
    }
    pub fn latent_len(&self) -> usize {
        self.model.config.latent_channels * self.latent * self.latent
    }
    pub fn image_len(&self) -> usize {
        self.model.config.out_channels * self.out_side() * self.out_side()
    }

    fn s<T: DevType>(&self, id: BufId) -> Result<DevSlice<T>> {
        self.dev.slice::<T>(self.plan.get(id))
    }

    fn w(&self, r: TRef) -> Result<DevSlice<f16>> {
        let i =
            self.index.iter().find(|(t, _)| *t == r).map(|&(_, i)| i).ok_or_else(|| {
                Error::invalid("GPU VAE decoder", "a weight tensor the plan does not hold (internal)")
            })?;
        self.s(self.b.weights[i])
    }

    /// Decodes `n = latents.len() / latent_len` latents (C, h, w each, as sampled) into f32
    /// images (C, H, W each), not clamped, as [`super::VaeDecoder::decode`].
    pub fn decode(&mut self, latents: &[f32], images: &mut [f32]) -> Result<()> {
        let n = self.run(latents, images.len() / self.image_len().max(1), images.len())?;
        let (oc, px) = (self.model.config.out_channels, self.out_side() * self.out_side());
        let out = self.s::<f32>(self.b.out)?.sub(0, n * px * oc)?;
        let host = &mut self.out_host[..n * px * oc];
        self.dev.download(out, host)?;
        for img in 0..n {
            for p in 0..px {
                for ch in 0..oc {
                    images[(img * oc + ch) * px + p] = host[(img * px + p) * oc + ch];
                }
            }
        }
        if let Some(i) = images.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("VAE output", format!("value {} at index {i} is not finite", images[i])));
        }
        Ok(())
    }

    /// Decodes into uint8 NHWC pixels converted on the device (`rounding` as
    /// [`crate::image::to_u8`] / `to_u8_diffusers`).
    pub fn decode_u8(&mut self, latents: &[f32], pixels: &mut [u8], rounding: Rounding) -> Result<()> {
        let n = self.run(latents, pixels.len() / self.image_len().max(1), pixels.len())?;
        let len = n * self.image_len();
        let out = self.s::<f32>(self.b.out)?.sub(0, len)?;
        launch::vae_to_u8(&self.dev, self.s::<u8>(self.b.pixels)?, VaeImage::F32(out), len as i32, rounding)?;
        self.dev.download(self.s::<u8>(self.b.pixels)?.sub(0, len)?, pixels)
    }

    /// Validates, stages the latents and runs the network into `out`; returns the image count.
    fn run(&mut self, latents: &[f32], n_out: usize, out_len: usize) -> Result<usize> {
        let ll = self.latent_len();
        let n = latents.len() / ll.max(1);
        if n == 0 || n > self.max_images || latents.len() != n * ll || n_out != n || out_len != n * self.image_len() {
            return Err(Error::invalid(
                "VAE decode",
                format!(
                    "{} latent floats and {out_len} output values: expected 1..={} latents of {ll} floats and {} values per image",
                    latents.len(),
                    self.max_images,
                    self.image_len()
                ),
            ));
        }
        if let Some(i) = latents.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("latents", format!("value {} at index {i} is not finite", latents[i])));
        }
        let model = Arc::clone(&self.model);
        let cfg = &model.config;
        let (lc, l) = (cfg.latent_channels, self.latent);
        let l2 = l * l;
        let (scale, shift) = (cfg.scaling_factor as f32, cfg.shift_factor as f32);
        for img in 0..n {
            for p in 0..l2 {
                for ch in 0..lc {
                    self.lat_host[(img * l2 + p) * lc + ch] =
                        f16::from_f32(latents[(img * lc + ch) * l2 + p] / scale + shift);
                }
            }
        }
        self.dev.upload(self.s::<f16>(self.b.lat)?.sub(0, n * l2 * lc)?, &self.lat_host[..n * l2 * lc])?;
        if self.graphs.len() < n {
            self.graphs.resize_with(n, || None);
        }
        if self.graphs[n - 1].is_none() {
            self.dev.begin_capture()?;
            let recorded = self.network(n);
            let graph = self.dev.end_capture();
            recorded?;
            self.graphs[n - 1] = Some(graph?);
        }
        if let Some(g) = &self.graphs[n - 1] {
            self.dev.launch_graph(g)?;
        }
        Ok(n)
    }

    /// The decoder's launches for `n` staged latents, from `lat` to `out`.
    fn network(&self, n: usize) -> Result<()> {
        let model = Arc::clone(&self.model);
        let (cfg, t) = (&model.config, &model.t);
        let (lc, l) = (cfg.latent_channels, self.latent);
        let l2 = l * l;
        let z = match &t.post_quant {
            Some(pq) => {
                self.conv1x1(self.b.lat, n * l2, lc, pq, lc, self.b.lat2, None)?;
                self.b.lat2
            }
            None => self.b.lat,
        };
        let cm = cfg.mid_channels();
        let mut x = self.b.big[0];
        self.conv3(z, n, l, lc, false, &t.conv_in, cm, x, None)?;
        x = self.resnet(&t.mid[0], n, l, x)?;
        if let Some(a) = &t.attn {
            x = self.attention(a, n, l2, cm, x)?;
        }
        x = self.resnet(&t.mid[1], n, l, x)?;
        let mut side = l;
        for (i, blk) in t.up.iter().enumerate() {
            for r in &blk.resnets {
                x = self.resnet(r, n, side, x)?;
            }
            if let Some(up) = &blk.upsample {
                let c = cfg.up_channels(i).1;
                let [dst, ..] = self.others(&[x]);
                side *= 2;
                self.conv3(x, n, side, c, true, up, c, dst, None)?;
                x = dst;
            }
        }
        let (c0, oc) = (cfg.block_out_channels[0], cfg.out_channels);
        let [tn, ..] = self.others(&[x]);
        self.group_norm(x, n, side * side, c0, &t.norm_out, true, tn)?;
        let mut spec = Conv3Spec::new(
            GemmOut::F32(self.s(self.b.out)?),
            self.s(tn)?,
            self.w(t.conv_out.w)?,
            side as i32,
            side as i32,
            c0 as i32,
            oc as i32,
        );
        spec.layout = ConvWeights::TapMajor;
        spec.bias = Some(self.w(t.conv_out.b)?);
        spec.images = n as i32;
        launch::conv3x3_f16(&self.dev, &spec)
    }

    fn others(&self, used: &[BufId]) -> [BufId; 3] {
        let mut out = [self.b.big[0]; 3];
        let mut k = 0;
        for &b in &self.b.big {
            if !used.contains(&b) && k < 3 {
                out[k] = b;
                k += 1;
            }
        }
        out
    }

    fn resnet(&self, r: &Resnet, n: usize, side: usize, x: BufId) -> Result<BufId> {
        let [t, h, s] = self.others(&[x]);
        let px = side * side;
        self.group_norm(x, n, px, r.cin, &r.norm1, true, t)?;
        self.conv3(t, n, side, r.cin, false, &r.conv1, r.cout, h, None)?;
        self.group_norm(h, n, px, r.cout, &r.norm2, true, t)?;
        let res = match &r.shortcut {
            Some(sc) => {
                self.conv1x1(x, n * px, r.cin, sc, r.cout, s, None)?;
                s
            }
            None => x,
        };
        self.conv3(t, n, side, r.cout, false, &r.conv2, r.cout, h, Some(res))?;
        Ok(h)
    }

    /// The mid block's single-head attention with its residual, image by image.
    fn attention(&self, a: &super::Attention, n: usize, px: usize, c: usize, x: BufId) -> Result<BufId> {
        let [t, out, _] = self.others(&[x]);
        self.group_norm(x, n, px, c, &a.norm, false, t)?;
        let b = &self.b;
        let (pxi, ci) = (px as i32, c as i32);
        for img in 0..n {
            let at = |id: BufId| -> Result<DevSlice<f16>> {
                let s = self.s::<f16>(id)?;
                s.sub(img * px * c, s.len() - img * px * c)
            };
            for (wb, dst) in [(&a.q, b.q), (&a.k, b.k), (&a.v, b.v)] {
                let mut g = GemmSpec::new(GemmOut::F16(self.s(dst)?), at(t)?, self.w(wb.w)?, pxi, ci, ci);
                g.bias = Some(self.w(wb.b)?);
                launch::gemm(&self.dev, &g)?;
            }
            let g = GemmSpec::new(GemmOut::F16(self.s(b.scores)?), self.s(b.q)?, self.s(b.k)?, pxi, pxi, ci);
            launch::gemm(&self.dev, &g)?;
            launch::softmax_rows_f16(
                &self.dev,
                self.s(b.probs)?,
                self.s(b.scores)?,
                pxi,
                pxi,
                1.0 / (c as f32).sqrt(),
            )?;
            launch::transpose_f16(&self.dev, self.s(b.vt)?, self.s(b.v)?, pxi, ci)?;
            let g = GemmSpec::new(GemmOut::F16(self.s(b.o)?), self.s(b.probs)?, self.s(b.vt)?, pxi, ci, pxi);
            launch::gemm(&self.dev, &g)?;
            let mut g = GemmSpec::new(GemmOut::F16(at(out)?), self.s(b.o)?, self.w(a.out.w)?, pxi, ci, ci);
            g.bias = Some(self.w(a.out.b)?);
            g.add = Some((at(x)?, ci, pxi));
            launch::gemm(&self.dev, &g)?;
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn conv3(
        &self,
        src: BufId,
        n: usize,
        side: usize,
        cin: usize,
        up2: bool,
        w: &Wb,
        cout: usize,
        dst: BufId,
        add: Option<BufId>,
    ) -> Result<()> {
        let mut spec = Conv3Spec::new(
            GemmOut::F16(self.s(dst)?),
            self.s(src)?,
            self.w(w.w)?,
            side as i32,
            side as i32,
            cin as i32,
            cout as i32,
        );
        spec.layout = ConvWeights::TapMajor;
        spec.bias = Some(self.w(w.b)?);
        spec.add = add.map(|a| self.s(a)).transpose()?;
        spec.images = n as i32;
        spec.up2 = up2;
        launch::conv3x3_f16(&self.dev, &spec)
    }

    #[allow(clippy::too_many_arguments)]
    fn conv1x1(
        &self,
        src: BufId,
        px: usize,
        cin: usize,
        w: &Wb,
        cout: usize,
        dst: BufId,
        add: Option<BufId>,
    ) -> Result<()> {
        let mut g =
            GemmSpec::new(GemmOut::F16(self.s(dst)?), self.s(src)?, self.w(w.w)?, px as i32, cout as i32, cin as i32);
        g.bias = Some(self.w(w.b)?);
        if let Some(a) = add {
            g.add = Some((self.s(a)?, cout as i32, px as i32));
        }
        launch::gemm(&self.dev, &g)
    }

    #[allow(clippy::too_many_arguments)]
    fn group_norm(&self, src: BufId, n: usize, px: usize, c: usize, norm: &Wb, silu: bool, dst: BufId) -> Result<()> {
        launch::group_norm_silu_f16(
            &self.dev,
            self.s(dst)?,
            self.s(src)?,
            self.w(norm.w)?,
            self.w(norm.b)?,
            n as i32,
            px as i32,
            c as i32,
            self.model.config.norm_num_groups as i32,
            GN_EPS,
            silu,
        )
    }
}
