//! Typed launchers: exactly one per kernel, with the kernel's C parameters as fixed-width
//! types (buffers as [`DevSlice`]s, so lengths and alignment can be checked here, before a
//! kernel could read past them). Grid and block sizes are computed here and nowhere else.
//! Each function names the kernel it launches and the file that documents it.

use super::{f16, kernels, DevSlice, Device, LaunchCfg, MAX_DYN_SMEM, MAX_DYN_SMEM_OPT_IN};
use crate::error::{Error, Result};

mod gemm;
pub use gemm::*;
mod lowrank;
pub use lowrank::*;
mod embed;
mod vae;
pub use vae::*;
mod forecast;
mod pixart;
mod sampler;
pub use embed::*;
pub use forecast::*;
pub use pixart::*;
pub use sampler::*;

fn invalid(kernel: &str, reason: String) -> Error {
    Error::invalid("kernel arguments", format!("{kernel}: {reason}"))
}

fn positive(kernel: &str, args: &[(&str, i32)]) -> Result<()> {
    match args.iter().find(|(_, v)| *v <= 0) {
        Some((name, v)) => Err(invalid(kernel, format!("{name} = {v} must be positive"))),
        None => Ok(()),
    }
}

/// `s` holds at least `elems` elements and starts at a multiple of `align` bytes.
fn covers<T>(kernel: &str, what: &str, s: DevSlice<T>, elems: i64, align: u64) -> Result<()> {
    if (s.len as i64) < elems {
        return Err(invalid(kernel, format!("{what} has {} elements, needs {elems}", s.len)));
    }
    if !s.addr.is_multiple_of(align) {
        return Err(invalid(kernel, format!("{what} at {:#x} is not {align}-byte aligned", s.addr)));
    }
    Ok(())
}

fn blocks(n: i64, per_block: i64, cap: i64) -> u32 {
    ((n + per_block - 1) / per_block).clamp(1, cap) as u32
}

/// Grid-stride elementwise kernels: 256 threads, at most 1024 blocks (enough to fill an H100
/// several times over; fewer blocks also keep the emulation's per-block setup small).
fn elementwise(n: i64) -> LaunchCfg {
    LaunchCfg { grid: [blocks(n, 256, 1024), 1, 1], block: [256, 1, 1], dyn_smem: 0 }
}

/// `out[i] = f16(input[i])`, round to nearest even (kernels/convert.cu).
pub fn convert_f32_to_f16<D: Device + ?Sized>(dev: &D, out: DevSlice<f16>, input: DevSlice<f32>, n: i32) -> Result<()> {
    const K: &str = "convert_f32_to_f16";
    positive(K, &[("n", n)])?;
    covers(K, "out", out, n as i64, 2)?;
    covers(K, "input", input, n as i64, 4)?;
    // SAFETY: both buffers hold n elements.
    unsafe { kernels::convert_f32_to_f16::launch(dev, &elementwise(n as i64), out.ptr(), input.ptr(), n) }
}

/// `out[i] = f32(input[i])` (kernels/convert.cu).
pub fn convert_f16_to_f32<D: Device + ?Sized>(dev: &D, out: DevSlice<f32>, input: DevSlice<f16>, n: i32) -> Result<()> {
    const K: &str = "convert_f16_to_f32";
    positive(K, &[("n", n)])?;
    covers(K, "out", out, n as i64, 4)?;
    covers(K, "input", input, n as i64, 2)?;
    // SAFETY: both buffers hold n elements.
    unsafe { kernels::convert_f16_to_f32::launch(dev, &elementwise(n as i64), out.ptr(), input.ptr(), n) }
}

/// Rows of `rows / tokens` batch items whose modulation rows are `mod_stride` apart: the
/// modulation slice must reach the last item's `channels` values.
fn modulation_elems(rows: i32, tokens: i32, channels: i32, stride: i32) -> i64 {
    let items = (rows as i64 + tokens as i64 - 1) / tokens as i64;
    (items - 1) * stride as i64 + channels as i64
}

