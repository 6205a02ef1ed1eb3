//! Shared helpers of the GPU kernel tests (tests/gpu_*.rs): devices to run on, arena buffers
//! with guard zones, a deterministic generator, correctly rounded f16 references and the
//! tolerance policy.
//!
//! Tolerance policy (docs/gpu-emulation.md, "Tolerances"): every kernel is compared with a
//! reference computed in f64 from the same f16 inputs. Where the kernel's result is defined
//! to the bit (conversions, the fused multiply-add of the residual, GEMMs of small integers)
//! the test demands bit equality. Elsewhere each element must satisfy |got − exact| ≤ bound,
//! where the bound is the rounding analysis of the kernel's arithmetic, written next to the
//! test; the test prints the largest measured error as a fraction of its bound and asserts
//! the reference is not trivial.
//!
//! Each check runs on the emulated device (`emu`, every build) and, with the feature `cuda`,
//! on the first GPU (`cuda(test)`); a CUDA test that finds no GPU prints
//! `<test>: skipped: no CUDA device`, and fails instead when `ICDIT_REQUIRE_GPU=1`.
#![allow(dead_code)]

use icdit::gpu::{f16, DevSlice, DevType, Device, EmuDevice};
use icdit::plan::{BufId, Dt, Plan};

// ---- devices ---------------------------------------------------------------------------------

/// The emulated GPU holding `plan`'s arena.
pub fn emu(plan: &Plan) -> Option<EmuDevice> {
    Some(EmuDevice::new(plan).unwrap_or_else(|e| panic!("{e}")))
}

/// The environment variable that turns a GPU test's skip into a failure: set to `1` where a GPU
/// is expected (scripts/gpu-check.sh sets it), so a run that could not reach the GPU does not
/// look green.
pub const REQUIRE_GPU: &str = "ICDIT_REQUIRE_GPU";

/// The one way a GPU test gives up: prints `<test>: skipped: <reason>` and returns, or, with
/// `ICDIT_REQUIRE_GPU=1`, panics with that line (scripts/gpu-check.sh counts the `skipped: `
/// lines of every test binary it runs).
pub fn skip_or_fail(test: &str, reason: &str) {
    let line = format!("{test}: skipped: {reason}");
    if std::env::var(REQUIRE_GPU).is_ok_and(|v| v == "1") {
        panic!("{line} ({REQUIRE_GPU}=1: the GPU tests must run here)");
    }
    println!("{line}");
}

/// The first CUDA GPU holding `plan`'s arena for the test `test`, or None after
/// [`skip_or_fail`] on a machine without one. A device that is present but cannot be used
/// always fails.
#[cfg(feature = "cuda")]
pub fn cuda_device_or_skip(test: &str, plan: &Plan) -> Option<icdit::gpu::CudaDevice> {
    match icdit::gpu::CudaDevice::open(plan) {
        Ok(Some(dev)) => Some(dev),
        Ok(None) => {
            skip_or_fail(test, "no CUDA device");
            None
        }
        Err(e) => panic!("{test}: CUDA device present but unusable: {e}"),
    }
}

/// Whether a CUDA GPU is there for the test `test` (an empty arena is opened and dropped);
/// [`skip_or_fail`] when not. For tests that run several checks and should skip once.
#[cfg(feature = "cuda")]
pub fn cuda_present(test: &str) -> bool {
    cuda_device_or_skip(test, &Plan::new("probe")).is_some()
}

/// The device opener of the `*_cuda` test `test`, for the check functions that take one:
/// `check(cuda("layernorm_modulate_cuda"))`.
#[cfg(feature = "cuda")]
pub fn cuda(test: &str) -> impl Fn(&Plan) -> Option<icdit::gpu::CudaDevice> + '_ {
    move |plan: &Plan| cuda_device_or_skip(test, plan)
}

/// Without the feature `cuda` no `*_cuda` test is compiled into this binary: said once per
/// test binary, and a failure under `ICDIT_REQUIRE_GPU=1`.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_tests_are_built() {
    skip_or_fail(
        "cuda_tests_are_built",
        "no CUDA tests in this build (the feature `cuda` is off: cargo test --features cuda)",
    );
}

// ---- buffers with guard zones ----------------------------------------------------------------

/// Elements of guard zone on each side of a test buffer: 128 bytes of f16, so the buffer
/// itself keeps the plan's 64-byte alignment.
pub const GUARD: usize = 64;

