//! kernels/residual.cu (gated_residual_add_f16) against the exact result rounded once to f16,
//! bit for bit: x + g·y is exact in f64 whenever it is finite in f16 (g·y has 22 significant
//! bits and f16's exponent range is narrow), and __hfma2 rounds once. The data mixes scales
//! from 1e-4 (subnormal products) to 300 (products that overflow to infinity).
//!
//! `gated_residual_add_f32_stream` (x in f32: the GPU pipeline's residual stream) is defined to the
//! bit as well: g·y, a product of two f16 values, has at most 22 significant bits and lies
//! between 2^-48 and 2^32, so it is exact in f32, and what remains is one f32 addition, one
//! rounding to nearest (error ≤ u·|x + g·y|, u = 2^-24), whether or not nvcc fuses the multiply
//! into the add. The reference is the exact x + g·y rounded once to f32 (`f32_sum_rne`); the
//! measured error against the sum in f64 is printed as a fraction of that half ulp. x mixes
//! the same scales in f32 (no f32 subnormal can arise: every operand is a multiple of 2^-89).

mod gpu_common;

use gpu_common::*;
use icdit::gpu::{f16, launch, Device};
use icdit::plan::{Dt, Plan};

struct Case {
    rows: usize,
    tokens: usize,
    channels: usize,
    gate_stride: usize,
}

const CASES: &[Case] = &[
    Case { rows: 6, tokens: 3, channels: 1152, gate_stride: 6 * 1152 }, // gate: a chunk of 6C
    Case { rows: 5, tokens: 5, channels: 10, gate_stride: 20 },         // fewer pairs than threads
    Case { rows: 9, tokens: 3, channels: 258, gate_stride: 260 },
    Case { rows: 700, tokens: 350, channels: 1000, gate_stride: 1000 }, // more pairs than the 1024-block grid covers at once
];

fn mixed(rng: &mut Rng, n: usize) -> Vec<f16> {
    (0..n).map(|_| f16_rne(mixed_f64(rng))).collect()
}

/// Uniform in [-s, s) at a scale s of 1e-4, 1 or 300, chosen at random.
fn mixed_f64(rng: &mut Rng) -> f64 {
    let scale = [1e-4, 1.0, 300.0][(rng.next_u64() % 3) as usize];
    rng.uniform() * scale
}

fn check<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for (ci, c) in CASES.iter().enumerate() {
        let (rows, ch) = (c.rows, c.channels);
        let items = rows.div_ceil(c.tokens);
        let gate_len = (items - 1) * c.gate_stride + ch;
        let mut plan = Plan::new("residual test");
        let (bx, by, bg) = (
            add(&mut plan, "x", rows * ch, Dt::F16),
            add(&mut plan, "y", rows * ch, Dt::F16),
            add(&mut plan, "gate", gate_len, Dt::F16),
        );
        let Some(dev) = open(&plan) else { return };
        let mut rng = Rng::new(200 + ci as u64);
        let (x, y, gate) = (mixed(&mut rng, rows * ch), mixed(&mut rng, rows * ch), mixed(&mut rng, gate_len));
        let (dx, dy, dg) = (put(&dev, &plan, bx, &x), put(&dev, &plan, by, &y), put(&dev, &plan, bg, &gate));
        launch::gated_residual_add_f16(&dev, dx, dy, dg, rows as i32, c.tokens as i32, ch as i32, c.gate_stride as i32)
            .unwrap();
        let got: Vec<f16> = get(&dev, &plan, bx);

        let exact: Vec<f64> = (0..rows * ch)
            .map(|i| {
                let g = gate[(i / ch / c.tokens) * c.gate_stride + i % ch];
                x[i].to_f64() + g.to_f64() * y[i].to_f64()
            })
            .collect();
        let finite: Vec<f64> = exact.iter().copied().filter(|v| v.abs() < 65504.0).collect();
        let what = format!("gated_residual_add_f16 rows={rows} tokens={} C={ch} ({})", c.tokens, dev.name());
        assert_nontrivial(&what, &finite);
        let expected: Vec<f16> = exact.iter().map(|&e| f16_rne(e)).collect();
        let overflow = expected.iter().filter(|h| h.is_infinite()).count();
        println!("{what}: {} elements, {overflow} overflow to ±inf", expected.len());
        assert_bits_eq(&what, &got, &expected);
    }
}

#[test]
fn gated_residual_add_emulated() {
    check(emu);
}

#[cfg(feature = "cuda")]
#[test]
fn gated_residual_add_cuda() {
    check(cuda("gated_residual_add_cuda"));
}

fn check_f32_stream<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    for (ci, c) in CASES.iter().enumerate() {
        let (rows, ch) = (c.rows, c.channels);
        let items = rows.div_ceil(c.tokens);
        let gate_len = (items - 1) * c.gate_stride + ch;
        let mut plan = Plan::new("residual f32-stream test");
        let (bx, by, bg) = (
            add(&mut plan, "x", rows * ch, Dt::F32),
            add(&mut plan, "y", rows * ch, Dt::F16),
            add(&mut plan, "gate", gate_len, Dt::F16),
        );
        let Some(dev) = open(&plan) else { return };
        let mut rng = Rng::new(300 + ci as u64);
        let x: Vec<f32> = (0..rows * ch).map(|_| mixed_f64(&mut rng) as f32).collect();
        let (y, gate) = (mixed(&mut rng, rows * ch), mixed(&mut rng, gate_len));
        let (dx, dy, dg) = (put(&dev, &plan, bx, &x), put(&dev, &plan, by, &y), put(&dev, &plan, bg, &gate));
        let (r, t, chn, st) = (rows as i32, c.tokens as i32, ch as i32, c.gate_stride as i32);
        launch::gated_residual_add_f32_stream(&dev, dx, dy, dg, r, t, chn, st).unwrap();
        let got: Vec<f32> = get(&dev, &plan, bx);

        let (sum, expected): (Vec<f64>, Vec<f32>) = (0..rows * ch)
            .map(|i| {
                let g = gate[(i / ch / c.tokens) * c.gate_stride + i % ch];
                let (a, b) = (x[i] as f64, g.to_f64() * y[i].to_f64());
                (a + b, f32_sum_rne(a, b))
            })
            .unzip();
        let what = format!("gated_residual_add_f32_stream rows={rows} tokens={} C={ch} ({})", c.tokens, dev.name());
        let rounded = (0..rows * ch).filter(|&i| expected[i] as f64 != sum[i]).count();
        println!("{what}: {} elements, {rounded} of the sums not representable in f32", rows * ch);
        assert_within(&what, &got, &sum, |i| (U32 * sum[i].abs()).max(f64::MIN_POSITIVE));
        let bad: Vec<usize> = (0..rows * ch).filter(|&i| got[i].to_bits() != expected[i].to_bits()).collect();
        for &i in bad.iter().take(8) {
            eprintln!(
                "  [{i}] got {:e} expected {:e} (x {:e}, gate·y {:e})",
                got[i],
                expected[i],
                x[i],
                sum[i] - x[i] as f64
            );
        }
        assert!(bad.is_empty(), "{what}: {} of {} elements differ from x + gate·y rounded once", bad.len(), rows * ch);
    }
}

#[test]
fn gated_residual_add_f32_stream_emulated() {
    check_f32_stream(emu);
}

#[cfg(feature = "cuda")]
#[test]
fn gated_residual_add_f32_stream_cuda() {
    check_f32_stream(cuda("gated_residual_add_f32_stream_cuda"));
}
