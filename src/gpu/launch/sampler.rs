//! Launchers of the sampler kernels (kernels/sampler.cu): the counter-based noise of
//! [`crate::noise`] and the fused guidance + DDPM/DDIM step, with the host helper that fills
//! the per-step coefficient table they read.
//!
//! Sampler state (i32, device memory): `[s, seed lo, seed hi, first image lo, first image hi]`,
//! s the sampling index 0..steps (spaced step k = steps − 1 − s), advanced on the device by
//! [`super::step_advance`].

use super::{covers, elementwise, invalid, positive};
use crate::diffusion::StepCoeffs;
use crate::error::Result;
use crate::gpu::{kernels, DevPtr, DevSlice, Device};

/// Elements of the sampler state: s, seed (2), first image index (2).
pub const SAMPLER_STATE_LEN: usize = 5;
/// f32 entries per step in the coefficient table (see [`sampler_coeffs`]).
pub const SAMPLER_COEFFS_PER_STEP: usize = 12;

/// `out` (images, elems) f32: element e of image (first + r)'s noise stream `stream_step`,
/// bit for bit [`crate::noise::fill_normal`] under the emulation; seed and first image index
/// from `state` (kernels/sampler.cu). One thread per 4 elements.
pub fn normal_f32<D: Device + ?Sized>(
    dev: &D,
    out: DevSlice<f32>,
    state: DevSlice<i32>,
    images: i32,
    elems: i32,
    stream_step: i32,
) -> Result<()> {
    const K: &str = "normal_f32";
    positive(K, &[("images", images), ("elems", elems)])?;
    if stream_step < 0 {
        return Err(invalid(K, format!("stream_step = {stream_step} must not be negative")));
    }
    covers(K, "out", out, images as i64 * elems as i64, 4)?;
    covers(K, "state", state, SAMPLER_STATE_LEN as i64, 4)?;
    let quads = images as i64 * ((elems as i64 + 3) / 4);
    // SAFETY: out holds images × elems elements, state the five the kernel reads.
    unsafe { kernels::normal_f32::launch(dev, &elementwise(quads), out.ptr(), state.ptr(), images, elems, stream_step) }
}

/// Which update `sampler_step_f32` applies (the kernel's `mode`: 0, 1, 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerMode {
    /// DDPM with the learned-range variance (model_out has 2·Cin channels).
    DdpmLearned,
    /// DDPM with the fixed-large variance.
    DdpmFixed,
    /// DDIM; η lives in the coefficient table (σ), see [`sampler_coeffs`].
    Ddim,
}

impl SamplerMode {
    fn code(self) -> i32 {
        match self {
            SamplerMode::DdpmLearned => 0,
            SamplerMode::DdpmFixed => 1,
            SamplerMode::Ddim => 2,
        }
    }
}

/// The shape and settings of `sampler_step_f32`.
#[derive(Clone, Copy, Debug)]
pub struct SamplerParams {
    pub images: i32,
    /// Latent channels Cin (x is (images, Cin, hw)).
    pub cin: i32,
    /// Model output channels Cout (2·Cin with learned variance, else Cin).
    pub cout: i32,
    /// Latent pixels per channel (input_size²).
    pub hw: i32,
    /// Guided ε channels 0..guided_channels (0: unguided; model_out then has `images` rows,
    /// else 2·images, conditional first).
    pub guided_channels: i32,
    pub cfg_scale: f32,
    pub mode: SamplerMode,
    /// Rows of the coefficient table; the state's index must lie in 0..steps.
    pub steps: i32,
}

/// The coefficient-table row of one step, as the kernel reads it:
/// `[nonzero, sqrt_recip, sqrt_recipm1, coef1, coef2, min_log, max_log, fixed_log, σ,
/// √ᾱ_prev, √(1 − ᾱ_prev − σ²), 0]`, the DDIM entries computed exactly as
/// [`crate::diffusion::ddim_step`] computes them (η is ignored by the DDPM modes).
pub fn sampler_coeffs(c: &StepCoeffs, eta: f32) -> [f32; SAMPLER_COEFFS_PER_STEP] {
    let (ab, abp) = (c.alpha_bar, c.alpha_bar_prev);
    let sigma = eta * ((1.0 - abp) / (1.0 - ab)).sqrt() * (1.0 - ab / abp).sqrt();
    let (sqrt_abp, dir) = (abp.sqrt(), (1.0 - abp - sigma * sigma).sqrt());
    [
        if c.nonzero { 1.0 } else { 0.0 },
        c.sqrt_recip,
        c.sqrt_recipm1,
        c.coef1,
        c.coef2,
        c.min_log,
        c.max_log,
        c.fixed_log,
        sigma,
        sqrt_abp,
        dir,
        0.0,
    ]
}

