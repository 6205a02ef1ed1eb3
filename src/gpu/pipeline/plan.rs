//! The GPU pipeline's memory plan: every buffer of the device arena by name, shape and
//! dtype — the f16 weights and factors, the cache slots, the activations, the per-request
//! conditioning and the sampler state — from (config, rows, steps, factors, caching), before
//! anything is allocated.

use crate::config::{DitConfig, FREQ_DIM};
use crate::engine::EngineOptions;
use crate::error::{Error, Result};
use crate::factors::{Factors, LayerType};
use crate::forward::Slot;
use crate::gpu::launch;
use crate::plan::{BufId, Dt, Plan};
use crate::policy::{CacheMode, IccForm};
use crate::weights::DitModel;

/// f32 values per step in the sampler's coefficient table (see kernels/sampler.cu).
pub(super) const COEFFS: usize = 12;
/// Ints of device-side request state: step index, seed (lo, hi), first image index (lo, hi),
/// then the first step whose model output ([`BAD_OUTPUT`]) or latents ([`BAD_LATENTS`]) held
/// NaN or ±Inf (−1: none).
pub(super) const STATE: usize = 8;
pub(super) const BAD_OUTPUT: usize = 5;
pub(super) const BAD_LATENTS: usize = 6;

/// One block's weights (f16), as [`crate::weights`] names them.
pub(super) struct BlockWeights {
    pub(super) qkv_w: BufId,
    pub(super) qkv_b: BufId,
    pub(super) proj_w: BufId,
    pub(super) proj_b: BufId,
    pub(super) fc1_w: BufId,
    pub(super) fc1_b: BufId,
    pub(super) fc2_w: BufId,
    pub(super) fc2_b: BufId,
}

/// One block's rank-r factors: `down` of (q|k|v stacked, proj, fc1, fc2), `up` per layer
/// type in [`LayerType::ALL`] order.
pub(super) struct BlockFactors {
    pub(super) down: [BufId; 4],
    pub(super) up: [BufId; 6],
    pub(super) ranks: [usize; 6],
    /// q, k and v's up factors as one block-diagonal (3C, r_q + r_k + r_v) matrix, planned when
    /// the engine's rows are few (see `MERGED_QKV_UP_ROWS`): one GEMM instead of three.
    pub(super) qkv_up: Option<BufId>,
}

/// Up to this many model rows (tokens × images, guidance included) the calibrated q, k and v
/// share one up-projection GEMM against a block-diagonal factor: at 512 rows (DiT-XL/2 batch 1)
/// three launches of (512 × 1152, k = 128) took 3 × 10.8 µs on an H200, and the launches, not
/// the FLOPs, set the time; the merged GEMM does 3× the multiply-adds (the zero blocks), which
/// stops paying at a few thousand rows (2048 rows: 3 × 14.9 µs against ≈ 45 µs merged).
const MERGED_QKV_UP_ROWS: usize = 1024;

