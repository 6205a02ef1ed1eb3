//! Launchers of the VAE decoder's kernels: the 3×3 convolution as an implicit GEMM with the
//! nearest 2× upsample fused into its input indexing (kernels/vae_conv.cu), GroupNorm + SiLU,
//! the mid-block attention's row softmax and transpose, and the final conversion to uint8
//! pixels (kernels/vae.cu). Activations are NHWC: (images·pixels, channels) row-major.
//!
//! The decoder's 1×1 convolutions (resnet shortcuts, attention q/k/v/out projections) are
//! ordinary GEMMs over pixels: [`super::gemm`] with `a` = the activation (pixels, cin), `w` =
//! the (cout, cin, 1, 1) weight as stored, and the residual as `add`. The attention itself is
//! S = q·kᵀ ([`super::gemm`] with `w` = k), P = [`softmax_rows_f16`]`(S, 1/√C)`, Vᵀ =
//! [`transpose_f16`]`(v)`, O = P·V ([`super::gemm`] with `w` = Vᵀ).

use super::gemm::{check_agrees, download_out, CheckScratch};
use super::{covers, invalid, positive, GemmOut};
use crate::error::Result;
use crate::gpu::{f16, kernels, DevPtr, DevSlice, Device, LaunchCfg, TensorMapSpec};

/// The layout of a 3×3 convolution weight (cout, 9·cin).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvWeights {
    /// PyTorch's (cout, cin, ky, kx) as stored: column ci·9 + ky·3 + kx. Its tiles are
    /// gathered element by element.
    Torch,
    /// Tap-major (cout, ky, kx, cin): column (ky·3 + kx)·cin + ci, the weight permuted once at
    /// upload; with cin % 8 == 0 its tiles load by 16-byte cp.async.
    TapMajor,
}

/// The kernel and block tile of [`conv3x3_f16`]: the Hopper kernel (kernels/conv_sm90.cu), or
/// one of the two tiles of kernels/vae_conv.cu (one kernel, the block size selects the tile).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvTile {
    /// The launcher's rule: the Hopper kernel where [`conv_sm90_unsupported`] finds nothing
    /// against it, else [`ConvTile::choose`].
    Auto,
    /// 64×64 pixels × output channels, 128 threads, 40,960 B of dynamic shared memory.
    Small,
    /// 128×128, 256 threads, 81,920 B of dynamic shared memory (opted in above 48 KiB).
    Large,
    /// kernels/conv_sm90.cu (wgmma, the weight tile by TMA, the input gathered by cp.async):
    /// 128×128 tiles, a persistent grid of 384-thread blocks, [`CONV_SM90_SMEM`] bytes. An
    /// error where [`conv_sm90_unsupported`] says why not.
    Sm90,
}

/// Dynamic shared memory of kernels/conv_sm90.cu: 4 stages of 32 KiB, 8 mbarriers, 1 KiB of
/// alignment slack.
pub const CONV_SM90_SMEM: u32 = 132_160;

/// Why the Hopper convolution cannot run `spec` on `dev` (`None`: it can): it needs an sm_90
/// device whose Hopper GEMM passed its first-use check ([`Device::gemm_sm90`]), tap-major
/// weights, cin a multiple of 64 (whole 64-channel k steps) and 16-byte aligned input and
/// weight (16-byte gathers, the tensor map's rule).
pub fn conv_sm90_unsupported<D: Device + ?Sized>(dev: &D, spec: &Conv3Spec) -> Option<&'static str> {
    if !dev.gemm_sm90() {
        Some("it needs an sm_90 GPU (H100/H200) whose Hopper kernels passed their first-use check")
    } else if spec.layout != ConvWeights::TapMajor {
        Some("it needs tap-major weights")
    } else if spec.cin % 64 != 0 {
        Some("it needs cin to be a multiple of 64")
    } else if spec.input.ptr().addr() % 16 != 0 || spec.weight.ptr().addr() % 16 != 0 {
        Some("it needs 16-byte aligned input and weight")
    } else {
        None
    }
}

