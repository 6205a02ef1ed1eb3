//! Launchers of the DiT's input/output reshapes, its conditioning and the step-state kernels
//! (kernels/embed.cu), and of the standalone GELU (kernels/activation.cu). All are
//! grid-stride elementwise kernels (256 threads, ≤ 1024 blocks) except `step_advance`, one
//! thread.

use super::{covers, elementwise, invalid, positive};
use crate::config::FREQ_DIM;
use crate::error::Result;
use crate::gpu::{f16, kernels, DevSlice, Device, LaunchCfg};

/// `x` (images, channels, size, size) f32 → `patches` (rows, N, channels·patch²) f16,
/// N = (size/patch)², token n = i·g + j, feature (c·patch + kh)·patch + kw; row r reads
/// image r mod images (rows = 2·images under guidance) (kernels/embed.cu).
#[allow(clippy::too_many_arguments)]
pub fn patchify_f16<D: Device + ?Sized>(
    dev: &D,
    patches: DevSlice<f16>,
    x: DevSlice<f32>,
    rows: i32,
    images: i32,
    channels: i32,
    size: i32,
    patch: i32,
) -> Result<()> {
    const K: &str = "patchify_f16";
    positive(K, &[("rows", rows), ("images", images), ("channels", channels), ("size", size), ("patch", patch)])?;
    if size % patch != 0 {
        return Err(invalid(K, format!("size {size} is not a multiple of patch {patch}")));
    }
    let image = channels as i64 * size as i64 * size as i64;
    let elems = rows as i64 * image;
    covers(K, "patches", patches, elems, 2)?;
    covers(K, "x", x, images as i64 * image, 4)?;
    // SAFETY: patches holds rows × N × C·p² = rows·C·size² elements, x every image.
    unsafe {
        kernels::patchify_f16::launch(
            dev,
            &elementwise(elems),
            patches.ptr(),
            x.ptr(),
            rows,
            images,
            channels,
            size,
            patch,
        )
    }
}

/// `out[i] = [cos(t[i]·freqs), sin(t[i]·freqs)]` in f16, out (count, 256), freqs (128) f32
/// (kernels/embed.cu; the CPU's `embed::timestep_embedding`).
pub fn timestep_freq_f16<D: Device + ?Sized>(
    dev: &D,
    out: DevSlice<f16>,
    t: DevSlice<f32>,
    freqs: DevSlice<f32>,
    count: i32,
) -> Result<()> {
    const K: &str = "timestep_freq_f16";
    positive(K, &[("count", count)])?;
    covers(K, "out", out, count as i64 * FREQ_DIM as i64, 2)?;
    covers(K, "t", t, count as i64, 4)?;
    covers(K, "freqs", freqs, FREQ_DIM as i64 / 2, 4)?;
    // SAFETY: out holds count × 256, t count and freqs 128 elements.
    unsafe {
        kernels::timestep_freq_f16::launch(
            dev,
            &elementwise(count as i64 * FREQ_DIM as i64 / 2),
            out.ptr(),
            t.ptr(),
            freqs.ptr(),
            count,
        )
    }
}

/// `silu_c[i] = SiLU(temb[i] + table[labels[i mod rows]])` in f16: temb (count, channels)
/// f32, table (table_rows, channels) f16, labels (rows) i32; an out-of-range label makes its
/// row NaN (kernels/embed.cu).
#[allow(clippy::too_many_arguments)]
pub fn condition_silu_f16<D: Device + ?Sized>(
    dev: &D,
    silu_c: DevSlice<f16>,
    temb: DevSlice<f32>,
    table: DevSlice<f16>,
    labels: DevSlice<i32>,
    count: i32,
    rows: i32,
    channels: i32,
    table_rows: i32,
) -> Result<()> {
    const K: &str = "condition_silu_f16";
    positive(K, &[("count", count), ("rows", rows), ("channels", channels), ("table_rows", table_rows)])?;
    let elems = count as i64 * channels as i64;
    covers(K, "silu_c", silu_c, elems, 2)?;
    covers(K, "temb", temb, elems, 4)?;
    covers(K, "table", table, table_rows as i64 * channels as i64, 2)?;
    covers(K, "labels", labels, rows.min(count) as i64, 4)?;
    // SAFETY: silu_c and temb hold count × channels, table table_rows × channels elements,
    // labels every label read; the kernel checks each label against table_rows.
    unsafe {
        kernels::condition_silu_f16::launch(
            dev,
            &elementwise(elems),
            silu_c.ptr(),
            temb.ptr(),
            table.ptr(),
            labels.ptr(),
            count,
            rows,
            channels,
            table_rows,
        )
    }
}