/// Every buffer of the GPU pipeline's arena; [`plan`] gives their shapes and dtypes.
pub(super) struct DeviceBuffers {
    pub(super) patch_w: BufId,
    pub(super) patch_b: BufId,
    pub(super) pos: BufId,
    /// The timestep MLP (t_embedder.mlp.0 and .2): frequencies → C, then C → C.
    pub(super) t_mlp_in_w: BufId,
    pub(super) t_mlp_in_b: BufId,
    pub(super) t_mlp_out_w: BufId,
    pub(super) t_mlp_out_b: BufId,
    pub(super) table: BufId,
    /// Every block's adaLN weights, then the final layer's: (depth·6C + 2C, C).
    pub(super) ada_w: BufId,
    pub(super) ada_b: BufId,
    pub(super) final_w: BufId,
    pub(super) final_b: BufId,
    pub(super) freqs: BufId,
    pub(super) blocks: Vec<BlockWeights>,
    pub(super) factors: Vec<BlockFactors>,
    /// Per block, the cache slots the policy keeps (all eight for reuse and icc, `proj_y` and
    /// `fc2_y` for fora), f16.
    pub(super) cache: Vec<[Option<BufId>; 8]>,
    /// Per block, Taylor forecasting's factors of the attention and MLP branch outputs, f32
    /// (order + 1, max rows, N, C) each; empty unless the policy is taylor.
    pub(super) forecast: Vec<[BufId; 2]>,
    /// Taylor forecasting's numbers per step ([`launch::FORECAST_TABLE`] f32 each).
    pub(super) forecast_table: Option<BufId>,
    /// icc's folded form: every block's b_s = y_s − up·(down·x_s) of qkv, proj, fc1 and fc2;
    /// the projected form: every block's t_s = down·x_s (f32) of the same (empty for the
    /// direct form).
    pub(super) bases: Vec<[BufId; 4]>,
    pub(super) patches: BufId,
    pub(super) x: BufId,
    pub(super) h: BufId,
    pub(super) qkv: BufId,
    pub(super) attn: BufId,
    pub(super) y: BufId,
    pub(super) mlp: BufId,
    pub(super) out: BufId,
    pub(super) model_out: BufId,
    pub(super) lowrank: Option<BufId>,
    pub(super) t_all: BufId,
    pub(super) labels: BufId,
    pub(super) tfreq: BufId,
    pub(super) temb_h: BufId,
    pub(super) temb: BufId,
    pub(super) silu_c: BufId,
    pub(super) mod_all: BufId,
    pub(super) mod_cur: BufId,
    pub(super) latents: BufId,
    /// The last step's x̂₀ (per-step previews), the latents' layout.
    pub(super) x0: BufId,
    pub(super) coeffs: BufId,
    pub(super) state: BufId,
    pub(super) split_ws: BufId,
}

/// Width of one row of the modulation buffers: every block's 6C, then the final layer's 2C.
pub(super) fn mod_width(cfg: &DitConfig) -> usize {
    (6 * cfg.depth + 2) * cfg.hidden_size
}

/// How the pipeline computes icc's calibrated linears, resolved from the options and the
/// factors' ranks ([`IccLayout::resolve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct IccLayout {
    /// Direct, folded (b_s slots, refreshed by full steps) or projected (t_s slots, refreshed
    /// by full steps); never `Auto`.
    pub(super) form: IccForm,
    /// One fused low-rank launch per calibrated linear (kernels/lowrank.cu) rather than two GEMMs.
    pub(super) fused: bool,
}

impl Default for IccLayout {
    fn default() -> Self {
        IccLayout { form: IccForm::Direct, fused: false }
    }
}

impl IccLayout {
    /// The layout `opts` asks for with these factors: fused when the options allow it and every
    /// layer's ranks fit the kernel; folded or projected when asked (both need the fused
    /// kernel for the full step's refresh), and by default (`auto`) projected when fused, else
    /// direct (docs/performance.md, "icc's three forms").
    pub(super) fn resolve(cfg: &DitConfig, opts: &EngineOptions, factors: Option<&Factors>) -> Result<Self> {
        let Some(f) = factors else { return Ok(IccLayout::default()) };
        let (c, m) = (cfg.hidden_size, cfg.mlp_hidden());
        let fits = f.blocks.iter().all(|b| {
            let r = |t| b.get(t).rank;
            launch::lowrank_fits(c, c, &[r(LayerType::Q), r(LayerType::K), r(LayerType::V)])
                && launch::lowrank_fits(c, c, &[r(LayerType::Proj)])
                && launch::lowrank_fits(c, c, &[r(LayerType::Fc1)])
                && launch::lowrank_fits(m, m, &[r(LayerType::Fc2)])
        });
        let fused = opts.fused_lowrank && fits;
        let form = match opts.icc_form {
            IccForm::Auto if fused => IccForm::Projected,
            IccForm::Auto | IccForm::Direct => IccForm::Direct,
            f if fused => f,
            f => {
                return Err(Error::invalid(
                    "icc form",
                    if fits {
                        format!("{f}: the {f} form needs the fused low-rank kernel, which these options turn off")
                    } else {
                        format!(
                            "{f}: the {f} form needs the fused low-rank kernel, which takes ranks that are multiples of 8 up to {}; these factors' are not",
                            launch::LOWRANK_MAX_RANK
                        )
                    },
                ))
            }
        };
        Ok(IccLayout { form, fused })
    }
}

