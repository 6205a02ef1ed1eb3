//! Tests of the emulated Hopper primitives (kernels/emu/sm90.h) through the kernels of
//! kernels/emu/sm90_selftest.cu, against layouts worked out by hand from the PTX ISA's figures:
//! the 128-byte swizzle of a bulk tensor copy, out-of-bounds zero fill, the m64nNk16
//! accumulator fragment layout, descriptors advanced along k; the misuses the emulation must
//! report; and mutants of the Hopper GEMM (kernels/gemm_sm90.cu) and convolution
//! (kernels/conv_sm90.cu), each missing one synchronisation, which must fail.

use super::kernels::kernel_mod;
use super::{f16, DevPtr, DevSlice, Device, EmuDevice, Kernel, LaunchCfg, TensorMap, TensorMapSpec};
use crate::error::Result;
use crate::plan::{Dt, Plan};

use std::ffi::c_void;

kernel_mod!("emu/sm90_selftest", usize::MAX, emu_selftest_tma(map: TensorMap, out: DevPtr<f16>, c0: i32, c1: i32, box_rows: i32, mode: i32));
kernel_mod!("emu/sm90_selftest", usize::MAX, emu_selftest_wgmma(map_a: TensorMap, map_b: TensorMap, out: DevPtr<f32>, kk: i32, mode: i32));
kernel_mod!("emu/sm90_selftest", usize::MAX, emu_selftest_sm90_broken(mode: i32));
kernel_mod!("gemm_sm90", usize::MAX, emu_mutant_gemm_sm90(map_a: TensorMap, map_w: TensorMap, map_am: TensorMap, minus: i32, out: DevPtr<f16>, m: i32, n: i32, k: i32, mutant: i32));

kernel_mod!("conv_sm90", usize::MAX, emu_mutant_conv_sm90(map_w: TensorMap, out: DevPtr<f16>, input: DevPtr<f16>, h: i32, w: i32, cin: i32, cout: i32, mutant: i32));

fn cfg(blocks: u32, threads: u32, dyn_smem: u32) -> LaunchCfg {
    LaunchCfg { grid: [blocks, 1, 1], block: [threads, 1, 1], dyn_smem }
}

/// An emulated device with an f16 matrix buffer and an f32 output buffer.
fn device(f16s: usize, f32s: usize) -> (EmuDevice, DevSlice<f16>, DevSlice<f32>) {
    let mut plan = Plan::new("sm90 selftest");
    let a = plan.add("matrix", &[f16s], Dt::F16);
    let o = plan.add("out", &[f32s], Dt::F32);
    let dev = EmuDevice::with_threads(&plan, 2).unwrap();
    let (a, o) = (dev.slice::<f16>(plan.get(a)).unwrap(), dev.slice::<f32>(plan.get(o)).unwrap());
    (dev, a, o)
}

fn sub<T>(s: DevSlice<T>, start: usize, len: usize) -> DevSlice<T> {
    s.sub(start, len).unwrap()
}

fn map(dev: &EmuDevice, s: DevSlice<f16>, rows: u64, cols: u64, box_rows: u32) -> TensorMap {
    map_strided(dev, s, rows, cols, cols, box_rows)
}

fn map_strided(dev: &EmuDevice, s: DevSlice<f16>, rows: u64, cols: u64, stride: u64, box_rows: u32) -> TensorMap {
    dev.tensor_map_2d(&TensorMapSpec { addr: s.addr, rows, cols, stride, box_rows, box_cols: 64 }).unwrap()
}

/// Byte offset of box element (r, c) (f16) in shared memory under the 128-byte swizzle, from
/// the ISA's description: 128-byte rows, the 16-byte chunk index XOR the row index mod 8.
fn swizzled(r: usize, c: usize) -> usize {
    r * 128 + (((c * 2) / 16) ^ (r % 8)) * 16 + (c * 2) % 16
}

#[test]
fn swizzle_offsets_by_hand() {
    // Row 0 is not permuted; row 1 swaps chunk pairs (0↔1, 2↔3, …); row 3, element 9 (chunk 1)
    // goes to chunk 1 ^ 3 = 2: 3·128 + 32 + 2.
    assert_eq!(swizzled(0, 9), 18);
    assert_eq!(swizzled(1, 0), 128 + 16);
    assert_eq!(swizzled(1, 8), 128);
    assert_eq!(swizzled(3, 9), 418);
    assert_eq!(swizzled(7, 63), 7 * 128 + (7 ^ 7) * 16 + 14);
    assert_eq!(swizzled(8, 5), 8 * 128 + 10);
}

