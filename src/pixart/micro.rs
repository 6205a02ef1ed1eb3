//! The 1024-MS model's micro-conditions (diffusers' `PixArtAlphaCombinedTimestepSizeEmbeddings`
//! with `use_additional_conditions`): the image's resolution (height, width in pixels, each
//! embedded on its own) and aspect ratio (height / width) go through the timestep's 256-wide
//! [cos, sin] sinusoid and their own `linear_2(SiLU(linear_1(·)))` MLPs (hidden/3 wide), and
//! `[res(height), res(width), ar(height/width)]` is added to the timestep embedding `emb` —
//! so to adaLN-single's input and to the final layer's modulation alike. The pipeline passes
//! the sampled size (after binning) for every row, negative rows included.
//!
//! Constant over a request's steps, it is computed once when the request is staged.

use super::config::{PixArtConfig, VAE_SCALE_FACTOR};
use super::weights::{LinearTensors, PixArtModel};
use crate::config::FREQ_DIM;
use crate::cpu::math;
use crate::embed;
use crate::error::{Error, Result};

/// The pipeline's conditions for a model run at `cfg`'s latent size: the resolution
/// (height, width) in pixels, 8 × the latent's, and `float(height / width)` cast to f32.
pub fn pipeline_conditions(cfg: &PixArtConfig) -> ([f32; 2], f32) {
    let (h, w) = ((cfg.height * VAE_SCALE_FACTOR) as f64, (cfg.width * VAE_SCALE_FACTOR) as f64);
    ([h as f32, w as f32], (h / w) as f32)
}

/// Scratch values [`size_embedding`] needs: the sinusoid and one hidden layer.
pub fn scratch_len(model: &PixArtModel) -> usize {
    FREQ_DIM + model.config.size_emb_dim()
}

/// y = W·x + b of one (out, in) layer, in f32.
fn dense(model: &PixArtModel, l: LinearTensors, x: &[f32], y: &mut [f32]) {
    let (w, b) = (model.w(l.w), model.w(l.b));
    let inp = x.len();
    for (o, yo) in y.iter_mut().enumerate() {
        *yo = b[o] + w[o * inp..(o + 1) * inp].iter().zip(x).map(|(a, b)| a * b).sum::<f32>();
    }
}

/// Writes one row's micro-condition embedding (C values) into `out`: the resolution
/// (height, width) and the aspect ratio through their MLPs. Nothing when the model has none.
pub fn size_embedding(
    model: &PixArtModel,
    resolution: [f32; 2],
    aspect: f32,
    freqs: &[f32; FREQ_DIM / 2],
    scratch: &mut [f32],
    out: &mut [f32],
) {
    let Some(size) = model.tensors.size else { return };
    let s = model.config.size_emb_dim();
    let (tf, hidden) = scratch.split_at_mut(FREQ_DIM);
    let hidden = &mut hidden[..s];
    for (k, (value, mlp)) in
        [(resolution[0], size.resolution), (resolution[1], size.resolution), (aspect, size.aspect_ratio)]
            .into_iter()
            .enumerate()
    {
        embed::timestep_embedding(value, freqs, tf);
        dense(model, mlp[0], tf, hidden);
        for v in hidden.iter_mut() {
            *v = math::silu(*v);
        }
        dense(model, mlp[1], hidden, &mut out[k * s..(k + 1) * s]);
    }
}

/// The micro-condition embeddings of `rows` rows, as a backend stages them: checks
/// `resolution` (rows, 2: height, width in pixels) and `aspect` (rows: height / width) for a
/// backend planned for `max_rows`, then writes row r's C values at `out[r·C..]`.
#[allow(clippy::too_many_arguments)]
pub fn size_embeddings(
    model: &PixArtModel,
    resolution: &[f32],
    aspect: &[f32],
    rows: usize,
    max_rows: usize,
    freqs: &[f32; FREQ_DIM / 2],
    scratch: &mut [f32],
    out: &mut [f32],
) -> Result<()> {
    if model.tensors.size.is_none() {
        return Err(Error::invalid(
            "micro-conditions",
            "this model has no use_additional_conditions: it takes no resolution or aspect ratio",
        ));
    }
    if rows == 0 || rows > max_rows || resolution.len() != 2 * rows || aspect.len() != rows {
        return Err(Error::invalid(
            "micro-conditions",
            format!(
                "{} resolution and {} aspect-ratio values for {rows} rows (expected 2 and 1 per row, at most {max_rows} rows)",
                resolution.len(),
                aspect.len(),
            ),
        ));
    }
    if let Some(i) = resolution.iter().chain(aspect).position(|v| !v.is_finite()) {
        return Err(Error::invalid("micro-conditions", format!("value {i} is not finite")));
    }
    let c = model.config.hidden_size();
    for r in 0..rows {
        let res = [resolution[2 * r], resolution[2 * r + 1]];
        size_embedding(model, res, aspect[r], freqs, scratch, &mut out[r * c..(r + 1) * c]);
    }
    Ok(())
}
