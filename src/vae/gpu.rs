//! The VAE decoder on a [`Device`] (a CUDA GPU or the CPU emulation): the [`VaeOps`] of the
//! decoder graph (src/vae/graph.rs) that [`super::VaeDecoder`] also runs, f16 NHWC activations
//! with f32 accumulation, every buffer in one arena planned for a fixed latent size and
//! batch, the graph's launches recorded once per batch size and replayed. 3×3 convolutions
//! are implicit GEMMs (`conv3x3_f16`, weights permuted tap-major once at upload, the
//! nearest-2× upsample read through the next convolution's indexing, the residual added in
//! the epilogue); GroupNorm is fused with SiLU; 1×1 convolutions and the mid block's
//! attention are fused GEMMs (kernels/gemm.cu) around a row softmax. The result comes back as f32
//! (C, H, W) images.

use std::sync::Arc;

use super::graph::{self, Conv, Kernel, VaeAct, VaeOps, WORK_BUFFERS};
use super::{Attention, VaeModel, WeightBias, GN_EPS};
use crate::error::{Error, Result};
use crate::gpu::launch::{self, Conv3Spec, ConvWeights, GemmOut, GemmSpec};
use crate::gpu::{f16, DevSlice, DevType, Device};
use crate::plan::{BufId, Dt, Plan};
use crate::weights::TRef;

/// The device decoder's activation and output buffers (the weights' are in
/// [`GpuVaeDecoder::weights`]).
struct DeviceBuffers {
    /// [`VaeAct::Latent`], f16 like every activation but the image.
    latent: BufId,
    /// [`VaeAct::PostQuant`].
    post_quant: BufId,
    /// [`VaeAct::Work`].
    work: [BufId; WORK_BUFFERS],
    /// [`VaeAct::Image`], f32 NHWC.
    image: BufId,
    /// The attention's projections, vᵀ, its output before `to_out`, the scores and their
    /// softmax, for one image at a time.
    attn_q: BufId,
    attn_k: BufId,
    attn_v: BufId,
    attn_v_t: BufId,
    attn_out: BufId,
    attn_scores: BufId,
    /// f32 workspace of the Hopper kernels' first-use check ([`launch::check_sm90`]).
    check_scratch: BufId,
    /// The GroupNorms' per-chunk statistics ([`launch::group_norm_stats_len`]).
    gn_stats: BufId,
    attn_probs: BufId,
}

/// A VAE decoder on a device for one latent size and up to `max_images` latents per call.
pub struct GpuVaeDecoder<D: Device> {
    model: Arc<VaeModel>,
    dev: D,
    plan: Plan,
    buffers: DeviceBuffers,
    /// Every weight tensor the graph reads and its arena buffer, in the order it reads them.
    weights: Vec<(TRef, BufId)>,
    latent: usize,
    max_images: usize,
    /// Host staging: one batch of latents in NHWC f16, and the f32 NHWC result.
    latent_host: Vec<f16>,
    image_host: Vec<f32>,
    /// The decoder graph's launches for n images, recorded as a graph the first time n images are
    /// decoded (index n − 1) and replayed after: one graph launch per decode.
    graphs: Vec<Option<D::Graph>>,
}

/// The weights the decoder graph reads, in the order it reads them, each with its (cout, cin)
/// when it is a 3×3 convolution weight (permuted tap-major at upload): the [`VaeOps`] of a
/// walk that launches nothing.
#[derive(Default)]
struct WeightList(Vec<(TRef, Option<(usize, usize)>)>);

impl VaeOps for WeightList {
    fn conv(&mut self, weights: &WeightBias, shape: Conv, _: VaeAct, _: VaeAct, _: Option<VaeAct>) -> Result<()> {
        let three_by_three = matches!(shape.kernel, Kernel::ThreeByThree { .. });
        self.0.push((weights.weight, three_by_three.then_some((shape.cout, shape.cin))));
        self.0.push((weights.bias, None));
        Ok(())
    }

    fn group_norm(&mut self, norm: &WeightBias, _: usize, _: usize, _: bool, _: VaeAct, _: VaeAct) -> Result<()> {
        self.0.extend([(norm.weight, None), (norm.bias, None)]);
        Ok(())
    }

