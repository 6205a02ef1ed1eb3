//! The SD-VAE decoder's graph (diffusers `Decoder.forward` after `post_quant_conv`, reference
//! doc F), written once against [`VaeOps`]: the few fused operations the CPU decoder
//! (src/vae/cpu.rs, f32) and the device decoder (src/vae/gpu.rs, f16 on a CUDA GPU or the
//! emulation) implement. The backends differ only in how they carry out these calls; which
//! calls run, on which buffers, in which order, is decided here.
//!
//! Both backends fuse the same steps, so every fusion is an op of its own: the nearest 2×
//! upsample is read through the following 3×3 convolution's indexing, a residual is added in a
//! convolution's epilogue, and SiLU is applied by the GroupNorm before it.

use super::{Attention, Resnet, VaeModel, WeightBias};
use crate::error::{Error, Result};

/// How many activation buffers of the largest stage the graph rotates through: a resnet
/// holds its input, the normalised activation, the first convolution's output and the
/// shortcut at once.
pub(crate) const WORK_BUFFERS: usize = 4;

/// Activation buffers the decoder graph names, NHWC (one row of channels per pixel) for each
/// image of the decode. Each backend maps them to its arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VaeAct {
    /// The latent as the backend staged it, z = latent / scaling + shift: (h·w, latent channels).
    Latent,
    /// post_quant_conv(z): (h·w, latent channels).
    PostQuant,
    /// Work buffer `i` < [`WORK_BUFFERS`], each the size of the largest activation.
    Work(usize),
    /// The decoder's output, (H·W, out channels), f32 on every backend.
    Image,
}

/// The kernel of a convolution (stride 1; a 3×3 one zero-padded by 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// 1×1: a linear map of each pixel's channels (post_quant_conv, resnet shortcuts).
    OneByOne,
    /// 3×3; with `upsample` the source is half the output side and read upsampled 2× by
    /// nearest neighbour (an up block's `Upsample2D` fused into its convolution).
    ThreeByThree { upsample: bool },
}

/// The shape of one convolution, per image: `h`×`w` output pixels, `cin` → `cout`
/// channels. The weight is PyTorch's (cout, cin, k, k) as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Conv {
    pub kernel: Kernel,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
}

impl Conv {
    pub fn one_by_one((h, w): (usize, usize), cin: usize, cout: usize) -> Self {
        Conv { kernel: Kernel::OneByOne, h, w, cin, cout }
    }
    pub fn three_by_three((h, w): (usize, usize), cin: usize, cout: usize) -> Self {
        Conv { kernel: Kernel::ThreeByThree { upsample: false }, h, w, cin, cout }
    }
    /// A 3×3 convolution of the source upsampled 2×: `(h, w)` is the output's (twice the source's).
    pub fn upsampled_three_by_three((h, w): (usize, usize), cin: usize, cout: usize) -> Self {
        Conv { kernel: Kernel::ThreeByThree { upsample: true }, h, w, cin, cout }
    }
    /// Output pixels per image.
    pub fn pixels(&self) -> usize {
        self.h * self.w
    }
    /// Source pixels per image (a quarter of the output's when upsampled).
    pub fn src_pixels(&self) -> usize {
        match self.kernel {
            Kernel::ThreeByThree { upsample: true } => self.pixels() / 4,
            _ => self.pixels(),
        }
    }
}

/// The operations of the VAE decoder, each over every image of the decode (one on the CPU,
/// the batch on a device). Sizes are per image. An op never writes a buffer it reads.
pub(crate) trait VaeOps {
    /// dst = conv(src) + bias (+ residual, added in the same pass).
    fn conv(
        &mut self,
        weights: &WeightBias,
        shape: Conv,
        src: VaeAct,
        dst: VaeAct,
        residual: Option<VaeAct>,
    ) -> Result<()>;

    /// dst = GroupNorm(src) over `pixels` × `channels` (the model's groups, eps
    /// [`super::GN_EPS`], statistics per image, affine `norm`), then SiLU when `silu`.
    fn group_norm(
        &mut self,
        norm: &WeightBias,
        pixels: usize,
        channels: usize,
        silu: bool,
        src: VaeAct,
        dst: VaeAct,
    ) -> Result<()>;

    /// dst = residual + softmax(q·kᵀ/√C)·v·W_outᵀ + b_out with q, k, v = src·Wᵀ + b: the mid
    /// block's single-head self-attention over each image's `pixels`, `src` its normalised
    /// input.
    fn attention(
        &mut self,
        attn: &Attention,
        pixels: usize,
        channels: usize,
        src: VaeAct,
        residual: VaeAct,
        dst: VaeAct,
    ) -> Result<()>;
}

