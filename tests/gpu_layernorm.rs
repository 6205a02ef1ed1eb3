//! kernels/layernorm.cu (layernorm_modulate_f16 and _f32_stream, residual_layernorm_modulate_f32_stream:
//! the block reduction) against an f64 reference of LayerNorm (no affine) followed by adaLN
//! modulation, at row widths below, at and above one pass of the 256-thread block (512
//! values), with batch items sharing modulation rows.
//!
//! Error bound of one output element y = x̂·(1 + scale) + shift, x̂ = (x − mean)·rstd, from
//! the kernel's f32 arithmetic (u = 2^-24): every value passes through at most
//! d = 2⌈C/512⌉ + 13 additions in block_sum (per-thread sums, 5 shuffle levels, 8 warps), so
//!   |Δmean| ≤ (d + 1)·u·mean|x|,  |Δrstd|/rstd ≤ ((d + 3)/2 + 4)·u  (rsqrtf: 2 ulp),
//!   |Δx̂| ≤ |Δmean|·rstd + |x̂|·(|Δrstd|/rstd + 2u),
//!   |Δy| ≤ |1 + scale|·|Δx̂| + 3u·(|x̂·(1 + scale)| + |shift|),
//! doubled for second-order terms; then one rounding to f16: U16·|y| (+ 2^-25 near zero).
//! In ulps: the mean is off by at most d + 1 ulps of mean|x|, where d counts the serial part
//! of the reduction (2⌈C/512⌉ terms per thread, growing with the row length C) and its 13
//! tree levels; rstd by about half as many ulps plus rsqrtf's 2. The final rounding to f16
//! (2^13 f32 ulps) dominates the bound at DiT widths.
//!
//! The `_f32_stream` kernels the GPU pipeline uses read x in f32 (its residual stream) instead of
//! f16. The conversion of an f16 x was exact, so from the first addition on the arithmetic is
//! the same and so is the bound; x now carries 24 significant bits, so the data exercises
//! values no f16 holds. `residual_layernorm_modulate_f32_stream` first updates x ← x + gate·y in f32
//! and normalises that: its x is checked to the bit against the exact sum rounded once (a
//! product of two f16 values is exact in f32; see tests/gpu_residual.rs), its output with the
//! bound above applied to the new x.

mod gpu_common;

use gpu_common::*;
use icdit::gpu::{f16, launch, Device};
use icdit::plan::{Dt, Plan};

struct Case {
    rows: usize,
    tokens: usize,
    channels: usize,
    mod_stride: usize,
    /// Added to every x: a large offset makes the variance a small difference of large values.
    offset: f64,
}

const CASES: &[Case] = &[
    // DiT-XL/2 width, shift and scale as chunks 0 and 1 of a 6C modulation row.
    Case { rows: 6, tokens: 3, channels: 1152, mod_stride: 6 * 1152, offset: 0.5 },
    Case { rows: 5, tokens: 5, channels: 72, mod_stride: 144, offset: 0.0 }, // most threads idle
    Case { rows: 3, tokens: 1, channels: 514, mod_stride: 514, offset: -3.0 }, // 257 pairs: one thread does two
    Case { rows: 8, tokens: 4, channels: 1000, mod_stride: 2004, offset: 40.0 },
];

const EPS: f32 = 1e-6;

/// The f64 reference of every output element of case `c` for the x values the kernel reads
/// (`x`, rows × C, exact in f64) and modulation `m`, and each element's error bound (module
/// header).
fn reference(c: &Case, x: &[f64], m: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (rows, ch) = (c.rows, c.channels);
    let d = 2.0 * (ch as f64 / 512.0).ceil() + 13.0;
    let mut exact = vec![0.0; rows * ch];
    let mut bound = vec![0.0; rows * ch];
    for r in 0..rows {
        let row = &x[r * ch..(r + 1) * ch];
        let mean = row.iter().sum::<f64>() / ch as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / ch as f64;
        let rstd = 1.0 / (var + EPS as f64).sqrt();
        let mean_abs = row.iter().map(|v| v.abs()).sum::<f64>() / ch as f64;
        let base = (r / c.tokens) * c.mod_stride;
        for j in 0..ch {
            let (sh, sc) = (m[base + j], m[base + ch + j]);
            let xh = (row[j] - mean) * rstd;
            let y = xh * (1.0 + sc) + sh;
            let dxh = (d + 1.0) * U32 * mean_abs * rstd + xh.abs() * (((d + 3.0) / 2.0 + 4.0) * U32 + 2.0 * U32);
            let dy = 2.0 * ((1.0 + sc).abs() * dxh + 3.0 * U32 * ((xh * (1.0 + sc)).abs() + sh.abs()));
            exact[r * ch + j] = y;
            bound[r * ch + j] = U16 * (y.abs() + dy) + F16_TINY + dy;
        }
    }
    (exact, bound)
}