#[test]
fn tensor_copy_swizzles_and_zero_fills() {
    // A 20 × 70 matrix in rows of 72 (a 16-byte multiple), value (64·r + c)/8 (exact in f16).
    let (rows, cols) = (20usize, 72usize);
    let (dev, buf, _) = device(rows * cols + 2 * 16 * 64, 16);
    let g = sub(buf, 0, rows * cols);
    let val = |r: usize, c: usize| (r * 64 + c) as f32 / 8.0;
    let host: Vec<f16> = (0..rows * cols).map(|i| f16::from_f32(val(i / cols, i % cols))).collect();
    dev.upload(g, &host).unwrap();
    let m = map_strided(&dev, g, rows as u64, 70, cols as u64, 16);
    let dst = sub(buf, rows * cols, 2 * 16 * 64);
    // Box at (c0, c1) = (8, 10): rows 10..26 (past 20: zero), columns 8..72 (past 70: zero).
    for mode in [0, 1] {
        // SAFETY: the kernel writes 2 blocks × 16 × 64 halves into `dst`.
        unsafe { emu_selftest_tma::launch(&dev, &cfg(2, 128, 16 * 128 + 1024 + 64), m, dst.ptr(), 8, 10, 16, mode) }
            .unwrap();
        let mut got = vec![f16::ZERO; 2 * 16 * 64];
        dev.download(dst, &mut got).unwrap();
        for block in 0..2 {
            let raw = &got[block * 16 * 64..][..16 * 64];
            let mut wrong = 0;
            for r in 0..16 {
                for c in 0..64 {
                    let (gr, gc) = (10 + r, 8 + c);
                    let want = if gr < rows && gc < 70 { val(gr, gc) } else { 0.0 };
                    if raw[swizzled(r, c) / 2].to_f32() != want {
                        wrong += 1;
                    }
                }
            }
            // Block 0 lands copies late (at the wait), block 1 at once: reading before the
            // wait sees the untouched shared memory (all ones: NaN) in block 0 only.
            if mode == 1 && block == 0 {
                assert_eq!(wrong, 16 * 64, "a read before the mbarrier wait must see no data");
            } else {
                assert_eq!(wrong, 0, "mode {mode}, block {block}");
            }
        }
    }
}

