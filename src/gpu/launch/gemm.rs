//! The launcher of the fused GEMM (kernels/gemm.cu: `gemm_fused_f16_64x64_k64`, `gemm_fused_f16_128x128_k32`,
//! `gemm_splitk_reduce_f16`; kernels/gemm_sm90.cu: `gemm_sm90_f16_128x128_k64`): every linear layer of the GPU
//! pipeline, `out = act(a'·wᵀ + bias + add)` with `a' = a` or `a − a_minus` (the
//! increment-calibrated caching product `t = (x − x_s)·downᵀ`), an optional pre-activation
//! copy, and strided operands so column groups of wider buffers can be read and written in
//! place. On a device whose [`Device::gemm_sm90`] holds, the GEMMs the Hopper kernel takes
//! (see [`sm90_unsupported`]) run on it; the rest, and every GEMM elsewhere, on gemm.cu's.

use super::{covers, invalid, positive};
use crate::error::Result;
use crate::gpu::{f16, kernels, DevPtr, DevSlice, Device, LaunchCfg, TensorMapSpec};

const KERNEL: &str = "gemm_fused_f16_64x64_k64";

/// One of the kernel's tile shapes (`Cfg<…>` in kernels/gemm.cu): these constants must match.
struct Shape {
    bm: i64,
    bn: i64,
    bk: i64,
    stages: i64,
    threads: u32,
}

/// The GEMM kernels of kernels/gemm.cu, by tile shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmTile {
    /// `gemm_fused_f16_64x64_k64`: 64×64 tiles, 4 warps of 32×32, k step 64, 4 stages (splits along k).
    Small,
    /// `gemm_fused_f16_128x128_k32`: 128×128 tiles, 8 warps of 64×32, k step 32, 4 stages.
    Large,
    /// `gemm_fused_f16_128x64_k32`: 128×64 tiles, 4 warps of 64×32, k step 32, 4 stages.
    Tall,
    /// `gemm_fused_f16_64x64_k32`: 64×64 tiles, 4 warps of 32×32, k step 32, 4 stages.
    Small32,
    /// `gemm_fused_f16_64x64_k32_s2`: 64×64 tiles, 4 warps of 32×32, k step 32, 2 stages (the first kernel's
    /// configuration, kept for comparison).
    Classic,
    /// `gemm_sm90_f16_128x128_k64` (kernels/gemm_sm90.cu): Hopper's wgmma on tiles the tensor memory
    /// accelerator loads, 128×128 tiles, k step 64, 4 stages, a persistent grid; sm_90 only.
    Sm90,
}

impl GemmTile {
    pub const ALL: [GemmTile; 6] =
        [GemmTile::Small, GemmTile::Large, GemmTile::Tall, GemmTile::Small32, GemmTile::Classic, GemmTile::Sm90];

    fn shape(self) -> &'static Shape {
        match self {
            GemmTile::Small => &SMALL,
            GemmTile::Large => &LARGE,
            GemmTile::Tall => &TALL,
            GemmTile::Small32 => &SMALL32,
            GemmTile::Classic => &CLASSIC,
            GemmTile::Sm90 => &SM90,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GemmTile::Small => "64x64 k64 s4",
            GemmTile::Large => "128x128 k32 s4",
            GemmTile::Tall => "128x64 k32 s4",
            GemmTile::Small32 => "64x64 k32 s4",
            GemmTile::Classic => "64x64 k32 s2",
            GemmTile::Sm90 => "sm90 128x128 k64 s4",
        }
    }
}

const SMALL: Shape = Shape { bm: 64, bn: 64, bk: 64, stages: 4, threads: 128 };
const LARGE: Shape = Shape { bm: 128, bn: 128, bk: 32, stages: 4, threads: 256 };
const TALL: Shape = Shape { bm: 128, bn: 64, bk: 32, stages: 4, threads: 128 };
const SMALL32: Shape = Shape { bm: 64, bn: 64, bk: 32, stages: 4, threads: 128 };
const CLASSIC: Shape = Shape { bm: 64, bn: 64, bk: 32, stages: 2, threads: 128 };
/// kernels/gemm_sm90.cu's constants: a producer warpgroup and two consumer warpgroups.
const SM90: Shape = Shape { bm: 128, bn: 128, bk: 64, stages: 4, threads: 384 };
/// kernels/gemm_sm90.cu's dynamic shared memory: 4 stages of two 128 × 64 f16 tiles, 8
/// mbarriers, and 1 KiB to align the stages to the 128-byte swizzle's 1024-byte period.
const SM90_SMEM: u32 = 4 * 2 * 128 * 64 * 2 + 8 * 8 + 1024;
/// The same with icc's increment: a third tile (a_minus's) per stage.
const SM90_SMEM_MINUS: u32 = 4 * 3 * 128 * 64 * 2 + 8 * 8 + 1024;
const _: () = assert!(SM90_SMEM_MINUS <= crate::gpu::MAX_DYN_SMEM_OPT_IN, "the Hopper GEMM fits sm_90's shared memory");