impl ConvTile {
    /// 128×128 tiles needed to fill every SM of an H100/H200 (132 SMs) about once; with
    /// fewer the 64×64 tile's four times as many blocks spread better over the SMs.
    pub const LARGE_MIN_TILES: i64 = 128;

    /// The rule for [`ConvTile::Auto`]: `Large` when cout > 64 (at most 64 output channels
    /// fill a 64-wide tile no worse, e.g. the final 128→3 conv) and ⌈pixels/128⌉·⌈cout/128⌉ ≥
    /// [`ConvTile::LARGE_MIN_TILES`]; else `Small`. At 256×256 the SD-VAE decoder's 32×32
    /// convolutions (M = 1024, cout = 512: 32 large tiles) run small for one image, everything
    /// from 64×64 up (M ≥ 4096) large.
    pub fn choose(self, pixels: i64, cout: i32) -> ConvTile {
        match self {
            ConvTile::Auto => {
                let tiles = (pixels + 127) / 128 * ((cout as i64 + 127) / 128);
                if cout > 64 && tiles >= Self::LARGE_MIN_TILES {
                    ConvTile::Large
                } else {
                    ConvTile::Small
                }
            }
            t => t,
        }
    }

    /// (block tile side, threads, dynamic shared memory bytes): kernels/vae_conv.cu's Cfg,
    /// kernels/conv_sm90.cu's constants.
    fn geometry(self) -> (i64, u32, u32) {
        match self {
            ConvTile::Large => (128, 256, 81_920),
            ConvTile::Sm90 => (128, 384, CONV_SM90_SMEM),
            _ => (64, 128, 40_960),
        }
    }
}

/// One 3×3 convolution, stride 1, zero padding 1:
/// `out[p, co] = bias[co] + Σ in[tap(p, ky, kx), ci]·weight[co, ci, ky, kx] + add[p, co]`.
#[derive(Clone, Copy, Debug)]
pub struct Conv3Spec {
    /// (images·h·w, cout), f16 or f32.
    pub out: GemmOut,
    /// (images·h·w, cin), or (images·(h/2)·(w/2), cin) when `up2`.
    pub input: DevSlice<f16>,
    /// (cout, 9·cin) in `layout`.
    pub weight: DevSlice<f16>,
    pub layout: ConvWeights,
    /// (cout).
    pub bias: Option<DevSlice<f16>>,
    /// The residual, (images·h·w, cout).
    pub add: Option<DevSlice<f16>>,
    pub images: i32,
    /// The output's height and width.
    pub h: i32,
    pub w: i32,
    pub cin: i32,
    pub cout: i32,
    /// The input is (h/2)×(w/2), read upsampled 2× by nearest neighbour.
    pub up2: bool,
    /// The block tile: [`ConvTile::Auto`] but in tests and benchmarks.
    pub tile: ConvTile,
}

impl Conv3Spec {
    /// One image, PyTorch weight layout, no bias, no residual, no upsample.
    pub fn new(out: GemmOut, input: DevSlice<f16>, weight: DevSlice<f16>, h: i32, w: i32, cin: i32, cout: i32) -> Self {
        Conv3Spec {
            out,
            input,
            weight,
            layout: ConvWeights::Torch,
            bias: None,
            add: None,
            images: 1,
            h,
            w,
            cin,
            cout,
            up2: false,
            tile: ConvTile::Auto,
        }
    }
}

fn ptr_or_null<T>(s: Option<DevSlice<T>>) -> DevPtr<T> {
    s.map_or(DevPtr::null(), DevSlice::ptr)
}

