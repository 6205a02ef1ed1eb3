//! Launchers of Taylor forecasting's two elementwise kernels (kernels/forecast.cu): the
//! factor update of a Taylor-full step and the prediction of a forecast step, both reading the
//! step's numbers from a per-step table at the sampling index kept in device memory.

use super::{covers, elementwise, invalid, positive};
use crate::error::Result;
use crate::gpu::{f16, kernels, DevSlice, Device};

/// f32 values per step in the forecast table (`FORECAST_TABLE` in kernels/forecast.cu):
/// orders, Δ, then the weights w_0 … w_2, padded.
pub const FORECAST_TABLE: usize = 8;

/// Checks shared by both kernels: `levels` factors `stride` apart hold `n` elements each, the
/// table `steps` rows.
#[allow(clippy::too_many_arguments)]
fn check(
    k: &str,
    factors: DevSlice<f32>,
    y: DevSlice<f16>,
    table: DevSlice<f32>,
    state: DevSlice<i32>,
    n: i32,
    stride: i32,
    levels: i32,
    steps: i32,
) -> Result<()> {
    positive(k, &[("n", n), ("stride", stride), ("levels", levels), ("steps", steps)])?;
    if n > stride || levels > 3 {
        return Err(invalid(k, format!("n = {n} must be ≤ stride {stride}, levels = {levels} ≤ 3")));
    }
    covers(k, "factors", factors, levels as i64 * stride as i64, 4)?;
    covers(k, "y", y, n as i64, 2)?;
    covers(k, "table", table, steps as i64 * FORECAST_TABLE as i64, 4)?;
    covers(k, "state", state, 1, 4)
}

/// A Taylor-full step's update of one branch's factors from its new output `y`
/// (kernels/forecast.cu): D₀ = y, D_{i+1} = (D_i(new) − D_i(old))/Δ up to the step's orders.
#[allow(clippy::too_many_arguments)]
pub fn forecast_update_f32<D: Device + ?Sized>(
    dev: &D,
    factors: DevSlice<f32>,
    y: DevSlice<f16>,
    table: DevSlice<f32>,
    state: DevSlice<i32>,
    n: i32,
    stride: i32,
    levels: i32,
    steps: i32,
) -> Result<()> {
    const K: &str = "forecast_update_f32";
    check(K, factors, y, table, state, n, stride, levels, steps)?;
    // SAFETY: factors hold levels × stride ≥ levels × n, y n elements, the table every step.
    unsafe {
        kernels::forecast_update_f32::launch(
            dev,
            &elementwise(n as i64),
            factors.ptr(),
            y.ptr(),
            table.ptr(),
            state.ptr(),
            n,
            stride,
            levels,
            steps,
        )
    }
}

/// A forecast step's prediction of one branch's output, y = Σ_i w_i·D_i (kernels/forecast.cu).
#[allow(clippy::too_many_arguments)]
pub fn forecast_f16<D: Device + ?Sized>(
    dev: &D,
    y: DevSlice<f16>,
    factors: DevSlice<f32>,
    table: DevSlice<f32>,
    state: DevSlice<i32>,
    n: i32,
    stride: i32,
    levels: i32,
    steps: i32,
) -> Result<()> {
    const K: &str = "forecast_f16";
    check(K, factors, y, table, state, n, stride, levels, steps)?;
    // SAFETY: as forecast_update_f32, y written.
    unsafe {
        kernels::forecast_f16::launch(
            dev,
            &elementwise(n as i64),
            y.ptr(),
            factors.ptr(),
            table.ptr(),
            state.ptr(),
            n,
            stride,
            levels,
            steps,
        )
    }
}
