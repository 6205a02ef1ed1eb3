//! Images out of pixel-space samples: DiT's uint8 conversion and PNG files (single images
//! and contact-sheet grids), written atomically.

use std::path::Path;

use crate::error::{Error, Result};

/// DiT's `sample_ddp.py` conversion: uint8(clamp(127.5·x + 128, 0, 255)) with a truncating
/// cast, i.e. round-half-up of 127.5·x + 127.5.
#[inline]
pub fn to_u8(x: f32) -> u8 {
    (127.5 * x + 128.0).clamp(0.0, 255.0) as u8
}

/// One image (C, H, W) in [−1, 1] → interleaved RGB or grey bytes (H, W, C).
pub fn to_hwc_u8(chw: &[f32], channels: usize, side: usize, out: &mut [u8]) {
    let hw = side * side;
    for p in 0..hw {
        for c in 0..channels {
            out[p * channels + c] = to_u8(chw[c * hw + p]);
        }
    }
}

/// Lays `count` images (each (C, side, side) in [−1, 1]) out in a grid of `cols` columns
/// with a `pad`-pixel border, and writes it as a PNG.
pub fn write_grid_png(
    path: &Path,
    images: &[f32],
    count: usize,
    channels: usize,
    side: usize,
    cols: usize,
    pad: usize,
) -> Result<()> {
    if !(channels == 1 || channels == 3) {
        return Err(Error::invalid("image channels", format!("{channels}: PNG output needs 1 or 3")));
    }
    let cols = cols.clamp(1, count.max(1));
    let rows = count.div_ceil(cols);
    let (w, h) = (cols * (side + pad) + pad, rows * (side + pad) + pad);
    let mut canvas = vec![255u8; w * h * channels];
    let mut tile = vec![0u8; side * side * channels];
    let img = channels * side * side;
    for i in 0..count {
        to_hwc_u8(&images[i * img..(i + 1) * img], channels, side, &mut tile);
        let (gy, gx) = (i / cols, i % cols);
        for y in 0..side {
            let dst = ((pad + gy * (side + pad) + y) * w + pad + gx * (side + pad)) * channels;
            canvas[dst..dst + side * channels].copy_from_slice(&tile[y * side * channels..(y + 1) * side * channels]);
        }
    }
    write_png(path, &canvas, w, h, channels)
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
    crate::atomic_write(path, &bytes)
}