/// The decoder for latents of `latent` = (height, width), from the staged latent
/// ([`VaeAct::Latent`]) to the image ([`VaeAct::Image`]).
pub(crate) fn decode<O: VaeOps>(ops: &mut O, model: &VaeModel, latent: (usize, usize)) -> Result<()> {
    let (cfg, t) = (&model.config, &model.tensors);
    let (lc, cm) = (cfg.latent_channels, cfg.mid_channels());
    let z = match &t.post_quant {
        Some(pq) => {
            ops.conv(pq, Conv::one_by_one(latent, lc, lc), VaeAct::Latent, VaeAct::PostQuant, None)?;
            VaeAct::PostQuant
        }
        None => VaeAct::Latent,
    };
    let mut x = VaeAct::Work(0);
    ops.conv(&t.conv_in, Conv::three_by_three(latent, lc, cm), z, x, None)?;
    x = resnet(ops, &t.mid[0], latent, x)?;
    if let Some(a) = &t.attn {
        let [normed, out, _] = free_work_buffers(x);
        ops.group_norm(&a.norm, latent.0 * latent.1, cm, false, x, normed)?;
        ops.attention(a, latent.0 * latent.1, cm, normed, x, out)?;
        x = out;
    }
    x = resnet(ops, &t.mid[1], latent, x)?;
    let mut side = latent;
    for (i, block) in t.up.iter().enumerate() {
        for r in &block.resnets {
            x = resnet(ops, r, side, x)?;
        }
        if let Some(upsample) = &block.upsample {
            let c = cfg.up_channels(i).1;
            let [dst, ..] = free_work_buffers(x);
            side = (2 * side.0, 2 * side.1);
            ops.conv(upsample, Conv::upsampled_three_by_three(side, c, c), x, dst, None)?;
            x = dst;
        }
    }
    let (c0, oc) = (cfg.block_out_channels[0], cfg.out_channels);
    let [normed, ..] = free_work_buffers(x);
    ops.group_norm(&t.norm_out, side.0 * side.1, c0, true, x, normed)?;
    ops.conv(&t.conv_out, Conv::three_by_three(side, c0, oc), normed, VaeAct::Image, None)
}

/// Stages `latents` as the sampler produced them ((C, h, w) per image, before the scaling
/// factor is undone) for the decoder: refuses non-finite values, then hands `put` each value
/// z = latent / scaling + shift (a division, as DiT's sample.py does) with its index in NHWC
/// order. Both decoders stage through this; each stores the values its own way.
pub(crate) fn stage_latents(
    model: &VaeModel,
    (h, w): (usize, usize),
    latents: &[f32],
    mut put: impl FnMut(usize, f32),
) -> Result<()> {
    if let Some(i) = latents.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid("latents", format!("value {} at index {i} is not finite", latents[i])));
    }
    let cfg = &model.config;
    let (lc, l2) = (cfg.latent_channels, h * w);
    let (scale, shift) = (cfg.scaling_factor as f32, cfg.shift_factor as f32);
    for img in 0..latents.len() / (lc * l2) {
        for p in 0..l2 {
            for ch in 0..lc {
                put((img * l2 + p) * lc + ch, latents[(img * lc + ch) * l2 + p] / scale + shift);
            }
        }
    }
    Ok(())
}

/// The decoder's NHWC output (`channels` per pixel) as (C, H, W) images, refusing non-finite
/// values; `nhwc` and `images` hold the same number of values.
pub(crate) fn unstage_images(nhwc: &[f32], channels: usize, pixels: usize, images: &mut [f32]) -> Result<()> {
    for (img, out) in images.chunks_exact_mut(channels * pixels).enumerate() {
        for p in 0..pixels {
            for ch in 0..channels {
                out[ch * pixels + p] = nhwc[(img * pixels + p) * channels + ch];
            }
        }
    }
    if let Some(i) = images.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "VAE output",
            format!("value {} at index {i} is not finite (do the VAE weights hold NaN or Inf?)", images[i]),
        ));
    }
    Ok(())
}

/// ResnetBlock2D: h = conv1(SiLU(GN1(x))); out = conv2(SiLU(GN2(h))) + (x or shortcut(x)).
/// Returns the buffer holding out.
fn resnet<O: VaeOps>(ops: &mut O, r: &Resnet, side: (usize, usize), x: VaeAct) -> Result<VaeAct> {
    let [normed, h, shortcut] = free_work_buffers(x);
    let px = side.0 * side.1;
    ops.group_norm(&r.norm1, px, r.cin, true, x, normed)?;
    ops.conv(&r.conv1, Conv::three_by_three(side, r.cin, r.cout), normed, h, None)?;
    ops.group_norm(&r.norm2, px, r.cout, true, h, normed)?;
    let residual = match &r.shortcut {
        Some(sc) => {
            ops.conv(sc, Conv::one_by_one(side, r.cin, r.cout), x, shortcut, None)?;
            shortcut
        }
        None => x,
    };
    ops.conv(&r.conv2, Conv::three_by_three(side, r.cout, r.cout), normed, h, Some(residual))?;
    Ok(h)
}

/// The work buffers other than `used`, in order.
fn free_work_buffers(used: VaeAct) -> [VaeAct; WORK_BUFFERS - 1] {
    let mut free = [VaeAct::Work(0); WORK_BUFFERS - 1];
    let mut n = 0;
    for i in 0..WORK_BUFFERS {
        if VaeAct::Work(i) != used && n < free.len() {
            free[n] = VaeAct::Work(i);
            n += 1;
        }
    }
    free
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_work_buffers_skip_the_one_in_use() {
        let w = VaeAct::Work;
        assert_eq!(free_work_buffers(w(0)), [w(1), w(2), w(3)]);
        assert_eq!(free_work_buffers(w(2)), [w(0), w(1), w(3)]);
        assert_eq!(free_work_buffers(VaeAct::Latent), [w(0), w(1), w(2)]);
    }
}