/// A planned buffer of `len` elements between two guard zones that hold NaN.
#[derive(Clone, Copy)]
pub struct Guarded {
    id: BufId,
    pub len: usize,
}

pub fn add(plan: &mut Plan, name: &str, len: usize, dt: Dt) -> Guarded {
    Guarded { id: plan.add(name, &[len + 2 * GUARD], dt), len }
}

fn guard_value<T: DevType>() -> T {
    // All-ones bits: NaN in f16 and f32, the same pattern EmuDevice fills its arena with.
    bytemuck::cast_slice::<u8, T>(&[0xffu8; 8][..size_of::<T>()])[0]
}

/// Uploads `data` into the buffer and NaN into its guard zones; returns the inner slice.
pub fn put<T: DevType, D: Device>(dev: &D, plan: &Plan, b: Guarded, data: &[T]) -> DevSlice<T> {
    assert_eq!(data.len(), b.len, "{}: data length", plan.get(b.id).name);
    let mut all = vec![guard_value::<T>(); b.len + 2 * GUARD];
    all[GUARD..GUARD + b.len].copy_from_slice(data);
    let whole = dev.slice::<T>(plan.get(b.id)).unwrap();
    dev.upload(whole, &all).unwrap();
    whole.sub(GUARD, b.len).unwrap()
}

/// The inner slice of a buffer whose contents the kernel writes (guards set to NaN).
pub fn out<T: DevType, D: Device>(dev: &D, plan: &Plan, b: Guarded) -> DevSlice<T> {
    let all = vec![guard_value::<T>(); b.len + 2 * GUARD];
    let whole = dev.slice::<T>(plan.get(b.id)).unwrap();
    dev.upload(whole, &all).unwrap();
    whole.sub(GUARD, b.len).unwrap()
}

/// Downloads the buffer, asserting that nothing wrote into its guard zones.
pub fn get<T: DevType, D: Device>(dev: &D, plan: &Plan, b: Guarded) -> Vec<T> {
    let name = &plan.get(b.id).name;
    let whole = dev.slice::<T>(plan.get(b.id)).unwrap();
    let mut all = vec![guard_value::<T>(); b.len + 2 * GUARD];
    dev.download(whole, &mut all).unwrap_or_else(|e| panic!("{name}: {e}"));
    let g = bytemuck::cast_slice::<T, u8>(&[guard_value::<T>()]).to_vec();
    for (i, v) in all[..GUARD].iter().chain(&all[GUARD + b.len..]).enumerate() {
        assert_eq!(bytemuck::bytes_of(v), &g[..], "{name}: guard element {i} was overwritten");
    }
    all[GUARD..GUARD + b.len].to_vec()
}

// ---- data ------------------------------------------------------------------------------------

/// SplitMix64: a small deterministic generator, so every run and device sees the same data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    /// `n` f16 values uniform in [-scale, scale).
    pub fn f16s(&mut self, n: usize, scale: f64) -> Vec<f16> {
        (0..n).map(|_| f16_rne(self.uniform() * scale)).collect()
    }
    /// `n` small integers in [-r, r] as f16 (exact).
    pub fn ints(&mut self, n: usize, r: i64) -> Vec<f16> {
        (0..n).map(|_| f16::from_f64((self.next_u64() % (2 * r as u64 + 1)) as f64 - r as f64)).collect()
    }
}

pub fn f64s(v: &[f16]) -> Vec<f64> {
    v.iter().map(|h| h.to_f64()).collect()
}

/// Round to nearest even of an f64 to f16, by choosing between the neighbours of a first
/// guess with exact f64 differences. (`half::f16::from_f64` truncates the low 32 bits of the
/// significand first, which loses the sticky bits of ties, so it cannot serve as reference.)
pub fn f16_rne(x: f64) -> f16 {
    if x.is_nan() {
        return f16::NAN;
    }
    if x.abs() >= 65520.0 {
        return if x > 0.0 { f16::INFINITY } else { f16::NEG_INFINITY };
    }
    let guess = f16::from_f64(x);
    let mut best = guess;
    for cand in [next_down(guess), next_up(guess)] {
        if !cand.is_finite() {
            continue;
        }
        let (d, db) = ((cand.to_f64() - x).abs(), (best.to_f64() - x).abs());
        if d < db || (d == db && cand.to_bits() & 1 == 0) {
            best = cand;
        }
    }
    best
}

