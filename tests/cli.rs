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
fn cache_policies_and_step_kinds_are_named_one_way() {
    let w = hd72();
    #[allow(clippy::type_complexity)]
    let cases: &[(&[&str], &[&str])] = &[
        // Unknown names are refused while parsing, naming the flag and the accepted values.
        (&["--cache", "foo"], &["--cache", "foo", "none, reuse, icc"]),
        (&["--compare", "none,foo"], &["--compare", "foo", "none, reuse, icc"]),
        (&["--cache", "icc"], &["--cache icc", "needs --factors"]),
        (&["--cache", "reuse", "--factors", "f.safetensors"], &["--factors", "only used with --cache icc"]),
    ];
    for (extra, words) in cases {
        let mut args = vec!["sample", "--weights", &w, "--class", "1", "--steps", "2"];
        args.extend_from_slice(extra);
        let o = icdit(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.starts_with("error: "), "{extra:?}: {err}");
        for word in *words {
            assert!(err.contains(word), "{extra:?}: lacks `{word}`: {err}");
        }
    }
    let o = icdit(&["bench-forward", "--step", "partial"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--step") && stderr(&o).contains("plain, full, calibrated, reuse"), "{}", stderr(&o));
    // Reports spell the policy as the flag does.
    let o = icdit(&["sample", "--weights", &w, "--class", "1", "--steps", "3", "--cache", "reuse", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["cache"], "reuse");
    assert!(stderr(&o).contains("cache reuse: 2 full steps"), "{}", stderr(&o));
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

fn read_png(path: &std::path::Path) -> (usize, usize, Vec<u8>) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

#[test]
fn decode_writes_pngs_and_npz_that_read_back_to_the_same_pixels() {
    let dir = tmp("decode");
    let _ = std::fs::remove_dir_all(&dir);
    let (pngs, npz, dec) = (dir.join("png"), dir.join("x.npz"), dir.join("decoded.safetensors"));
    let o = icdit(&[
        "decode",
        "--vae",
        &fixture("vae/new").display().to_string(),
        "--latents",
        &fixture("vae/new/latents.safetensors").display().to_string(),
        "--out",
        &pngs.display().to_string(),
        "--npz",
        &npz.display().to_string(),
        "--out-decoded",
        &dec.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The float output matches diffusers.
    let (shape, got) = TensorFile::open(&dec).unwrap().read_f32("decoded").unwrap();
    assert_eq!(shape, [2, 3, 32, 32]);
    let (_, want) = TensorFile::open(&fixture("vae/new/expected.safetensors")).unwrap().read_f32("decoded").unwrap();
    assert_close("icdit decode", &got, &want, 1e-5);
    let mut pixels = vec![0u8; 2 * 32 * 32 * 3];
    icdit::image::to_nhwc_u8(&got, 2, 3, 32, icdit::image::Rounding::Dit, &mut pixels);
    // PNGs: one per image, named with index and class (labels 3 and 7 in the file).
    for (i, class) in [(0, 3), (1, 7)] {
        let (w, h, px) = read_png(&pngs.join(format!("{i:06}-class{class}.png")));
        assert_eq!((w, h), (32, 32));
        assert_eq!(px, pixels[i * 3072..(i + 1) * 3072], "PNG {i}");
    }
    // NPZ: arr_0 uint8 (N, H, W, C).
    let mut arch = npyz::npz::NpzArchive::open(&npz).unwrap();
    let arr = arch.by_name("arr_0").unwrap().expect("arr_0");
    assert_eq!(arr.shape(), &[2, 32, 32, 3]);
    let data: Vec<u8> = arr.into_vec().unwrap();
    assert_eq!(data, pixels);
    assert!(pixels.iter().any(|&p| p != pixels[0]), "pixels are not constant");
    // No temporary files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .chain(std::fs::read_dir(&pngs).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn sample_through_a_vae_writes_images_named_by_index_class_and_seed() {
    let dir = tmp("sample-vae");
    let _ = std::fs::remove_dir_all(&dir);
    let o = icdit(&[
        "sample",
        "--weights",
        &hd72(),
        "--vae",
        &fixture("vae/new").display().to_string(),
        "--class",
        "1,4",
        "--steps",
        "3",
        "--seed",
        "9",
        "--out",
        &dir.join("imgs").display().to_string(),
        "--grid",
        &dir.join("grid.png").display().to_string(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["vae_decode_s"].as_f64().unwrap() > 0.0);
    for name in ["000000-class1-seed9.png", "000001-class4-seed9.png"] {
        let (w, h, _) = read_png(&dir.join("imgs").join(name));
        assert_eq!((w, h), (32, 32), "{name}");
    }
    let (w, h, _) = read_png(&dir.join("grid.png"));
    assert_eq!((w, h), (2 + 2 * 34, 2 + 34));
}

#[test]
fn vae_errors_name_the_problem() {
    // Latent channels differ: rgb_h6 samples 3 channels, the VAE decodes 4.
    let o = icdit(&[
        "sample",
        "--weights",
        &fixture("rgb_h6/official.safetensors").display().to_string(),
        "--vae",
        &fixture("vae/new").display().to_string(),
        "--steps",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("4-channel latents but the DiT samples 3 channels"), "{}", stderr(&o));
    // Image outputs from a latent model without a VAE.
    let o = icdit(&["sample", "--weights", &hd72(), "--steps", "2", "--grid", &tmp("never.png").display().to_string()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--vae"), "{}", stderr(&o));
    assert!(!tmp("never.png").exists());
    // An output folder that cannot be created (a file is in the way): fails before sampling.
    let blocker = tmp("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    let inside = blocker.join("pngs");
    let o = icdit(&[
        "decode",
        "--vae",
        &fixture("vae/new").display().to_string(),
        "--latents",
        &fixture("vae/new/latents.safetensors").display().to_string(),
        "--out",
        &inside.display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains(&inside.display().to_string()), "{}", stderr(&o));
    // Unknown rounding.
    let o = icdit(&["sample", "--steps", "2", "--rounding", "bankers"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--rounding"), "{}", stderr(&o));
}

#[test]
fn backends_are_chosen_and_refused_clearly() {
    let w = hd72();
    // An unknown backend is a settings error.
    let o = icdit(&["sample", "--weights", &w, "--class", "1", "--backend", "tpu"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("`tpu`: expected cpu, cuda or emu"), "{}", stderr(&o));
    // cuda: in a build without the feature, or on a machine without a GPU, a device error.
    let o = icdit(&["sample", "--weights", &w, "--class", "1", "--steps", "2", "--backend", "cuda"]);
    if cfg!(feature = "cuda") && o.status.success() {
        println!("--backend cuda ran: a GPU is present");
    } else {
        assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains("without CUDA support") || err.contains("no CUDA GPU") || err.contains("CUDA call"),
            "{err}"
        );
        println!("--backend cuda refused: {err}");
    }
    // emu: the GPU pipeline on the emulation gives the CPU backend's latents to f16 accuracy.
    let (cpu, emu) = (tmp("backend-cpu.safetensors"), tmp("backend-emu.safetensors"));
    for (backend, path) in [("cpu", &cpu), ("emu", &emu)] {
        let o = icdit(&[
            "sample",
            "--weights",
            &w,
            "--class",
            "1,7",
            "--steps",
            "4",
            "--sampler",
            "ddim",
            "--seed",
            "3",
            "--backend",
            backend,
            "--out-latents",
            &path.display().to_string(),
            "--json",
        ]);
        assert!(o.status.success(), "{backend}: {}", stderr(&o));
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(report["backend"], backend);
    }
    let read = |p: &PathBuf| TensorFile::open(p).unwrap().read_f32("latents").unwrap().1;
    assert_close("icdit sample --backend emu vs cpu", &read(&emu), &read(&cpu), 1e-2);
}

#[test]
fn sample_and_decode_on_the_emulated_gpu_match_the_cpu_images() {
    let dir = tmp("emu-vae");
    let _ = std::fs::remove_dir_all(&dir);
    let vae = fixture("vae/new").display().to_string();
    let mut pixels = Vec::new();
    for backend in ["cpu", "emu"] {
        let out = dir.join(backend);
        let o = icdit(&[
            "sample",
            "--weights",
            &hd72(),
            "--vae",
            &vae,
            "--class",
            "1,4",
            "--steps",
            "3",
            "--seed",
            "9",
            "--backend",
            backend,
            "--out",
            &out.display().to_string(),
        ]);
        assert!(o.status.success(), "{backend}: {}", stderr(&o));
        let (w, h, px) = read_png(&out.join("000001-class4-seed9.png"));
        assert_eq!((w, h), (32, 32));
        pixels.push(px);
    }
    let diff: Vec<i32> = pixels[0].iter().zip(&pixels[1]).map(|(&a, &b)| (a as i32 - b as i32).abs()).collect();
    let (worst, n) = (*diff.iter().max().unwrap(), diff.iter().filter(|&&d| d > 0).count());
    println!(
        "emu vs cpu (sampler and VAE on the emulated GPU): {n} of {} values differ, at most by {worst}",
        diff.len()
    );
    // f16 sampling then an f16 decode: measured 175 of 3072 values (5.7%) by 1 level.
    assert!(worst <= 2 && n * 10 <= diff.len(), "{n} values differ, worst by {worst}");
}

/// `cache-report` across policies: one row per setting with quality, MAC and time ratios, the
/// equalities the policies promise (fora = reuse, taylor order 0 = fora), and the frontier PNG.
#[test]
fn cache_report_compares_policies_and_draws_the_frontier() {
    let plot = tmp("frontier.png");
    let o = icdit(&[
        "cache-report",
        "--weights",
        &hd72(),
        "--policies",
        "none,reuse,fora,taylor",
        "--periods",
        "2,3",
        "--orders",
        "0,2",
        "--steps",
        "6",
        "--per-class",
        "1",
        "--threads",
        "2",
        "--json",
        "--plot",
        &plot.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let json = text.lines().find(|l| l.starts_with('{')).expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let rows = v["results"].as_array().unwrap();
    // none, then per period reuse, fora and taylor orders 0 and 2.
    assert_eq!(rows.len(), 1 + 2 * 4, "{json}");
    let find = |policy: &str, setting: &str| {
        rows.iter()
            .find(|r| r["policy"] == policy && r["setting"] == setting)
            .unwrap_or_else(|| panic!("{policy} {setting}"))
    };
    for p in [2, 3] {
        let (reuse, fora) = (find("reuse", &format!("period {p}")), find("fora", &format!("period {p}")));
        let order0 = find("taylor", &format!("order 0 period {p} warm-up 2"));
        let order2 = find("taylor", &format!("order 2 period {p} warm-up 2"));
        assert_eq!(reuse["rel_l2"], fora["rel_l2"], "fora is reuse");
        assert!(reuse["rel_l2"].as_f64().unwrap() > 0.0);
        // Warm-up 2 makes step 1 full too: more MACs than fora, a different sample.
        assert!(order0["mac_ratio"].as_f64() > fora["mac_ratio"].as_f64());
        assert_ne!(order0["rel_l2"], order2["rel_l2"]);
        for r in [reuse, fora, order0, order2] {
            let t = r["time_ratio"].as_f64().unwrap();
            assert!(t > 0.0 && t.is_finite(), "{r}");
        }
    }
    assert!(text.contains("| policy | setting | rel. L2 | PSNR dB | MAC ratio | time ratio |"), "{text}");
    assert!(text.contains("time ≤ 0.35"), "{text}");
    let (w, h, px) = read_png(&plot);
    assert_eq!((w, h), (1500, 640));
    // Text and markers were drawn: dark pixels (glyphs) and the policies' colours.
    assert!(px.chunks(3).any(|c| c[0] < 60 && c[1] < 60 && c[2] < 60));
    assert!(px.chunks(3).any(|c| c == [44, 160, 44]), "taylor's green markers");
}