/// The arena for `max_rows` model rows (guidance included) and a schedule of `steps` steps,
/// with factors and cache slots when the policy uses them, and icc's b_s or t_s slots in the
/// folded or projected form.
pub(super) fn plan(
    cfg: &DitConfig,
    max_rows: usize,
    steps: usize,
    factors: Option<&Factors>,
    cache_mode: &CacheMode,
    icc: IccLayout,
) -> (Plan, DeviceBuffers) {
    let caching = cache_mode.keeps_caches();
    let (c, n, m, d) = (cfg.hidden_size, cfg.tokens(), cfg.mlp_hidden(), cfg.depth);
    let fin = cfg.patch_size * cfg.patch_size * cfg.out_channels();
    let mw = mod_width(cfg);
    let h = Dt::F16;
    let mut p = Plan::new(format!("GPU pipeline ({max_rows} rows, {steps} steps)"));
    let blocks = (0..d)
        .map(|i| BlockWeights {
            qkv_w: p.add(format!("blocks.{i}.qkv.w"), &[3 * c, c], h),
            qkv_b: p.add(format!("blocks.{i}.qkv.b"), &[3 * c], h),
            proj_w: p.add(format!("blocks.{i}.proj.w"), &[c, c], h),
            proj_b: p.add(format!("blocks.{i}.proj.b"), &[c], h),
            fc1_w: p.add(format!("blocks.{i}.fc1.w"), &[m, c], h),
            fc1_b: p.add(format!("blocks.{i}.fc1.b"), &[m], h),
            fc2_w: p.add(format!("blocks.{i}.fc2.w"), &[c, m], h),
            fc2_b: p.add(format!("blocks.{i}.fc2.b"), &[c], h),
        })
        .collect();
    let factor_bufs = factors.map_or_else(Vec::new, |f| {
        f.blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let ranks = LayerType::ALL.map(|t| b.get(t).rank);
                let down = [
                    p.add(format!("factors.{i}.qkv.down"), &[b.qkv_rank(), c], h),
                    p.add(format!("factors.{i}.proj.down"), &[ranks[3], c], h),
                    p.add(format!("factors.{i}.fc1.down"), &[ranks[4], c], h),
                    p.add(format!("factors.{i}.fc2.down"), &[ranks[5], m], h),
                ];
                let up = LayerType::ALL.map(|t| {
                    let (out, _) = t.shape(c, m);
                    p.add(format!("factors.{i}.{}.up", t.name()), &[out, b.get(t).rank], h)
                });
                let qkv_up = (!icc.fused && max_rows * n <= MERGED_QKV_UP_ROWS)
                    .then(|| p.add(format!("factors.{i}.qkv.up (block-diagonal)"), &[3 * c, b.qkv_rank()], h));
                BlockFactors { down, up, ranks, qkv_up }
            })
            .collect()
    });
    let kept = |s: Slot| match cache_mode {
        CacheMode::None | CacheMode::Taylor(_) => false,
        CacheMode::Reuse | CacheMode::Icc(_) => true,
        CacheMode::Fora => matches!(s, Slot::ProjY | Slot::Fc2Y),
    };
    let cache = if Slot::ALL.iter().any(|&s| kept(s)) {
        (0..d)
            .map(|i| {
                Slot::ALL
                    .map(|s| kept(s).then(|| p.add(format!("cache.{i}.{}", s.name()), &[max_rows, n, s.width(cfg)], h)))
            })
            .collect()
    } else {
        Vec::new()
    };
    let forecast = cache_mode.forecast().map_or_else(Vec::new, |f| {
        (0..d)
            .map(|i| ["attn", "mlp"].map(|b| p.add(format!("taylor.{i}.{b}"), &[f.order + 1, max_rows, n, c], Dt::F32)))
            .collect()
    });
    let forecast_table =
        cache_mode.forecast().map(|_| p.add("Taylor forecast table", &[steps, launch::FORECAST_TABLE], Dt::F32));
    let bases = match (icc.form, factors) {
        (IccForm::Folded, Some(_)) if caching => (0..d)
            .map(|i| {
                [("qkv", 3 * c), ("proj", c), ("fc1", m), ("fc2", c)]
                    .map(|(l, w)| p.add(format!("cache.{i}.{l}_base"), &[max_rows, n, w], h))
            })
            .collect(),
        (IccForm::Projected, Some(f)) if caching => f
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let r = |t| b.get(t).rank;
                [
                    ("qkv", b.qkv_rank()),
                    ("proj", r(LayerType::Proj)),
                    ("fc1", r(LayerType::Fc1)),
                    ("fc2", r(LayerType::Fc2)),
                ]
                .map(|(l, w)| p.add(format!("cache.{i}.{l}_t_s"), &[max_rows, n, w.max(1)], Dt::F32))
            })
            .collect(),
        _ => Vec::new(),
    };
    // The two-GEMM path's rank-r intermediate (the fused kernel keeps it on chip).
    let lowrank = factors.filter(|_| !icc.fused).map(|f| {
        let (qkv, one) = f.max_ranks();
        p.add("icc_lowrank", &[max_rows, n, qkv.max(one)], h)
    });
    let cond = steps * max_rows;
    let buffers = DeviceBuffers {
        patch_w: p.add("patch.w", &[c, cfg.patch_dim()], h),
        patch_b: p.add("patch.b", &[c], h),
        pos: p.add("pos_embed", &[n, c], h),
        t_mlp_in_w: p.add("t_mlp.0.w", &[c, FREQ_DIM], h),
        t_mlp_in_b: p.add("t_mlp.0.b", &[c], h),
        t_mlp_out_w: p.add("t_mlp.2.w", &[c, c], h),
        t_mlp_out_b: p.add("t_mlp.2.b", &[c], h),
        table: p.add("label_table", &[cfg.label_rows(), c], h),
        ada_w: p.add("adaLN.w (all blocks, final)", &[mw, c], h),
        ada_b: p.add("adaLN.b (all blocks, final)", &[mw], h),
        final_w: p.add("final.w", &[fin, c], h),
        final_b: p.add("final.b", &[fin], h),
        freqs: p.add("t_freqs", &[FREQ_DIM / 2], Dt::F32),
        blocks,
        factors: factor_bufs,
        cache,
        forecast,
        forecast_table,
        bases,
        patches: p.add("patches", &[max_rows, n, cfg.patch_dim()], h),
        x: p.add("x (residual stream)", &[max_rows, n, c], Dt::F32),
        h: p.add("h", &[max_rows, n, c], h),
        qkv: p.add("qkv", &[max_rows, n, 3 * c], h),
        attn: p.add("attn", &[max_rows, n, c], h),
        y: p.add("y", &[max_rows, n, c], h),
        mlp: p.add("mlp", &[max_rows, n, m], h),
        out: p.add("final_out", &[max_rows, n, fin], Dt::F32),
        model_out: p.add("model_output", &[max_rows, cfg.output_elems()], Dt::F32),
        lowrank,
        t_all: p.add("timesteps (steps × rows)", &[cond], Dt::F32),
        labels: p.add("labels", &[max_rows], Dt::I32),
        tfreq: p.add("t_freq", &[cond, FREQ_DIM], h),
        temb_h: p.add("t_hidden", &[cond, c], h),
        temb: p.add("t_emb", &[cond, c], Dt::F32),
        silu_c: p.add("silu_c", &[cond, c], h),
        mod_all: p.add("modulation (steps × rows)", &[cond, mw], h),
        mod_cur: p.add("modulation (this step)", &[max_rows, mw], h),
        latents: p.add("latents", &[max_rows, cfg.image_elems()], Dt::F32),
        x0: p.add("x̂₀ of the last step (previews)", &[max_rows, cfg.image_elems()], Dt::F32),
        coeffs: p.add("sampler coefficients", &[steps, COEFFS], Dt::F32),
        state: p.add("request state", &[STATE], Dt::I32),
        split_ws: p.add("GEMM split-k partial sums", &[launch::SPLIT_WORKSPACE_ELEMS], Dt::F32),
    };
    (p, buffers)
}

/// Plans (without allocating) the GPU pipeline for a model and options: for `inspect` and
/// memory checks.
pub fn plan_for(model: &DitModel, opts: &EngineOptions) -> Result<Plan> {
    let schedule = opts.validate(&model.config)?;
    let factors = opts.cache.factors().map(|f| f.as_ref());
    let rows = opts.model_rows(opts.max_batch);
    let icc = IccLayout::resolve(&model.config, opts, factors)?;
    Ok(plan(&model.config, rows, schedule.len(), factors, &opts.cache, icc).0)
}
