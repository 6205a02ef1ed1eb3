//! Tests of the emulator itself, through the kernels of kernels/emu/selftest.cu: the CUDA
//! semantics our kernels rely on, and the misuses it must report instead of hanging or
//! computing garbage.

use std::ffi::c_void;

use super::kernels::kernel_mod;
use super::{f16, DevPtr, DevSlice, Device, EmuDevice, Kernel, LaunchCfg};
use crate::error::Result;
use crate::plan::{Dt, Plan};

// Not in the kernel table: emulation-only kernels.
kernel_mod!("emu/selftest", usize::MAX, emu_selftest_warp(out: DevPtr<i32>));
kernel_mod!("emu/selftest", usize::MAX, emu_selftest_shared(out: DevPtr<i32>, counter: DevPtr<i32>, sum: DevPtr<f32>));
kernel_mod!("emu/selftest", usize::MAX, emu_selftest_wmma(d: DevPtr<f32>, a: DevPtr<f16>, b: DevPtr<f16>, c: DevPtr<f32>, layout: i32));
kernel_mod!("emu/selftest", usize::MAX, emu_selftest_broken(out: DevPtr<f32>, mode: i32));

fn cfg(grid: [u32; 3], block: [u32; 3], dyn_smem: u32) -> LaunchCfg {
    LaunchCfg { grid, block, dyn_smem }
}

/// A device with one f32 buffer of `n` elements (i32 data shares it: same size).
fn device(n: usize, workers: u32) -> (EmuDevice, DevSlice<f32>, Plan) {
    let mut plan = Plan::new("selftest");
    let id = plan.add("buf", &[n], Dt::F32);
    let dev = EmuDevice::with_threads(&plan, workers).unwrap();
    let buf = dev.slice::<f32>(plan.get(id)).unwrap();
    (dev, buf, plan)
}

fn as_i32(s: DevSlice<f32>) -> DevPtr<i32> {
    DevPtr { addr: s.addr, _t: std::marker::PhantomData }
}

fn read_i32(dev: &EmuDevice, s: DevSlice<f32>) -> Vec<i32> {
    let mut v = vec![0f32; s.len()];
    dev.download(s, &mut v).unwrap();
    v.iter().map(|f| f.to_bits() as i32).collect()
}

fn run_warp(dev: &EmuDevice, buf: DevSlice<f32>) -> Result<()> {
    // SAFETY: the buffer holds 6 blocks × 64 threads × 8 ints.
    unsafe { emu_selftest_warp::launch(dev, &cfg([3, 2, 1], [8, 4, 2], 0), as_i32(buf)) }
}

#[test]
fn shuffles_votes_and_indices() {
    let (dev, buf, _) = device(6 * 64 * 8, 2);
    run_warp(&dev, buf).unwrap();
    let o = read_i32(&dev, buf);
    for b in 0..6 {
        for t in 0..64i32 {
            let got = &o[(b * 64 + t as usize) * 8..][..8];
            let (lane, base) = (t % 32, t - t % 32);
            let ballot = (0..32).filter(|l| (base + l) % 3 == 0).fold(0u32, |m, l| m | 1 << l) as i32;
            let expected = [
                t,
                b as i32,
                base + (lane + 5) % 32,
                t ^ 3,
                if lane % 16 + 4 < 16 { t + 4 } else { t },
                if lane % 8 >= 2 { t - 2 } else { t },
                ballot,
                if base == 0 { 1 } else { 0 } + 2,
            ];
            assert_eq!(got, &expected[..], "block {b} thread {t}");
        }
    }
}

#[test]
fn shared_memory_barriers_and_atomics() {
    let blocks = 50;
    let (dev, buf, _) = device(blocks * 64 * 3 + 2, 2);
    let out = buf.sub(0, blocks * 64 * 3).unwrap();
    let counter = buf.sub(blocks * 64 * 3, 1).unwrap();
    let sum = buf.sub(blocks * 64 * 3 + 1, 1).unwrap();
    dev.upload(counter, &[0.0]).unwrap();
    dev.upload(sum, &[0.0]).unwrap();
    // SAFETY: out holds blocks × 64 × 3 ints, counter and sum one element each.
    unsafe {
        emu_selftest_shared::launch(
            &dev,
            &cfg([blocks as u32, 1, 1], [64, 1, 1], 256),
            as_i32(out),
            as_i32(counter),
            sum.ptr(),
        )
    }
    .unwrap();
    let o = read_i32(&dev, out);
    for b in 0..blocks as i32 {
        for t in 0..64i32 {
            let got = &o[((b * 64 + t) * 3) as usize..][..3];
            let pair = if t % 32 < 16 { t ^ 1 } else { t ^ 2 };
            assert_eq!(got, &[(63 - t) * (b + 1) + 1000 + (t + 1) % 64, -1, pair], "block {b} thread {t}");
        }
    }
    assert_eq!(read_i32(&dev, counter), [blocks as i32 * 64]);
    let mut s = [0f32];
    dev.download(sum, &mut s).unwrap();
    assert_eq!(s[0], blocks as f32 * 32.0);
}