fn check<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for (ci, c) in CASES.iter().enumerate() {
        let (rows, ch) = (c.rows, c.channels);
        let items = rows.div_ceil(c.tokens);
        let mod_len = (items - 1) * c.mod_stride + 2 * ch; // shift at 0, scale at +ch
        let mut plan = Plan::new("layernorm test");
        let (bx, bm, bo) = (
            add(&mut plan, "x", rows * ch, Dt::F16),
            add(&mut plan, "modulation", mod_len, Dt::F16),
            add(&mut plan, "out", rows * ch, Dt::F16),
        );
        let Some(dev) = open(&plan) else { return };
        let mut rng = Rng::new(100 + ci as u64);
        let x: Vec<f16> = (0..rows * ch).map(|_| f16_rne(c.offset + 2.0 * rng.uniform())).collect();
        let modulation = rng.f16s(mod_len, 1.0);
        let (dx, dm, dout) =
            (put(&dev, &plan, bx, &x), put(&dev, &plan, bm, &modulation), out::<f16, _>(&dev, &plan, bo));
        let (shift, scale) = (dm.sub(0, mod_len).unwrap(), dm.sub(ch, mod_len - ch).unwrap());
        launch::layernorm_modulate_f16(
            &dev,
            dout,
            dx,
            shift,
            scale,
            rows as i32,
            c.tokens as i32,
            ch as i32,
            c.mod_stride as i32,
            EPS,
        )
        .unwrap();
        let got: Vec<f32> = get::<f16, _>(&dev, &plan, bo).iter().map(|h| h.to_f32()).collect();

        let (exact, bound) = reference(c, &f64s(&x), &f64s(&modulation));
        let what = format!(
            "layernorm_modulate_f16 rows={rows} tokens={} C={ch} offset={} ({})",
            c.tokens,
            c.offset,
            dev.name()
        );
        assert_within(&what, &got, &exact, |i| bound[i]);
    }
}

#[test]
fn layernorm_modulate_emulated() {
    check(emu);
}

#[cfg(feature = "cuda")]
#[test]
fn layernorm_modulate_cuda() {
    check(cuda("layernorm_modulate_cuda"));
}

/// `layernorm_modulate_f32_stream`: as `check`, with x in f32 (module header: the same bound).
fn check_f32_stream<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for (ci, c) in CASES.iter().enumerate() {
        let (rows, ch) = (c.rows, c.channels);
        let items = rows.div_ceil(c.tokens);
        let mod_len = (items - 1) * c.mod_stride + 2 * ch; // shift at 0, scale at +ch
        let mut plan = Plan::new("layernorm f32-stream test");
        let (bx, bm, bo) = (
            add(&mut plan, "x", rows * ch, Dt::F32),
            add(&mut plan, "modulation", mod_len, Dt::F16),
            add(&mut plan, "out", rows * ch, Dt::F16),
        );
        let Some(dev) = open(&plan) else { return };
        let mut rng = Rng::new(300 + ci as u64);
        let x: Vec<f32> = (0..rows * ch).map(|_| (c.offset + 2.0 * rng.uniform()) as f32).collect();
        let modulation = rng.f16s(mod_len, 1.0);
        let (dx, dm, dout) =
            (put(&dev, &plan, bx, &x), put(&dev, &plan, bm, &modulation), out::<f16, _>(&dev, &plan, bo));
        let (shift, scale) = (dm.sub(0, mod_len).unwrap(), dm.sub(ch, mod_len - ch).unwrap());
        let (r, t, chn, st) = (rows as i32, c.tokens as i32, ch as i32, c.mod_stride as i32);
        launch::layernorm_modulate_f32_stream(&dev, dout, dx, shift, scale, r, t, chn, st, EPS).unwrap();
        let got: Vec<f32> = get::<f16, _>(&dev, &plan, bo).iter().map(|h| h.to_f32()).collect();
        assert!(get::<f32, _>(&dev, &plan, bx) == x, "layernorm_modulate_f32_stream wrote into x");

        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let (exact, bound) = reference(c, &x64, &f64s(&modulation));
        let what = format!(
            "layernorm_modulate_f32_stream rows={rows} tokens={} C={ch} offset={} ({})",
            c.tokens,
            c.offset,
            dev.name()
        );
        assert_within(&what, &got, &exact, |i| bound[i]);
    }
}

