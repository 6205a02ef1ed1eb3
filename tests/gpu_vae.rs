//! The VAE decoder's kernels (kernels/vae_conv.cu, kernels/vae.cu) against f64 references on
//! the same f16 inputs: the 3×3 convolution (PyTorch and tap-major weights, the fused nearest
//! 2× upsample, bias, residual add, f16 and f32 out, the 16-byte and element-wise staging
//! paths, batches of images, both block tiles (64×64 and 128×128, forced and by the launcher's
//! rule) at shapes that are not multiples of either), a 1×1 convolution as `gemm_fused_f16_64x64_k64`
//! with the shortcut as `add`, GroupNorm + SiLU, the row softmax, the transpose, the mid-block
//! attention composed of them, and the uint8 conversion (bit for bit against src/image.rs);
//! then the launchers' rejections.
//!
//! Convolutions get two kinds of data, as tests/gpu_gemm.rs: small integers (input and weights
//! in [-2, 2], bias and add in [-4, 4]: every partial sum is an integer below 2^24, exact in
//! f32 in any order, so the outputs must be the exact value correctly rounded, to the bit) and
//! uniform values in [-1, 1), held to gpu_gemm's bound: with S = Σ|a·w| + |bias| + |add| over
//! the K = 9·cin terms, accumulation error ≤ 2·(K + 3)·u32·S (products exact, K + 2 f32
//! additions, doubled for tensor cores that truncate), plus U16·|v| + 2^-25 for an f16 output.

mod gpu_common;

use gpu_common::*;
use icdit::gpu::launch::{self, Conv3Spec, ConvTile, ConvWeights, GemmOut, GemmSpec};
use icdit::gpu::{f16, DevSlice, Device};
use icdit::plan::{Dt, Plan};

// ---- 3×3 convolution ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Conv {
    images: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    up2: bool,
    tap_major: bool,
    bias: bool,
    add: bool,
    f32_out: bool,
    /// The input slice starts one element into its buffer (2-byte aligned only): the
    /// element-wise A staging path even when cin % 8 == 0.
    misalign: bool,
    /// The block tile (kernels/vae_conv.cu compiles two); `Auto`: the launcher's rule.
    tile: ConvTile,
}

const fn conv(h: usize, w: usize, cin: usize, cout: usize) -> Conv {
    Conv {
        images: 1,
        h,
        w,
        cin,
        cout,
        up2: false,
        tap_major: false,
        bias: true,
        add: false,
        f32_out: false,
        misalign: false,
        tile: ConvTile::Auto,
    }
}

/// The same convolution on the 128×128 tile (256 threads, 4-stage pipeline).
const fn large(c: Conv) -> Conv {
    Conv { tile: ConvTile::Large, ..c }
}

