//! The arena of a PixArt pass on the device: every buffer named and sized before anything is
//! allocated (weights and factors in f16, the caption's K/V of every block, the activations,
//! the cache slots, the sampler's latents).

use super::{Buffers, DevFactors, STEP_IN};
use crate::config::FREQ_DIM;
use crate::gpu::launch;
use crate::pixart::forward::{self as pforward, modulation_width, Slot};
use crate::pixart::{Layer, PixArtCache, PixArtModel};
use crate::plan::{Dt, Plan};

/// The arena of a PixArt pass for `rows` model rows and captions of up to `l` tokens.
pub(super) fn plan(model: &PixArtModel, rows: usize, l: usize, cache: &PixArtCache) -> (Plan, Buffers) {
    let cfg = model.config;
    let (n, c, m, d) = (cfg.tokens(), cfg.hidden_size(), cfg.mlp_hidden(), cfg.depth);
    let p = cfg.patch_size;
    let (pd, fin) = (cfg.in_channels * p * p, p * p * cfg.out_channels);
    let h = Dt::F16;
    let mut pl = Plan::new(format!("PixArt GPU forward ({rows} rows, {l} text tokens)"));
    let linears = Layer::all(d)
        .map(|layer| {
            let (out, inp) = layer.shape(&cfg);
            let name = layer.name();
            (pl.add(format!("{name}.w"), &[out, inp], h), pl.add(format!("{name}.b"), &[out], h))
        })
        .collect();
    let factors = match cache {
        PixArtCache::Icc(f) => Layer::all(d)
            .map(|layer| {
                let lf = pforward::slots(layer).and(f.get(layer))?;
                let (out, inp) = layer.shape(&cfg);
                let name = layer.name();
                Some(DevFactors {
                    down: pl.add(format!("factors {name}.down"), &[lf.rank, inp], h),
                    up: pl.add(format!("factors {name}.up"), &[out, lf.rank], h),
                    rank: lf.rank,
                })
            })
            .collect(),
        _ => vec![None; Layer::all(d).count()],
    };
    let cache_bufs = if matches!(cache, PixArtCache::None) {
        Vec::new()
    } else {
        (0..d)
            .map(|i| {
                let qkv = pl.add(format!("cache.{i}.qkv_y"), &[rows, n, 3 * c], h);
                Slot::ALL.map(|s| match s {
                    Slot::Q1Y | Slot::K1Y | Slot::V1Y => qkv,
                    _ => pl.add(format!("cache.{i}.{s:?}"), &[rows, n, s.width(&cfg)], h),
                })
            })
            .collect()
    };
    let lowrank = match cache {
        PixArtCache::Icc(f) => Some(pl.add("icc low-rank", &[rows, n, f.max_rank().max(1)], h)),
        _ => None,
    };
    let bufs = Buffers {
        linears,
        patch_w: pl.add("patch.w", &[c, pd], h),
        patch_b: pl.add("patch.b", &[c], h),
        pos: pl.add("pos_embed", &[n, c], h),
        tables: pl.add("scale_shift_tables", &[modulation_width(&cfg)], Dt::F32),
        freqs: pl.add("t_freqs", &[FREQ_DIM / 2], Dt::F32),
        factors,
        input: pl.add("latents (model input)", &[rows, cfg.image_elems()], Dt::F32),
        step_in: pl.add("step numbers and timesteps", &[STEP_IN + rows], Dt::F32),
        tfreq: pl.add("t_freq", &[rows, FREQ_DIM], h),
        temb_h: pl.add("t_hidden", &[rows, c], h),
        emb: pl.add("emb", &[rows, c], Dt::F32),
        silu_emb: pl.add("silu_emb", &[rows, c], h),
        tmod: pl.add("t_mod", &[rows, 6 * c], Dt::F32),
        modv: pl.add("modulation", &[rows, modulation_width(&cfg)], h),
        text: pl.add("caption embeddings", &[rows, l, cfg.caption_channels], h),
        cap_h: pl.add("caption hidden", &[rows, l, c], h),
        cap: pl.add("caption", &[rows, l, c], h),
        mask_bias: pl.add("caption mask bias", &[rows, l], Dt::F32),
        cross: (0..d)
            .map(|i| {
                [
                    pl.add(format!("block {i} cross k"), &[rows, l, c], h),
                    pl.add(format!("block {i} cross v"), &[rows, l, c], h),
                ]
            })
            .collect(),
        patches: pl.add("patches", &[rows, n, pd], h),
        x: pl.add("x (residual stream)", &[rows, n, c], Dt::F32),
        xh: pl.add("x in f16", &[rows, n, c], h),
        h: pl.add("h", &[rows, n, c], h),
        qkv: pl.add("qkv", &[rows, n, 3 * c], h),
        attn: pl.add("attn", &[rows, n, c], h),
        y: pl.add("y", &[rows, n, c], h),
        mlp: pl.add("mlp", &[rows, n, m], h),
        out: pl.add("final_out", &[rows, n, fin], Dt::F32),
        image: pl.add("model output", &[rows, cfg.out_elems()], Dt::F32),
        ones: pl.add("ones", &[rows, c], h),
        size_emb: cfg.use_additional_conditions.then(|| pl.add("micro-condition embedding", &[rows, c], h)),
        cache: cache_bufs,
        lowrank,
        split_ws: pl.add("GEMM split-k partial sums", &[launch::SPLIT_WORKSPACE_ELEMS], Dt::F32),
        latents: pl.add("sampler latents", &[rows, cfg.image_elems()], Dt::F32),
        x0: pl.add("sampler x̂₀", &[rows, cfg.image_elems()], Dt::F32),
        state: pl.add("request state", &[3], Dt::I32),
    };
    pl.outside("weights, memory-mapped file(s) on the host", model.file_bytes());
    (pl, bufs)
}
