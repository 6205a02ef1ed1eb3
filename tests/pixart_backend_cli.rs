//! `icdit forward`, `sample` and `bench-gpu --pixart` on a PixArt-α folder with `--backend emu`
//! (the GPU pipeline on the CPU emulation of CUDA; tests/gpu_pixart.rs checks the library
//! calls). Kept out of the `gpu_*` test binaries, which the GPU check runs on a machine without
//! the `icdit` binary at its build path.

mod common;

use common::pixart::{sample_tiny, tiny};
use common::{assert_close, fixture, icdit, p, TempDir};
use icdit::tensorfile::TensorFile;

/// As tests/gpu_pixart.rs: the f16 bound of one forward pass, and of guided sampling.
const FORWARD_TOL: f64 = 2e-3;
const GUIDED_TOL: f64 = 5e-3;

/// `icdit forward --backend emu` writes diffusers' output within the f16 bound; `icdit sample
/// --backend emu` the CPU backend's latents within the guided bound (DPM-Solver++, 6 steps),
/// and `--compare none,reuse` runs on it too; `bench-gpu --pixart` times each step kind;
/// `--backend cuda` without the feature says so.
#[test]
fn cli_backend_emu() {
    let dir = TempDir::new("pixart-gpu-cli");
    let out = dir.join("out.safetensors");
    let input = fixture("pixart/forward_in.safetensors");
    let (ok, err) =
        icdit(&["forward", "--weights", p(&tiny()), "--input", p(&input), "--out", p(&out), "--backend", "emu"]);
    assert!(ok && err.contains("on emu"), "{err}");
    let got = TensorFile::open(&out).unwrap().read_f32("out").unwrap();
    let diffusers = TensorFile::open(&fixture("pixart/forward_out.safetensors")).unwrap().read_f32("out").unwrap().1;
    assert_close("icdit forward --backend emu vs diffusers", &got.1, &diffusers, FORWARD_TOL);
    let z = fixture("pixart/noise.safetensors");
    let mut latents = Vec::new();
    for backend in ["emu", "cpu"] {
        let lat = dir.join(format!("{backend}.safetensors"));
        let (ok, err) =
            sample_tiny("6", &["--noise", p(&z), "--threads", "2", "--backend", backend, "--out-latents", p(&lat)]);
        assert!(ok && err.contains(&format!("on {backend}")), "{err}");
        latents.push(TensorFile::open(&lat).unwrap().read_f32("latents").unwrap().1);
    }
    assert_close("icdit sample --backend emu vs cpu", &latents[0], &latents[1], GUIDED_TOL);
    let cmp = dir.join("compare.png");
    let vae = fixture("vae/new");
    let (ok, err) =
        sample_tiny("4", &["--backend", "emu", "--compare", "none,reuse", "--vae", p(&vae), "--grid", p(&cmp)]);
    assert!(ok && err.contains("reuse: relative L2 of the latents to `none`"), "{err}");
    assert!(std::fs::read(&cmp).unwrap().starts_with(b"\x89PNG"), "{err}");
    // bench-gpu --pixart on the emulation: a row per step kind, the JSON line last.
    let bench = std::process::Command::new(env!("CARGO_BIN_EXE_icdit"))
        .args(["bench-gpu", "--backend", "emu", "--pixart", p(&tiny()), "--iters", "1", "--pixart-factors"])
        .arg(fixture("pixart/factors_rank4.safetensors"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&bench.stdout);
    assert!(bench.status.success(), "{}", String::from_utf8_lossy(&bench.stderr));
    for row in ["| 1 | none | plain |", "| 1 | reuse | reuse |", "| 1 | icc | calibrated |"] {
        assert!(stdout.contains(row), "{stdout}");
    }
    assert!(stdout.trim_end().lines().last().unwrap().contains("\"tool\":\"icdit bench-gpu --pixart\""), "{stdout}");
    if !cfg!(feature = "cuda") {
        let (ok, err) =
            icdit(&["forward", "--weights", p(&tiny()), "--input", p(&input), "--out", p(&out), "--backend", "cuda"]);
        assert!(!ok && err.contains("without CUDA support"), "{err}");
    }
}
