//! kernels/layernorm.cu (layernorm_modulate_f16, the block reduction) against an f64
//! reference of LayerNorm (no affine) followed by adaLN modulation, at row widths below,
//! at and above one pass of the 256-thread block, with batch items sharing modulation rows.
//!
//! Error bound of one output element y = x̂·(1 + scale) + shift, x̂ = (x − mean)·rstd, from
//! the kernel's f32 arithmetic (u = 2^-24): every value passes through at most
//! d = 2⌈C/512⌉ + 13 additions in block_sum (per-thread sums, 5 shuffle levels, 8 warps), so
//!   |Δmean| ≤ (d + 1)·u·mean|x|,  |Δrstd|/rstd ≤ ((d + 3)/2 + 4)·u  (rsqrtf: 2 ulp),
//!   |Δx̂| ≤ |Δmean|·rstd + |x̂|·(|Δrstd|/rstd + 2u),
//!   |Δy| ≤ |1 + scale|·|Δx̂| + 3u·(|x̂·(1 + scale)| + |shift|),
//! doubled for second-order terms; then one rounding to f16: U16·|y| (+ 2^-25 near zero).

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

        let (x, m) = (f64s(&x), f64s(&modulation));
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
    check(cuda);
}