#[test]
fn layernorm_modulate_f32_stream_emulated() {
    check_f32_stream(emu);
}

#[cfg(feature = "cuda")]
#[test]
fn layernorm_modulate_f32_stream_cuda() {
    check_f32_stream(cuda("layernorm_modulate_f32_stream_cuda"));
}

/// `residual_layernorm_modulate_f32_stream` against f64: the new x = x + gate·y must be the exact sum
/// rounded once to f32, bit for bit (one f32 addition of an exact product), and the output
/// LayerNorm(new x)·(1 + scale) + shift must be within the bound of the module header. Gate,
/// shift and scale are chunks 2, 0 and 1 of the modulation rows, as in a DiT block.
fn check_residual_f32_stream<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for (ci, c) in CASES.iter().enumerate() {
        let (rows, ch) = (c.rows, c.channels);
        let items = rows.div_ceil(c.tokens);
        let mod_len = (items - 1) * c.mod_stride + 3 * ch; // shift at 0, scale at +ch, gate at +2ch
        let mut plan = Plan::new("residual + layernorm f32-stream test");
        let (bx, by, bm, bo) = (
            add(&mut plan, "x", rows * ch, Dt::F32),
            add(&mut plan, "y", rows * ch, Dt::F16),
            add(&mut plan, "modulation", mod_len, Dt::F16),
            add(&mut plan, "out", rows * ch, Dt::F16),
        );
        let Some(dev) = open(&plan) else { return };
        let mut rng = Rng::new(400 + ci as u64);
        let x: Vec<f32> = (0..rows * ch).map(|_| (c.offset + 2.0 * rng.uniform()) as f32).collect();
        let y = rng.f16s(rows * ch, 1.0);
        let modulation = rng.f16s(mod_len, 1.0);
        let (dx, dy, dm) = (put(&dev, &plan, bx, &x), put(&dev, &plan, by, &y), put(&dev, &plan, bm, &modulation));
        let dout = out::<f16, _>(&dev, &plan, bo);
        let chunk = |k: usize| dm.sub(k * ch, mod_len - k * ch).unwrap();
        let (r, t, chn, st) = (rows as i32, c.tokens as i32, ch as i32, c.mod_stride as i32);
        launch::residual_layernorm_modulate_f32_stream(
            &dev,
            dout,
            dx,
            dy,
            chunk(2),
            st,
            chunk(0),
            chunk(1),
            r,
            t,
            chn,
            st,
            EPS,
        )
        .unwrap();
        let got_x: Vec<f32> = get(&dev, &plan, bx);
        let got: Vec<f32> = get::<f16, _>(&dev, &plan, bo).iter().map(|h| h.to_f32()).collect();

        let m = f64s(&modulation);
        let (sum, new_x): (Vec<f64>, Vec<f32>) = (0..rows * ch)
            .map(|i| {
                let g = m[(i / ch / c.tokens) * c.mod_stride + 2 * ch + i % ch];
                let (a, b) = (x[i] as f64, g * y[i].to_f64());
                (a + b, f32_sum_rne(a, b))
            })
            .unzip();
        let what =
            format!("residual_layernorm_modulate_f32_stream rows={rows} tokens={} C={ch} ({})", c.tokens, dev.name());
        assert!(new_x.iter().zip(&x).filter(|(a, b)| a != b).count() > rows * ch / 2, "{what}: x barely changes");
        assert_within(&format!("{what}, x"), &got_x, &sum, |i| (U32 * sum[i].abs()).max(f64::MIN_POSITIVE));
        let bad: Vec<usize> = (0..rows * ch).filter(|&i| got_x[i].to_bits() != new_x[i].to_bits()).collect();
        for &i in bad.iter().take(8) {
            eprintln!(
                "  x[{i}] got {:e} expected {:e} (x {:e}, gate·y {:e})",
                got_x[i],
                new_x[i],
                x[i],
                sum[i] - x[i] as f64
            );
        }
        assert!(bad.is_empty(), "{what}: {} of {} x values differ from x + gate·y rounded once", bad.len(), rows * ch);

        let (exact, bound) = reference(c, &new_x.iter().map(|&v| v as f64).collect::<Vec<_>>(), &m);
        assert_within(&format!("{what}, out"), &got, &exact, |i| bound[i]);
    }
}

#[test]
fn residual_layernorm_modulate_f32_stream_emulated() {
    check_residual_f32_stream(emu);
}