/// `a + b` rounded once to f32 (to nearest even), for f64 `a` and `b` whose exact sum may need
/// more than f64's 53 bits: the f64 sum `s` and its rounding error `e` (TwoSum, exact) decide.
/// `s as f32` is right unless `s` lies exactly halfway between two f32 values, where the sign
/// of `e` says on which side the exact sum is (|e| is below half an f64 ulp of `s`, so it can
/// never move the exact sum across any other f32 midpoint).
pub fn f32_sum_rne(a: f64, b: f64) -> f32 {
    let s = a + b;
    let bb = s - a;
    let e = (a - (s - bb)) + (b - bb);
    let r = s as f32;
    if e == 0.0 || !r.is_finite() {
        return r;
    }
    // s's other f32 neighbour (r itself when s is an f32 value: then no tie).
    let other = if (r as f64) < s { r.next_up() } else { r.next_down() };
    let tie = (r as f64 - s).abs() == (other as f64 - s).abs();
    if tie && (e > 0.0) == (other > r) {
        other
    } else {
        r
    }
}

/// The next f16 above `h` (from ±0: the smallest positive subnormal).
pub fn next_up(h: f16) -> f16 {
    let b = h.to_bits();
    if b & 0x7fff == 0 {
        f16::from_bits(1)
    } else if b & 0x8000 == 0 {
        f16::from_bits(b + 1)
    } else {
        f16::from_bits(b - 1)
    }
}

pub fn next_down(h: f16) -> f16 {
    -next_up(-h)
}

// ---- comparisons -----------------------------------------------------------------------------

/// Asserts every element is finite and within its bound, after checking the reference is not
/// trivial. Prints the largest error as a fraction of its bound, and on failure the worst
/// elements. Returns that fraction.
pub fn assert_within(what: &str, got: &[f32], exact: &[f64], bound: impl Fn(usize) -> f64) -> f64 {
    assert_eq!(got.len(), exact.len(), "{what}: length");
    assert_nontrivial(what, exact);
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{what}: element {i} is {} (expected {})", got[i], exact[i]);
    }
    let mut worst: Vec<(f64, usize)> =
        (0..got.len()).map(|i| ((got[i] as f64 - exact[i]).abs() / bound(i), i)).collect();
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    let max_ratio = worst[0].0;
    println!("{what}: max |error| / bound = {max_ratio:.3}, relative L2 error {:.2e}", rel_l2(got, exact));
    if max_ratio > 1.0 {
        for &(r, i) in worst.iter().take(8) {
            eprintln!(
                "  [{i}] got {} exact {} (error {:.3e}, bound {:.3e}, ratio {r:.2})",
                got[i],
                exact[i],
                got[i] as f64 - exact[i],
                bound(i)
            );
        }
        let over = worst.iter().filter(|w| w.0 > 1.0).count();
        panic!("{what}: {over} of {} elements exceed their error bound", got.len());
    }
    max_ratio
}

/// Asserts bit equality of f16 results (NaN matches NaN), listing the first mismatches.
pub fn assert_bits_eq(what: &str, got: &[f16], expected: &[f16]) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != expected[i].to_bits() && !(got[i].is_nan() && expected[i].is_nan()))
        .collect();
    for &i in bad.iter().take(8) {
        eprintln!(
            "  [{i}] got {} ({:#06x}) expected {} ({:#06x})",
            got[i],
            got[i].to_bits(),
            expected[i],
            expected[i].to_bits()
        );
    }
    assert!(bad.is_empty(), "{what}: {} of {} elements differ", bad.len(), got.len());
}

/// A reference that is all zeros or constant would let a broken kernel pass.
pub fn assert_nontrivial(what: &str, exact: &[f64]) {
    let n = exact.len() as f64;
    let rms = (exact.iter().map(|v| v * v).sum::<f64>() / n).sqrt();
    let mean = exact.iter().sum::<f64>() / n;
    let spread = (exact.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(rms > 1e-3 && spread > 1e-3, "{what}: reference is trivial (rms {rms}, spread {spread})");
}

pub fn rel_l2(got: &[f32], exact: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(exact).map(|(&g, &e)| (g as f64 - e).powi(2)).sum();
    let den: f64 = exact.iter().map(|e| e * e).sum();
    (num / den).sqrt()
}

/// Unit roundoff of f32 and f16 (round to nearest): half an ulp of 1.
pub const U32: f64 = 1.0 / (1u64 << 24) as f64;
pub const U16: f64 = 1.0 / (1u64 << 11) as f64;
/// Half the smallest f16 subnormal: the absolute rounding error of f16 near zero.
pub const F16_TINY: f64 = 1.0 / (1u64 << 25) as f64;