/// Runs the convolution `spec` describes: on an sm_90 device the Hopper kernel
/// (kernels/conv_sm90.cu, [`ConvTile::Sm90`]) where it can run it, else kernels/vae_conv.cu
/// with the tile [`ConvTile::choose`] picks: grid (⌈cout/T⌉, ⌈images·h·w/T⌉) of T×T tiles,
/// 128 threads for T = 64, 256 for T = 128, and that tile's dynamic shared memory. Checks
/// sizes (h and w even with `up2`), that every slice covers what the kernel reads or writes,
/// and that the pixel count fits the grid. The outputs must not overlap the inputs (not
/// checked).
pub fn conv3x3_f16<D: Device + ?Sized>(dev: &D, spec: &Conv3Spec) -> Result<()> {
    const K: &str = "conv3x3_f16";
    let &Conv3Spec { out, input, weight, layout, bias, add, images, h, w, cin, cout, up2, tile } = spec;
    positive(K, &[("images", images), ("h", h), ("w", w), ("cin", cin), ("cout", cout)])?;
    if up2 && (h % 2 != 0 || w % 2 != 0) {
        return Err(invalid(K, format!("up2 needs an even output size, got {h}×{w}")));
    }
    let pixels = images as i64 * h as i64 * w as i64;
    let tile = match (tile, conv_sm90_unsupported(dev, spec)) {
        (ConvTile::Sm90, Some(why)) => {
            return Err(invalid(K, format!("the Hopper kernel cannot run this convolution: {why}")))
        }
        (ConvTile::Auto, None) => ConvTile::Sm90,
        (t, _) => t.choose(pixels, cout),
    };
    let (tile_side, threads, smem) = tile.geometry();
    // The kernel indexes pixels and channels in `int`, up to a whole tile past the end.
    const TILE: i64 = 128;
    let k = 9 * cin as i64;
    if pixels + TILE > i32::MAX as i64 || k > i32::MAX as i64 || cout as i64 + TILE > i32::MAX as i64 {
        return Err(invalid(K, format!("{pixels} pixels, cin = {cin} or cout = {cout} is too large")));
    }
    let grid_y = (pixels + tile_side - 1) / tile_side;
    if grid_y > 65535 {
        return Err(invalid(K, format!("{pixels} pixels need {grid_y} row tiles, more than 65535")));
    }
    let src_pixels = if up2 { images as i64 * (h / 2) as i64 * (w / 2) as i64 } else { pixels };
    let out_elems = pixels * cout as i64;
    let (out16, out32) = match out {
        GemmOut::F16(s) => {
            covers(K, "out", s, out_elems, 2)?;
            (s.ptr(), DevPtr::null())
        }
        GemmOut::F32(s) => {
            covers(K, "out", s, out_elems, 4)?;
            (DevPtr::null(), s.ptr())
        }
    };
    covers(K, "input", input, src_pixels * cin as i64, 2)?;
    covers(K, "weight", weight, cout as i64 * k, 2)?;
    if let Some(s) = bias {
        covers(K, "bias", s, cout as i64, 2)?;
    }
    if let Some(s) = add {
        covers(K, "add", s, out_elems, 2)?;
    }
    if tile == ConvTile::Sm90 {
        let map_w = dev.tensor_map_2d(&TensorMapSpec {
            addr: weight.ptr().addr(),
            rows: cout as u64,
            cols: k as u64,
            stride: k as u64,
            box_rows: 128,
            box_cols: 64,
        })?;
        let units = grid_y * ((cout as i64 + tile_side - 1) / tile_side);
        let cfg = LaunchCfg {
            grid: [units.min(dev.multiprocessors() as i64).max(1) as u32, 1, 1],
            block: [threads, 1, 1],
            dyn_smem: smem,
        };
        // SAFETY: the tensor map covers the weight (cout × 9·cin, checked above); input, bias,
        // add and the output cover what the kernel reads or writes for these sizes (checked
        // above); absent ones are null, which the kernel skips.
        return unsafe {
            kernels::conv3x3_sm90_f16::launch(
                dev,
                &cfg,
                map_w,
                out16,
                out32,
                input.ptr(),
                ptr_or_null(bias),
                ptr_or_null(add),
                images,
                h,
                w,
                cin,
                cout,
                up2 as i32,
            )
        };
    }
    let cfg = LaunchCfg {
        grid: [((cout as i64 + tile_side - 1) / tile_side) as u32, grid_y as u32, 1],
        block: [threads, 1, 1],
        dyn_smem: smem,
    };
    // SAFETY: every operand present covers what the kernel reads or writes for these sizes
    // (checked above); absent ones are null, which the kernel skips.
    unsafe {
        kernels::conv3x3_f16::launch(
            dev,
            &cfg,
            out16,
            out32,
            input.ptr(),
            weight.ptr(),
            ptr_or_null(bias),
            ptr_or_null(add),
            images,
            h,
            w,
            cin,
            cout,
            up2 as i32,
            (layout == ConvWeights::TapMajor) as i32,
        )
    }
}