const CONVS: &[(&str, Conv)] = &[
    ("5×5, 8→12, 16-byte A, gathered B", conv(5, 5, 8, 12)),
    (
        "5×5, 8→12, tap-major B, residual add, no bias",
        Conv { tap_major: true, add: true, bias: false, ..conv(5, 5, 8, 12) },
    ),
    ("up2 3×3→6×6, 16→20", Conv { up2: true, ..conv(6, 6, 16, 20) }),
    ("first conv 4→16 (element-wise A), 8×8", conv(8, 8, 4, 16)),
    ("last conv 40→3 (n = 3, partial channel block), 7×9, f32 out", Conv { f32_out: true, ..conv(7, 9, 40, 3) }),
    (
        "2 images, up2 6×6→12×12, 64→70, tap-major, add: several tiles in m and n",
        Conv { images: 2, up2: true, tap_major: true, add: true, ..conv(12, 12, 64, 70) },
    ),
    ("misaligned input (element-wise A), 5×6, 16→24", Conv { misalign: true, ..conv(5, 6, 16, 24) }),
    ("odd sizes 3×11, 12→33 (element-wise A), tap-major", Conv { tap_major: true, ..conv(3, 11, 12, 33) }),
    (
        "64×64 tile forced, 2 images 10×13, 40→150, tap-major, add, f32 out",
        Conv { images: 2, tap_major: true, add: true, f32_out: true, tile: ConvTile::Small, ..conv(10, 13, 40, 150) },
    ),
    // The 128×128 tile: M not a multiple of 128 (a partial last row tile), cout not a multiple
    // of 128 (a partial column tile), cin not a multiple of 32 (a partial channel block).
    (
        "128×128 tile, 2 images 10×13 (260 pixels), 40→150, tap-major, add, f32 out",
        large(Conv { images: 2, tap_major: true, add: true, f32_out: true, ..conv(10, 13, 40, 150) }),
    ),
    (
        "128×128 tile, up2 9×7→18×14, 48→130, PyTorch weights, bias, add",
        large(Conv { up2: true, add: true, ..conv(18, 14, 48, 130) }),
    ),
    (
        "128×128 tile, 3 images up2 8×8→16×16, 64→256, tap-major, add: 6×2 tiles",
        large(Conv { images: 3, up2: true, tap_major: true, add: true, ..conv(16, 16, 64, 256) }),
    ),
    ("128×128 tile, first conv 4→136 (element-wise A), 9×15", large(conv(9, 15, 4, 136))),
    (
        "128×128 tile, misaligned input (element-wise A), 11×12, 16→129 (odd cout: single columns), tap-major",
        large(Conv { misalign: true, tap_major: true, ..conv(11, 12, 16, 129) }),
    ),
    (
        "128×128 tile, last conv 40→3, 13×11, f32 out, no bias",
        large(Conv { f32_out: true, bias: false, ..conv(13, 11, 40, 3) }),
    ),
    // The Hopper kernel (kernels/conv_sm90.cu: tap-major weights, cin % 64 == 0), which the
    // emulated device (an sm_90 GPU) runs wherever it can. 3 emulated multiprocessors: a
    // persistent block walks several tiles, its 4-stage ring wrapping within and across them.
    (
        "Hopper, 3 images 10×13 (390 pixels: 4×2 tiles), 128→150, tap-major, add, f32 out",
        Conv { images: 3, tap_major: true, add: true, f32_out: true, tile: ConvTile::Sm90, ..conv(10, 13, 128, 150) },
    ),
    (
        "Hopper, up2 9×7→18×14, 64→129 (odd cout: single columns), tap-major, no bias",
        Conv { up2: true, tap_major: true, bias: false, tile: ConvTile::Sm90, ..conv(18, 14, 64, 129) },
    ),
    // The launcher's own choice of the 128×128 tile: ⌈M/128⌉·⌈cout/128⌉ = 128·1 tiles.
    (
        "auto: 128×128 tile chosen, 128×128 image, 8→72, tap-major, add",
        Conv { tap_major: true, add: true, ..conv(128, 128, 8, 72) },
    ),
];

impl Conv {
    fn pixels(&self) -> usize {
        self.images * self.h * self.w
    }
    fn src_side(&self) -> (usize, usize) {
        if self.up2 {
            (self.h / 2, self.w / 2)
        } else {
            (self.h, self.w)
        }
    }
    fn src_len(&self) -> usize {
        let (sh, sw) = self.src_side();
        self.images * sh * sw * self.cin
    }
}

/// Exact value and S = Σ|terms| of every output element, from the PyTorch-layout weight.
fn conv_reference(c: &Conv, input: &[f16], w: &[f16], bias: &[f16], add: &[f16]) -> (Vec<f64>, Vec<f64>) {
    let (x, wf) = (f64s(input), f64s(w));
    let (sh, sw) = c.src_side();
    let mut v = vec![0.0; c.pixels() * c.cout];
    let mut s = vec![0.0; c.pixels() * c.cout];
    for img in 0..c.images {
        for y in 0..c.h {
            for xx in 0..c.w {
                let p = (img * c.h + y) * c.w + xx;
                for co in 0..c.cout {
                    let (mut sum, mut abs) = (0.0, 0.0);
                    if c.bias {
                        sum += bias[co].to_f64();
                        abs += bias[co].to_f64().abs();
                    }
                    if c.add {
                        sum += add[p * c.cout + co].to_f64();
                        abs += add[p * c.cout + co].to_f64().abs();
                    }
                    for t in 0..9 {
                        let (yy, xq) = (y as isize + t as isize / 3 - 1, xx as isize + t as isize % 3 - 1);
                        if yy < 0 || xq < 0 || yy >= c.h as isize || xq >= c.w as isize {
                            continue;
                        }
                        let (yy, xq) = (yy as usize, xq as usize);
                        let sp = if c.up2 { (yy / 2) * sw + xq / 2 } else { yy * sw + xq };
                        let src = (img * sh * sw + sp) * c.cin;
                        for ci in 0..c.cin {
                            let term = x[src + ci] * wf[(co * c.cin + ci) * 9 + t];
                            sum += term;
                            abs += term.abs();
                        }
                    }
                    v[p * c.cout + co] = sum;
                    s[p * c.cout + co] = abs;
                }
            }
        }
    }
    (v, s)
}

/// (cout, cin, 3, 3) → (cout, 3, 3, cin).
fn tap_major(w: &[f16], cout: usize, cin: usize) -> Vec<f16> {
    let mut out = vec![f16::ZERO; w.len()];
    for co in 0..cout {
        for ci in 0..cin {
            for t in 0..9 {
                out[(co * 9 + t) * cin + ci] = w[(co * cin + ci) * 9 + t];
            }
        }
    }
    out
}

