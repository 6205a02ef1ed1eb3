//! The CPU instruction-set override as a user meets it: `ICDIT_CPU_ISA` picks the path,
//! reports name it, a path the CPU lacks or an unknown name is a clear error (exit 2), and the
//! sampled images of every SIMD path are the same bytes.

use std::process::{Command, Output};

use icdit::cpu::{Isa, IsaKind};

mod common;
use common::TempDir;

const BUNDLED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/weights/icdit-shapes-32.safetensors");

fn icdit(isa: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_icdit"));
    cmd.args(args).env_remove("ICDIT_CPU_ISA");
    if let Some(isa) = isa {
        cmd.env("ICDIT_CPU_ISA", isa);
    }
    cmd.output().expect("run icdit")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn inspect_names_the_path_in_use_and_the_ones_available() {
    let available: Vec<&str> = Isa::available().map(|i| i.name()).collect();
    println!("paths on this machine: {available:?}");
    let o = icdit(None, &["inspect", BUNDLED]);
    assert!(o.status.success(), "{}", text(&o));
    let line = text(&o).lines().find(|l| l.starts_with("CPU path")).map(str::to_string).expect("a CPU path line");
    assert!(line.contains(Isa::best().name()) && line.contains(&available.join(", ")), "{line}");
    for isa in &available {
        let o = icdit(Some(isa), &["inspect", BUNDLED, "--json"]);
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["cpu_isa"], *isa);
        assert_eq!(v["cpu_isas_available"], serde_json::json!(available));
    }
}

#[test]
fn a_path_the_cpu_lacks_or_an_unknown_name_is_refused() {
    let missing: Vec<IsaKind> = IsaKind::ALL.into_iter().filter(|k| !k.supported()).collect();
    assert!(!missing.is_empty(), "some path is always foreign (NEON on x86-64, AVX on aarch64)");
    let dir = TempDir::new("refused");
    let out = dir.join("latents.safetensors");
    let out_s = out.display().to_string();
    for kind in missing {
        let o = icdit(Some(kind.name()), &["sample", "--steps", "2", "--class", "1", "--out-latents", &out_s]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{kind}: {t}");
        assert!(t.contains(&format!("ICDIT_CPU_ISA={}", kind.name())) && t.contains("available: scalar"), "{t}");
        println!("{kind}: {}", t.trim());
        assert!(!out.exists(), "a refused run wrote {}", out.display());
    }
    let o = icdit(Some("sse9"), &["bench-forward", "--family", "S/2", "--image-size", "64", "--runs", "1"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("ICDIT_CPU_ISA=sse9") && t.contains("scalar, avx2, avx512, neon"), "{t}");
}

/// The JSON reports name the path, and the bundled model's latents are the same bytes on
/// every SIMD path (the scalar one, without fused multiply-adds, rounds differently).
#[test]
fn reports_name_the_path_and_simd_paths_sample_the_same_bytes() {
    let dir = TempDir::new("paths");
    let mut simd: Vec<(String, Vec<u8>)> = Vec::new();
    for isa in Isa::available() {
        let o = icdit(
            Some(isa.name()),
            &["bench-forward", "--family", "S/2", "--image-size", "64", "--runs", "1", "--warmup", "0"],
        );
        assert!(o.status.success(), "{}", text(&o));
        let last = String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or_default().to_string();
        let v: serde_json::Value = serde_json::from_str(&last).unwrap_or_else(|e| panic!("{e}: {last}"));
        assert_eq!(v["gemm_kernel"], isa.name());

        let lat = dir.join(format!("{isa}.safetensors"));
        let lat_s = lat.display().to_string();
        let o = icdit(
            Some(isa.name()),
            &["sample", "--steps", "4", "--class", "0,7", "--seed", "3", "--json", "--out-latents", &lat_s],
        );
        assert!(o.status.success(), "{}", text(&o));
        let json = String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or_default().to_string();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
        assert_eq!(v["cpu_isa"], isa.name());
        let bytes = std::fs::read(&lat).unwrap();
        if isa.kind() != IsaKind::Scalar {
            simd.push((isa.name().to_string(), bytes));
        }
    }
    println!("SIMD paths compared: {:?}", simd.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>());
    if simd.len() < 2 {
        println!("fewer than two SIMD paths on this CPU: nothing to compare bytes with (the NEON bytes are compared with AVX2 in scripts/ci-aarch64.sh)");
    }
    for (name, bytes) in &simd[1.min(simd.len())..] {
        assert!(bytes == &simd[0].1, "the {name} and {} paths sampled different latents", simd[0].0);
    }
}