/// `out` (rows, N, patch²·channels_out) → `image` (rows, channels_out, size, size):
/// image[r, c, i·p + a, j·p + b] = out[r, i·g + j, (a·p + b)·Cout + c], a bit-exact copy
/// (kernels/embed.cu; the CPU's `unpatchify`).
pub fn unpatchify_f32<D: Device + ?Sized>(
    dev: &D,
    image: DevSlice<f32>,
    out: DevSlice<f32>,
    rows: i32,
    channels_out: i32,
    size: i32,
    patch: i32,
) -> Result<()> {
    const K: &str = "unpatchify_f32";
    positive(K, &[("rows", rows), ("channels_out", channels_out), ("size", size), ("patch", patch)])?;
    if size % patch != 0 {
        return Err(invalid(K, format!("size {size} is not a multiple of patch {patch}")));
    }
    let elems = rows as i64 * channels_out as i64 * size as i64 * size as i64;
    covers(K, "image", image, elems, 4)?;
    covers(K, "out", out, elems, 4)?;
    // SAFETY: both buffers hold rows × channels_out × size² elements.
    unsafe {
        kernels::unpatchify_f32::launch(
            dev,
            &elementwise(elems),
            image.ptr(),
            out.ptr(),
            rows,
            channels_out,
            size,
            patch,
        )
    }
}

/// `dst = src[s·per_step .. (s + 1)·per_step]` with s = state[0] read on the device (NaN
/// when s ∉ 0..steps): this step's precomputed modulation, replayable from a captured graph
/// (kernels/embed.cu). src (steps, per_step).
pub fn select_step_f16<D: Device + ?Sized>(
    dev: &D,
    dst: DevSlice<f16>,
    src: DevSlice<f16>,
    state: DevSlice<i32>,
    per_step: i32,
    steps: i32,
) -> Result<()> {
    const K: &str = "select_step_f16";
    positive(K, &[("per_step", per_step), ("steps", steps)])?;
    covers(K, "dst", dst, per_step as i64, 2)?;
    covers(K, "src", src, steps as i64 * per_step as i64, 2)?;
    covers(K, "state", state, 1, 4)?;
    // The kernel copies 8 halves at a time where per_step and both addresses allow it
    // (every step's start is then 16-byte aligned too), else pairs, else single halves.
    let aligned = |a: u64| (dst.ptr().addr() | src.ptr().addr()).is_multiple_of(a);
    let width = if per_step % 8 == 0 && aligned(16) {
        8
    } else if per_step % 2 == 0 && aligned(4) {
        2
    } else {
        1
    };
    // SAFETY: dst holds per_step elements, src steps × per_step (the kernel reads only step
    // s < steps), state one.
    unsafe {
        kernels::select_step_f16::launch(
            dev,
            &elementwise(per_step as i64 / width),
            dst.ptr(),
            src.ptr(),
            state.ptr(),
            per_step,
            steps,
        )
    }
}

/// `state[0] += 1` on the device: the next sampling step (kernels/embed.cu). One thread.
pub fn step_advance<D: Device + ?Sized>(dev: &D, state: DevSlice<i32>) -> Result<()> {
    covers("step_advance", "state", state, 1, 4)?;
    let cfg = LaunchCfg { grid: [1, 1, 1], block: [1, 1, 1], dyn_smem: 0 };
    // SAFETY: state holds at least one element.
    unsafe { kernels::step_advance::launch(dev, &cfg, state.ptr()) }
}

/// `out = GELU_tanh(x)` elementwise in f16, computed in f32 (kernels/activation.cu).
pub fn gelu_f16<D: Device + ?Sized>(dev: &D, out: DevSlice<f16>, x: DevSlice<f16>, n: i32) -> Result<()> {
    const K: &str = "gelu_f16";
    positive(K, &[("n", n)])?;
    covers(K, "out", out, n as i64, 2)?;
    covers(K, "x", x, n as i64, 2)?;
    // SAFETY: both buffers hold n elements.
    unsafe { kernels::gelu_f16::launch(dev, &elementwise(n as i64), out.ptr(), x.ptr(), n) }
}
