//! kernels/forecast.cu (taylor's factor update and forecast) against the CPU's arithmetic.
//!
//! `forecast_update_f32` is defined to the bit: f32(y) is exact (an f16 value), and each
//! difference is one f32 subtraction and one IEEE division (CUDA's `/` on f32 is correctly
//! rounded by default), as the CPU computes them; the factors past the step's orders are zeroed.
//! `forecast_f16` sums w_i·D_i in f32, where nvcc may contract a multiply and an add into one
//! FMA, then rounds once to f16: the result must be the f16 rounding of the f64 sum or one of
//! its two f16 neighbours. Both write NaN when the step index is outside the table.

mod gpu_common;

use gpu_common::*;
use icdit::gpu::launch::{self, TaylorBranch};
use icdit::gpu::{f16, DevSlice, Device};
use icdit::plan::{Dt, Plan};

const TABLE: usize = launch::FORECAST_TABLE;

fn check<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    // (elements, stride between factors): a tail shorter than a block, and several blocks.
    for (ci, &(n, stride)) in [(37usize, 40usize), (3000, 3072)].iter().enumerate() {
        let levels = 3;
        let mut plan = Plan::new("forecast test");
        let (bf, by, bt, bs, bo) = (
            add(&mut plan, "factors", levels * stride, Dt::F32),
            add(&mut plan, "y", n, Dt::F16),
            add(&mut plan, "table", 3 * TABLE, Dt::F32),
            add(&mut plan, "state", 1, Dt::I32),
            add(&mut plan, "prediction", n, Dt::F16),
        );
        let Some(dev) = open(&plan) else { return };
        let mut rng = Rng::new(300 + ci as u64);
        let y = rng.f16s(n, 4.0);
        let old: Vec<f32> = (0..levels * stride).map(|_| (rng.uniform() * 3.0) as f32).collect();
        // Step 0: a full step forming one difference over Δ = 3 (D₂ zeroed); step 1: a forecast
        // k = 2 after it with all three weights (1, 2, 2); step 2: a full step forming both.
        let mut table = vec![0.0f32; 3 * TABLE];
        table[..2].copy_from_slice(&[1.0, 3.0]);
        table[TABLE + 2..TABLE + 5].copy_from_slice(&[1.0, 2.0, 2.0]);
        table[2 * TABLE..2 * TABLE + 2].copy_from_slice(&[2.0, 2.0]);
        let (df, dy, dt) = (put(&dev, &plan, bf, &old), put(&dev, &plan, by, &y), put(&dev, &plan, bt, &table));
        let what = |k: &str| format!("{k} n={n} ({})", dev.name());
        // The branch's operands at step index `state`, with `y` as its output.
        let branch = |y: DevSlice<f16>, state: DevSlice<i32>| TaylorBranch {
            factors: df,
            y,
            table: dt,
            state,
            n: n as i32,
            stride: stride as i32,
            levels: levels as i32,
            steps: 3,
        };
        for step in [0i32, 2] {
            let ds = put(&dev, &plan, bs, &[step]);
            let before: Vec<f32> = get(&dev, &plan, bf);
            launch::forecast_update_f32(&dev, &branch(dy, ds)).unwrap();
            let got: Vec<f32> = get(&dev, &plan, bf);
            let (orders, delta) = (table[step as usize * TABLE] as usize, table[step as usize * TABLE + 1]);
            let mut want = before.clone();
            for e in 0..n {
                let mut new = y[e].to_f32();
                for i in 0..levels {
                    let d = &mut want[i * stride + e];
                    if i <= orders {
                        let o = *d;
                        *d = new;
                        new = (new - o) / delta;
                    } else {
                        *d = 0.0;
                    }
                }
            }
            let mismatches = (0..n * levels)
                .filter(|&j| got[j / n * stride + j % n].to_bits() != want[j / n * stride + j % n].to_bits())
                .count();
            println!(
                "{}: step {step}, {mismatches} of {} factors differ from the CPU's",
                what("forecast_update_f32"),
                n * levels
            );
            assert_eq!(mismatches, 0, "{}", what("forecast_update_f32"));
            // Past n, nothing was touched.
            assert!((n..stride).all(|e| got[e].to_bits() == before[e].to_bits()));
            if step == 0 {
                let ds = put(&dev, &plan, bs, &[1]);
                let dout = out::<f16, _>(&dev, &plan, bo);
                launch::forecast_f16(&dev, &branch(dout, ds)).unwrap();
                let pred: Vec<f16> = get(&dev, &plan, bo);
                let exact: Vec<f64> = (0..n)
                    .map(|e| (0..levels).map(|i| table[TABLE + 2 + i] as f64 * got[i * stride + e] as f64).sum())
                    .collect();
                assert_nontrivial(&what("forecast_f16"), &exact);
                let off = (0..n)
                    .filter(|&e| {
                        let r = f16_rne(exact[e]);
                        pred[e] != r && pred[e] != next_up(r) && pred[e] != next_down(r)
                    })
                    .count();
                let rounded = (0..n).filter(|&e| pred[e] == f16_rne(exact[e])).count();
                println!("{}: {rounded} of {n} equal to the f64 sum rounded once, {off} further", what("forecast_f16"));
                assert_eq!(off, 0, "{}", what("forecast_f16"));
            }
        }
        // A step index outside the table: NaN, not a read past it.
        let ds = put(&dev, &plan, bs, &[7]);
        let dout = out::<f16, _>(&dev, &plan, bo);
        launch::forecast_f16(&dev, &branch(dout, ds)).unwrap();
        let pred: Vec<f16> = get(&dev, &plan, bo);
        assert!(pred.iter().all(|v| v.is_nan()), "{}", what("forecast_f16 outside the table"));
    }
}

#[test]
fn forecast_kernels_emulated() {
    check(emu);
}

#[cfg(feature = "cuda")]
#[test]
fn forecast_kernels_cuda() {
    check(cuda("forecast_kernels_cuda"));
}
