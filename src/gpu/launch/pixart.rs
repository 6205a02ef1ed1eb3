//! Launchers of PixArt-α's own kernels (kernels/pixart.cu): attention over rows of keys with
//! an optional additive bias (cross-attention with the caption mask, and self-attention at
//! head dims the flash kernel is not built for), SiLU from f32 to f16, and the modulation
//! vectors of adaLN-single.

use super::{covers, elementwise, invalid, positive};
use crate::error::Result;
use crate::gpu::{f16, kernels, DevPtr, DevSlice, Device, LaunchCfg};

/// The largest head dim [`attention_rows_f16`] takes (AR_MAX_D in kernels/pixart.cu).
pub const ATTENTION_ROWS_MAX_HEAD_DIM: i32 = 128;

/// The operands of one [`attention_rows_f16`] launch.
#[derive(Clone, Copy, Debug)]
pub struct AttentionRows {
    /// (rows, nq) rows of `ldo` f16, head h at columns h·head_dim ..
    pub out: DevSlice<f16>,
    /// (rows, nq) rows of `ldq`.
    pub q: DevSlice<f16>,
    /// (rows, nk) rows of `ldkv`, as `v`.
    pub k: DevSlice<f16>,
    pub v: DevSlice<f16>,
    /// (rows, nk) f32, added to the scaled scores.
    pub bias: Option<DevSlice<f32>>,
    pub rows: i32,
    pub nq: i32,
    pub nk: i32,
    pub heads: i32,
    pub head_dim: i32,
    pub ldq: i32,
    pub ldkv: i32,
    pub ldo: i32,
}

/// Elements a (rows, width) matrix with row stride `ld` spans.
fn span(rows: i64, ld: i32, width: i64) -> i64 {
    (rows - 1) * ld as i64 + width
}

/// `out = softmax(q·kᵀ/√head_dim + bias)·v` per (row, head) (kernels/pixart.cu). Grid
/// (⌈nq/16⌉, heads, rows), 128 threads: 16 queries per block.
pub fn attention_rows_f16<D: Device + ?Sized>(dev: &D, a: &AttentionRows) -> Result<()> {
    const K: &str = "attention_rows_f16";
    positive(K, &[("rows", a.rows), ("nq", a.nq), ("nk", a.nk), ("heads", a.heads), ("head_dim", a.head_dim)])?;
    if a.head_dim > ATTENTION_ROWS_MAX_HEAD_DIM {
        return Err(invalid(K, format!("head_dim {} is above {ATTENTION_ROWS_MAX_HEAD_DIM}", a.head_dim)));
    }
    if a.rows > 65535 || a.heads > 65535 {
        return Err(invalid(K, format!("rows {} and heads {} must be ≤ 65535 (grid z and y)", a.rows, a.heads)));
    }
    let width = a.heads as i64 * a.head_dim as i64;
    for (name, ld) in [("ldq", a.ldq), ("ldkv", a.ldkv), ("ldo", a.ldo)] {
        if (ld as i64) < width {
            return Err(invalid(K, format!("{name} = {ld} is less than heads × head_dim = {width}")));
        }
    }
    let (q_rows, k_rows) = (a.rows as i64 * a.nq as i64, a.rows as i64 * a.nk as i64);
    covers(K, "out", a.out, span(q_rows, a.ldo, width), 2)?;
    covers(K, "q", a.q, span(q_rows, a.ldq, width), 2)?;
    covers(K, "k", a.k, span(k_rows, a.ldkv, width), 2)?;
    covers(K, "v", a.v, span(k_rows, a.ldkv, width), 2)?;
    if let Some(b) = a.bias {
        covers(K, "bias", b, k_rows, 4)?;
    }
    let cfg = LaunchCfg {
        grid: [((a.nq + 15) / 16) as u32, a.heads as u32, a.rows as u32], // AR_Q = 16 queries per block
        block: [128, 1, 1],                                               // AR_THREADS
        dyn_smem: 0,
    };
    let scale = 1.0 / (a.head_dim as f32).sqrt();
    // SAFETY: every operand covers the rows, strides and widths the kernel reads or writes.
    unsafe {
        kernels::attention_rows_f16::launch(
            dev,
            &cfg,
            a.out.ptr(),
            a.q.ptr(),
            a.k.ptr(),
            a.v.ptr(),
            a.bias.map_or(DevPtr::null(), DevSlice::ptr),
            a.nq,
            a.nk,
            a.head_dim,
            a.ldq,
            a.ldkv,
            a.ldo,
            scale,
            a.bias.is_some() as i32,
        )
    }
}

