//! The launcher of the fused GEMM `gemm_fused_f16` (kernels/gemm.cu): every linear layer of the
//! GPU pipeline, `out = act(a'·wᵀ + bias + add)` with `a' = a` or `a − a_minus` (the
//! increment-calibrated caching product `t = (x − x_s)·downᵀ`), an optional pre-activation
//! copy, and strided operands so column groups of wider buffers can be read and written in
//! place.

use super::{covers, invalid, positive};
use crate::error::Result;
use crate::gpu::{f16, kernels, DevPtr, DevSlice, Device, LaunchCfg};

const KERNEL: &str = "gemm_fused_f16";
/// Output tile of one block and its threads (BM = BN, THREADS in kernels/gemm.cu).
const TILE: i64 = 64;
const THREADS: u32 = 128;

/// The activation applied after bias and add.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmAct {
    None,
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, PyTorch's `gelu(approximate="tanh")`.
    GeluTanh,
    /// `x / (1 + e^−x)`.
    Silu,
}

impl GemmAct {
    /// The kernel's `act` argument (enum Act in kernels/gemm.cu).
    fn code(self) -> i32 {
        match self {
            GemmAct::None => 0,
            GemmAct::GeluTanh => 1,
            GemmAct::Silu => 2,
        }
    }
}

/// Where the activated result goes: f16, or f32 (e.g. the final layer's output).
#[derive(Clone, Copy, Debug)]
pub enum GemmOut {
    F16(DevSlice<f16>),
    F32(DevSlice<f32>),
}

/// One fused GEMM: `out[i, j] = act(v)`, `pre[i, j] = v`, with
/// `v = Σ_k a'[i, k]·w[j, k] + bias[j] + add[i mod add_rows, j]` (f32, in that order) and
/// `a' = f16(a − a_minus)` when `a_minus` is given. Matrices are row-major with the row strides
/// given (`w`'s is `k`); a slice may start anywhere (e.g. at a column offset of a wider buffer)
/// and needs only `(rows − 1)·stride + width` elements.
#[derive(Clone, Copy, Debug)]
pub struct GemmSpec {
    /// (m, n), row stride `ldc`.
    pub out: GemmOut,
    /// The value before the activation, f16, (m, n) with row stride `ldc`.
    pub pre: Option<DevSlice<f16>>,
    /// (m, k), row stride `lda`.
    pub a: DevSlice<f16>,
    /// Subtracted from `a` (same shape and stride) before the product.
    pub a_minus: Option<DevSlice<f16>>,
    /// (n, k), PyTorch's Linear weight layout.
    pub w: DevSlice<f16>,
    /// (n).
    pub bias: Option<DevSlice<f16>>,
    /// (matrix, row stride, rows before the row index wraps)
    pub add: Option<(DevSlice<f16>, i32, i32)>,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub lda: i32,
    pub ldc: i32,
    pub act: GemmAct,
}

impl GemmSpec {
    /// out = a·wᵀ (+ nothing else), contiguous: lda = k, ldc = n.
    pub fn new(out: GemmOut, a: DevSlice<f16>, w: DevSlice<f16>, m: i32, n: i32, k: i32) -> Self {
        GemmSpec {
            out,
            pre: None,
            a,
            a_minus: None,
            w,
            bias: None,
            add: None,
            m,
            n,
            k,
            lda: k,
            ldc: n,
            act: GemmAct::None,
        }
    }
}

/// Elements a (rows, width) matrix with row stride `ld` spans.
fn span(rows: i32, ld: i32, width: i32) -> i64 {
    (rows as i64 - 1) * ld as i64 + width as i64
}

fn stride_at_least(name: &str, ld: i32, width: i32) -> Result<()> {
    if ld < width {
        return Err(invalid(KERNEL, format!("{name} = {ld} is less than the row width {width}")));
    }
    Ok(())
}

fn ptr_or_null<T>(s: Option<DevSlice<T>>) -> DevPtr<T> {
    s.map_or(DevPtr::null(), DevSlice::ptr)
}

/// Runs the fused GEMM `spec` describes (kernels/gemm.cu): grid (⌈n/64⌉, ⌈m/64⌉), 128 threads.
/// Checks sizes, strides (≥ the row width), and that every slice covers what the kernel reads
/// or writes; the kernel picks its 16-byte load paths itself from k, lda and the alignment.
pub fn gemm<D: Device + ?Sized>(dev: &D, spec: &GemmSpec) -> Result<()> {
    let &GemmSpec { out, pre, a, a_minus, w, bias, add, m, n, k, lda, ldc, act } = spec;
    let (add_slice, ld_add, add_rows) = match add {
        Some((s, ld, rows)) => (Some(s), ld, rows),
        None => (None, n, m),
    };
    positive(KERNEL, &[("m", m), ("n", n), ("k", k), ("add rows", add_rows)])?;
    stride_at_least("lda", lda, k)?;
    stride_at_least("ldc", ldc, n)?;
    stride_at_least("add row stride", ld_add, n)?;
    // The kernel's column and row indices (tile origin + 63) must fit in an int.
    if n as i64 + TILE > i32::MAX as i64 || m as i64 + TILE > i32::MAX as i64 {
        return Err(invalid(KERNEL, format!("m = {m} or n = {n} is too large")));
    }
    let grid_y = (m as i64 + TILE - 1) / TILE;
    if grid_y > 65535 {
        return Err(invalid(KERNEL, format!("m = {m} needs {grid_y} row tiles, more than 65535")));
    }

    let out_span = span(m, ldc, n);
    let (out16, out32) = match out {
        GemmOut::F16(s) => {
            covers(KERNEL, "out", s, out_span, 2)?;
            (s.ptr(), DevPtr::null())
        }
        GemmOut::F32(s) => {
            covers(KERNEL, "out", s, out_span, 4)?;
            (DevPtr::null(), s.ptr())
        }
    };
    if let Some(s) = pre {
        covers(KERNEL, "pre", s, out_span, 2)?;
    }
    covers(KERNEL, "a", a, span(m, lda, k), 2)?;
    if let Some(s) = a_minus {
        covers(KERNEL, "a_minus", s, span(m, lda, k), 2)?;
    }
    covers(KERNEL, "w", w, span(n, k, k), 2)?;
    if let Some(s) = bias {
        covers(KERNEL, "bias", s, n as i64, 2)?;
    }
    if let Some(s) = add_slice {
        // Rows 0 .. min(m, add_rows) are read.
        covers(KERNEL, "add", s, span(m.min(add_rows), ld_add, n), 2)?;
    }

    let cfg = LaunchCfg {
        grid: [((n as i64 + TILE - 1) / TILE) as u32, grid_y as u32, 1],
        block: [THREADS, 1, 1],
        dyn_smem: 0,
    };
    // SAFETY: every operand present covers the elements the kernel reads or writes for these
    // sizes and strides (checked above); absent operands are null, which the kernel skips.
    unsafe {
        kernels::gemm_fused_f16::launch(
            dev,
            &cfg,
            out16,
            out32,
            ptr_or_null(pre),
            a.ptr(),
            ptr_or_null(a_minus),
            w.ptr(),
            ptr_or_null(bias),
            ptr_or_null(add_slice),
            m,
            n,
            k,
            lda,
            ldc,
            ld_add,
            add_rows,
            act.code(),
        )
    }
}