fn check_conv<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for (ci, &(name, c)) in CONVS.iter().enumerate() {
        for ints in [true, false] {
            let (n_out, n_w) = (c.pixels() * c.cout, c.cout * 9 * c.cin);
            let mut plan = Plan::new("conv3x3 test");
            let bi = add(&mut plan, "input", c.src_len() + 1, Dt::F16);
            let bw = add(&mut plan, "weight", n_w, Dt::F16);
            let bb = add(&mut plan, "bias", c.cout, Dt::F16);
            let ba = add(&mut plan, "add", n_out, Dt::F16);
            let bo = add(&mut plan, "out", n_out, if c.f32_out { Dt::F32 } else { Dt::F16 });
            let Some(dev) = open(&plan) else { return };
            if c.tile == ConvTile::Sm90 && !dev.gemm_sm90() {
                println!("conv3x3 {name}: not run on {}: the Hopper kernel needs an sm_90 GPU", dev.name());
                continue;
            }
            let mut rng = Rng::new(1000 + 2 * ci as u64 + ints as u64);
            type Gen = fn(&mut Rng, usize) -> Vec<f16>;
            let (gen, gen4): (Gen, Gen) = if ints {
                (|r, n| r.ints(n, 2), |r, n| r.ints(n, 4))
            } else {
                (|r, n| r.f16s(n, 1.0), |r, n| r.f16s(n, 1.0))
            };
            let input_all = gen(&mut rng, c.src_len() + 1);
            let w = gen(&mut rng, n_w);
            let (bias, addv) = (gen4(&mut rng, c.cout), gen4(&mut rng, n_out));
            let off = c.misalign as usize;
            let input = &input_all[off..off + c.src_len()];
            let d_in = put(&dev, &plan, bi, &input_all).sub(off, c.src_len()).unwrap();
            let w_dev = if c.tap_major { tap_major(&w, c.cout, c.cin) } else { w.clone() };
            let d_w = put(&dev, &plan, bw, &w_dev);
            let d_b = put(&dev, &plan, bb, &bias);
            let d_a = put(&dev, &plan, ba, &addv);
            let out = if c.f32_out { GemmOut::F32(out(&dev, &plan, bo)) } else { GemmOut::F16(out(&dev, &plan, bo)) };
            let spec = Conv3Spec {
                layout: if c.tap_major { ConvWeights::TapMajor } else { ConvWeights::Torch },
                bias: c.bias.then_some(d_b),
                add: c.add.then_some(d_a),
                images: c.images as i32,
                up2: c.up2,
                tile: c.tile,
                ..Conv3Spec::new(out, d_in, d_w, c.h as i32, c.w as i32, c.cin as i32, c.cout as i32)
            };
            launch::conv3x3_f16(&dev, &spec).unwrap_or_else(|e| panic!("{name}: {e}"));
            let got: Vec<f32> = if c.f32_out {
                get::<f32, _>(&dev, &plan, bo)
            } else {
                get::<f16, _>(&dev, &plan, bo).iter().map(|h| h.to_f32()).collect()
            };
            let (exact, s) = conv_reference(&c, input, &w, &bias, &addv);
            let what = format!("conv3x3 {name} ({}, {})", if ints { "integers" } else { "uniform" }, dev.name());
            if ints {
                assert_nontrivial(&what, &exact);
                let bad: Vec<usize> = (0..n_out)
                    .filter(|&i| {
                        let e = if c.f32_out { exact[i] as f32 } else { f16_rne(exact[i]).to_f32() };
                        got[i].to_bits() != e.to_bits()
                    })
                    .collect();
                for &i in bad.iter().take(8) {
                    eprintln!("  [{i}] got {} exact {}", got[i], exact[i]);
                }
                assert!(bad.is_empty(), "{what}: {} of {n_out} elements differ", bad.len());
                println!("{what}: bit-exact");
            } else {
                let k = 9.0 * c.cin as f64;
                assert_within(&what, &got, &exact, |i| {
                    let acc = 2.0 * (k + 3.0) * U32 * s[i];
                    if c.f32_out {
                        acc + 1e-30
                    } else {
                        acc + U16 * exact[i].abs() + F16_TINY
                    }
                });
            }
        }
    }
}

#[test]
fn conv3x3_emulated() {
    check_conv(emu);
}