/// One convolution of the Hopper kernel's first-use check: sizes, upsample, which operands
/// are present, f32 or f16 out.
struct ConvCheck {
    images: i32,
    h: i32,
    w: i32,
    cin: i32,
    cout: i32,
    up2: bool,
    bias: bool,
    add: bool,
    f32_out: bool,
}

/// Two row tiles and a partial column tile with the upsample, bias and residual; then a single
/// partial column tile (cout < 128, not a multiple of 8), f32 out, no bias.
const CONV_CHECKS: [ConvCheck; 2] = [
    ConvCheck { images: 2, h: 10, w: 12, cin: 64, cout: 136, up2: true, bias: true, add: true, f32_out: false },
    ConvCheck { images: 1, h: 11, w: 13, cin: 128, cout: 42, up2: false, bias: false, add: false, f32_out: true },
];

/// The Hopper convolution's part of the first-use check ([`super::check_sm90`]): each of
/// [`CONV_CHECKS`] on kernels/conv_sm90.cu and on vae_conv.cu's 64×64 tile, from
/// deterministic values in [−1, 1) (weights scaled by 1/√(9·cin)), compared within
/// `|h − f| ≤ 4e-3·|f| + 2e-3` (the same f16 products summed in another order, each output
/// rounded once: a rounding step apart at most). `scratch` is f32 workspace; the first case that
/// disagrees, described, or `None`.
pub(crate) fn conv_sm90_disagreement<D: Device + ?Sized>(dev: &D, scratch: DevSlice<f32>) -> Result<Option<String>> {
    for (index, c) in CONV_CHECKS.iter().enumerate() {
        let mut sc = CheckScratch::new(dev, scratch, 0x85eb_ca6bu32.wrapping_mul(index as u32 + 1));
        let px = (c.images * c.h * c.w) as usize;
        let src_px = if c.up2 { px / 4 } else { px };
        let (cin, cout) = (c.cin as usize, c.cout as usize);
        let input = sc.f16(src_px * cin)?;
        let weight = sc.f16(cout * 9 * cin)?;
        let bias = sc.f16(cout)?;
        let add = sc.f16(px * cout)?;
        let outs = [sc.f32(px * cout)?, sc.f32(px * cout)?];
        sc.fill(input, 1.0)?;
        sc.fill(weight, 1.0 / (9.0 * cin as f32).sqrt())?;
        sc.fill(bias, 0.5)?;
        sc.fill(add, 0.5)?;
        let mut results = Vec::new();
        for (i, tile) in [ConvTile::Sm90, ConvTile::Small].into_iter().enumerate() {
            let out = CheckScratch::<D>::out(outs[i], c.f32_out);
            let spec = Conv3Spec {
                layout: ConvWeights::TapMajor,
                bias: c.bias.then_some(bias),
                add: c.add.then_some(add),
                images: c.images,
                up2: c.up2,
                tile,
                ..Conv3Spec::new(out, input, weight, c.h, c.w, c.cin, c.cout)
            };
            conv3x3_f16(dev, &spec)?;
            results.push(download_out(dev, out)?);
        }
        let (h, f) = (&results[0], &results[1]);
        if let Some(i) = (0..h.len()).find(|&i| !check_agrees(h[i], f[i])) {
            return Ok(Some(format!(
                "3×3 convolution {}×{}×{} px, {}→{}{}: element {i} = {} against {}",
                c.images,
                c.h,
                c.w,
                c.cin,
                c.cout,
                if c.up2 { ", upsampled" } else { "" },
                h[i],
                f[i]
            )));
        }
    }
    Ok(None)
}