/// Multiprocessors the tile choice aims to fill: an H100 or H200 SXM has 132. A smaller GPU is
/// filled all the more; a larger one gets large tiles a little earlier than it would like.
const TARGET_SMS: i64 = 132;
/// Split-K aims at this many blocks (two per multiprocessor), each with at least
/// `MIN_SPLIT_K` of the k range, and at most `MAX_SPLITS` slices.
const SPLIT_TARGET_BLOCKS: i64 = 2 * TARGET_SMS;
const MIN_SPLIT_K: i64 = 256;
const MAX_SPLITS: i64 = 16;
/// 128×64 tiles from this many on (see `choose`).
const TALL_MIN_TILES: i64 = 200;
/// f32 elements of a workspace that never limits a split: splits happen only below
/// `TARGET_SMS` small tiles, so m·n < `TARGET_SMS`·64·64, times `MAX_SPLITS` slices (33 MiB).
pub const SPLIT_WORKSPACE_ELEMS: usize = (MAX_SPLITS * TARGET_SMS * 64 * 64) as usize;

impl Shape {
    fn tiles(&self, m: i64, n: i64) -> i64 {
        ((m + self.bm - 1) / self.bm) * ((n + self.bn - 1) / self.bn)
    }

    /// Dynamic shared memory: the stages (a, w, and a_minus when present: (2·bm + bn) rows of
    /// bk + 8 halves) or the f32 epilogue tile (bm × (bn + 4)), whichever is larger.
    fn smem(&self, diff: bool) -> u32 {
        let rows = self.bm * (if diff { 2 } else { 1 }) + self.bn;
        let stages = self.stages * rows * (self.bk + 8) * 2;
        stages.max(self.bm * (self.bn + 4) * 4) as u32
    }
}

/// How one GEMM is launched: the tile shape and the split of the k range.
struct Choice {
    tile: GemmTile,
    splits: i64,
    k_split: i64,
}

/// The launch rule, from `icdit bench-gemm` on an H200 (docs/gpu-runs/2026-11-27-h200.md: every
/// tile shape and split on every DiT-XL/2 linear shape at 512, 2048 and 8192 rows):
///   - k ≤ 256 (icc's up projections): 64×64 tiles with 32-wide k steps, the best or within 8%
///     at every row count (the 128×128 tiles took 2–2.3× as long);
///   - with `a_minus` (icc's down projections, three tiles per stage): 64×64 tiles with 64-wide
///     k steps, split along k (into `ws_elems` f32 of workspace) while fewer than `TARGET_SMS`
///     tiles would run, to about two blocks per multiprocessor;
///   - else 128×64 tiles when at least `TALL_MIN_TILES` of them run (best, or within 5%, for
///     qkv and fc1 at 512 rows and every linear at 2048 and 8192 rows);
///   - else 64×64 tiles with 64-wide k steps, split as above, and also when k ≥ 2048 and fewer
///     than two tiles per multiprocessor would run (fc2 at 512 rows: 56 µs instead of 80).
///
/// The 128×128 tiles (8 warps, 158 registers: one block per multiprocessor) were never the best.
/// Slices hold at least `MIN_SPLIT_K` of k and a whole number of k steps.
fn choose(m: i64, n: i64, k: i64, ws_elems: i64, diff: bool) -> Choice {
    let whole = |tile| Choice { tile, splits: 1, k_split: k };
    if k <= 256 && !diff {
        return whole(GemmTile::Small32);
    }
    if !diff && TALL.tiles(m, n) >= TALL_MIN_TILES {
        return whole(GemmTile::Tall);
    }
    let tiles = SMALL.tiles(m, n);
    let mut splits = 1;
    if ws_elems > 0 && (tiles < TARGET_SMS || (!diff && k >= 2048 && tiles < SPLIT_TARGET_BLOCKS)) {
        let want = (SPLIT_TARGET_BLOCKS + tiles - 1) / tiles;
        splits = want.min(k / MIN_SPLIT_K).min(MAX_SPLITS).min(ws_elems / (m * n)).max(1);
    }
    if splits == 1 {
        return whole(GemmTile::Small);
    }
    let step = SMALL.bk;
    let k_split = ((k + splits - 1) / splits + step - 1) / step * step;
    // Rounding up may leave the last slices empty: count only those that hold some of k.
    let splits = (k + k_split - 1) / k_split;
    Choice { tile: GemmTile::Small, splits, k_split }
}

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
    /// More output columns from a second weight: their raw f32 sums `a'·w2ᵀ`, no bias, add or
    /// activation (icc's t_s = down·x_s, kept by a full step's linear in the same pass).
    pub also: Option<GemmAlso>,
}

