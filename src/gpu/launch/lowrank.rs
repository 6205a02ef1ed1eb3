//! The launcher of the fused low-rank linear (kernels/lowrank.cu: `lowrank_fused_f16_bm16`,
//! `lowrank_fused_f16_bm32`): `out = act(add + scale·(a'·downᵀ)·upᵀ)` with `a' = a − a_minus`
//! (icc's direct form) or `a` (the folded form), optionally `t_s` subtracted from the projection
//! (the projected form), the rank-r intermediate kept on chip, and up to three output groups
//! (q, k and v) in one launch.

use super::{covers, invalid, positive, GemmAct};
use crate::error::Result;
use crate::gpu::{f16, kernels, DevSlice, Device, LaunchCfg, MAX_DYN_SMEM_OPT_IN};

const KERNEL: &str = "lowrank_fused_f16";

/// Threads per block, phase-1 k step and stages, phase-2 column tile (kernels/lowrank.cu).
const THREADS: u32 = 128;
const BK: i64 = 32;
const STAGES: i64 = 3;
const BN: i64 = 64;
/// The largest rank of one output group the kernel holds on chip.
pub const LOWRANK_MAX_RANK: usize = 256;
/// Blocks the launch aims at: two per multiprocessor of an H100/H200 (132).
const TARGET_BLOCKS: i64 = 264;

/// One fused low-rank linear: `out[i, j] = f16(act(add[i, j] + scale·Σ_r t[i, r]·up_g[j', r]))`
/// with `t = f16((a − a_minus)·down_gᵀ)` (or `a·down_gᵀ` without `a_minus`), for the output
/// group g = j / (n / groups) and j' = j − g·(n / groups). `down` stacks the groups' down
/// factors, (Σ ranks, k); `up[g]` is (n / groups, ranks[g]).
#[derive(Clone, Copy, Debug)]
pub struct LowRankSpec {
    /// (m, n), row stride `ldc`.
    pub out: DevSlice<f16>,
    /// (m, k), row stride `lda`.
    pub a: DevSlice<f16>,
    /// Subtracted from `a` (same shape and stride) before the down projection.
    pub a_minus: Option<DevSlice<f16>>,
    pub down: DevSlice<f16>,
    /// The up factor of each group (only the first `groups` are read).
    pub up: [DevSlice<f16>; 3],
    pub ranks: [i32; 3],
    pub groups: i32,
    /// (m, n), row stride `ld_add`.
    pub add: Option<DevSlice<f16>>,
    /// The projected form's t_s = down·x_s (f32, (m, Σ ranks), group g's columns after the
    /// ranks of the groups before it), subtracted from down·a in f32 before t is rounded.
    pub t_minus: Option<DevSlice<f32>>,
    pub scale: f32,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub lda: i32,
    pub ldc: i32,
    pub ld_add: i32,
    /// None or GELU (fc1 of a calibrated step).
    pub act: GemmAct,
}

/// Whether the fused kernel takes a layer of input width `k` (row stride `lda`) with these
/// group ranks: k, lda and every rank multiples of 8, every rank at most [`LOWRANK_MAX_RANK`].
/// Otherwise the pipeline runs the two fused GEMMs instead.
pub fn lowrank_fits(k: usize, lda: usize, ranks: &[usize]) -> bool {
    k.is_multiple_of(8) && lda.is_multiple_of(8) && ranks.iter().all(|&r| r.is_multiple_of(8) && r <= LOWRANK_MAX_RANK)
}

/// How one launch is laid out: rows per block (16 or 32) and blocks per output group along n.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowRankChoice {
    pub bm: i64,
    pub col_splits: i64,
}

/// The layout rule: 32-row blocks while they give at least one block per two multiprocessors
/// (`TARGET_BLOCKS / 4` row blocks × groups), else 16-row blocks; then each group's columns
/// split over enough blocks to reach `TARGET_BLOCKS`, but every split repeats the block's
/// down projection (k·r per row against (n / groups)·r for its share of the up projection), so
/// at most 1 + (n / groups) / k splits (qkv and proj 2, fc1 5, fc2 1 on DiT-XL/2) and no more
/// than the group's 64-column tiles.
pub fn lowrank_choice(m: i32, n: i32, k: i32, groups: i32) -> LowRankChoice {
    let (m, n, k, groups) = (m as i64, n as i64, k as i64, groups.max(1) as i64);
    let rows = |bm: i64| ((m + bm - 1) / bm).max(1);
    let bm = if rows(32) * groups >= TARGET_BLOCKS / 4 { 32 } else { 16 };
    let gw = (n / groups).max(1);
    let tiles = (gw + BN - 1) / BN;
    let want = (TARGET_BLOCKS + rows(bm) * groups - 1) / (rows(bm) * groups);
    let cap = 1 + gw / k.max(1);
    LowRankChoice { bm, col_splits: want.min(cap).min(tiles).max(1) }
}