/// Chunks per image of the two-kernel GroupNorm at most ([`group_norm_silu_f16`] with stats).
pub const GN_MAX_CHUNKS: usize = 128;

/// f32 elements of the statistics workspace [`group_norm_silu_f16`] needs for `images` images of
/// `groups` groups: (images, chunks ≤ [`GN_MAX_CHUNKS`], groups, 2).
pub fn group_norm_stats_len(images: usize, groups: usize) -> usize {
    images * GN_MAX_CHUNKS * groups * 2
}

/// The two-kernel GroupNorm's chunking of an image of `pixels` pixels for `images` images:
/// about 256 blocks in all, at most [`GN_MAX_CHUNKS`] per image, at least 16 pixels each.
/// Returns (chunk pixels, chunks).
fn gn_chunks(images: i64, pixels: i64) -> (i64, i64) {
    let want = (256 + images - 1) / images;
    let chunks = want.clamp(1, GN_MAX_CHUNKS as i64).min((pixels + 15) / 16).max(1);
    let chunk_px = (pixels + chunks - 1) / chunks;
    (chunk_px, (pixels + chunk_px - 1) / chunk_px)
}

/// GroupNorm over `groups` groups of consecutive channels, statistics per image over all its
/// `pixels`, affine (`gamma`, `beta`, (channels) f16), then SiLU when `silu`; `x` and `out`
/// (images·pixels, channels) f16 (kernels/vae.cu). With `stats` (f32, at least
/// [`group_norm_stats_len`]) and channels a multiple of 8 dividing 2048, groups ≤ 256, `x` and
/// `out` 16-byte aligned: two kernels over (chunks, images) blocks of 256 threads,
/// `group_norm_stats_f16` then `group_norm_apply_f16` (chunks by `gn_chunks`: about 256
/// blocks); otherwise `group_norm_silu_f16`, grid (groups, images), 256 threads.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_silu_f16<D: Device + ?Sized>(
    dev: &D,
    out: DevSlice<f16>,
    x: DevSlice<f16>,
    gamma: DevSlice<f16>,
    beta: DevSlice<f16>,
    images: i32,
    pixels: i32,
    channels: i32,
    groups: i32,
    eps: f32,
    silu: bool,
    stats: Option<DevSlice<f32>>,
) -> Result<()> {
    const K: &str = "group_norm_silu_f16";
    positive(K, &[("images", images), ("pixels", pixels), ("channels", channels), ("groups", groups)])?;
    if channels % groups != 0 {
        return Err(invalid(K, format!("{channels} channels do not split into {groups} groups")));
    }
    if images > 65535 {
        return Err(invalid(K, format!("{images} images: more than 65535")));
    }
    // The kernel counts a group's elements in an int.
    if pixels as i64 * (channels / groups) as i64 > i32::MAX as i64 {
        return Err(invalid(K, format!("{pixels} pixels × {} channels per group is too many", channels / groups)));
    }
    if eps.is_nan() || eps < 0.0 {
        return Err(invalid(K, format!("eps = {eps} must be ≥ 0")));
    }
    let elems = images as i64 * pixels as i64 * channels as i64;
    covers(K, "out", out, elems, 2)?;
    covers(K, "x", x, elems, 2)?;
    covers(K, "gamma", gamma, channels as i64, 2)?;
    covers(K, "beta", beta, channels as i64, 2)?;
    let vector = channels % 8 == 0
        && 2048 % channels == 0
        && groups <= 256
        && out.ptr().addr() % 16 == 0
        && x.ptr().addr() % 16 == 0;
    if let (Some(st), true) = (stats, vector) {
        let (chunk_px, chunks) = gn_chunks(images as i64, pixels as i64);
        covers(K, "stats", st, images as i64 * chunks * groups as i64 * 2, 4)?;
        let cfg = LaunchCfg { grid: [chunks as u32, images as u32, 1], block: [256, 1, 1], dyn_smem: 0 };
        // SAFETY: x and out hold images·pixels·channels elements, 16-byte aligned, channels a
        // multiple of 8 (whole vectors per pixel); stats holds (images, chunks, groups, 2);
        // gamma and beta channels.
        unsafe {
            kernels::group_norm_stats_f16::launch(
                dev,
                &cfg,
                st.ptr(),
                x.ptr(),
                pixels,
                channels,
                groups,
                chunk_px as i32,
            )?;
            return kernels::group_norm_apply_f16::launch(
                dev,
                &cfg,
                out.ptr(),
                x.ptr(),
                st.ptr(),
                gamma.ptr(),
                beta.ptr(),
                pixels,
                channels,
                groups,
                chunk_px as i32,
                eps,
                silu as i32,
            );
        }
    }
    let cfg = LaunchCfg { grid: [groups as u32, images as u32, 1], block: [256, 1, 1], dyn_smem: 0 };
    // SAFETY: out and x hold images·pixels·channels elements, gamma and beta channels.
    unsafe {
        kernels::group_norm_silu_f16::launch(
            dev,
            &cfg,
            out.ptr(),
            x.ptr(),
            gamma.ptr(),
            beta.ptr(),
            pixels,
            channels,
            groups,
            eps,
            silu as i32,
        )
    }
}

