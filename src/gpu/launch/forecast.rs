//! Launchers of Taylor forecasting's two elementwise kernels (kernels/forecast.cu): the
//! factor update of a Taylor-full step and the prediction of a forecast step, both on one
//! branch's operands ([`TaylorBranch`]) and reading the step's numbers from a per-step table at
//! the sampling index kept in device memory.

use super::{covers, elementwise, invalid, positive};
use crate::error::Result;
use crate::gpu::{f16, kernels, DevSlice, Device};

/// f32 values per step in the forecast table (`FORECAST_TABLE` in kernels/forecast.cu):
/// orders, Δ, then the weights w_0 … w_2, padded.
pub const FORECAST_TABLE: usize = 8;

/// The operands of both Taylor kernels on one branch.
#[derive(Clone, Copy, Debug)]
pub struct TaylorBranch {
    /// `levels` f32 factors D_0 … D_{levels−1}, each `stride` elements apart, `n` used.
    pub factors: DevSlice<f32>,
    /// The branch output, n f16: read by the update, written by the forecast.
    pub y: DevSlice<f16>,
    /// `steps` rows of [`FORECAST_TABLE`] f32.
    pub table: DevSlice<f32>,
    /// state[0]: the sampling index, the table row of the step.
    pub state: DevSlice<i32>,
    pub n: i32,
    pub stride: i32,
    pub levels: i32,
    pub steps: i32,
}

impl TaylorBranch {
    /// Checks shared by both kernels: `levels` ≤ 3 factors `stride` apart hold `n` elements
    /// each, `y` n elements, the table `steps` rows, the state one value.
    fn check(&self, k: &str) -> Result<()> {
        let TaylorBranch { factors, y, table, state, n, stride, levels, steps } = *self;
        positive(k, &[("n", n), ("stride", stride), ("levels", levels), ("steps", steps)])?;
        if n > stride || levels > 3 {
            return Err(invalid(k, format!("n = {n} must be ≤ stride {stride}, levels = {levels} ≤ 3")));
        }
        covers(k, "factors", factors, levels as i64 * stride as i64, 4)?;
        covers(k, "y", y, n as i64, 2)?;
        covers(k, "table", table, steps as i64 * FORECAST_TABLE as i64, 4)?;
        covers(k, "state", state, 1, 4)
    }
}

/// A Taylor-full step's update of one branch's factors from its new output `y`
/// (kernels/forecast.cu): D₀ = y, D_{i+1} = (D_i(new) − D_i(old))/Δ up to the step's orders.
pub fn forecast_update_f32<D: Device + ?Sized>(dev: &D, b: &TaylorBranch) -> Result<()> {
    b.check("forecast_update_f32")?;
    // SAFETY: checked: factors hold levels × stride ≥ levels × n, y n elements, the table
    // every step.
    unsafe {
        kernels::forecast_update_f32::launch(
            dev,
            &elementwise(b.n as i64),
            b.factors.ptr(),
            b.y.ptr(),
            b.table.ptr(),
            b.state.ptr(),
            b.n,
            b.stride,
            b.levels,
            b.steps,
        )
    }
}

/// A forecast step's prediction of one branch's output, y = Σ_i w_i·D_i (kernels/forecast.cu).
pub fn forecast_f16<D: Device + ?Sized>(dev: &D, b: &TaylorBranch) -> Result<()> {
    b.check("forecast_f16")?;
    // SAFETY: as forecast_update_f32, y written.
    unsafe {
        kernels::forecast_f16::launch(
            dev,
            &elementwise(b.n as i64),
            b.y.ptr(),
            b.factors.ptr(),
            b.table.ptr(),
            b.state.ptr(),
            b.n,
            b.stride,
            b.levels,
            b.steps,
        )
    }
}