/// The second weight of a [`GemmSpec`] and where its columns go.
#[derive(Clone, Copy, Debug)]
pub struct GemmAlso {
    /// (n, k), row stride k.
    pub w: DevSlice<f16>,
    pub n: i32,
    /// (m, n) f32, row stride `ld`.
    pub out: DevSlice<f32>,
    pub ld: i32,
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
            also: None,
        }
    }

    /// Columns the kernel computes: n, plus the second weight's.
    fn n_total(&self) -> i32 {
        self.n + self.also.map_or(0, |x| x.n)
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

/// `p`, or null when `cond` holds (a split launch writes only its workspace).
fn unless<T>(cond: bool, p: DevPtr<T>) -> DevPtr<T> {
    if cond {
        DevPtr::null()
    } else {
        p
    }
}

fn ptr_or_null<T>(s: Option<DevSlice<T>>) -> DevPtr<T> {
    s.map_or(DevPtr::null(), DevSlice::ptr)
}

/// The launch [`gemm_ws`] makes for these sizes, workspace and whether `a_minus` is given:
/// (tile, number of k slices).
pub fn gemm_choice(m: i32, n: i32, k: i32, workspace_elems: usize, a_minus: bool) -> (GemmTile, usize) {
    let c = choose(m as i64, n as i64, k as i64, workspace_elems as i64, a_minus);
    (c.tile, c.splits as usize)
}

/// The launch [`gemm_ws`] makes of `spec` on `dev` with `workspace_elems` of workspace: the
/// Hopper kernel where [`Device::gemm_sm90`] holds and it takes the GEMM, else
/// [`gemm_choice`]'s rule. (tile, number of k slices).
pub fn gemm_choice_on<D: Device + ?Sized>(dev: &D, spec: &GemmSpec, workspace_elems: usize) -> (GemmTile, usize) {
    let c = choose_on(dev, spec, workspace_elems as i64);
    (c.tile, c.splits as usize)
}

fn choose_on<D: Device + ?Sized>(dev: &D, spec: &GemmSpec, ws_elems: i64) -> Choice {
    let (m, n, k) = (spec.m as i64, spec.n_total() as i64, spec.k as i64);
    if dev.gemm_sm90() && sm90_unsupported(spec).is_none() {
        return choose_sm90(m, n, k, ws_elems, dev.multiprocessors() as i64);
    }
    choose(m, n, k, ws_elems, spec.a_minus.is_some())
}

/// The Hopper kernel's split of k (not measured yet: the first GPU check times it): while its
/// 128×128 tiles would leave multiprocessors idle and the workspace allows, about one work unit
/// per multiprocessor, slices of at least `MIN_SPLIT_K` and whole 64-wide k steps, at most
/// `MAX_SPLITS`. At DiT-XL/2's batch 1 (512 rows, 132 SMs): proj and fc2 (36 tiles) in 4
/// slices, qkv (108 tiles) in 2, fc1 (144 tiles) whole.
fn choose_sm90(m: i64, n: i64, k: i64, ws_elems: i64, sms: i64) -> Choice {
    let tiles = SM90.tiles(m, n);
    let mut splits = 1;
    if ws_elems > 0 && tiles < sms {
        splits = ((sms + tiles - 1) / tiles).min(k / MIN_SPLIT_K).min(MAX_SPLITS).min(ws_elems / (m * n)).max(1);
    }
    if splits == 1 {
        return Choice { tile: GemmTile::Sm90, splits: 1, k_split: k };
    }
    let k_split = ((k + splits - 1) / splits + SM90.bk - 1) / SM90.bk * SM90.bk;
    Choice { tile: GemmTile::Sm90, splits: (k + k_split - 1) / k_split, k_split }
}

/// A launch chosen by the caller instead of [`gemm_ws`]'s rule (for `icdit bench-gemm`, which
/// measures the alternatives): a tile shape, and about `splits` k slices (rounded to whole k
/// steps; needs a workspace of `splits`·m·n).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmLaunch {
    pub tile: GemmTile,
    pub splits: usize,
}

/// Why the Hopper kernel does not take `spec` (`None`: it does): its tensor maps need k and
/// the row stride of `a` (and `a_minus`) to be multiples of 8 and the matrices (a, a_minus, w,
/// a second weight) 16-byte aligned.
pub fn sm90_unsupported(spec: &GemmSpec) -> Option<&'static str> {
    let misaligned = |s: DevSlice<f16>| s.ptr().addr() % 16 != 0;
    if spec.k % 8 != 0 || spec.lda % 8 != 0 {
        Some("k or lda not a multiple of 8")
    } else if misaligned(spec.a)
        || misaligned(spec.w)
        || spec.a_minus.is_some_and(misaligned)
        || spec.also.is_some_and(|x| misaligned(x.w))
    {
        Some("a, a_minus, w or the second weight not 16-byte aligned")
    } else {
        None
    }
}

/// Runs the GEMM as `how` says; see [`gemm_ws`].
pub fn gemm_as<D: Device + ?Sized>(
    dev: &D,
    spec: &GemmSpec,
    workspace: Option<DevSlice<f32>>,
    how: GemmLaunch,
) -> Result<()> {
    validate(spec)?;
    if how.tile == GemmTile::Sm90 {
        if let Some(why) = sm90_unsupported(spec) {
            return Err(invalid(KERNEL, format!("the Hopper kernel does not take {why}")));
        }
        if !dev.gemm_sm90() {
            return Err(invalid(KERNEL, format!("the Hopper kernel does not run on {}", dev.name())));
        }
    }
    let k = spec.k as i64;
    let bk = how.tile.shape().bk;
    let choice = if how.splits <= 1 {
        Choice { tile: how.tile, splits: 1, k_split: k }
    } else {
        let splits = how.splits as i64;
        let k_split = ((k + splits - 1) / splits + bk - 1) / bk * bk;
        Choice { tile: how.tile, splits: (k + k_split - 1) / k_split, k_split }
    };
    if choice.splits > 1
        && workspace.is_none_or(|w| (w.len as i64) < choice.splits * spec.m as i64 * spec.n_total() as i64)
    {
        return Err(invalid(KERNEL, format!("{} k slices need a workspace of that many (m, n) slices", choice.splits)));
    }
    launch_gemm(dev, spec, workspace, choice)
}