/// The launcher's tile rule (src/gpu/launch/vae.rs) at the SD-VAE decoder's shapes, and that
/// the last case of CONVS really exercises its 128×128 choice.
#[test]
fn conv3x3_tile_rule() {
    let small = |px: i64, cout: i32| ConvTile::Auto.choose(px, cout) == ConvTile::Small;
    assert!(small(32 * 32, 512), "32×32 latent, one image: 32 large tiles");
    assert!(!small(64 * 64, 512), "64×64, 512 channels: 128 large tiles");
    assert!(!small(256 * 256, 128), "256×256, 128 channels: 512 large tiles");
    assert!(small(256 * 256, 3), "the final conv to RGB: cout ≤ 64");
    assert!(!small(16 * 32 * 32, 512), "32×32 latents, 16 images: 512 large tiles");
    assert_eq!(ConvTile::Large.choose(1, 1), ConvTile::Large);
    assert_eq!(ConvTile::Small.choose(1 << 20, 512), ConvTile::Small);
    let (_, last) = CONVS[CONVS.len() - 1];
    assert_eq!(ConvTile::Auto.choose(last.pixels() as i64, last.cout as i32), ConvTile::Large);
    // Which convolutions the Hopper kernel takes (on the emulated sm_90 device): the decoder's
    // 3×3 convolutions but conv_in (cin = 4), tap-major.
    let mut plan = Plan::new("hopper rule");
    let b = add(&mut plan, "buf", 1 << 16, Dt::F16);
    let dev = emu(&plan).unwrap();
    let s = out::<f16, _>(&dev, &plan, b);
    let spec = |cin: i32, layout: ConvWeights, off: usize| Conv3Spec {
        layout,
        ..Conv3Spec::new(GemmOut::F16(s.sub(0, 8).unwrap()), s.sub(off, 8).unwrap(), s.sub(0, 8).unwrap(), 1, 1, cin, 1)
    };
    for cin in [128, 256, 512] {
        assert_eq!(launch::conv_sm90_unsupported(&dev, &spec(cin, ConvWeights::TapMajor, 0)), None, "cin {cin}");
    }
    assert!(launch::conv_sm90_unsupported(&dev, &spec(4, ConvWeights::TapMajor, 0)).is_some(), "conv_in");
    assert!(launch::conv_sm90_unsupported(&dev, &spec(128, ConvWeights::Torch, 0)).is_some(), "PyTorch layout");
    assert!(launch::conv_sm90_unsupported(&dev, &spec(128, ConvWeights::TapMajor, 4)).is_some(), "8-byte input");
}

// ---- 1×1 convolution = gemm_fused_f16_64x64_k64 over pixels ------------------------------------------------

/// A resnet shortcut 1×1 conv (cin ≠ cout) with the residual as `add`: integer data, exact.
fn check_conv1x1<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    let (px, cin, cout) = (7 * 9, 24, 40);
    let mut plan = Plan::new("conv1x1 test");
    let (bx, bw, bb, ba, bo) = (
        add(&mut plan, "x", px * cin, Dt::F16),
        add(&mut plan, "w", cout * cin, Dt::F16),
        add(&mut plan, "bias", cout, Dt::F16),
        add(&mut plan, "residual", px * cout, Dt::F16),
        add(&mut plan, "out", px * cout, Dt::F16),
    );
    let Some(dev) = open(&plan) else { return };
    let mut rng = Rng::new(77);
    let (x, w, b, r) = (rng.ints(px * cin, 2), rng.ints(cout * cin, 2), rng.ints(cout, 4), rng.ints(px * cout, 4));
    let (dx, dw, db, dr) =
        (put(&dev, &plan, bx, &x), put(&dev, &plan, bw, &w), put(&dev, &plan, bb, &b), put(&dev, &plan, ba, &r));
    let spec = GemmSpec {
        bias: Some(db),
        add: Some((dr, cout as i32, px as i32)),
        ..GemmSpec::new(GemmOut::F16(out(&dev, &plan, bo)), dx, dw, px as i32, cout as i32, cin as i32)
    };
    launch::gemm(&dev, &spec).unwrap();
    let got: Vec<f16> = get(&dev, &plan, bo);
    let exact: Vec<f64> = (0..px * cout)
        .map(|i| {
            let (p, co) = (i / cout, i % cout);
            b[co].to_f64()
                + r[i].to_f64()
                + (0..cin).map(|ci| x[p * cin + ci].to_f64() * w[co * cin + ci].to_f64()).sum::<f64>()
        })
        .collect();
    let what = format!("1×1 conv {px} px {cin}→{cout} + shortcut add via gemm_fused_f16_64x64_k64 ({})", dev.name());
    assert_nontrivial(&what, &exact);
    assert_bits_eq(&what, &got, &exact.iter().map(|&e| f16_rne(e)).collect::<Vec<_>>());
}

#[test]
fn conv1x1_via_gemm_emulated() {
    check_conv1x1(emu);
}

