//! The `icdit` binary as a script would use it: outputs, JSON reports, exit codes and
//! error messages, and no partial files.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::{assert_close, fixture, reference};
use icdit::tensorfile::TensorFile;

fn icdit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_icdit")).args(args).output().expect("run icdit")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("icdit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn hd72() -> String {
    fixture("hd72/official.safetensors").display().to_string()
}

#[test]
fn inspect_json_has_the_documented_keys() {
    let o = icdit(&["inspect", &fixture("p4_nosigma/diffusers").display().to_string(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in [
        "layout",
        "depth",
        "hidden_size",
        "num_heads",
        "patch_size",
        "input_size",
        "in_channels",
        "out_channels",
        "learn_sigma",
        "num_classes",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["layout"], "diffusers");
    assert_eq!((v["patch_size"].as_u64(), v["learn_sigma"].as_bool()), (Some(4), Some(false)));
}

#[test]
fn forward_command_reproduces_the_fixture() {
    let out = tmp("fwd.safetensors");
    let input = fixture("hd72/forward.safetensors").display().to_string();
    let o = icdit(&["forward", "--weights", &hd72(), "--input", &input, "--out", &out.display().to_string()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = TensorFile::open(&out).unwrap().read_f32("out").unwrap();
    assert_eq!(got.0, vec![4, 8, 8, 8]);
    assert_close("icdit forward CLI", &got.1, &reference("hd72/forward.safetensors").out, 1e-5);
}

#[test]
fn sample_writes_latents_and_a_json_report() {
    let out = tmp("latents.safetensors");
    let o = icdit(&[
        "sample",
        "--weights",
        &hd72(),
        "--class",
        "1,2,3",
        "--steps",
        "10",
        "--seed",
        "5",
        "--out-latents",
        &out.display().to_string(),
        "--json",
        "--threads",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["steps"], 10);
    assert_eq!(report["step_ms"].as_array().unwrap().len(), 10);
    let f = TensorFile::open(&out).unwrap();
    let (shape, latents) = f.read_f32("latents").unwrap();
    assert_eq!(shape, vec![3, 4, 8, 8]);
    assert!(latents.iter().all(|v| v.is_finite()));
    assert_eq!(f.read_i64("labels").unwrap().1, vec![1, 2, 3]);
    // The same command gives the same bits.
    let again = tmp("latents2.safetensors");
    let o = icdit(&[
        "sample",
        "--weights",
        &hd72(),
        "--class",
        "1,2,3",
        "--steps",
        "10",
        "--seed",
        "5",
        "--out-latents",
        &again.display().to_string(),
    ]);
    assert!(o.status.success());
    assert_eq!(TensorFile::open(&again).unwrap().read_f32("latents").unwrap().1, latents);
}

#[test]
fn bad_settings_exit_with_documented_codes() {
    let w = hd72();
    #[allow(clippy::type_complexity)]
    let cases: &[(&[&str], i32, &str)] = &[
        (&["--class", "10"], 2, "class 10"),
        (&["--class", "1", "--steps", "0"], 2, "steps"),
        (&["--class", "1", "--respacing", "ddim300"], 2, "ddim300"),
        (&["--class", "1", "--cfg", "0.5"], 2, "cfg"),
        (&["--class", "1", "--sampler", "euler"], 2, "euler"),
        (&["--class", "1", "--noise", "/nonexistent/noise.safetensors"], 4, "noise.safetensors"),
    ];
    for (extra, code, words) in cases {
        let mut args = vec!["sample", "--weights", &w];
        args.extend_from_slice(extra);
        let o = icdit(&args);
        let err = stderr(&o);
        println!("{extra:?} → {:?}: {err}", o.status.code());
        assert_eq!(o.status.code(), Some(*code), "{extra:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(words), "{extra:?}: {err}");
    }
}

#[test]
fn noise_file_with_wrong_shape_is_named() {
    // ddim_hd72's z is [2, 4, 8, 8]; asking for 3 images does not fit.
    let z = fixture("diffusion/ddim_hd72.safetensors").display().to_string();
    let o = icdit(&["sample", "--weights", &hd72(), "--class", "1,2,3", "--noise", &z]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("`z`") && stderr(&o).contains("[3, 4, 8, 8]"), "{}", stderr(&o));
}

#[test]
fn unwritable_output_leaves_no_partial_file() {
    let dir = tmp("outdir");
    std::fs::create_dir_all(&dir).unwrap();
    // The output path is an existing directory: the final rename must fail.
    let o = icdit(&[
        "sample",
        "--weights",
        &hd72(),
        "--class",
        "1",
        "--steps",
        "2",
        "--out-latents",
        &dir.display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let leftovers: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let o = icdit(&[
        "sample",
        "--weights",
        &hd72(),
        "--class",
        "1",
        "--steps",
        "2",
        "--out-latents",
        "/nonexistent-dir/x.safetensors",
    ]);
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("/nonexistent-dir/x.safetensors"), "{}", stderr(&o));
}