/// The checks and launch geometry shared by the LayerNorm-modulate kernels.
#[allow(clippy::too_many_arguments)]
fn layernorm_cfg<X>(
    k: &str,
    out: DevSlice<f16>,
    x: DevSlice<X>,
    shift: DevSlice<f16>,
    scale: DevSlice<f16>,
    rows: i32,
    tokens: i32,
    channels: i32,
    mod_stride: i32,
) -> Result<LaunchCfg> {
    positive(k, &[("rows", rows), ("tokens", tokens), ("channels", channels)])?;
    let row_bytes = channels as i64 * 4;
    if channels % 2 != 0 || mod_stride % 2 != 0 || mod_stride < channels || row_bytes > MAX_DYN_SMEM as i64 {
        return Err(invalid(
            k,
            format!(
                "channels {channels} must be even and ≤ {}, mod_stride {mod_stride} even and ≥ channels",
                MAX_DYN_SMEM / 4
            ),
        ));
    }
    let elems = rows as i64 * channels as i64;
    let modulation = modulation_elems(rows, tokens, channels, mod_stride);
    covers(k, "out", out, elems, 4)?;
    covers(k, "x", x, elems, 2 * size_of::<X>() as u64)?;
    covers(k, "shift", shift, modulation, 4)?;
    covers(k, "scale", scale, modulation, 4)?;
    Ok(LaunchCfg {
        grid: [rows as u32, 1, 1],
        block: [256, 1, 1], // LN_THREADS in the kernel
        dyn_smem: row_bytes as u32,
    })
}

/// `out = LayerNorm(x)·(1 + scale) + shift` per row, shift and scale per batch item
/// (kernels/layernorm.cu). x, out: (rows, channels) f16; one block per row.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_modulate_f16<D: Device + ?Sized>(
    dev: &D,
    out: DevSlice<f16>,
    x: DevSlice<f16>,
    shift: DevSlice<f16>,
    scale: DevSlice<f16>,
    rows: i32,
    tokens: i32,
    channels: i32,
    mod_stride: i32,
    eps: f32,
) -> Result<()> {
    let cfg = layernorm_cfg("layernorm_modulate_f16", out, x, shift, scale, rows, tokens, channels, mod_stride)?;
    // SAFETY: out and x hold rows × channels, shift and scale every batch item's row.
    unsafe {
        kernels::layernorm_modulate_f16::launch(
            dev,
            &cfg,
            out.ptr(),
            x.ptr(),
            shift.ptr(),
            scale.ptr(),
            tokens,
            channels,
            mod_stride,
            eps,
        )
    }
}

/// As [`layernorm_modulate_f16`] with x in f32 (the pipeline's residual stream).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_modulate_f32_stream<D: Device + ?Sized>(
    dev: &D,
    out: DevSlice<f16>,
    x: DevSlice<f32>,
    shift: DevSlice<f16>,
    scale: DevSlice<f16>,
    rows: i32,
    tokens: i32,
    channels: i32,
    mod_stride: i32,
    eps: f32,
) -> Result<()> {
    let cfg = layernorm_cfg("layernorm_modulate_f32_stream", out, x, shift, scale, rows, tokens, channels, mod_stride)?;
    // SAFETY: out and x hold rows × channels, shift and scale every batch item's row.
    unsafe {
        kernels::layernorm_modulate_f32_stream::launch(
            dev,
            &cfg,
            out.ptr(),
            x.ptr(),
            shift.ptr(),
            scale.ptr(),
            tokens,
            channels,
            mod_stride,
            eps,
        )
    }
}