    fn attention(&mut self, attn: &Attention, _: usize, _: usize, _: VaeAct, _: VaeAct, _: VaeAct) -> Result<()> {
        for linear in [&attn.q, &attn.k, &attn.v, &attn.out] {
            self.0.extend([(linear.weight, None), (linear.bias, None)]);
        }
        Ok(())
    }
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
        let mut list = WeightList::default();
        graph::decode(&mut list, &model, (latent, latent))?;
        let weights = list
            .0
            .iter()
            .enumerate()
            .map(|(i, &(r, _))| (r, plan.add(format!("weight.{i}"), &[model.weight(r).len()], Dt::F16)))
            .collect();
        let h = Dt::F16;
        let buffers = DeviceBuffers {
            latent: plan.add("latent (NHWC)", &[n * l2, lc], h),
            post_quant: plan.add("post_quant", &[n * l2, lc], h),
            work: std::array::from_fn(|i| plan.add(format!("act{i}"), &[n * biggest], h)),
            attn_q: plan.add("attn_q", &[attn_px, cm], h),
            attn_k: plan.add("attn_k", &[attn_px, cm], h),
            attn_v: plan.add("attn_v", &[attn_px, cm], h),
            attn_v_t: plan.add("attn_v_t", &[cm, attn_px], h),
            attn_out: plan.add("attn_o", &[attn_px, cm], h),
            attn_scores: plan.add("attn_scores", &[attn_px, attn_px], h),
            attn_probs: plan.add("attn_probs", &[attn_px, attn_px], h),
            image: plan.add("image (NHWC f32)", &[n * side * side, oc], Dt::F32),
            check_scratch: plan.add("Hopper first-use check scratch", &[launch::SM90_CHECK_ELEMS], Dt::F32),
            gn_stats: plan.add(
                "GroupNorm statistics",
                &[launch::group_norm_stats_len(n, cfg.norm_num_groups)],
                Dt::F32,
            ),
        };
        let dev = open(&plan)?;
        // The decoder may be the first user of this device's Hopper kernels (its own arena).
        launch::check_sm90(&dev, dev.slice::<f32>(plan.get(buffers.check_scratch))?)?;
        let mut d = GpuVaeDecoder {
            model,
            dev,
            plan,
            buffers,
            weights,
            latent,
            max_images,
            latent_host: vec![f16::ZERO; n * l2 * lc],
            image_host: vec![0.0; n * side * side * oc],
            graphs: Vec::new(),
        };
        d.upload(&list)?;
        Ok(d)
    }

    /// Uploads every weight as f16, 3×3 convolution weights permuted tap-major.
    fn upload(&mut self, list: &WeightList) -> Result<()> {
        let mut staging: Vec<f16> = Vec::new();
        for (&(r, conv), &(_, buf)) in list.0.iter().zip(&self.weights) {
            let src = self.model.weight(r);
            staging.clear();
            match conv {
                // (cout, cin, ky, kx) → (cout, ky, kx, cin)
                Some((cout, cin)) => {
                    staging.resize(src.len(), f16::ZERO);
                    for co in 0..cout {
                        for ci in 0..cin {
                            for tap in 0..9 {
                                staging[(co * 9 + tap) * cin + ci] = f16::from_f32(src[(co * cin + ci) * 9 + tap]);
                            }
                        }
                    }
                }
                None => staging.extend(src.iter().map(|&v| f16::from_f32(v))),
            }
            self.dev.upload(self.slice::<f16>(buf)?, &staging)?;
        }
        self.dev.synchronize()
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    pub fn model(&self) -> &VaeModel {
        &self.model
    }
    /// Graphs recorded so far (one per batch size decoded).
    pub fn graph_count(&self) -> usize {
        self.graphs.iter().filter(|g| g.is_some()).count()
    }
    /// Latents per call at most.
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

    fn slice<T: DevType>(&self, id: BufId) -> Result<DevSlice<T>> {
        self.dev.slice::<T>(self.plan.get(id))
    }

    /// A weight tensor on the device.
    fn weight(&self, r: TRef) -> Result<DevSlice<f16>> {
        let buf =
            self.weights.iter().find(|&&(t, _)| t == r).map(|&(_, buf)| buf).ok_or_else(|| {
                Error::invalid("GPU VAE decoder", "a weight tensor the plan does not hold (internal)")
            })?;
        self.slice(buf)
    }

    /// A graph activation held in f16 (every one but the image).
    fn act(&self, act: VaeAct) -> Result<DevSlice<f16>> {
        let b = &self.buffers;
        let buf = match act {
            VaeAct::Latent => b.latent,
            VaeAct::PostQuant => b.post_quant,
            VaeAct::Work(i) => *b.work.get(i).ok_or_else(|| {
                Error::invalid("GPU VAE decoder", format!("work buffer {i} of {WORK_BUFFERS} (internal)"))
            })?,
            VaeAct::Image => return Err(Error::invalid("GPU VAE decoder", "the image is f32, not f16 (internal)")),
        };
        self.slice(buf)
    }

    /// Where an op writes `act`: the image in f32, every other activation in f16.
    fn output(&self, act: VaeAct) -> Result<GemmOut> {
        match act {
            VaeAct::Image => Ok(GemmOut::F32(self.slice(self.buffers.image)?)),
            _ => Ok(GemmOut::F16(self.act(act)?)),
        }
    }

    /// Decodes `n = latents.len() / latent_len` latents (C, h, w each, as sampled) into f32
    /// images (C, H, W each), not clamped, as [`super::VaeDecoder::decode`].
    pub fn decode(&mut self, latents: &[f32], images: &mut [f32]) -> Result<()> {
        let n = self.run(latents, images.len() / self.image_len().max(1), images.len())?;
        let (oc, px) = (self.model.config.out_channels, self.out_side() * self.out_side());
        let out = self.slice::<f32>(self.buffers.image)?.sub(0, n * px * oc)?;
        let host = &mut self.image_host[..n * px * oc];
        self.dev.download(out, host)?;
        graph::unstage_images(host, oc, px, images)
    }

    /// Validates, stages the latents and runs the decoder graph into the image buffer;
    /// returns the image count.
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
        let model = Arc::clone(&self.model);
        let (lc, l) = (model.config.latent_channels, self.latent);
        let l2 = l * l;
        let host = &mut self.latent_host;
        graph::stage_latents(&model, (l, l), latents, |i, z| host[i] = f16::from_f32(z))?;
        let staged = self.slice::<f16>(self.buffers.latent)?.sub(0, n * l2 * lc)?;
        self.dev.upload(staged, &self.latent_host[..n * l2 * lc])?;
        if self.graphs.len() < n {
            self.graphs.resize_with(n, || None);
        }
        if self.graphs[n - 1].is_none() {
            self.dev.begin_capture()?;
            let recorded =
                graph::decode(&mut DevicePass { decoder: &*self, images: n }, &self.model, (self.latent, self.latent));
            let captured = self.dev.end_capture();
            recorded?;
            self.graphs[n - 1] = Some(captured?);
        }
        if let Some(g) = &self.graphs[n - 1] {
            self.dev.launch_graph(g)?;
        }
        Ok(n)
    }
}