/// Dynamic shared memory of a launch: the f32 tile (bm rows of max(rp, 64) + 4), t in f16
/// (bm × (rp + 8)), and the larger of the phase-1 stages (3 × (2·bm + rp) rows of 40 halves)
/// and the two up-tile buffers (2 × 64 × (rp + 8) halves); rp = the largest rank rounded up to 16.
pub fn lowrank_smem_bytes(bm: i64, max_rank: i64) -> u32 {
    let rp = (max_rank + 15) / 16 * 16;
    let cf = bm * (rp.max(BN) + 4) * 4;
    let ts = bm * (rp + 8) * 2;
    let work = (STAGES * (2 * bm + rp) * (BK + 8)).max(2 * BN * (rp + 8)) * 2;
    (cf + ts + work) as u32
}

/// Elements a (rows, width) matrix with row stride `ld` spans.
fn span(rows: i32, ld: i32, width: i32) -> i64 {
    (rows as i64 - 1) * ld as i64 + width as i64
}

/// Runs the fused low-rank linear `spec` describes (kernels/lowrank.cu), laid out by
/// [`lowrank_choice`]. Checks sizes, strides, the kernel's limits ([`lowrank_fits`]) and that
/// every slice covers what the kernel reads or writes.
pub fn lowrank_fused<D: Device + ?Sized>(dev: &D, spec: &LowRankSpec) -> Result<()> {
    let c = lowrank_choice(spec.m, spec.n, spec.k, spec.groups);
    lowrank_fused_as(dev, spec, c)
}