/// One sampling step on x (images, Cin, hw) in place: classifier-free guidance of
/// `model_out` then the DDPM or DDIM update with the coefficients of step s = state[0]
/// (`coeffs`: steps rows of [`sampler_coeffs`]) and the step's noise (stream s + 1)
/// generated in the kernel; bit-identical under the emulation to the CPU engine
/// (kernels/sampler.cu). One thread per 4 elements of an image.
pub fn sampler_step_f32<D: Device + ?Sized>(
    dev: &D,
    x: DevSlice<f32>,
    model_out: DevSlice<f32>,
    coeffs: DevSlice<f32>,
    state: DevSlice<i32>,
    p: &SamplerParams,
) -> Result<()> {
    sampler_step_keep_x0(dev, x, model_out, coeffs, state, p, None)
}

/// [`sampler_step_f32`], also writing the step's x̂₀ = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε̂ (guided ε̂,
/// before the update; the same (images, Cin, hw) layout as x) into `x0` when given: the
/// engine's per-step previews.
pub fn sampler_step_keep_x0<D: Device + ?Sized>(
    dev: &D,
    x: DevSlice<f32>,
    model_out: DevSlice<f32>,
    coeffs: DevSlice<f32>,
    state: DevSlice<i32>,
    p: &SamplerParams,
    x0: Option<DevSlice<f32>>,
) -> Result<()> {
    const K: &str = "sampler_step_f32";
    positive(K, &[("images", p.images), ("cin", p.cin), ("cout", p.cout), ("hw", p.hw), ("steps", p.steps)])?;
    let min_cout = if p.mode == SamplerMode::DdpmLearned { 2 * p.cin as i64 } else { p.cin as i64 };
    if (p.cout as i64) < min_cout {
        return Err(invalid(K, format!("cout = {} is below the {min_cout} channels {:?} reads", p.cout, p.mode)));
    }
    if p.guided_channels < 0 {
        return Err(invalid(K, format!("guided_channels = {} must not be negative", p.guided_channels)));
    }
    if !p.cfg_scale.is_finite() {
        return Err(invalid(K, format!("cfg_scale = {} must be finite", p.cfg_scale)));
    }
    let rows = if p.guided_channels > 0 { 2 * p.images as i64 } else { p.images as i64 };
    let image = p.cin as i64 * p.hw as i64;
    covers(K, "x", x, p.images as i64 * image, 4)?;
    covers(K, "model_out", model_out, rows * p.cout as i64 * p.hw as i64, 4)?;
    covers(K, "coeffs", coeffs, p.steps as i64 * SAMPLER_COEFFS_PER_STEP as i64, 4)?;
    covers(K, "state", state, SAMPLER_STATE_LEN as i64, 4)?;
    if let Some(s) = x0 {
        covers(K, "x0", s, p.images as i64 * image, 4)?;
    }
    let quads = p.images as i64 * ((image + 3) / 4);
    // SAFETY: x holds images × Cin × hw, model_out rows × Cout × hw (the guided rows
    // included), coeffs steps rows of 12 (the kernel reads row s only for s in 0..steps),
    // state five elements.
    unsafe {
        kernels::sampler_step_f32::launch(
            dev,
            &elementwise(quads),
            x.ptr(),
            model_out.ptr(),
            coeffs.ptr(),
            state.ptr(),
            p.images,
            p.cin,
            p.cout,
            p.hw,
            p.guided_channels,
            p.cfg_scale,
            p.mode.code(),
            p.steps,
            x0.map_or(DevPtr::null(), DevSlice::ptr),
        )
    }
}

/// Records the sampling step (`state[0]`) in `state[slot]` if any of `v[..n]` is NaN or ±Inf
/// and the slot still holds −1 (kernels/sampler.cu): the pipeline's non-finite check.
pub fn check_finite_f32<D: Device + ?Sized>(
    dev: &D,
    v: DevSlice<f32>,
    n: i32,
    state: DevSlice<i32>,
    slot: i32,
) -> Result<()> {
    const K: &str = "check_finite_f32";
    positive(K, &[("n", n)])?;
    if slot < 1 {
        return Err(invalid(K, format!("slot {slot} must be ≥ 1 (state[0] is the step)")));
    }
    covers(K, "v", v, n as i64, 4)?;
    covers(K, "state", state, slot as i64 + 1, 4)?;
    // SAFETY: v holds n elements and state slot + 1.
    unsafe { kernels::check_finite_f32::launch(dev, &elementwise(n as i64), v.ptr(), n, state.ptr(), slot) }
}
