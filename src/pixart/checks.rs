//! What both backends of PixArt-α's forward pass (the CPU's [`super::PixArtCpu`], the device's
//! [`crate::gpu::pixart::PixArtGpu`]) check of the rows they stage and the passes they run:
//! one set of rules and messages.

use super::PixArtConfig;
use crate::error::{Error, Result};
use crate::forward::StepKind;
use crate::policy::CachePolicy;

/// A pass's latents `x` (rows, Cin, H, W) and timesteps `t` (rows) for an engine of
/// `max_rows` rows.
pub(crate) fn check_inputs(cfg: &PixArtConfig, max_rows: usize, x: &[f32], t: &[f32], rows: usize) -> Result<()> {
    let img = cfg.image_elems();
    if rows == 0 || rows > max_rows || x.len() != rows * img || t.len() != rows {
        return Err(Error::invalid(
            "model input",
            format!(
                "{rows} rows ({} latent values, {} timesteps) for an engine of {max_rows} rows of {img}",
                x.len(),
                t.len(),
            ),
        ));
    }
    Ok(())
}

/// A request's captions `text` (rows, len, D) and masks `mask` (rows, len) of 0/1, for an
/// engine of `max_rows` rows and captions of at most `max_text_len` tokens.
pub(crate) fn check_text(
    cfg: &PixArtConfig,
    max_rows: usize,
    max_text_len: usize,
    text: &[f32],
    mask: &[i64],
    rows: usize,
    len: usize,
) -> Result<()> {
    let d = cfg.caption_channels;
    if len == 0 || len > max_text_len {
        return Err(Error::invalid(
            "text length",
            format!("{len} tokens; this engine was planned for 1 to {max_text_len} (max text length)"),
        ));
    }
    if rows == 0 || rows > max_rows || text.len() != rows * len * d || mask.len() != rows * len {
        return Err(Error::invalid(
            "caption",
            format!(
                "{} embedding values and {} mask values for {rows} rows of {len} tokens × {d}",
                text.len(),
                mask.len()
            ),
        ));
    }
    if let Some(i) = mask.iter().position(|&v| v != 0 && v != 1) {
        return Err(Error::invalid("attention mask", format!("element {i} is {}; masks are 0 or 1", mask[i])));
    }
    Ok(())
}

/// The additive attention bias of a caption token's mask value: 0 kept, −10000 masked.
pub(crate) fn mask_bias(m: i64) -> f32 {
    (1 - m) as f32 * -10000.0
}

/// What a backend has staged, as [`check_pass`] reads it.
pub(crate) struct Staged {
    pub max_rows: usize,
    /// Tokens of the staged caption; 0: none staged.
    pub text_len: usize,
    /// For a model with micro-conditions, the rows whose conditions are staged; `None` for one
    /// without.
    pub size_rows: Option<usize>,
    /// Rows of the last full step, whose activations the caches hold.
    pub cached_rows: Option<usize>,
    pub policy: CachePolicy,
}

/// A pass of `kind` on `rows` rows may run: a caption staged, rows in range, the
/// micro-conditions of as many rows staged (models that take them), the kind in the cache
/// policy, a full step on the same rows before a cached one.
pub(crate) fn check_pass(s: &Staged, rows: usize, kind: StepKind) -> Result<()> {
    if s.text_len == 0 {
        return Err(Error::invalid("caption", "no caption staged before the forward pass"));
    }
    if rows == 0 || rows > s.max_rows {
        return Err(Error::invalid("model input", format!("{rows} rows; this engine takes 1 to {}", s.max_rows)));
    }
    if let Some(staged) = s.size_rows.filter(|&n| n < rows) {
        return Err(Error::invalid(
            "micro-conditions",
            format!(
                "this model uses the resolution and aspect-ratio conditions (use_additional_conditions): \
                 {staged} rows staged for a pass of {rows}"
            ),
        ));
    }
    let policy = s.policy;
    if kind != StepKind::Plain && !policy.step_kinds().contains(&kind) {
        return Err(Error::invalid("step kind", format!("a {} step under cache policy {policy}", kind.name())));
    }
    if matches!(kind, StepKind::Calibrated | StepKind::Reuse) && s.cached_rows != Some(rows) {
        return Err(Error::invalid(
            "step kind",
            format!("a {} step needs a full step with the same {rows} rows before it", kind.name()),
        ));
    }
    Ok(())
}