/// [`lowrank_fused`] with the layout given (tests cover every layout this way).
pub fn lowrank_fused_as<D: Device + ?Sized>(dev: &D, spec: &LowRankSpec, choice: LowRankChoice) -> Result<()> {
    let &LowRankSpec { out, a, a_minus, down, up, ranks, groups, add, t_minus, scale, m, n, k, lda, ldc, ld_add, act } =
        spec;
    positive(KERNEL, &[("m", m), ("n", n), ("k", k), ("groups", groups)])?;
    if groups != 1 && groups != 3 {
        return Err(invalid(KERNEL, format!("groups = {groups}: 1 or 3")));
    }
    if n % groups != 0 {
        return Err(invalid(KERNEL, format!("n = {n} is not {groups} equal groups")));
    }
    let ranks = &ranks[..groups as usize];
    let fits =
        k % 8 == 0 && lda % 8 == 0 && ranks.iter().all(|&r| r >= 0 && r % 8 == 0 && r as usize <= LOWRANK_MAX_RANK);
    if !fits {
        return Err(invalid(
            KERNEL,
            format!(
                "k = {k}, lda = {lda} and ranks {ranks:?} must be multiples of 8, ranks at most {LOWRANK_MAX_RANK}"
            ),
        ));
    }
    if lda < k || ldc < n || (add.is_some() && ld_add < n) {
        return Err(invalid(KERNEL, format!("strides lda {lda}, ldc {ldc}, ld_add {ld_add} below the row widths")));
    }
    if !(choice.bm == 16 || choice.bm == 32) || choice.col_splits < 1 {
        return Err(invalid(KERNEL, format!("layout {choice:?}: 16 or 32 rows per block, ≥ 1 column split")));
    }
    if !scale.is_finite() {
        return Err(invalid(KERNEL, format!("scale = {scale}")));
    }
    let act_code = match act {
        GemmAct::None => 0,
        GemmAct::GeluTanh => 1,
        GemmAct::Silu => return Err(invalid(KERNEL, "SiLU is not an activation of a block linear".into())),
    };
    let gw = n / groups;
    let r_total: i64 = ranks.iter().map(|&r| r as i64).sum();
    covers(KERNEL, "out", out, span(m, ldc, n), 2)?;
    covers(KERNEL, "a", a, span(m, lda, k), 16)?;
    if let Some(s) = a_minus {
        covers(KERNEL, "a_minus", s, span(m, lda, k), 16)?;
    }
    covers(KERNEL, "down", down, r_total * k as i64, 16)?;
    for (g, &r) in ranks.iter().enumerate() {
        covers(KERNEL, ["up[0]", "up[1]", "up[2]"][g], up[g], gw as i64 * r as i64, 16)?;
    }
    if let Some(s) = add {
        covers(KERNEL, "add", s, span(m, ld_add, n), 2)?;
    }
    // t_s: (m, Σ ranks) f32, row stride Σ ranks.
    let ld_t = r_total.max(1) as i32;
    if let Some(s) = t_minus {
        covers(KERNEL, "t_minus", s, m as i64 * r_total, 4)?;
    }
    let grid_y = (m as i64 + choice.bm - 1) / choice.bm;
    if grid_y > 65535 {
        return Err(invalid(KERNEL, format!("m = {m} needs {grid_y} row blocks, more than 65535")));
    }
    let max_rank = *ranks.iter().max().expect("groups ≥ 1") as i64;
    let smem = lowrank_smem_bytes(choice.bm, max_rank);
    debug_assert!(
        smem <= MAX_DYN_SMEM_OPT_IN,
        "rank ≤ {LOWRANK_MAX_RANK} keeps the kernel within Hopper's shared memory"
    );
    let cfg = LaunchCfg {
        grid: [(groups as i64 * choice.col_splits) as u32, grid_y as u32, 1],
        block: [THREADS, 1, 1],
        dyn_smem: smem,
    };
    let launch = if choice.bm == 16 {
        kernels::lowrank_fused_f16_bm16::launch::<D>
    } else {
        kernels::lowrank_fused_f16_bm32::launch::<D>
    };
    let up_ptr = |g: usize| if g < groups as usize { up[g].ptr() } else { up[0].ptr() };
    let r = |g: usize| if g < groups as usize { ranks[g] } else { 0 };
    // SAFETY: every operand covers what the kernel reads or writes for these sizes, strides and
    // ranks (checked above); absent operands are null, which the kernel skips.
    unsafe {
        launch(
            dev,
            &cfg,
            out.ptr(),
            a.ptr(),
            a_minus.map_or(crate::gpu::DevPtr::null(), DevSlice::ptr),
            down.ptr(),
            up_ptr(0),
            up_ptr(1),
            up_ptr(2),
            add.map_or(crate::gpu::DevPtr::null(), DevSlice::ptr),
            t_minus.map_or(crate::gpu::DevPtr::null(), DevSlice::ptr),
            scale,
            m,
            n,
            k,
            lda,
            ldc,
            if add.is_some() { ld_add } else { n },
            ld_t,
            groups,
            r(0),
            r(1),
            r(2),
            choice.col_splits as i32,
            act_code,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_on_dit_xl2() {
        // Batch 1 with guidance (512 rows): 16-row blocks; splits bounded by the repeated down
        // projection.
        assert_eq!(lowrank_choice(512, 3456, 1152, 3), LowRankChoice { bm: 16, col_splits: 2 });
        assert_eq!(lowrank_choice(512, 1152, 1152, 1), LowRankChoice { bm: 16, col_splits: 2 });
        assert_eq!(lowrank_choice(512, 4608, 1152, 1), LowRankChoice { bm: 16, col_splits: 5 });
        assert_eq!(lowrank_choice(512, 1152, 4608, 1), LowRankChoice { bm: 16, col_splits: 1 });
        // Batch 16 (8192 rows): 256 row blocks of 32 fill the GPU without splitting.
        assert_eq!(lowrank_choice(8192, 3456, 1152, 3), LowRankChoice { bm: 32, col_splits: 1 });
        // Tiny layers: never more splits than column tiles.
        assert_eq!(lowrank_choice(8, 48, 64, 3).col_splits, 1);
    }

    #[test]
    fn shared_memory_fits_hopper() {
        assert!(lowrank_smem_bytes(32, LOWRANK_MAX_RANK as i64) <= MAX_DYN_SMEM_OPT_IN);
        // Rank 128 at 16 rows: 16·132·4 + 16·136·2 + max(3·160·40, 2·64·136)·2.
        assert_eq!(lowrank_smem_bytes(16, 128), 8448 + 4352 + 38400);
    }
}