// ---- GroupNorm + SiLU --------------------------------------------------------------------------

/// (images, pixels, channels, groups, silu)
const GNS: &[(usize, usize, usize, usize, bool)] = &[
    (1, 25, 64, 32, true),
    (2, 300, 96, 32, false),
    (1, 1024, 128, 32, true),
    (1, 9, 512, 32, true),
    // Chunks with a partial last one (2 images × 41 chunks of 50 pixels, the last of 49), 4
    // channels per group; then 256 chunks' worth for one image capped at 128 chunks of 61.
    (2, 2049, 128, 32, false),
    (1, 7808, 64, 16, true),
];

/// Every case runs both forms (kernels/vae.cu): `group_norm_silu_f16` (one block per group and
/// image) and, with a statistics workspace, the two-kernel form over chunks of pixels where the
/// channels allow (a multiple of 8 dividing 2048: all but 96 here). The chunked form sums at
/// most as many terms per partial (⌈chunk·C/8/256⌉ per thread, 2048/groups per group, and a
/// chunk combine whose every term is ≥ 0) as the bound below allows.
/// Bound of one output, with z = (x − mean)·rstd exact, m = mean|x − mean|·rstd ≤ 1 + …, n the
/// group's elements and T = 256 threads: each thread sums ⌈n/T⌉ values in f32 and the block
/// sums 256 partials (8 warps × 5 shuffle levels + 8), so the mean and the variance carry a
/// relative error ≤ (⌈n/T⌉ + 16)·u32 of Σ|x| and Σd² respectively. Then
///   |δz| ≤ E·(mean|x|·rstd + |z|) + 4·u32·|z|        (E = 2·(⌈n/T⌉ + 16)·u32, doubled)
///   |δy| ≤ |gamma|·|δz| + 4·u32·(|y| + |beta|)        (the affine's roundings)
/// SiLU multiplies by ≤ 1.1 and adds ≤ 8·u32·|out| (expf, the add, the division); the f16
/// output adds U16·|out| + 2^-25.
fn check_group_norm<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for (gi, &(images, px, ch, groups, silu)) in GNS.iter().enumerate() {
        let n = images * px * ch;
        let mut plan = Plan::new("group norm test");
        let (bx, bg, bb, bo) = (
            add(&mut plan, "x", n, Dt::F16),
            add(&mut plan, "gamma", ch, Dt::F16),
            add(&mut plan, "beta", ch, Dt::F16),
            add(&mut plan, "out", n, Dt::F16),
        );
        let bs = add(&mut plan, "stats", launch::group_norm_stats_len(images, groups), Dt::F32);
        let Some(dev) = open(&plan) else { return };
        let mut rng = Rng::new(300 + gi as u64);
        // An offset of 3 with spread 2: the mean is not small against the deviations.
        let x: Vec<f16> = (0..n).map(|_| f16_rne(3.0 + 2.0 * rng.uniform())).collect();
        let gamma: Vec<f16> = (0..ch).map(|_| f16_rne(1.0 + 0.5 * rng.uniform())).collect();
        let beta = rng.f16s(ch, 0.5);
        let (dx, dg, db) = (put(&dev, &plan, bx, &x), put(&dev, &plan, bg, &gamma), put(&dev, &plan, bb, &beta));
        let dout = out(&dev, &plan, bo);
        let stats = out::<f32, _>(&dev, &plan, bs);
        let mut runs = Vec::new();
        for (form, st) in [("one block per group", None), ("chunked", Some(stats))] {
            dev.upload(dout, &vec![f16::from_f32(f32::NAN); n]).unwrap();
            launch::group_norm_silu_f16(
                &dev,
                dout,
                dx,
                dg,
                db,
                images as i32,
                px as i32,
                ch as i32,
                groups as i32,
                1e-6,
                silu,
                st,
            )
            .unwrap();
            runs.push((form, get::<f16, _>(&dev, &plan, bo).iter().map(|h| h.to_f32()).collect::<Vec<f32>>()));
        }
        let cpg = ch / groups;
        let cnt = px * cpg;
        let e = 2.0 * (cnt.div_ceil(256) as f64 + 16.0) * U32;
        let mut exact = vec![0.0; n];
        let mut bound = vec![0.0; n];
        for img in 0..images {
            for g in 0..groups {
                let idx = |e: usize| (img * px + e / cpg) * ch + g * cpg + e % cpg;
                let mean = (0..cnt).map(|e| x[idx(e)].to_f64()).sum::<f64>() / cnt as f64;
                let var = (0..cnt).map(|e| (x[idx(e)].to_f64() - mean).powi(2)).sum::<f64>() / cnt as f64;
                let rstd = 1.0 / (var + 1e-6).sqrt();
                let mabs = (0..cnt).map(|e| x[idx(e)].to_f64().abs()).sum::<f64>() / cnt as f64;
                for el in 0..cnt {
                    let (i, c) = (idx(el), g * cpg + el % cpg);
                    let z = (x[i].to_f64() - mean) * rstd;
                    let (ga, be) = (gamma[c].to_f64(), beta[c].to_f64());
                    let y = z * ga + be;
                    let dz = e * (mabs * rstd + z.abs()) + 4.0 * U32 * z.abs();
                    let mut dy = ga.abs() * dz + 4.0 * U32 * (y.abs() + be.abs());
                    let o = if silu {
                        let o = y / (1.0 + (-y).exp());
                        dy = 1.1 * dy + 8.0 * U32 * o.abs();
                        o
                    } else {
                        y
                    };
                    exact[i] = o;
                    bound[i] = dy + U16 * o.abs() + F16_TINY;
                }
            }
        }
        for (form, got) in &runs {
            let what = format!(
                "group_norm_silu_f16 {form}, {images}×{px} px, C={ch}, {groups} groups, silu={silu} ({})",
                dev.name()
            );
            assert_within(&what, got, &exact, |i| bound[i]);
        }
    }
}