/// `out[i] = f16(SiLU(x[i]))` (kernels/pixart.cu).
pub fn silu_f32_to_f16<D: Device + ?Sized>(dev: &D, out: DevSlice<f16>, x: DevSlice<f32>, n: i32) -> Result<()> {
    const K: &str = "silu_f32_to_f16";
    positive(K, &[("n", n)])?;
    covers(K, "out", out, n as i64, 2)?;
    covers(K, "x", x, n as i64, 4)?;
    // SAFETY: both buffers hold n elements.
    unsafe { kernels::silu_f32_to_f16::launch(dev, &elementwise(n as i64), out.ptr(), x.ptr(), n) }
}

/// Every modulation vector of `rows` rows: the blocks' `table + t_mod`, then the final
/// layer's `table + emb` (kernels/pixart.cu). out (rows, (6·depth + 2)·C) f16, tmod (rows, 6C)
/// and emb (rows, C) f32, table ((6·depth + 2)·C) f32.
pub fn pixart_modulation_f16<D: Device + ?Sized>(
    dev: &D,
    out: DevSlice<f16>,
    tmod: DevSlice<f32>,
    emb: DevSlice<f32>,
    table: DevSlice<f32>,
    rows: i32,
    channels: i32,
    depth: i32,
) -> Result<()> {
    const K: &str = "pixart_modulation_f16";
    positive(K, &[("rows", rows), ("channels", channels), ("depth", depth)])?;
    let width = (6 * depth as i64 + 2) * channels as i64;
    covers(K, "out", out, rows as i64 * width, 2)?;
    covers(K, "tmod", tmod, rows as i64 * 6 * channels as i64, 4)?;
    covers(K, "emb", emb, rows as i64 * channels as i64, 4)?;
    covers(K, "table", table, width, 4)?;
    // SAFETY: every buffer covers what the kernel reads or writes.
    unsafe {
        kernels::pixart_modulation_f16::launch(
            dev,
            &elementwise(rows as i64 * width),
            out.ptr(),
            tmod.ptr(),
            emb.ptr(),
            table.ptr(),
            rows,
            channels,
            depth,
        )
    }
}

/// Guidance and one DPM-Solver++ or DDIM update of `images` latents in place (kernels/pixart.cu):
/// x, x0 (images, img) f32, out (rows, out_img) f32 model output (rows = 2·images guided),
/// coeffs this step's six numbers (`PixArtSchedule::update_coeffs`).
#[allow(clippy::too_many_arguments)]
pub fn pixart_sampler_step_f32<D: Device + ?Sized>(
    dev: &D,
    x: DevSlice<f32>,
    x0: DevSlice<f32>,
    out: DevSlice<f32>,
    coeffs: DevSlice<f32>,
    images: i32,
    img: i32,
    out_img: i32,
    guided: bool,
    cfg_scale: f32,
) -> Result<()> {
    const K: &str = "pixart_sampler_step_f32";
    positive(K, &[("images", images), ("img", img), ("out_img", out_img)])?;
    if out_img < img {
        return Err(invalid(K, format!("out_img {out_img} is less than img {img}")));
    }
    let elems = images as i64 * img as i64;
    covers(K, "x", x, elems, 4)?;
    covers(K, "x0", x0, elems, 4)?;
    covers(K, "out", out, (1 + guided as i64) * images as i64 * out_img as i64, 4)?;
    covers(K, "coeffs", coeffs, 6, 4)?;
    // SAFETY: every buffer covers what the kernel reads or writes.
    unsafe {
        kernels::pixart_sampler_step_f32::launch(
            dev,
            &elementwise(elems),
            x.ptr(),
            x0.ptr(),
            out.ptr(),
            coeffs.ptr(),
            images,
            img,
            out_img,
            guided as i32,
            cfg_scale,
        )
    }
}