/// `x += gate·y` (as [`gated_residual_add_f32_stream`]) then `out = LayerNorm(x)·(1 + scale) + shift`
/// (as [`layernorm_modulate_f32_stream`]), in one pass per row (kernels/layernorm.cu): a block's
/// residual add fused with the LayerNorm that follows it.
#[allow(clippy::too_many_arguments)]
pub fn residual_layernorm_modulate_f32_stream<D: Device + ?Sized>(
    dev: &D,
    out: DevSlice<f16>,
    x: DevSlice<f32>,
    y: DevSlice<f16>,
    gate: DevSlice<f16>,
    gate_stride: i32,
    shift: DevSlice<f16>,
    scale: DevSlice<f16>,
    rows: i32,
    tokens: i32,
    channels: i32,
    mod_stride: i32,
    eps: f32,
) -> Result<()> {
    const K: &str = "residual_layernorm_modulate_f32_stream";
    let cfg = layernorm_cfg(K, out, x, shift, scale, rows, tokens, channels, mod_stride)?;
    residual_check(K, x, y, gate, rows, tokens, channels, gate_stride)?;
    // SAFETY: out, x and y hold rows × channels; gate, shift and scale every batch item's row.
    unsafe {
        kernels::residual_layernorm_modulate_f32_stream::launch(
            dev,
            &cfg,
            out.ptr(),
            x.ptr(),
            y.ptr(),
            gate.ptr(),
            gate_stride,
            shift.ptr(),
            scale.ptr(),
            tokens,
            channels,
            mod_stride,
            eps,
        )
    }
}

/// The checks of the gated residual kernels; returns the pair count.
#[allow(clippy::too_many_arguments)]
fn residual_check<X>(
    k: &str,
    x: DevSlice<X>,
    y: DevSlice<f16>,
    gate: DevSlice<f16>,
    rows: i32,
    tokens: i32,
    channels: i32,
    gate_stride: i32,
) -> Result<i64> {
    positive(k, &[("rows", rows), ("tokens", tokens), ("channels", channels)])?;
    if channels % 2 != 0 || gate_stride % 2 != 0 || gate_stride < channels {
        return Err(invalid(
            k,
            format!("channels {channels} must be even, gate_stride {gate_stride} even and ≥ channels"),
        ));
    }
    let elems = rows as i64 * channels as i64;
    covers(k, "x", x, elems, 2 * size_of::<X>() as u64)?;
    covers(k, "y", y, elems, 4)?;
    covers(k, "gate", gate, modulation_elems(rows, tokens, channels, gate_stride), 4)?;
    Ok(elems / 2)
}

/// `x += gate ⊙ y`, gate per batch item (kernels/residual.cu). x, y: (rows, channels) f16.
#[allow(clippy::too_many_arguments)]
pub fn gated_residual_add_f16<D: Device + ?Sized>(
    dev: &D,
    x: DevSlice<f16>,
    y: DevSlice<f16>,
    gate: DevSlice<f16>,
    rows: i32,
    tokens: i32,
    channels: i32,
    gate_stride: i32,
) -> Result<()> {
    let pairs = residual_check("gated_residual_add_f16", x, y, gate, rows, tokens, channels, gate_stride)?;
    // SAFETY: x and y hold rows × channels, gate every batch item's row.
    unsafe {
        kernels::gated_residual_add_f16::launch(
            dev,
            &elementwise(pairs),
            x.ptr(),
            y.ptr(),
            gate.ptr(),
            rows,
            tokens,
            channels,
            gate_stride,
        )
    }
}

/// As [`gated_residual_add_f16`] with x in f32 (the pipeline's residual stream).
#[allow(clippy::too_many_arguments)]
pub fn gated_residual_add_f32_stream<D: Device + ?Sized>(
    dev: &D,
    x: DevSlice<f32>,
    y: DevSlice<f16>,
    gate: DevSlice<f16>,
    rows: i32,
    tokens: i32,
    channels: i32,
    gate_stride: i32,
) -> Result<()> {
    let pairs = residual_check("gated_residual_add_f32_stream", x, y, gate, rows, tokens, channels, gate_stride)?;
    // SAFETY: x and y hold rows × channels, gate every batch item's row.
    unsafe {
        kernels::gated_residual_add_f32_stream::launch(
            dev,
            &elementwise(pairs),
            x.ptr(),
            y.ptr(),
            gate.ptr(),
            rows,
            tokens,
            channels,
            gate_stride,
        )
    }
}