/// One decode of `images` staged latents being recorded: the [`VaeOps`] of the device
/// decoder, each op a launch (or, for the attention, a few launches per image).
struct DevicePass<'a, D: Device> {
    decoder: &'a GpuVaeDecoder<D>,
    images: usize,
}

impl<D: Device> VaeOps for DevicePass<'_, D> {
    /// A 1×1 convolution is a GEMM over the pixels of every image; a 3×3 one an implicit
    /// GEMM (`conv3x3_f16`, weights tap-major), the upsample read through its indexing.
    fn conv(
        &mut self,
        weights: &WeightBias,
        shape: Conv,
        src: VaeAct,
        dst: VaeAct,
        residual: Option<VaeAct>,
    ) -> Result<()> {
        let d = self.decoder;
        let Conv { kernel, h, w, cin, cout } = shape;
        match kernel {
            Kernel::OneByOne => {
                let px = (self.images * shape.pixels()) as i32;
                let mut g =
                    GemmSpec::new(d.output(dst)?, d.act(src)?, d.weight(weights.weight)?, px, cout as i32, cin as i32);
                g.bias = Some(d.weight(weights.bias)?);
                if let Some(r) = residual {
                    g.add = Some((d.act(r)?, cout as i32, px));
                }
                launch::gemm(&d.dev, &g)
            }
            Kernel::ThreeByThree { upsample } => {
                let mut spec = Conv3Spec::new(
                    d.output(dst)?,
                    d.act(src)?,
                    d.weight(weights.weight)?,
                    h as i32,
                    w as i32,
                    cin as i32,
                    cout as i32,
                );
                spec.layout = ConvWeights::TapMajor;
                spec.bias = Some(d.weight(weights.bias)?);
                spec.add = residual.map(|r| d.act(r)).transpose()?;
                spec.images = self.images as i32;
                spec.up2 = upsample;
                launch::conv3x3_f16(&d.dev, &spec)
            }
        }
    }

    /// `group_norm_silu_f16` with the statistics workspace: the two-kernel form over chunks of
    /// pixels wherever the channels allow (every SD-VAE GroupNorm: 128–512 channels).
    fn group_norm(
        &mut self,
        norm: &WeightBias,
        pixels: usize,
        channels: usize,
        silu: bool,
        src: VaeAct,
        dst: VaeAct,
    ) -> Result<()> {
        let d = self.decoder;
        launch::group_norm_silu_f16(
            &d.dev,
            d.act(dst)?,
            d.act(src)?,
            d.weight(norm.weight)?,
            d.weight(norm.bias)?,
            self.images as i32,
            pixels as i32,
            channels as i32,
            d.model.config.norm_num_groups as i32,
            GN_EPS,
            silu,
            Some(d.slice::<f32>(d.buffers.gn_stats)?),
        )
    }

    /// Image by image: q, k, v = `gemm`s, S = q·kᵀ (`gemm` with k as the weight), P =
    /// `softmax_rows_f16`(S/√C), vᵀ = `transpose_f16`(v), O = P·v (`gemm` with vᵀ as the
    /// weight), then `to_out` with the residual in its epilogue.
    fn attention(
        &mut self,
        attn: &Attention,
        pixels: usize,
        channels: usize,
        src: VaeAct,
        residual: VaeAct,
        dst: VaeAct,
    ) -> Result<()> {
        let d = self.decoder;
        let b = &d.buffers;
        let (px, c) = (pixels as i32, channels as i32);
        for img in 0..self.images {
            // Activation `act` from image `img` on.
            let image = |act: VaeAct| -> Result<DevSlice<f16>> {
                let all = d.act(act)?;
                all.sub(img * pixels * channels, all.len() - img * pixels * channels)
            };
            for (linear, out) in [(&attn.q, b.attn_q), (&attn.k, b.attn_k), (&attn.v, b.attn_v)] {
                let mut g = GemmSpec::new(GemmOut::F16(d.slice(out)?), image(src)?, d.weight(linear.weight)?, px, c, c);
                g.bias = Some(d.weight(linear.bias)?);
                launch::gemm(&d.dev, &g)?;
            }
            let g =
                GemmSpec::new(GemmOut::F16(d.slice(b.attn_scores)?), d.slice(b.attn_q)?, d.slice(b.attn_k)?, px, px, c);
            launch::gemm(&d.dev, &g)?;
            let scale = 1.0 / (channels as f32).sqrt();
            launch::softmax_rows_f16(&d.dev, d.slice(b.attn_probs)?, d.slice(b.attn_scores)?, px, px, scale)?;
            launch::transpose_f16(&d.dev, d.slice(b.attn_v_t)?, d.slice(b.attn_v)?, px, c)?;
            let g = GemmSpec::new(
                GemmOut::F16(d.slice(b.attn_out)?),
                d.slice(b.attn_probs)?,
                d.slice(b.attn_v_t)?,
                px,
                c,
                px,
            );
            launch::gemm(&d.dev, &g)?;
            let mut g =
                GemmSpec::new(GemmOut::F16(image(dst)?), d.slice(b.attn_out)?, d.weight(attn.out.weight)?, px, c, c);
            g.bias = Some(d.weight(attn.out.bias)?);
            g.add = Some((image(residual)?, c, px));
            launch::gemm(&d.dev, &g)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vae::VaeConfig;

    #[test]
    fn the_upload_list_holds_every_decoder_weight_once() {
        let cfg = VaeConfig { block_out_channels: vec![32, 64], layers_per_block: 1, ..VaeConfig::sd() };
        let model = VaeModel::random(&cfg, 3).unwrap();
        let mut list = WeightList::default();
        graph::decode(&mut list, &model, (4, 4)).unwrap();
        let total: usize = list.0.iter().map(|(r, _)| r.len()).sum();
        assert_eq!(total, model.params, "the graph reads every parameter the model holds");
        for (i, (r, _)) in list.0.iter().enumerate() {
            assert!(!list.0[..i].iter().any(|(s, _)| s == r), "weight {i} listed twice");
        }
        // conv_in, two per resnet (two in the mid block, two in each of two up blocks), one
        // upsampler and conv_out are 3×3; the post-quant conv and the shortcut are 1×1.
        let three_by_three = list.0.iter().filter(|(_, shape)| shape.is_some()).count();
        assert_eq!(three_by_three, 1 + 2 * 6 + 1 + 1);
    }
}