/// `out[r, :] = softmax(scale·x[r, :])`, (rows, cols) f16, f32 arithmetic (kernels/vae.cu).
/// One 256-thread block per row.
pub fn softmax_rows_f16<D: Device + ?Sized>(
    dev: &D,
    out: DevSlice<f16>,
    x: DevSlice<f16>,
    rows: i32,
    cols: i32,
    scale: f32,
) -> Result<()> {
    const K: &str = "softmax_rows_f16";
    positive(K, &[("rows", rows), ("cols", cols)])?;
    if !scale.is_finite() {
        return Err(invalid(K, format!("scale = {scale} must be finite")));
    }
    let elems = rows as i64 * cols as i64;
    covers(K, "out", out, elems, 2)?;
    covers(K, "x", x, elems, 2)?;
    let cfg = LaunchCfg { grid: [rows as u32, 1, 1], block: [256, 1, 1], dyn_smem: 0 };
    // SAFETY: both hold rows·cols elements.
    unsafe { kernels::softmax_rows_f16::launch(dev, &cfg, out.ptr(), x.ptr(), cols, scale) }
}

/// `out (cols, rows) = input (rows, cols)ᵀ`, f16 bit copies (kernels/vae.cu). 32×32 tiles,
/// block (32, 8).
pub fn transpose_f16<D: Device + ?Sized>(
    dev: &D,
    out: DevSlice<f16>,
    input: DevSlice<f16>,
    rows: i32,
    cols: i32,
) -> Result<()> {
    const K: &str = "transpose_f16";
    positive(K, &[("rows", rows), ("cols", cols)])?;
    let grid_y = (rows as i64 + 31) / 32;
    if grid_y > 65535 {
        return Err(invalid(K, format!("{rows} rows: more than 65535 row tiles")));
    }
    let elems = rows as i64 * cols as i64;
    covers(K, "out", out, elems, 2)?;
    covers(K, "input", input, elems, 2)?;
    let cfg = LaunchCfg { grid: [((cols as i64 + 31) / 32) as u32, grid_y as u32, 1], block: [32, 8, 1], dyn_smem: 0 };
    // SAFETY: both hold rows·cols elements.
    unsafe { kernels::transpose_f16::launch(dev, &cfg, out.ptr(), input.ptr(), rows, cols) }
}
