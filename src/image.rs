//! Images out: DiT's (or diffusers') uint8 conversion, PNG files (single images and
//! contact-sheet grids) and the `.npz` array FID evaluators read, all written atomically.

use std::path::Path;

use npyz::WriterBuilder;

use crate::error::{Error, Result};

/// DiT's `sample_ddp.py` conversion: uint8(clamp(127.5·x + 128, 0, 255)) with a truncating
/// cast, i.e. round-half-up of 127.5·x + 127.5.
#[inline]
pub fn to_u8(x: f32) -> u8 {
    (127.5 * x + 128.0).clamp(0.0, 255.0) as u8
}

/// diffusers' conversion (`DiTPipeline` + `numpy_to_pil`): (x/2 + 0.5) clamped to [0, 1],
/// times 255 in f32, rounded half to even.
#[inline]
pub fn to_u8_diffusers(x: f32) -> u8 {
    ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8
}

/// How floats in [−1, 1] become 8-bit pixels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Rounding {
    /// DiT's `sample_ddp.py` (what its FID numbers use): [`to_u8`].
    #[default]
    Dit,
    /// diffusers' pipelines: [`to_u8_diffusers`].
    Diffusers,
}

impl Rounding {
    #[inline]
    pub fn apply(self, x: f32) -> u8 {
        match self {
            Rounding::Dit => to_u8(x),
            Rounding::Diffusers => to_u8_diffusers(x),
        }
    }
}

/// `count` images (each (C, side, side) floats) → uint8 NHWC, the layout of PNG rows and of
/// the FID evaluators' `arr_0`.
pub fn to_nhwc_u8(images: &[f32], count: usize, channels: usize, side: usize, rounding: Rounding, out: &mut [u8]) {
    to_nhwc_u8_hw(images, count, channels, (side, side), rounding, out)
}

/// [`to_nhwc_u8`] for images of (height, width).
pub fn to_nhwc_u8_hw(
    images: &[f32],
    count: usize,
    channels: usize,
    (h, w): (usize, usize),
    rounding: Rounding,
    out: &mut [u8],
) {
    let hw = h * w;
    for i in 0..count {
        let src = &images[i * channels * hw..(i + 1) * channels * hw];
        let dst = &mut out[i * channels * hw..(i + 1) * channels * hw];
        for p in 0..hw {
            for c in 0..channels {
                dst[p * channels + c] = rounding.apply(src[c * hw + p]);
            }
        }
    }
}

/// Lays `count` uint8 NHWC images out in a grid of `cols` columns with a white `pad`-pixel
/// border and writes it as a PNG.
pub fn write_grid_png(
    path: &Path,
    pixels: &[u8],
    count: usize,
    channels: usize,
    side: usize,
    cols: usize,
    pad: usize,
) -> Result<()> {
    write_grid_png_hw(path, pixels, count, channels, (side, side), cols, pad)
}

/// [`write_grid_png`] for images of (height, width).
pub fn write_grid_png_hw(
    path: &Path,
    pixels: &[u8],
    count: usize,
    channels: usize,
    (th, tw): (usize, usize),
    cols: usize,
    pad: usize,
) -> Result<()> {
    check_channels(channels)?;
    let cols = cols.clamp(1, count.max(1));
    let rows = count.div_ceil(cols);
    let (w, h) = (cols * (tw + pad) + pad, rows * (th + pad) + pad);
    let mut canvas = vec![255u8; w * h * channels];
    let row_bytes = tw * channels;
    for i in 0..count {
        let tile = &pixels[i * th * row_bytes..(i + 1) * th * row_bytes];
        let (gy, gx) = (i / cols, i % cols);
        for y in 0..th {
            let dst = ((pad + gy * (th + pad) + y) * w + pad + gx * (tw + pad)) * channels;
            canvas[dst..dst + row_bytes].copy_from_slice(&tile[y * row_bytes..(y + 1) * row_bytes]);
        }
    }
    write_png(path, &canvas, w, h, channels)
}

/// Writes uint8 NHWC images as an `.npz` holding one array `arr_0` of shape (N, H, W, C),
/// as `np.savez` does and as the ADM / guided-diffusion FID evaluator reads it.
pub fn write_npz(path: &Path, pixels: &[u8], count: usize, side: usize, channels: usize) -> Result<()> {
    write_npz_hw(path, pixels, count, (side, side), channels)
}

/// [`write_npz`] for images of (height, width): `arr_0` uint8 [N, H, W, C].
pub fn write_npz_hw(path: &Path, pixels: &[u8], count: usize, (h, w): (usize, usize), channels: usize) -> Result<()> {
    let bad = |e: std::io::Error| Error::io(path, e);
    let mut buf = std::io::Cursor::new(Vec::with_capacity(pixels.len() + 4096));
    {
        let mut npz = npyz::npz::NpzWriter::new(&mut buf);
        let opts = npyz::zip::write::FileOptions::default()
            .compression_method(npyz::zip::CompressionMethod::Stored)
            .last_modified_time(npyz::zip::DateTime::default()) // fixed: same images, same bytes
            .large_file(pixels.len() as u64 >= u32::MAX as u64 / 2);
        let mut w = npz
            .array::<u8>("arr_0", opts)
            .map_err(bad)?
            .default_dtype()
            .shape(&[count as u64, h as u64, w as u64, channels as u64])
            .begin_nd()
            .map_err(bad)?;
        w.extend(pixels.iter().copied()).map_err(bad)?;
        w.finish().map_err(bad)?;
    }
    crate::fsio::atomic_write(path, buf.get_ref())
}

fn check_channels(channels: usize) -> Result<()> {
    if channels == 1 || channels == 3 {
        Ok(())
    } else {
        Err(Error::invalid("image channels", format!("{channels}: PNG output needs 1 or 3")))
    }
}

/// `NNNNNN-classC-seedS.png` for image `index` (class and seed left out when unknown): the
/// name every PNG the sampler writes gets, so files sort by image index.
pub fn png_name(index: u64, class: i64, seed: Option<u64>) -> String {
    let mut name = format!("{index:06}");
    if class >= 0 {
        name.push_str(&format!("-class{class}"));
    }
    if let Some(s) = seed {
        name.push_str(&format!("-seed{s}"));
    }
    name + ".png"
}

/// Writes 8-bit pixels as a PNG through a temporary file and a rename.
pub fn write_png(path: &Path, pixels: &[u8], width: usize, height: usize, channels: usize) -> Result<()> {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, width as u32, height as u32);
        enc.set_color(if channels == 3 { png::ColorType::Rgb } else { png::ColorType::Grayscale });
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| Error::invalid("PNG", format!("{}: {e}", path.display())))?;
        writer.write_image_data(pixels).map_err(|e| Error::invalid("PNG", format!("{}: {e}", path.display())))?;
    }
    crate::fsio::atomic_write(path, &bytes)
}