/// Runs the fused GEMM `spec` describes (kernels/gemm.cu) without splitting k: see [`gemm_ws`].
pub fn gemm<D: Device + ?Sized>(dev: &D, spec: &GemmSpec) -> Result<()> {
    gemm_ws(dev, spec, None)
}

/// Runs the fused GEMM `spec` describes (kernels/gemm.cu): 128×128 tiles when they fill the
/// GPU, else 64×64 tiles, split along k into slices of `workspace` (f32 partial sums, then one
/// reduction launch that applies the epilogue) when too few tiles would run and the workspace
/// holds at least two (m, n) slices. Checks sizes, strides (≥ the row width), and that every
/// slice covers what the kernel reads or writes; the kernel picks its 16-byte load paths
/// itself from k, lda and the alignment.
pub fn gemm_ws<D: Device + ?Sized>(dev: &D, spec: &GemmSpec, workspace: Option<DevSlice<f32>>) -> Result<()> {
    validate(spec)?;
    launch_gemm(dev, spec, workspace, choose_on(dev, spec, workspace.map_or(0, |s| s.len as i64)))
}

/// The checks on sizes and strides that need no launch choice.
fn validate(spec: &GemmSpec) -> Result<()> {
    let &GemmSpec { add, m, n, k, lda, ldc, also, .. } = spec;
    if let Some(x) = also {
        positive(KERNEL, &[("second weight's n", x.n)])?;
        stride_at_least("second output's row stride", x.ld, x.n)?;
        if n as i64 + x.n as i64 + 128 > i32::MAX as i64 {
            return Err(invalid(KERNEL, format!("n = {n} + {} is too large", x.n)));
        }
    }
    let (ld_add, add_rows) = add.map_or((n, m), |(_, ld, rows)| (ld, rows));
    positive(KERNEL, &[("m", m), ("n", n), ("k", k), ("add rows", add_rows)])?;
    stride_at_least("lda", lda, k)?;
    stride_at_least("ldc", ldc, n)?;
    stride_at_least("add row stride", ld_add, n)?;
    // The kernel's column and row indices (tile origin + 127) and k ranges must fit in an int.
    let big = LARGE.bm.max(LARGE.bn);
    if n as i64 + big > i32::MAX as i64 || m as i64 + big > i32::MAX as i64 || k as i64 + big > i32::MAX as i64 {
        return Err(invalid(KERNEL, format!("m = {m}, n = {n} or k = {k} is too large")));
    }
    Ok(())
}