#[test]
fn group_norm_silu_emulated() {
    check_group_norm(emu);
}

// ---- softmax, transpose, attention ---------------------------------------------------------------

/// Bound of p = softmax(scale·x) in f32: the argument scale·x − max carries at most
/// 2·u32·|scale·x| + u32·|max| (two roundings), expf 2 ulp, the sum of `cols` terms ≤ cols·u32 relative, the
/// reciprocal and product one each: |δp| ≤ p·(2·A + cols + 8)·u32 with A = |scale·x| + |max|,
/// doubled; then the f16 rounding U16·p + 2^-25.
fn check_softmax<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for &(rows, cols, scale, spread) in &[(5usize, 37usize, 1.0f32, 4.0), (48, 300, 1.0 / 512f32.sqrt(), 60.0)] {
        let n = rows * cols;
        let mut plan = Plan::new("softmax test");
        let (bx, bo) = (add(&mut plan, "x", n, Dt::F16), add(&mut plan, "out", n, Dt::F16));
        let Some(dev) = open(&plan) else { return };
        let mut rng = Rng::new(cols as u64);
        let x = rng.f16s(n, spread);
        let dx = put(&dev, &plan, bx, &x);
        launch::softmax_rows_f16(&dev, out(&dev, &plan, bo), dx, rows as i32, cols as i32, scale).unwrap();
        let got: Vec<f32> = get::<f16, _>(&dev, &plan, bo).iter().map(|h| h.to_f32()).collect();
        let (mut exact, mut bound) = (vec![0.0; n], vec![0.0; n]);
        for r in 0..rows {
            let row: Vec<f64> = (0..cols).map(|c| scale as f64 * x[r * cols + c].to_f64()).collect();
            let m = row.iter().copied().fold(f64::MIN, f64::max);
            let sum: f64 = row.iter().map(|v| (v - m).exp()).sum();
            for c in 0..cols {
                let p = (row[c] - m).exp() / sum;
                exact[r * cols + c] = p;
                let a = row[c].abs() + m.abs();
                bound[r * cols + c] = 2.0 * p * (2.0 * a + cols as f64 + 8.0) * U32 + U16 * p + F16_TINY;
            }
        }
        let what = format!("softmax_rows_f16 {rows}×{cols} scale {scale} ({})", dev.name());
        assert_within(&what, &got, &exact, |i| bound[i]);
    }
}

#[test]
fn softmax_rows_emulated() {
    check_softmax(emu);
}

fn check_transpose<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for &(rows, cols) in &[(5usize, 7usize), (70, 45), (32, 64)] {
        let mut plan = Plan::new("transpose test");
        let (bi, bo) = (add(&mut plan, "in", rows * cols, Dt::F16), add(&mut plan, "out", rows * cols, Dt::F16));
        let Some(dev) = open(&plan) else { return };
        let x = Rng::new(rows as u64).f16s(rows * cols, 10.0);
        let di = put(&dev, &plan, bi, &x);
        launch::transpose_f16(&dev, out(&dev, &plan, bo), di, rows as i32, cols as i32).unwrap();
        let got: Vec<f16> = get(&dev, &plan, bo);
        let expected: Vec<f16> = (0..rows * cols).map(|i| x[(i % rows) * cols + i / rows]).collect();
        assert_bits_eq(&format!("transpose_f16 {rows}×{cols} ({})", dev.name()), &got, &expected);
    }
}

