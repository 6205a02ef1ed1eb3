//! Multiply-accumulates of PixArt-α's forward per model row and step kind, the PixArt
//! counterpart of `crate::cost` (icc's accounting): every linear, both attentions' score and
//! value products, the patch embedding, the timestep MLP and adaLN-single, the final
//! projection. The caption projection and cross-attention K/V are computed once per request
//! and not counted. A calibrated linear costs its factors, r·(in + out) per token; a reuse step
//! skips every block.

use super::config::PixArtConfig;
use super::factors::PixArtFactors;
use super::weights::Layer;
use crate::config::FREQ_DIM;
use crate::forward::StepKind;

/// MACs of one model row's forward of `kind` with a caption of `text_len` tokens; `factors`
/// gives a calibrated step's ranks.
pub fn step_macs(cfg: &PixArtConfig, kind: StepKind, text_len: usize, factors: Option<&PixArtFactors>) -> f64 {
    let (n, c, p) = (cfg.tokens() as f64, cfg.hidden_size() as f64, cfg.patch_size as f64);
    let outside = n * cfg.in_channels as f64 * p * p * c
        + FREQ_DIM as f64 * c
        + c * c
        + c * 6.0 * c
        + n * c * p * p * cfg.out_channels as f64;
    let attention = 2.0 * n * n * c + 2.0 * n * text_len as f64 * c;
    let blocks: f64 = (0..cfg.depth)
        .map(|i| {
            let linear = |layer: Layer| {
                let (out, inp) = layer.shape(cfg);
                match (kind, factors.and_then(|f| f.get(layer))) {
                    (StepKind::Calibrated, Some(f)) => n * (f.rank * (inp + out)) as f64,
                    _ => n * (inp * out) as f64,
                }
            };
            match kind {
                StepKind::Reuse => 0.0,
                _ => Layer::cached(i).into_iter().map(linear).sum::<f64>() + attention,
            }
        })
        .sum();
    outside + blocks
}

/// The mean MACs per step of a schedule against the same steps all plain (icc's MAC ratio).
pub fn mac_ratio(
    cfg: &PixArtConfig,
    kinds: impl Iterator<Item = StepKind>,
    text_len: usize,
    factors: Option<&PixArtFactors>,
) -> f64 {
    let plain = step_macs(cfg, StepKind::Plain, text_len, None);
    let (mut sum, mut steps) = (0.0, 0usize);
    for k in kinds {
        sum += step_macs(cfg, k, text_len, factors);
        steps += 1;
    }
    sum / (plain * steps.max(1) as f64)
}
