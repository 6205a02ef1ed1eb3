//! kernels/convert.cu against the `half` crate, bit for bit. Because the emulation's f16
//! rounding is the code under test here, the inputs cover it exhaustively where it matters:
//! every f16 value, every midpoint between neighbours (ties to even), the f32 values just
//! either side of each midpoint, overflow and underflow edges, and random f32 of all scales.

mod gpu_common;

use gpu_common::*;
use icdit::gpu::{f16, launch, Device};
use icdit::plan::{Dt, Plan};

/// The f32 inputs whose f16 rounding is tested.
fn rounding_cases() -> Vec<f32> {
    let mut v = Vec::new();
    for bits in 0..=u16::MAX {
        let h = f16::from_bits(bits);
        v.push(h.to_f32()); // exact: must come back unchanged
        let up = next_up(h);
        if h.is_finite() && up.is_finite() && !(h.to_f32() == 0.0 && up.to_f32() == 0.0) {
            let mid = (h.to_f64() + up.to_f64()) / 2.0; // exact in f32 (12 significant bits)
            let m = mid as f32;
            v.push(m);
            v.push(f32::from_bits(m.to_bits() + 1));
            v.push(f32::from_bits(m.to_bits() - 1));
        }
    }
    // Edges: the largest finite f16, the overflow threshold 65520 (a tie that rounds to
    // infinity), the smallest subnormal 2^-24 and half of it (a tie that rounds to zero).
    for x in [65504.0f32, 65519.996, 65520.0, 1e6, f32::MAX, 5.960_464_5e-8, 2.980_232_2e-8, 2.980_232_5e-8, 1e-30] {
        v.push(x);
        v.push(-x);
    }
    v.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.0, -0.0]);
    let mut rng = Rng::new(7);
    for _ in 0..100_000 {
        v.push(f32::from_bits(rng.next_u64() as u32));
    }
    v
}

fn check_f32_to_f16<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    let input = rounding_cases();
    let n = input.len();
    let mut plan = Plan::new("convert_f32_to_f16 test");
    let (bi, bo) = (add(&mut plan, "in", n, Dt::F32), add(&mut plan, "out", n, Dt::F16));
    let Some(dev) = open(&plan) else { return };
    let (i, o) = (put(&dev, &plan, bi, &input), out::<f16, _>(&dev, &plan, bo));
    launch::convert_f32_to_f16(&dev, o, i, n as i32).unwrap();
    let got: Vec<f16> = get(&dev, &plan, bo);
    let expected: Vec<f16> = input.iter().map(|&x| f16::from_f32(x)).collect();
    // The reference itself: ties go to even (1 + 2^-11 lies between 1 and 1 + 2^-10).
    assert_eq!(f16::from_f32(1.0 + 1.0 / 2048.0).to_bits(), 0x3c00);
    assert_eq!(f16::from_f32(65520.0), f16::INFINITY);
    assert_bits_eq(&format!("convert_f32_to_f16 ({} inputs, {})", n, dev.name()), &got, &expected);
}

fn check_f16_to_f32<D: Device>(open: impl Fn(&Plan) -> Option<D>) {
    let input: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
    let n = input.len();
    let mut plan = Plan::new("convert_f16_to_f32 test");
    let (bi, bo) = (add(&mut plan, "in", n, Dt::F16), add(&mut plan, "out", n, Dt::F32));
    let Some(dev) = open(&plan) else { return };
    let (i, o) = (put(&dev, &plan, bi, &input), out::<f32, _>(&dev, &plan, bo));
    launch::convert_f16_to_f32(&dev, o, i, n as i32).unwrap();
    let got: Vec<f32> = get(&dev, &plan, bo);
    for (k, (&g, h)) in got.iter().zip(&input).enumerate() {
        let e = h.to_f32();
        assert!(
            g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan()),
            "convert_f16_to_f32: f16 {:#06x} gave {g}, expected {e} (element {k})",
            h.to_bits()
        );
    }
}

#[test]
fn convert_f32_to_f16_emulated() {
    check_f32_to_f16(emu);
}

#[test]
fn convert_f16_to_f32_emulated() {
    check_f16_to_f32(emu);
}

#[cfg(feature = "cuda")]
#[test]
fn convert_f32_to_f16_cuda() {
    check_f32_to_f16(cuda("convert_f32_to_f16_cuda"));
}

#[cfg(feature = "cuda")]
#[test]
fn convert_f16_to_f32_cuda() {
    check_f16_to_f32(cuda("convert_f16_to_f32_cuda"));
}