/// Checks `spec` and launches it as `choice` says (plus the reduction when split).
fn launch_gemm<D: Device + ?Sized>(
    dev: &D,
    spec: &GemmSpec,
    workspace: Option<DevSlice<f32>>,
    choice: Choice,
) -> Result<()> {
    let &GemmSpec { out, pre, a, a_minus, w, bias, add, m, n, k, lda, ldc, act, also } = spec;
    let n_total = spec.n_total();
    let (add_slice, ld_add, add_rows) = match add {
        Some((s, ld, rows)) => (Some(s), ld, rows),
        None => (None, n, m),
    };
    let shape = choice.tile.shape();
    let grid_y = (m as i64 + shape.bm - 1) / shape.bm;
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
    if let Some(x) = also {
        covers(KERNEL, "second weight", x.w, span(x.n, k, k), 2)?;
        covers(KERNEL, "second output", x.out, span(m, x.ld, x.n), 4)?;
    }
    if let Some(s) = bias {
        covers(KERNEL, "bias", s, n as i64, 2)?;
    }
    if let Some(s) = add_slice {
        // Rows 0 .. min(m, add_rows) are read.
        covers(KERNEL, "add", s, span(m.min(add_rows), ld_add, n), 2)?;
    }

    let cfg = LaunchCfg {
        grid: [((n_total as i64 + shape.bn - 1) / shape.bn) as u32, grid_y as u32, choice.splits as u32],
        block: [shape.threads, 1, 1],
        dyn_smem: shape.smem(a_minus.is_some()),
    };
    let ws = match workspace {
        Some(s) if choice.splits > 1 => {
            covers(KERNEL, "workspace", s, choice.splits * m as i64 * n_total as i64, 4)?;
            s.ptr()
        }
        _ => DevPtr::null(),
    };
    let split = !ws.is_null();
    if choice.tile == GemmTile::Sm90 {
        launch_sm90(dev, spec, ws, choice.k_split)?;
    } else {
        let launch = match choice.tile {
            GemmTile::Small => kernels::gemm_fused_f16_64x64_k64::launch::<D>,
            GemmTile::Large => kernels::gemm_fused_f16_128x128_k32::launch::<D>,
            GemmTile::Tall => kernels::gemm_fused_f16_128x64_k32::launch::<D>,
            GemmTile::Small32 => kernels::gemm_fused_f16_64x64_k32::launch::<D>,
            GemmTile::Classic => kernels::gemm_fused_f16_64x64_k32_s2::launch::<D>,
            GemmTile::Sm90 => unreachable!("launched above"),
        };
        // SAFETY: every operand present covers the elements the kernel reads or writes for these
        // sizes and strides (checked above); absent operands are null, which the kernel skips.
        // Split, the kernel writes only `ws` ((splits, m, n), covered) and the reduction below
        // reads it and writes the outputs.
        unsafe {
            launch(
                dev,
                &cfg,
                if split { DevPtr::null() } else { out16 },
                if split { DevPtr::null() } else { out32 },
                if split { DevPtr::null() } else { ptr_or_null(pre) },
                a.ptr(),
                ptr_or_null(a_minus),
                w.ptr(),
                ptr_or_null(bias),
                ptr_or_null(add_slice),
                ws,
                m,
                n,
                k,
                lda,
                ldc,
                ld_add,
                add_rows,
                choice.k_split as i32,
                also.map_or(DevPtr::null(), |x| x.w.ptr()),
                if split { DevPtr::null() } else { also.map_or(DevPtr::null(), |x| x.out.ptr()) },
                also.map_or(0, |x| x.n),
                also.map_or(0, |x| x.ld),
                act.code(),
            )?;
        }
    }
    if !split {
        return Ok(());
    }
    let total = m as i64 * n_total as i64;
    let cfg = LaunchCfg { grid: [super::blocks(total, 256, 1024), 1, 1], block: [256, 1, 1], dyn_smem: 0 };
    // SAFETY: as above; `ws` holds `splits` slices of m·n partial sums written by the launch
    // before it on the same stream.
    unsafe {
        kernels::gemm_splitk_reduce_f16::launch(
            dev,
            &cfg,
            out16,
            out32,
            ptr_or_null(pre),
            ws,
            ptr_or_null(bias),
            ptr_or_null(add_slice),
            m,
            n,
            ldc,
            ld_add,
            add_rows,
            choice.splits as i32,
            also.map_or(DevPtr::null(), |x| x.out.ptr()),
            also.map_or(0, |x| x.n),
            also.map_or(0, |x| x.ld),
            act.code(),
        )
    }
}

/// The Hopper kernel's launch (kernels/gemm_sm90.cu) for a checked `spec`: tensor maps of a, w,
/// a_minus and the second weight, a persistent grid of min(work units, multiprocessors) blocks; with
/// `ws` not null, k slices of `k_split` into it (the caller then launches the reduction).
fn launch_sm90<D: Device + ?Sized>(dev: &D, spec: &GemmSpec, ws: DevPtr<f32>, k_split: i64) -> Result<()> {
    let &GemmSpec { out, pre, a, a_minus, w, bias, add, m, n, k, lda, ldc, act, also } = spec;
    let (add_slice, ld_add, add_rows) = match add {
        Some((s, ld, rows)) => (Some(s), ld, rows),
        None => (None, n, m),
    };
    let (out16, out32) = match out {
        GemmOut::F16(s) => (s.ptr(), DevPtr::null()),
        GemmOut::F32(s) => (DevPtr::null(), s.ptr()),
    };
    let split = !ws.is_null();
    let map = |s: DevSlice<f16>, rows: i32, stride: i32| {
        dev.tensor_map_2d(&TensorMapSpec {
            addr: s.ptr().addr(),
            rows: rows as u64,
            cols: k as u64,
            stride: stride as u64,
            box_rows: SM90.bm as u32,
            box_cols: SM90.bk as u32,
        })
    };
    let (map_a, map_w) = (map(a, m, lda)?, map(w, n, k)?);
    // Without a second weight the kernel never reads its map: w's stands in.
    let map_w2 = match also {
        Some(x) => map(x.w, x.n, k)?,
        None => map_w,
    };
    // Without a_minus the kernel never reads its map either: a's stands in.
    let map_am = match a_minus {
        Some(s) => map(s, m, lda)?,
        None => map_a,
    };
    let up = |x: i64, t: i64| (x + t - 1) / t;
    let tiles = up(m as i64, SM90.bm) * (up(n as i64, SM90.bn) + also.map_or(0, |x| up(x.n as i64, SM90.bn)));
    let units = tiles * up(k as i64, k_split);
    let cfg = LaunchCfg {
        grid: [units.min(dev.multiprocessors() as i64).max(1) as u32, 1, 1],
        block: [SM90.threads, 1, 1],
        dyn_smem: if a_minus.is_some() { SM90_SMEM_MINUS } else { SM90_SMEM },
    };
    // SAFETY: the tensor maps cover exactly a (m × k, stride lda), w (n × k) and the second
    // weight, inside their slices; the other operands were checked by the caller as for
    // gemm.cu's kernels (split: only `ws`, (splits, m, n + n2), is written).
    unsafe {
        kernels::gemm_sm90_f16_128x128_k64::launch(
            dev,
            &cfg,
            map_a,
            map_w,
            map_w2,
            map_am,
            a_minus.is_some() as i32,
            unless(split, out16),
            unless(split, out32),
            unless(split, ptr_or_null(pre)),
            ptr_or_null(bias),
            ptr_or_null(add_slice),
            m,
            n,
            k,
            ldc,
            ld_add,
            add_rows,
            unless(split, also.map_or(DevPtr::null(), |x| x.out.ptr())),
            also.map_or(0, |x| x.n),
            also.map_or(0, |x| x.ld),
            ws,
            k_split as i32,
            act.code(),
        )
    }
}