#[cfg(feature = "cuda")]
#[test]
fn residual_layernorm_modulate_f32_stream_cuda() {
    check_residual_f32_stream(cuda("residual_layernorm_modulate_f32_stream_cuda"));
}

/// `residual_layernorm_modulate_f32_stream` (the residual update fused into the LayerNorm after it)
/// against the two kernels it replaces, run one after the other on the same inputs: the new x
/// and the normalised output must agree. The fused kernel evaluates the same f32 expressions in
/// the same order, so they are expected bit for bit; a last-bit difference in x from the
/// compiler contracting `x + g·y` differently is tolerated (2^-22 relative, then at most one
/// f16 step in the output), and the count of identical values is printed.
fn fused_matches_separate<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for (ci, c) in CASES.iter().enumerate() {
        let (rows, ch) = (c.rows, c.channels);
        let items = rows.div_ceil(c.tokens);
        let mod_len = (items - 1) * c.mod_stride + 3 * ch; // shift at 0, scale at +ch, gate at +2ch
        let mut plan = Plan::new("fused residual + layernorm test");
        let ids = [
            add(&mut plan, "x (fused)", rows * ch, Dt::F32),
            add(&mut plan, "x (separate)", rows * ch, Dt::F32),
            add(&mut plan, "y", rows * ch, Dt::F16),
            add(&mut plan, "modulation", mod_len, Dt::F16),
            add(&mut plan, "out (fused)", rows * ch, Dt::F16),
            add(&mut plan, "out (separate)", rows * ch, Dt::F16),
        ];
        let Some(dev) = open(&plan) else { return };
        let mut rng = Rng::new(200 + ci as u64);
        let x: Vec<f32> = (0..rows * ch).map(|_| (c.offset + 2.0 * rng.uniform()) as f32).collect();
        let y = rng.f16s(rows * ch, 1.0);
        let modulation = rng.f16s(mod_len, 1.0);
        let (xf, xs) = (put(&dev, &plan, ids[0], &x), put(&dev, &plan, ids[1], &x));
        let (dy, dm) = (put(&dev, &plan, ids[2], &y), put(&dev, &plan, ids[3], &modulation));
        let (of, os) = (out::<f16, _>(&dev, &plan, ids[4]), out::<f16, _>(&dev, &plan, ids[5]));
        let chunk = |k: usize| dm.sub(k * ch, mod_len - k * ch).unwrap();
        let (r, t, chn, st) = (rows as i32, c.tokens as i32, ch as i32, c.mod_stride as i32);
        launch::residual_layernorm_modulate_f32_stream(
            &dev,
            of,
            xf,
            dy,
            chunk(2),
            st,
            chunk(0),
            chunk(1),
            r,
            t,
            chn,
            st,
            EPS,
        )
        .unwrap();
        launch::gated_residual_add_f32_stream(&dev, xs, dy, chunk(2), r, t, chn, st).unwrap();
        launch::layernorm_modulate_f32_stream(&dev, os, xs, chunk(0), chunk(1), r, t, chn, st, EPS).unwrap();

        let what = format!("residual + layernorm fused vs separate, rows={rows} C={ch} ({})", dev.name());
        let (gx_f, gx_s) = (get::<f32, _>(&dev, &plan, ids[0]), get::<f32, _>(&dev, &plan, ids[1]));
        let (go_f, go_s) = (get::<f16, _>(&dev, &plan, ids[4]), get::<f16, _>(&dev, &plan, ids[5]));
        assert!(gx_f.iter().zip(&x).any(|(a, b)| a != b), "{what}: x was not updated");
        let mut same = 0;
        for i in 0..rows * ch {
            let (a, b) = (gx_f[i], gx_s[i]);
            same += (a.to_bits() == b.to_bits()) as usize;
            assert!((a - b).abs() <= b.abs() * 2f32.powi(-22), "{what}: x[{i}] {a} vs {b}");
            let (p, q) = (go_f[i].to_f32(), go_s[i].to_f32());
            assert!((p - q).abs() <= q.abs() * 2f32.powi(-10) + 6e-8, "{what}: out[{i}] {p} vs {q}");
            same += (go_f[i].to_bits() == go_s[i].to_bits()) as usize;
        }
        println!("{what}: {same} of {} values bit-identical", 2 * rows * ch);
    }
}

#[test]
fn residual_layernorm_fused_emulated() {
    fused_matches_separate(emu);
}

#[cfg(feature = "cuda")]
#[test]
fn residual_layernorm_fused_cuda() {
    fused_matches_separate(cuda("residual_layernorm_fused_cuda"));
}