/// The attention kernel of each head dim (kernels/attention.cu: one template instance per D):
/// (head dim, Q_SMEM, SPLIT_SMEM, the most key splits), the sizes kernels/attention.cu
/// static_asserts. The dynamic shared memory with `splits` key splits is Q_SMEM + splits ·
/// SPLIT_SMEM: the block's 64 query rows (64 × (D' + 8) halves, D' the head dim padded to a
/// multiple of 16), and per split a K and a V tile of the same shape and four warps' 16 ×
/// (D' + 4) f32 scratch. Above 48 KiB the launch needs the opt-in (the CUDA device opts every
/// kernel in at load). Head dim 128 is built for 1 or 2 splits (4 would not fit).
const ATTENTION_KERNELS: [(i32, u32, u32, i32); 3] =
    [(64, 9_216, 35_840, 4), (72, 11_264, 44_032, 4), (128, 17_408, 68_608, 2)];
const fn attention_smem(kernel: (i32, u32, u32, i32), splits: i32) -> u32 {
    kernel.1 + splits as u32 * kernel.2
}
const _: () = {
    let mut i = 0;
    while i < ATTENTION_KERNELS.len() {
        let k = ATTENTION_KERNELS[i];
        assert!(attention_smem(k, k.3) <= MAX_DYN_SMEM_OPT_IN, "attention fits sm_90's shared memory");
        i += 1;
    }
};
/// Head dims the attention kernels are built for (DiT-S/B/L: 64, DiT-XL/2: 72, and 128).
pub const ATTENTION_HEAD_DIMS: [i32; 3] = [64, 72, 128];
/// Key splits the attention kernels are built for: 1, 2 or 4 groups of 4 warps
/// (blockDim.x / 128), at most [`attention_max_splits`] of the head dim.
pub const ATTENTION_SPLITS: [i32; 3] = [1, 2, 4];
/// SMs of the GPUs the split choice is tuned for (H100 SXM and H200: 132). Only speed depends
/// on it: every split count gives the same result up to the f32 rounding of the merge.
const ATTENTION_TUNED_SMS: i64 = 132;

fn attention_kernel(head_dim: i32) -> Option<(i32, u32, u32, i32)> {
    ATTENTION_KERNELS.iter().copied().find(|k| k.0 == head_dim)
}

/// The most key splits the attention kernel of `head_dim` is built for (4; 2 at head dim 128;
/// 0 for a head dim without a kernel).
pub fn attention_max_splits(head_dim: i32) -> i32 {
    attention_kernel(head_dim).map_or(0, |k| k.3)
}

/// The key splits [`attention_f16`] uses for a shape: 4 when the ⌈tokens/64⌉ · heads · batch
/// blocks of 64 queries fit one per SM (DiT-XL/2 at batch 1 with guidance: 128 blocks), so
/// each warp gets a quarter of the keys; 2 when they fit two per SM; else 1 (batch 16, 512 px:
/// enough blocks already). Never more splits than key tiles of 64 tokens, nor than the head
/// dim's kernel is built for.
pub fn attention_splits(batch: i32, tokens: i32, heads: i32, head_dim: i32) -> i32 {
    let tiles = (tokens.max(1) as i64 + 63) / 64;
    let blocks = tiles * heads.max(1) as i64 * batch.max(1) as i64;
    let mut splits = if blocks <= ATTENTION_TUNED_SMS {
        4
    } else if blocks <= 2 * ATTENTION_TUNED_SMS {
        2
    } else {
        1
    };
    while splits as i64 > tiles || splits > attention_max_splits(head_dim).max(1) {
        splits /= 2;
    }
    splits
}