/// The first-use check of the Hopper kernels on a device (issue 26): a few small GEMMs with
/// every epilogue (bias, row-wrapped add, pre-activation copy, GELU and SiLU, f16 and f32 out,
/// a second weight, split-K, icc's increment a − a_minus; shapes that are not multiples of the
/// tile) on the Hopper GEMM and on gemm.cu's, and a few 3×3 convolutions on the Hopper
/// convolution and vae_conv.cu's ([`super::vae::conv_sm90_disagreement`]), compared within
/// `|h − f| ≤ 4e-3·|f| + 2e-3` (the same f16 products summed in another order, each output
/// rounded once to f16: a rounding step apart at most). On disagreement the device turns the
/// Hopper kernels off ([`Device::disable_gemm_sm90`]) and this says so once on stderr; a launch
/// error is returned. `scratch` is f32 workspace (the pipeline's split-K buffer, before
/// anything uses it) of at least [`SM90_CHECK_ELEMS`]. Returns whether the Hopper kernels stay
/// on.
pub fn check_sm90<D: Device + ?Sized>(dev: &D, scratch: DevSlice<f32>) -> Result<bool> {
    if !dev.gemm_sm90() {
        return Ok(false);
    }
    let bad = match sm90_disagreement(dev, scratch)? {
        Some(bad) => Some(bad),
        None => super::vae::conv_sm90_disagreement(dev, scratch)?,
    };
    if let Some(bad) = bad {
        dev.disable_gemm_sm90();
        eprintln!(
            "icdit: the Hopper kernels (wgmma + TMA) disagree with the fallback kernels on their first-use check \
             ({bad}); {} uses the fallback kernels",
            dev.name()
        );
        return Ok(false);
    }
    Ok(true)
}

/// f32 elements of scratch [`check_sm90`] needs.
pub const SM90_CHECK_ELEMS: usize = 1 << 18;

/// One first-use case: sizes, activation, f32 or f16 out, which operands are present (add
/// rows 0: no add), and the second weight's columns (0: none).
struct CheckCase {
    m: i32,
    n: i32,
    k: i32,
    act: GemmAct,
    f32_out: bool,
    bias: bool,
    add_rows: i32,
    pre: bool,
    n2: i32,
    /// k slices of the Hopper launch (the fallback's is whole).
    splits: usize,
    /// icc's increment: the product of a − a_minus.
    minus: bool,
}

const SM90_CASES: [CheckCase; 5] = [
    CheckCase {
        m: 200,
        n: 136,
        k: 72,
        act: GemmAct::GeluTanh,
        f32_out: false,
        bias: true,
        add_rows: 50,
        pre: true,
        n2: 0,
        minus: false,
        splits: 1,
    },
    CheckCase {
        m: 130,
        n: 200,
        k: 136,
        act: GemmAct::Silu,
        f32_out: false,
        bias: false,
        add_rows: 0,
        pre: false,
        n2: 40,
        minus: false,
        splits: 1,
    },
    CheckCase {
        m: 64,
        n: 64,
        k: 64,
        act: GemmAct::None,
        f32_out: true,
        bias: true,
        add_rows: 64,
        pre: false,
        n2: 0,
        minus: true,
        splits: 1,
    },
    CheckCase {
        m: 300,
        n: 24,
        k: 200,
        act: GemmAct::None,
        f32_out: false,
        bias: true,
        add_rows: 0,
        pre: true,
        n2: 130,
        minus: false,
        splits: 1,
    },
    CheckCase {
        m: 100,
        n: 72,
        k: 520,
        act: GemmAct::GeluTanh,
        f32_out: false,
        bias: true,
        add_rows: 0,
        pre: true,
        n2: 24,
        minus: true,
        splits: 3,
    },
];

/// The scratch of a first-use check ([`check_sm90`]), carved into 16-byte aligned regions from
/// its start, and deterministic values for them (an LCG from `seed`).
pub(super) struct CheckScratch<'a, D: Device + ?Sized> {
    dev: &'a D,
    at: u64,
    end: u64,
    state: u32,
}

impl<'a, D: Device + ?Sized> CheckScratch<'a, D> {
    pub(super) fn new(dev: &'a D, scratch: DevSlice<f32>, seed: u32) -> Self {
        let start = scratch.ptr().addr();
        CheckScratch { dev, at: start.div_ceil(16) * 16, end: start + scratch.len as u64 * 4, state: seed }
    }

