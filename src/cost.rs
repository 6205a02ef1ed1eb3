//! Compute accounting with icc's conventions (reference doc E.7): multiply-accumulates per
//! single-sample forward, elementwise work (LayerNorm, softmax, GELU) not counted.

use crate::config::{DitConfig, FREQ_DIM};
use crate::forward::StepKind;

/// Patch embedding, timestep MLP and final layer (the label lookup counts 0).
pub fn pre_post_macs(cfg: &DitConfig) -> u64 {
    let (c, n) = (cfg.hidden_size as u64, cfg.tokens() as u64);
    let p2co = (cfg.patch_size * cfg.patch_size * cfg.out_channels()) as u64;
    n * c * cfg.patch_dim() as u64 + FREQ_DIM as u64 * c + c * c + 2 * c * c + n * c * p2co
}

/// One block at full cost: 12NC² + 2N²C + 6C² for mlp_ratio 4.
pub fn full_block_macs(cfg: &DitConfig) -> u64 {
    let (c, n, m) = (cfg.hidden_size as u64, cfg.tokens() as u64, cfg.mlp_hidden() as u64);
    n * 3 * c * c + n * c * c + 2 * n * n * c + 2 * n * c * m + 6 * c * c
}

/// One block of a calibrated step with ranks (q, k, v, proj, fc1, fc2): every linear
/// costs N·(in + out)·r; attention and adaLN as in a full step.
pub fn calibrated_block_macs(cfg: &DitConfig, ranks: [usize; 6]) -> u64 {
    let (c, n, m) = (cfg.hidden_size as u64, cfg.tokens() as u64, cfg.mlp_hidden() as u64);
    let r = ranks.map(|r| r as u64);
    n * 2 * c * (r[0] + r[1] + r[2]) + n * 2 * c * r[3] + n * (c + m) * (r[4] + r[5]) + 2 * n * n * c + 6 * c * c
}

/// One block of a reuse or forecast step: the adaLN modulation only.
pub fn reuse_block_macs(cfg: &DitConfig) -> u64 {
    let c = cfg.hidden_size as u64;
    6 * c * c
}

/// A whole forward of the given kind; `ranks` per block (used by calibrated steps).
pub fn step_macs(cfg: &DitConfig, kind: StepKind, ranks: &[[usize; 6]]) -> u64 {
    let blocks: u64 = match kind {
        StepKind::Plain | StepKind::Full | StepKind::BranchFull | StepKind::TaylorFull => {
            cfg.depth as u64 * full_block_macs(cfg)
        }
        // A forecast's Σ w_i·D_i is elementwise (2·order + 1 flops per element), not counted.
        StepKind::Reuse | StepKind::Forecast => cfg.depth as u64 * reuse_block_macs(cfg),
        StepKind::Calibrated => {
            (0..cfg.depth).map(|i| calibrated_block_macs(cfg, ranks.get(i).copied().unwrap_or([0; 6]))).sum()
        }
    };
    blocks + pre_post_macs(cfg)
}

/// Mean MACs per step over a schedule of step kinds, and its ratio to no caching.
pub fn schedule_macs(cfg: &DitConfig, kinds: impl Iterator<Item = StepKind>, ranks: &[[usize; 6]]) -> (f64, f64) {
    let (mut sum, mut count) = (0u64, 0u64);
    for k in kinds {
        sum += step_macs(cfg, k, ranks);
        count += 1;
    }
    let mean = sum as f64 / count.max(1) as f64;
    (mean, mean / step_macs(cfg, StepKind::Plain, ranks) as f64)
}