#[test]
fn wmma_tile_semantics_in_every_layout() {
    let mut plan = Plan::new("wmma selftest");
    let (ia, ib, ic, id) = (
        plan.add("a", &[256], Dt::F16),
        plan.add("b", &[256], Dt::F16),
        plan.add("c", &[256], Dt::F32),
        plan.add("d", &[256], Dt::F32),
    );
    let dev = EmuDevice::with_threads(&plan, 1).unwrap();
    let a: Vec<f16> = (0..256).map(|i| f16::from_f32(((i * 7) % 5) as f32 - 2.0)).collect();
    let b: Vec<f16> = (0..256).map(|i| f16::from_f32(((i * 3) % 7) as f32 - 3.0)).collect();
    let c: Vec<f32> = (0..256).map(|i| (i % 11) as f32 - 5.0).collect();
    let (da, db, dc, dd) = (
        dev.slice::<f16>(plan.get(ia)).unwrap(),
        dev.slice::<f16>(plan.get(ib)).unwrap(),
        dev.slice::<f32>(plan.get(ic)).unwrap(),
        dev.slice::<f32>(plan.get(id)).unwrap(),
    );
    dev.upload(da, &a).unwrap();
    dev.upload(db, &b).unwrap();
    dev.upload(dc, &c).unwrap();
    for layout in 0..8 {
        // SAFETY: every matrix holds 256 elements.
        unsafe {
            emu_selftest_wmma::launch(
                &dev,
                &cfg([1, 1, 1], [32, 1, 1], 0),
                dd.ptr(),
                da.ptr(),
                db.ptr(),
                dc.ptr(),
                layout,
            )
        }
        .unwrap();
        let mut d = vec![0f32; 256];
        dev.download(dd, &mut d).unwrap();
        let at = |m: &[f16], r: usize, k: usize, col: bool| if col { m[k * 16 + r] } else { m[r * 16 + k] }.to_f32();
        for i in 0..16 {
            for j in 0..16 {
                let mut e = if layout & 4 != 0 { c[j * 16 + i] } else { c[i * 16 + j] };
                for k in 0..16 {
                    e += at(&a, i, k, layout & 1 != 0)
                        * if layout & 2 != 0 { b[j * 16 + k] } else { b[k * 16 + j] }.to_f32();
                }
                assert_eq!(d[i * 16 + j], 2.0 * e, "layout {layout}: d[{i}][{j}]");
            }
        }
    }
}

#[test]
fn misuses_are_reported_not_hung() {
    // Mode 2 is reported one of two ways depending on which half-warp the scheduler runs
    // first: as the mask disagreement, or (when the 0xffff0000 half completed its own
    // collective and returned) as lanes of the full mask that already returned.
    let expected: [(i32, &[&str]); 8] = [
        (0, &["__syncthreads"]),
        (1, &["__syncthreads"]),
        (2, &["with mask 0x", "already returned"]),
        (3, &["reads lane 20, which is not in mask"]),
        (4, &["deadlock"]),
        (5, &["not 256-bit aligned"]),
        (6, &["returned"]),
        (7, &["does not include the calling lane"]),
    ];
    let (dev, buf, _) = device(6 * 64 * 8, 2);
    for (mode, needle) in expected {
        // SAFETY: the buffer holds 2 blocks × 64 floats.
        let err = unsafe { emu_selftest_broken::launch(&dev, &cfg([2, 1, 1], [64, 1, 1], 0), buf.ptr(), mode) }
            .expect_err(&format!("mode {mode} was not reported"))
            .to_string();
        println!("mode {mode}: {err}");
        assert!(needle.iter().any(|n| err.contains(n)) && err.contains("emu_selftest_broken"), "mode {mode}: {err}");
        // The device keeps working after a failed launch.
        run_warp(&dev, buf).unwrap();
    }
}

#[test]
fn launch_limits_are_checked() {
    let (dev, buf, _) = device(64, 1);
    let bad: &[LaunchCfg] =
        &[cfg([1, 1, 1], [2048, 1, 1], 0), cfg([0, 1, 1], [32, 1, 1], 0), cfg([1, 1, 1], [32, 1, 1], 228 * 1024)];
    for c in bad {
        // SAFETY: refused before anything runs.
        let r = unsafe { emu_selftest_broken::launch(&dev, c, buf.ptr(), -1) };
        assert!(r.is_err(), "{c:?} was accepted");
    }
}