#[test]
fn wgmma_fragments_follow_the_isa_layout() {
    let (dev, buf, out) = device(64 * 64 + 128 * 64, 2 * 128 * 64);
    let (a, b) = (sub(buf, 0, 64 * 64), sub(buf, 64 * 64, 128 * 64));
    // Small integers: every product and sum exact in f32.
    let av: Vec<f32> = (0..64 * 64).map(|i| ((i * 7 + 3) % 9) as f32 - 4.0).collect();
    let bv: Vec<f32> = (0..128 * 64).map(|i| ((i * 5 + 1) % 7) as f32 - 3.0).collect();
    dev.upload(a, &av.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()).unwrap();
    dev.upload(b, &bv.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()).unwrap();
    let (ma, mb) = (map(&dev, a, 64, 64, 64), map(&dev, b, 128, 64, 128));
    let dd =
        |r: usize, c: usize, ks: std::ops::Range<usize>| -> f32 { ks.map(|k| av[r * 64 + k] * bv[c * 64 + k]).sum() };
    for (kk, mode) in [(0, 0), (1, 0), (3, 0), (1, 2), (0, 1)] {
        // SAFETY: the kernel writes 2 blocks × 128 threads × 64 floats into `out`.
        unsafe { emu_selftest_wgmma::launch(&dev, &cfg(2, 128, 192 * 128 + 1024 + 64), ma, mb, out.ptr(), kk, mode) }
            .unwrap();
        let mut got = vec![0f32; 2 * 128 * 64];
        dev.download(out, &mut got).unwrap();
        let kk = kk as usize;
        let ks = if mode == 2 { 16 * kk..16 * kk + 32 } else { 16 * kk..16 * kk + 16 };
        // Entries worked out from the ISA's figure of the m64nNk16 D fragments: thread 0
        // holds D[0][0], D[0][1], D[8][0], D[8][1], then D[0][8] …; thread 37 (warp 1, lane 5)
        // D[17][2] first and D[25][2] third; thread 127's last is D[63][127].
        let at = |t: usize, i: usize| got[t * 64 + i];
        if mode == 1 {
            // Read before wgmma.wait_group: the registers still hold what they held (−1).
            assert!(got.iter().all(|&x| x == -1.0), "accumulators changed before the wait");
            continue;
        }
        assert_eq!(at(0, 0), dd(0, 0, ks.clone()));
        assert_eq!(at(0, 1), dd(0, 1, ks.clone()));
        assert_eq!(at(0, 2), dd(8, 0, ks.clone()));
        assert_eq!(at(0, 3), dd(8, 1, ks.clone()));
        assert_eq!(at(0, 4), dd(0, 8, ks.clone()));
        assert_eq!(at(37, 0), dd(17, 2, ks.clone()));
        assert_eq!(at(37, 2), dd(25, 2, ks.clone()));
        assert_eq!(at(127, 63), dd(63, 127, ks.clone()));
        for block in 0..2 {
            for t in 0..128 {
                for j in 0..16 {
                    for i in 0..4 {
                        let row = 16 * (t / 32) + (t % 32) / 4 + 8 * (i / 2);
                        let col = 8 * j + 2 * (t % 4) + i % 2;
                        assert_eq!(
                            got[(block * 128 + t) * 64 + 4 * j + i],
                            dd(row, col, ks.clone()),
                            "kk {kk} mode {mode} block {block} thread {t} d[{}]",
                            4 * j + i
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn hopper_misuses_are_reported_not_hung() {
    let expected: [(i32, &str); 6] = [
        (0, "mbarrier phase that never completes"),
        (1, "no mbarrier was initialised"),
        (2, "returned while"),
        (3, "not retired by wgmma.wait_group"),
        (4, "outside dynamic shared memory"),
        (5, "more arrivals than"),
    ];
    let (dev, _, _) = device(16, 16);
    for (mode, needle) in expected {
        // SAFETY: the kernel touches only shared memory.
        let err = unsafe { emu_selftest_sm90_broken::launch(&dev, &cfg(1, 128, 8192 + 1024), mode) }
            .expect_err(&format!("mode {mode} was not reported"))
            .to_string();
        println!("mode {mode}: {err}");
        assert!(err.contains(needle), "mode {mode}: {err}");
    }
}

#[test]
fn gemm_mutants_fail() {
    // 300 × 200 × 256 (k: 4 stages of 64, so the pipeline wraps around its stages; 3 × 2 tiles
    // on the 3 emulated multiprocessors: two tiles per block); then the same with icc's
    // increment (a − a_minus, a_minus's values different from a's so that the difference is
    // not a).
    let (m, n, k) = (300usize, 200usize, 256usize);
    let (dev, buf, _) = device(2 * m * k + n * k + m * n, 16);
    let (a, w, o) = (sub(buf, 0, m * k), sub(buf, m * k, n * k), sub(buf, m * k + n * k, m * n));
    let am = sub(buf, m * k + n * k + m * n, m * k);
    let av: Vec<f32> = (0..m * k).map(|i| ((i * 7 + 3) % 9) as f32 - 4.0).collect();
    let amv: Vec<f32> = (0..m * k).map(|i| ((i * 3 + 2) % 5) as f32 - 2.0).collect();
    let wv: Vec<f32> = (0..n * k).map(|i| ((i * 5 + 1) % 7) as f32 - 3.0).collect();
    dev.upload(a, &av.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()).unwrap();
    dev.upload(am, &amv.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()).unwrap();
    dev.upload(w, &wv.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()).unwrap();
    let (ma, mw) = (map(&dev, a, m as u64, k as u64, 128), map(&dev, w, n as u64, k as u64, 128));
    let mam = map(&dev, am, m as u64, k as u64, 128);
    // Small integers: every product and sum is exact in f32, every output exact in f16.
    let want = |minus: bool| -> Vec<f32> {
        let ap = |i: usize| if minus { av[i] - amv[i] } else { av[i] };
        (0..m * n)
            .map(|i| f16::from_f32((0..k).map(|kk| ap(i / n * k + kk) * wv[i % n * k + kk]).sum()).to_f32())
            .collect()
    };
    let run = |minus: bool, mutant: i32| -> std::result::Result<usize, String> {
        dev.upload(o, &vec![f16::from_f32(f32::NAN); m * n]).unwrap();
        let smem = if minus { 197_696 } else { 132_160 };
        // SAFETY: the maps cover a, a_minus and w; `o` holds m × n halves.
        unsafe {
            emu_mutant_gemm_sm90::launch(
                &dev,
                &cfg(3, 384, smem),
                ma,
                mw,
                mam,
                minus as i32,
                o.ptr(),
                m as i32,
                n as i32,
                k as i32,
                mutant,
            )
        }
        .map_err(|e| e.to_string())?;
        let mut got = vec![f16::ZERO; m * n];
        dev.download(o, &mut got).unwrap();
        Ok(got.iter().zip(&want(minus)).filter(|(g, w)| g.to_f32() != **w).count())
    };
    let mutants = [(1, "no full wait"), (2, "no empty wait"), (3, "early release"), (4, "no init barrier")];
    assert_eq!(run(false, 0), Ok(0), "the sound kernel");
    for (mutant, what) in mutants {
        let r = run(false, mutant);
        println!("mutant {mutant} ({what}): {r:?}");
        assert!(!matches!(r, Ok(0)), "mutant {mutant} ({what}) computed the right result");
    }
    assert_eq!(run(true, 0), Ok(0), "the sound kernel, a − a_minus");
    for (mutant, what) in mutants.into_iter().chain([(5, "no subtraction"), (6, "a_minus's bytes not expected")]) {
        let r = run(true, mutant);
        println!("a − a_minus, mutant {mutant} ({what}): {r:?}");
        assert!(!matches!(r, Ok(0)), "a − a_minus, mutant {mutant} ({what}) computed the right result");
    }
}

#[test]
fn conv_mutants_fail() {
    // A 12 × 13 image (156 pixels: 2 row tiles), 64 → 136 channels (2 column tiles): 4 tiles on
    // the 3 emulated multiprocessors, 9 k steps each, so the 4-stage ring wraps within a tile
    // and across the tiles a block walks. Small integers: every sum is exact, every output
    // exact in f16.
    let (h, w, cin, cout) = (12usize, 13usize, 64usize, 136usize);
    let (px, k) = (h * w, 9 * cin);
    let (dev, buf, _) = device(px * cin + cout * k + px * cout, 16);
    let (x, wt, o) = (sub(buf, 0, px * cin), sub(buf, px * cin, cout * k), sub(buf, px * cin + cout * k, px * cout));
    let xv: Vec<f32> = (0..px * cin).map(|i| ((i * 7 + 3) % 9) as f32 - 4.0).collect();
    // Tap-major: column tap·cin + ci.
    let wv: Vec<f32> = (0..cout * k).map(|i| ((i * 5 + 1) % 7) as f32 - 3.0).collect();
    dev.upload(x, &xv.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>()).unwrap();
    dev.upload(wt, &wv.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>()).unwrap();
    let mw = map(&dev, wt, cout as u64, k as u64, 128);
    let want: Vec<f32> = (0..px * cout)
        .map(|i| {
            let (p, co) = (i / cout, i % cout);
            let (y, xx) = ((p / w) as i64, (p % w) as i64);
            let mut acc = 0f32;
            for tap in 0..9 {
                let (yy, xs) = (y + tap as i64 / 3 - 1, xx + tap as i64 % 3 - 1);
                if yy < 0 || xs < 0 || yy >= h as i64 || xs >= w as i64 {
                    continue;
                }
                let q = yy as usize * w + xs as usize;
                acc += (0..cin).map(|ci| xv[q * cin + ci] * wv[co * k + tap * cin + ci]).sum::<f32>();
            }
            f16::from_f32(acc).to_f32()
        })
        .collect();
    let run = |mutant: i32| -> std::result::Result<usize, String> {
        dev.upload(o, &vec![f16::from_f32(f32::NAN); px * cout]).unwrap();
        // SAFETY: the map covers the weight, `x` holds the image, `o` px × cout halves.
        unsafe {
            emu_mutant_conv_sm90::launch(
                &dev,
                &cfg(3, 384, 132_160),
                mw,
                o.ptr(),
                x.ptr(),
                h as i32,
                w as i32,
                cin as i32,
                cout as i32,
                mutant,
            )
        }
        .map_err(|e| e.to_string())?;
        let mut got = vec![f16::ZERO; px * cout];
        dev.download(o, &mut got).unwrap();
        Ok(got.iter().zip(&want).filter(|(g, w)| g.to_f32() != **w).count())
    };
    assert_eq!(run(0), Ok(0), "the sound kernel");
    for (mutant, what) in [(1, "no full wait"), (2, "no empty wait"), (3, "early release"), (4, "no init barrier")] {
        let r = run(mutant);
        println!("conv mutant {mutant} ({what}): {r:?}");
        assert!(!matches!(r, Ok(0)), "conv mutant {mutant} ({what}) computed the right result");
    }
}