    fn take(&mut self, bytes: usize) -> Result<u64> {
        let start = self.at;
        self.at += (bytes as u64).div_ceil(16) * 16;
        if self.at > self.end {
            return Err(invalid("first-use check", "the scratch is too small".to_string()));
        }
        Ok(start)
    }

    pub(super) fn f16(&mut self, len: usize) -> Result<DevSlice<f16>> {
        Ok(DevSlice { addr: self.take(len * 2)?, len, _t: std::marker::PhantomData })
    }

    pub(super) fn f32(&mut self, len: usize) -> Result<DevSlice<f32>> {
        Ok(DevSlice { addr: self.take(len * 4)?, len, _t: std::marker::PhantomData })
    }

    /// An output of `s`'s elements: f32 as carved, or f16 over its first half.
    pub(super) fn out(s: DevSlice<f32>, f32_out: bool) -> GemmOut {
        if f32_out {
            GemmOut::F32(s)
        } else {
            GemmOut::F16(DevSlice { addr: s.addr, len: s.len, _t: std::marker::PhantomData })
        }
    }

    /// Uploads values uniform in [−scale, scale) to `s`.
    pub(super) fn fill(&mut self, s: DevSlice<f16>, scale: f32) -> Result<()> {
        let v: Vec<f16> = (0..s.len)
            .map(|_| {
                self.state = self.state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                f16::from_f32(((self.state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale)
            })
            .collect();
        self.dev.upload(s, &v)
    }
}

/// The first-use checks' bound: `|h − f| ≤ 4e-3·|f| + 2e-3` (false for NaN).
pub(super) fn check_agrees(hopper: f32, fallback: f32) -> bool {
    (hopper - fallback).abs() <= 4e-3 * fallback.abs() + 2e-3
}

/// An output's elements as f32.
pub(super) fn download_out<D: Device + ?Sized>(dev: &D, out: GemmOut) -> Result<Vec<f32>> {
    Ok(match out {
        GemmOut::F32(s) => {
            let mut v = vec![0f32; s.len];
            dev.download(s, &mut v)?;
            v
        }
        GemmOut::F16(s) => {
            let mut v = vec![f16::ZERO; s.len];
            dev.download(s, &mut v)?;
            v.iter().map(|x| x.to_f32()).collect()
        }
    })
}

/// The first case whose Hopper result differs from the fallback's, described; `None`: all agree.
fn sm90_disagreement<D: Device + ?Sized>(dev: &D, scratch: DevSlice<f32>) -> Result<Option<String>> {
    for (index, c) in SM90_CASES.iter().enumerate() {
        let mut sc = CheckScratch::new(dev, scratch, 0x9e37_79b9u32.wrapping_mul(index as u32 + 1));
        let (m, n, k, n2) = (c.m as usize, c.n as usize, c.k as usize, c.n2 as usize);
        let a = sc.f16(m * k)?;
        let am = sc.f16(m * k)?;
        let w = sc.f16(n * k)?;
        let w2 = sc.f16(n2.max(1) * k)?;
        let bias = sc.f16(n)?;
        let add = sc.f16(c.add_rows.max(1) as usize * n)?;
        // Per kernel: out (f16 or f32), pre, out2.
        let outs = [sc.f32(m * n)?, sc.f32(m * n)?];
        let pres = [sc.f16(m * n)?, sc.f16(m * n)?];
        let outs2 = [sc.f32(m * n2.max(1))?, sc.f32(m * n2.max(1))?];
        let ws = sc.f32(c.splits * m * (n + n2))?;
        // The weights scaled by 1/√k.
        sc.fill(a, 1.0)?;
        sc.fill(am, 1.0)?;
        sc.fill(w, 1.0 / (k as f32).sqrt())?;
        sc.fill(w2, 1.0 / (k as f32).sqrt())?;
        sc.fill(bias, 0.5)?;
        sc.fill(add, 0.5)?;
        let mut results: Vec<Vec<(&str, f32)>> = Vec::new();
        for (i, tile) in [GemmTile::Sm90, GemmTile::Small].into_iter().enumerate() {
            let out = CheckScratch::<D>::out(outs[i], c.f32_out);
            let spec = GemmSpec {
                pre: c.pre.then_some(pres[i]),
                bias: c.bias.then_some(bias),
                add: (c.add_rows > 0).then_some((add, c.n, c.add_rows)),
                act: c.act,
                also: (n2 > 0).then_some(GemmAlso { w: w2, n: c.n2, out: outs2[i], ld: c.n2 }),
                a_minus: c.minus.then_some(am),
                ..GemmSpec::new(out, a, w, c.m, c.n, c.k)
            };
            let splits = if tile == GemmTile::Sm90 { c.splits } else { 1 };
            gemm_as(dev, &spec, (splits > 1).then_some(ws), GemmLaunch { tile, splits })?;
            let mut got: Vec<(&str, f32)> = download_out(dev, out)?.into_iter().map(|x| ("out", x)).collect();
            if c.pre {
                let mut v = vec![f16::ZERO; m * n];
                dev.download(pres[i], &mut v)?;
                got.extend(v.iter().map(|x| ("pre", x.to_f32())));
            }
            if n2 > 0 {
                let mut v = vec![0f32; m * n2];
                dev.download(outs2[i], &mut v)?;
                got.extend(v.into_iter().map(|x| ("out2", x)));
            }
            results.push(got);
        }
        let (h, f) = (&results[0], &results[1]);
        if let Some(i) = (0..h.len()).find(|&i| !check_agrees(h[i].1, f[i].1)) {
            return Ok(Some(format!(
                "{m}×{n}×{k}{} {:?}: {} element {} = {} against {}",
                if n2 > 0 { format!(" + {n2} columns of a second weight") } else { String::new() },
                c.act,
                h[i].0,
                i,
                h[i].1,
                f[i].1
            )));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_choice() {
        let ws = 1 << 24;
        let pick = |m, n, k, diff| {
            let c = choose(m, n, k, ws, diff);
            (c.tile, c.splits)
        };
        // DiT-XL/2 at batch 1 with guidance (512 rows), the measured best of each shape or a
        // launch within 8% of it (docs/gpu-runs/2026-11-27-h200.md):
        assert_eq!(pick(512, 3456, 1152, false), (GemmTile::Tall, 1)); // qkv: 216 tall tiles
        assert_eq!(pick(512, 1152, 1152, false), (GemmTile::Small, 1)); // proj: 144 small tiles
        assert_eq!(pick(512, 4608, 1152, false), (GemmTile::Tall, 1)); // fc1
        assert_eq!(pick(512, 1152, 4608, false), (GemmTile::Small, 2)); // fc2: long k, 144 tiles
        assert_eq!(pick(512, 1152, 128, false), (GemmTile::Small32, 1)); // icc up
        assert_eq!(pick(512, 384, 1152, true), (GemmTile::Small, 4)); // icc down qkv
                                                                      // Batches 4 and 16 (2048 and 8192 rows): 128×64 tiles for every block linear.
        for m in [2048, 8192] {
            for (n, k) in [(3456, 1152), (1152, 1152), (4608, 1152), (1152, 4608)] {
                assert_eq!(pick(m, n, k, false), (GemmTile::Tall, 1), "{m} {n} {k}");
            }
        }
        // icc's down projection at batch 1: 16 tiles, k = 4608 → at most 16 slices (17 wanted):
        // 288 rounded up to 320 makes 15.
        let c = choose(512, 128, 4608, ws, true);
        assert_eq!((c.tile, c.splits, c.k_split), (GemmTile::Small, 15, 320));
        // No workspace: no split.
        assert_eq!(choose(512, 128, 4608, 0, true).splits, 1);
        // A workspace for 3 slices only.
        assert_eq!(choose(512, 128, 4608, 3 * 512 * 128, true).splits, 3);
        // k = 1152 allows at most 4 slices of ≥ 256; k_split rounds up to 320 (a whole number
        // of 64-wide k steps), which covers k in 4 slices.
        let c = choose(512, 128, 1152, ws, true);
        assert_eq!((c.splits, c.k_split), (4, 320));
        // Every choice covers k exactly.
        for (m, n, k) in [(512, 384, 1152), (2, 1152, 256), (512, 32, 1152), (100, 10, 4000)] {
            for diff in [false, true] {
                let c = choose(m, n, k, 1 << 30, diff);
                assert!(c.splits * c.k_split >= k && (c.splits - 1) * c.k_split < k, "{m} {n} {k}");
                assert_eq!(c.k_split % c.tile.shape().bk, if c.splits > 1 { 0 } else { k % c.tile.shape().bk });
            }
        }
    }

    #[test]
    fn hopper_split_choice() {
        let ws = 1 << 24;
        let pick = |m, n, k| {
            let c = choose_sm90(m, n, k, ws, 132);
            assert!(
                c.splits * c.k_split >= k && (c.splits - 1) * c.k_split < k && c.k_split % 64 == 0 || c.splits == 1
            );
            c.splits
        };
        // DiT-XL/2, batch 1 with guidance: 512 rows.
        assert_eq!(pick(512, 1152, 1152), 4); // proj: 36 tiles
        assert_eq!(pick(512, 1152, 4608), 4); // fc2
        assert_eq!(pick(512, 3456, 1152), 2); // qkv: 108 tiles
        assert_eq!(pick(512, 4608, 1152), 1); // fc1: 144 tiles
        assert_eq!(pick(8192, 1152, 1152), 1); // batch 16
                                               // Short k is not split below 256 per slice; no workspace, no split.
        assert_eq!(pick(512, 128, 300), 1);
        assert_eq!(choose_sm90(512, 1152, 1152, 0, 132).splits, 1);
    }

    #[test]
    fn shared_memory_fits_hopper() {
        for t in GemmTile::ALL {
            assert!(t.shape().smem(true) <= crate::gpu::MAX_DYN_SMEM_OPT_IN);
        }
        assert!(SM90_SMEM <= crate::gpu::MAX_DYN_SMEM_OPT_IN);
        assert_eq!(SM90_SMEM, 132_160);
        assert_eq!(SM90_SMEM_MINUS, 197_696);
        assert_eq!(SMALL.smem(false), 73728);
        assert_eq!(LARGE.smem(true), 122880);
    }
}
