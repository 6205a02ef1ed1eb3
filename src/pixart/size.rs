//! Image sizes as PixArtAlphaPipeline chooses them (reference doc, "Pipeline and guidance"):
//! the requested height and width (pixels, default sample_size × 8), mapped with resolution
//! binning (`use_resolution_binning`, on by default) to the aspect-ratio bin nearest in
//! height/width ([`super::bins`]), sampled there, and the decoded image resized back to the
//! request by [`resize_and_crop`] (diffusers' `resize_and_crop_tensor`).

use super::bins::{ASPECT_RATIO_1024, ASPECT_RATIO_256, ASPECT_RATIO_512};
use super::config::{PixArtConfig, VAE_SCALE_FACTOR};
use crate::error::{Error, Result};

/// The pipeline's bins for a model's sample_size: 128, 64 and 32 only.
pub fn bins_for(sample_size: usize) -> Option<&'static [(f64, usize, usize)]> {
    match sample_size {
        128 => Some(ASPECT_RATIO_1024),
        64 => Some(ASPECT_RATIO_512),
        32 => Some(ASPECT_RATIO_256),
        _ => None,
    }
}

/// The bin whose ratio is nearest height / width (the first of equally near ones, as the
/// pipeline's `min` over the table picks): its (height, width).
pub fn classify(height: usize, width: usize, bins: &[(f64, usize, usize)]) -> (usize, usize) {
    let ar = height as f64 / width as f64;
    let mut best = bins[0];
    for &b in &bins[1..] {
        if (b.0 - ar).abs() < (best.0 - ar).abs() {
            best = b;
        }
    }
    (best.1, best.2)
}

/// The sizes of one request, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageSize {
    /// What was asked for: the size of the images written.
    pub requested: (usize, usize),
    /// What is sampled: the bin's size with binning, else the request.
    pub sampled: (usize, usize),
}

impl ImageSize {
    /// The request's sizes for `cfg`'s model: height/width default to sample_size × 8; with
    /// `binning` the sampled size is the nearest bin's.
    pub fn plan(cfg: &PixArtConfig, height: Option<usize>, width: Option<usize>, binning: bool) -> Result<Self> {
        let default = cfg.sample_size * VAE_SCALE_FACTOR;
        let requested = (height.unwrap_or(default), width.unwrap_or(default));
        let (h, w) = requested;
        if h == 0 || w == 0 || h > 1 << 16 || w > 1 << 16 {
            return Err(Error::invalid("--height/--width", format!("{h}×{w} pixels: each must be 1 to 65536")));
        }
        let sampled = if binning {
            let bins = bins_for(cfg.sample_size).ok_or_else(|| {
                Error::invalid(
                    "resolution binning",
                    format!(
                        "the pipeline has aspect-ratio bins for sample_size 128, 64 and 32 only; this model's is {}: \
                         pass --no-resolution-binning",
                        cfg.sample_size
                    ),
                )
            })?;
            classify(h, w, bins)
        } else {
            requested
        };
        let step = cfg.patch_size * VAE_SCALE_FACTOR;
        if !sampled.0.is_multiple_of(step) || !sampled.1.is_multiple_of(step) {
            return Err(Error::invalid(
                "--height/--width",
                format!(
                    "{}×{} pixels: without resolution binning each side must be a multiple of {step} \
                     (patch size {} × the VAE's {VAE_SCALE_FACTOR})",
                    sampled.0, sampled.1, cfg.patch_size
                ),
            ));
        }
        Ok(ImageSize { requested, sampled })
    }

    /// The latent (height, width) sampled.
    pub fn latent(&self) -> (usize, usize) {
        (self.sampled.0 / VAE_SCALE_FACTOR, self.sampled.1 / VAE_SCALE_FACTOR)
    }

    /// Whether decoded images must be resized to the request.
    pub fn resized(&self) -> bool {
        self.requested != self.sampled
    }
}

/// The resized size and crop offsets of diffusers' `resize_and_crop_tensor`: scale by the
/// larger of the two ratios (sides truncated), then take the centred crop.
fn resize_plan(src: (usize, usize), dst: (usize, usize)) -> ((usize, usize), (usize, usize)) {
    let ratio = (dst.0 as f64 / src.0 as f64).max(dst.1 as f64 / src.1 as f64);
    let (rh, rw) = ((src.0 as f64 * ratio) as usize, (src.1 as f64 * ratio) as usize);
    ((rh, rw), ((rh - dst.0) / 2, (rw - dst.1) / 2))
}

/// Source indices and weights of bilinear interpolation along one axis, align_corners false,
/// as torch's CPU kernel forms them in f32: src = (o + ½)·(in/out) − ½ clamped at 0.
fn axis_weights(inp: usize, out: usize, o: usize) -> (usize, usize, f32, f32) {
    let scale = inp as f32 / out as f32;
    let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
    let i0 = src as usize;
    let i1 = if i0 + 1 < inp { i0 + 1 } else { i0 };
    let l1 = (src - i0 as f32).clamp(0.0, 1.0);
    (i0, i1, 1.0 - l1, l1)
}

/// diffusers' `resize_and_crop_tensor` on one image (C, H, W) → (C, H', W') with
/// (H', W') = `dst`: bilinear resize (`F.interpolate`, align_corners false, no antialiasing)
/// to cover `dst`, then the centred crop. `out` holds C·H'·W' values.
pub fn resize_and_crop(img: &[f32], channels: usize, src: (usize, usize), dst: (usize, usize), out: &mut [f32]) {
    let (sh, sw) = src;
    if src == dst {
        out.copy_from_slice(&img[..channels * sh * sw]);
        return;
    }
    let ((rh, rw), (top, left)) = resize_plan(src, dst);
    for c in 0..channels {
        let plane = &img[c * sh * sw..(c + 1) * sh * sw];
        for y in 0..dst.0 {
            let (y0, y1, wy0, wy1) = axis_weights(sh, rh, top + y);
            for x in 0..dst.1 {
                let (x0, x1, wx0, wx1) = axis_weights(sw, rw, left + x);
                let (a, b) = (plane[y0 * sw + x0], plane[y0 * sw + x1]);
                let (c_, d) = (plane[y1 * sw + x0], plane[y1 * sw + x1]);
                out[(c * dst.0 + y) * dst.1 + x] = wy0 * (wx0 * a + wx1 * b) + wy1 * (wx0 * c_ + wx1 * d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_pick_the_nearest_ratio() {
        // Square requests stay square; a 16:9 request maps to the 0.57 bin (576 / 1024 ≈ 0.5625).
        assert_eq!(classify(1024, 1024, ASPECT_RATIO_1024), (1024, 1024));
        assert_eq!(classify(1080, 1920, ASPECT_RATIO_1024), (768, 1344));
        assert_eq!(classify(512, 512, ASPECT_RATIO_512), (512, 512));
        assert_eq!(classify(100, 10_000, ASPECT_RATIO_256), (128, 512));
    }

    #[test]
    fn resize_plan_covers_then_crops() {
        // 768×1344 back to 1080×1920: ratio max(1.40625, 1.428…) → 1097×1920, crop 8 rows off the top.
        assert_eq!(resize_plan((768, 1344), (1080, 1920)), ((1097, 1920), (8, 0)));
    }
}