#[test]
fn transpose_emulated() {
    check_transpose(emu);
}

/// The mid-block attention as the decoder composes it: S = q·kᵀ (gemm, f16), P = softmax(S/√C),
/// Vᵀ = transpose(v), out = P·V + x (gemm with the residual as add), against f64 attention on
/// the same q, k, v. Bound: S is rounded to f16 (relative U16, i.e. an absolute error
/// U16·|S|/√C in the logits), P to f16 (U16·p each) and P·V accumulates in f32, so
/// |δout| ≤ Σ_j p_j·|v_j|·(2·U16·(|S_j| + max|S|)/√C + 2·U16) + (n + 4)·2·u32·Σ|p·v| + U16·|out|
/// + 2^-25, with a factor 2 of slack for first-order terms.
fn check_attention<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    let (n, c) = (40usize, 32usize);
    let mut plan = Plan::new("attention test");
    let bq = add(&mut plan, "q", n * c, Dt::F16);
    let bk = add(&mut plan, "k", n * c, Dt::F16);
    let bv = add(&mut plan, "v", n * c, Dt::F16);
    let bx = add(&mut plan, "x", n * c, Dt::F16);
    let bs = add(&mut plan, "s", n * n, Dt::F16);
    let bp = add(&mut plan, "p", n * n, Dt::F16);
    let bvt = add(&mut plan, "vt", n * c, Dt::F16);
    let bo = add(&mut plan, "out", n * c, Dt::F16);
    let Some(dev) = open(&plan) else { return };
    let mut rng = Rng::new(9);
    let (q, k, v, x) = (rng.f16s(n * c, 2.0), rng.f16s(n * c, 2.0), rng.f16s(n * c, 1.0), rng.f16s(n * c, 1.0));
    let (dq, dk, dv, dx) =
        (put(&dev, &plan, bq, &q), put(&dev, &plan, bk, &k), put(&dev, &plan, bv, &v), put(&dev, &plan, bx, &x));
    let (ds, dp, dvt) = (out(&dev, &plan, bs), out(&dev, &plan, bp), out(&dev, &plan, bvt));
    let (ni, ci) = (n as i32, c as i32);
    launch::gemm(&dev, &GemmSpec::new(GemmOut::F16(ds), dq, dk, ni, ni, ci)).unwrap();
    launch::softmax_rows_f16(&dev, dp, ds, ni, ni, 1.0 / (c as f32).sqrt()).unwrap();
    launch::transpose_f16(&dev, dvt, dv, ni, ci).unwrap();
    let spec =
        GemmSpec { add: Some((dx, ci, ni)), ..GemmSpec::new(GemmOut::F16(out(&dev, &plan, bo)), dp, dvt, ni, ci, ni) };
    launch::gemm(&dev, &spec).unwrap();
    let got: Vec<f32> = get::<f16, _>(&dev, &plan, bo).iter().map(|h| h.to_f32()).collect();
    let (mut exact, mut bound) = (vec![0.0; n * c], vec![0.0; n * c]);
    let inv = 1.0 / (c as f64).sqrt();
    for i in 0..n {
        let s: Vec<f64> =
            (0..n).map(|j| (0..c).map(|d| q[i * c + d].to_f64() * k[j * c + d].to_f64()).sum::<f64>()).collect();
        let smax = s.iter().map(|v| v.abs()).fold(0.0, f64::max);
        let m = s.iter().copied().fold(f64::MIN, f64::max);
        let z: f64 = s.iter().map(|v| ((v - m) * inv).exp()).sum();
        let p: Vec<f64> = s.iter().map(|v| ((v - m) * inv).exp() / z).collect();
        for d in 0..c {
            let (mut o, mut b, mut abs) = (x[i * c + d].to_f64(), 0.0, x[i * c + d].to_f64().abs());
            for j in 0..n {
                let pv = p[j] * v[j * c + d].to_f64();
                o += pv;
                abs += pv.abs();
                b += pv.abs() * (2.0 * U16 * (s[j].abs() + smax) * inv + 2.0 * U16);
            }
            exact[i * c + d] = o;
            bound[i * c + d] = 2.0 * (b + (n as f64 + 4.0) * 2.0 * U32 * abs) + U16 * o.abs() + F16_TINY;
        }
    }
    assert_within(&format!("mid attention {n} tokens × {c} channels ({})", dev.name()), &got, &exact, |i| bound[i]);
}

#[test]
fn attention_composed_emulated() {
    check_attention(emu);
}

// ---- launcher rejections ------------------------------------------------------------------------