/// Multi-head self-attention `softmax(q·kᵀ/√D)·v` per (batch item, head)
/// (kernels/attention.cu). qkv: (batch, tokens, 3C) with q, k, v the column blocks
/// [0, C), [C, 2C), [2C, 3C), head h at columns h·D .. h·D + D of each; out: (batch, tokens, C),
/// heads concatenated; C = heads · head_dim. Head dims 64, 72 and 128 are built
/// ([`ATTENTION_HEAD_DIMS`]). Both buffers must be 16-byte aligned (the tiles are copied with
/// 16-byte cp.async). Grid (⌈tokens/64⌉, heads, batch), 128 · [`attention_splits`] threads.
#[allow(clippy::too_many_arguments)]
pub fn attention_f16<D: Device + ?Sized>(
    dev: &D,
    out: DevSlice<f16>,
    qkv: DevSlice<f16>,
    batch: i32,
    tokens: i32,
    heads: i32,
    head_dim: i32,
) -> Result<()> {
    let splits = attention_splits(batch, tokens, heads, head_dim);
    attention_f16_splits(dev, out, qkv, batch, tokens, heads, head_dim, splits)
}

/// [`attention_f16`] with the key splits chosen by the caller (one of [`ATTENTION_SPLITS`], at
/// most ⌈tokens/64⌉ and [`attention_max_splits`]): for tests of every split count at every shape.
#[allow(clippy::too_many_arguments)]
pub fn attention_f16_splits<D: Device + ?Sized>(
    dev: &D,
    out: DevSlice<f16>,
    qkv: DevSlice<f16>,
    batch: i32,
    tokens: i32,
    heads: i32,
    head_dim: i32,
    splits: i32,
) -> Result<()> {
    const K: &str = "attention_f16";
    positive(K, &[("batch", batch), ("tokens", tokens), ("heads", heads), ("head_dim", head_dim)])?;
    let Some(kernel) = attention_kernel(head_dim) else {
        return Err(invalid(
            K,
            format!(
                "head_dim {head_dim} is not supported: the kernels are built for head dims {ATTENTION_HEAD_DIMS:?}"
            ),
        ));
    };
    if batch > 65535 || heads > 65535 {
        return Err(invalid(K, format!("batch {batch} and heads {heads} must be ≤ 65535 (grid z and y)")));
    }
    // The kernel's merge gives each split's warp 16/splits query rows, and relies on every
    // split having a key tile in the first round (a finite running max).
    let tiles = (tokens - 1) / 64 + 1; // tokens ≥ 1
    if !ATTENTION_SPLITS.contains(&splits) || splits > tiles || splits > kernel.3 {
        return Err(invalid(
            K,
            format!(
                "splits {splits} must be one of {ATTENTION_SPLITS:?}, ≤ {tiles} (the key tiles of 64 tokens) \
                 and ≤ {} (head dim {head_dim})",
                kernel.3
            ),
        ));
    }
    let channels = heads as i64 * head_dim as i64;
    let rows = batch as i64 * tokens as i64;
    covers(K, "qkv", qkv, rows * 3 * channels, 16)?;
    covers(K, "out", out, rows * channels, 16)?;
    let cfg = LaunchCfg {
        grid: [tiles as u32, heads as u32, batch as u32], // BM = 64 queries per block
        block: [128 * splits as u32, 1, 1],               // SPLIT_THREADS per split
        dyn_smem: attention_smem(kernel, splits),
    };
    let (o, q) = (out.ptr(), qkv.ptr());
    // SAFETY: qkv holds batch × tokens × 3C and out batch × tokens × C elements, both 16-byte
    // aligned; the kernel of this head dim reads and writes nothing else.
    unsafe {
        match head_dim {
            64 => kernels::attention_d64_f16::launch(dev, &cfg, o, q, tokens, heads),
            72 => kernels::attention_f16::launch(dev, &cfg, o, q, tokens, heads),
            _ => kernels::attention_d128_f16::launch(dev, &cfg, o, q, tokens, heads),
        }
    }
}