/// The Hopper kernels' first-use check (src/gpu/launch/gemm.rs `check_sm90`: GEMMs with every
/// epilogue and 3×3 convolutions against the fallback kernels) passes on the emulated sm_90
/// device and leaves the Hopper path on.
#[test]
fn hopper_first_use_check_passes_emulated() {
    let mut plan = Plan::new("first-use check");
    let b = add(&mut plan, "scratch", launch::SM90_CHECK_ELEMS, Dt::F32);
    let dev = emu(&plan).unwrap();
    assert!(dev.gemm_sm90(), "the emulated device models an sm_90 GPU");
    let ok = launch::check_sm90(&dev, out::<f32, _>(&dev, &plan, b)).unwrap();
    assert!(ok && dev.gemm_sm90(), "the Hopper kernels disagree with the fallback kernels");
}

#[test]
fn vae_launchers_reject_bad_arguments() {
    let mut plan = Plan::new("rejections");
    let b = add(&mut plan, "buf", 4096, Dt::F16);
    let bf = add(&mut plan, "stats", 8, Dt::F32);
    let dev = emu(&plan).unwrap();
    let s = out::<f16, _>(&dev, &plan, b);
    let small = s.sub(0, 100).unwrap();
    let odd = s.sub(1, 200).unwrap();
    let base = Conv3Spec::new(
        GemmOut::F16(s.sub(0, 1000).unwrap()),
        s.sub(1000, 1000).unwrap(),
        s.sub(2000, 2000).unwrap(),
        5,
        5,
        8,
        8,
    );
    let bad_convs = [
        ("odd size with up2", Conv3Spec { up2: true, ..base }),
        ("zero cin", Conv3Spec { cin: 0, ..base }),
        ("input too short", Conv3Spec { input: small, ..base }),
        ("weight too short", Conv3Spec { cout: 40, out: GemmOut::F16(s.sub(0, 1000).unwrap()), ..base }),
        ("bias too short", Conv3Spec { bias: Some(s.sub(0, 4).unwrap()), ..base }),
        ("add too short", Conv3Spec { add: Some(small), ..base }),
        ("more than 65535 row tiles", Conv3Spec { images: 200_000, ..base }),
        ("Hopper kernel, PyTorch weights", Conv3Spec { tile: ConvTile::Sm90, ..base }),
        ("Hopper kernel, cin = 8", Conv3Spec { tile: ConvTile::Sm90, layout: ConvWeights::TapMajor, ..base }),
    ];
    launch::conv3x3_f16(&dev, &base).expect("the base spec is valid");
    for (what, spec) in bad_convs {
        assert!(launch::conv3x3_f16(&dev, &spec).is_err(), "conv3x3: {what} accepted");
    }
    let (g, bt) = (s.sub(0, 64).unwrap(), s.sub(64, 64).unwrap());
    let tiny_stats = out::<f32, _>(&dev, &plan, bf);
    let gn = |x: DevSlice<f16>, images: i32, ch: i32, eps: f32, stats: Option<DevSlice<f32>>| {
        launch::group_norm_silu_f16(&dev, s.sub(2048, 640).unwrap(), x, g, bt, images, 10, ch, 32, eps, true, stats)
    };
    let x = s.sub(128, 640).unwrap();
    assert!(gn(x, 1, 64, 1e-6, None).is_ok());
    assert!(gn(x, 1, 60, 1e-6, None).is_err(), "channels not split into groups");
    assert!(gn(x, 2, 64, 1e-6, None).is_err(), "x too short");
    assert!(gn(odd, 1, 64, 1e-6, None).is_err(), "x too short (200 elements)");
    assert!(gn(x, 1, 64, -1.0, None).is_err(), "negative eps");
    assert!(gn(x, 1, 64, 1e-6, Some(tiny_stats)).is_err(), "statistics workspace too short");
    assert!(launch::softmax_rows_f16(&dev, small, s.sub(200, 100).unwrap(), 10, 11, 1.0).is_err(), "softmax too short");
    assert!(
        launch::softmax_rows_f16(&dev, small, s.sub(200, 100).unwrap(), 10, 10, f32::NAN).is_err(),
        "softmax NaN scale"
    );
    assert!(launch::transpose_f16(&dev, small, s.sub(200, 100).unwrap(), 0, 10).is_err(), "transpose zero rows");
}

// ---- on a GPU ----------------------------------------------------------------------------------

#[cfg(feature = "cuda")]
#[test]
fn vae_kernels_cuda() {
    const TEST: &str = "vae_kernels_cuda";
    if !cuda_present(TEST) {
        return; // said once, not once per check
    }
    check_conv(cuda(TEST));
    check_conv1x1(cuda(TEST));
    check_group_norm(cuda(TEST));
    check_softmax(cuda(TEST));
    check_transpose(cuda(TEST));
    check_attention(cuda(TEST));
}
