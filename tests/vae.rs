//! The CPU VAE decoder against diffusers' AutoencoderKL (tests/fixtures/vae, made by
//! tools/make_vae_fixtures.py), the uint8 conversions bit for bit, and bad VAE files.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{assert_close, fixture, TempDir};
use icdit::cpu::Isa;
use icdit::image::{to_u8, to_u8_diffusers, Rounding};
use icdit::tensorfile::TensorFile;
use icdit::vae::{AttnNaming, VaeDecoder, VaeModel};
use icdit::Error;

fn u8_tensor(path: &Path, name: &str) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::U8, "{name}");
    t.data().to_vec()
}

/// Decodes a fixture's latents with `threads` on every CPU path this machine runs and checks
/// floats and both uint8 conversions.
fn check_fixture(name: &str, naming: AttnNaming, threads: usize) {
    for isa in common::isas(&format!("VAE {name}")) {
        check_fixture_on(name, naming, threads, isa);
    }
}

fn check_fixture_on(name: &str, naming: AttnNaming, threads: usize, isa: Isa) {
    let model = Arc::new(VaeModel::load(&fixture(&format!("vae/{name}"))).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(model.naming, Some(naming));
    let lat = TensorFile::open(&fixture(&format!("vae/{name}/latents.safetensors"))).unwrap();
    let (shape, latents) = lat.read_f32("latents").unwrap();
    let exp_path = fixture(&format!("vae/{name}/expected.safetensors"));
    let exp = TensorFile::open(&exp_path).unwrap();
    let (eshape, expected) = exp.read_f32("decoded").unwrap();
    let mut dec = VaeDecoder::new(Arc::clone(&model), shape[2], threads).unwrap().with_isa(isa);
    assert_eq!(dec.out_side(), eshape[2]);
    let (ll, il) = (dec.latent_len(), dec.image_len());
    let mut got = vec![0.0f32; shape[0] * il];
    for i in 0..shape[0] {
        dec.decode(&latents[i * ll..(i + 1) * ll], &mut got[i * il..(i + 1) * il]).unwrap();
    }
    // Tolerance 1e-5 relative L2 (the reference's own f32-vs-f64 error is ~5e-7).
    assert_close(&format!("VAE {name} decode, {threads} threads ({isa})"), &got, &expected, 1e-5);
    let (_, exact) = exp.read_f32("decoded_f64").unwrap();
    let err = common::rel_l2(&got, &exact);
    println!("VAE {name} ({isa}): against diffusers' f64 decode {err:.3e}");

    let side = dec.out_side();
    for (rounding, tensor) in [(Rounding::Dit, "u8_dit"), (Rounding::Diffusers, "u8_diffusers")] {
        let want = u8_tensor(&exp_path, tensor);
        let mut mine = vec![0u8; want.len()];
        icdit::image::to_nhwc_u8(&got, shape[0], 3, side, rounding, &mut mine);
        // Exact, except ±1 where the float lies within 1e-4 of a rounding boundary.
        let (mut off, mut near) = (0, 0);
        for (k, (&a, &b)) in mine.iter().zip(&want).enumerate() {
            if a != b {
                let (n, p, c) = (k / (side * side * 3), (k / 3) % (side * side), k % 3);
                let x = got[(n * 3 + c) * side * side + p];
                let frac = (127.5 * x as f64 + 127.5).fract();
                let boundary = (frac - 0.5).abs() * 2.0 / 255.0;
                assert!(a.abs_diff(b) == 1 && boundary < 1e-4, "{name} {tensor}[{k}]: {a} vs {b} (x = {x})");
                near += 1;
            }
            off += usize::from(a != b);
        }
        println!(
            "VAE {name} {tensor}: {off} of {} pixels differ (all by 1 at a rounding boundary: {near})",
            want.len()
        );
    }
}

#[test]
fn decoder_matches_diffusers_new_attention_names() {
    check_fixture("new", AttnNaming::New, 2);
}

#[test]
fn decoder_matches_diffusers_old_attention_names() {
    check_fixture("old", AttnNaming::Old, 1);
}

#[test]
fn scaling_factor_defaults_and_config_values() {
    let new = VaeModel::load(&fixture("vae/new")).unwrap();
    assert_eq!(new.config.scaling_factor, 0.18215);
    assert_eq!(new.config.block_out_channels, vec![16, 24, 24]);
    assert_eq!((new.config.layers_per_block, new.config.norm_num_groups), (1, 8));
    let old = VaeModel::load(&fixture("vae/old")).unwrap();
    assert_eq!(old.config.scaling_factor, 0.5);
    assert_eq!(old.config.out_side(8), 16);
}

#[test]
fn uint8_conversions_match_dit_and_diffusers_bit_for_bit() {
    let path = fixture("vae/u8_conversion.safetensors");
    let (_, x) = TensorFile::open(&path).unwrap().read_f32("x").unwrap();
    let (dit, diff) = (u8_tensor(&path, "u8_dit"), u8_tensor(&path, "u8_diffusers"));
    let mut differ = 0;
    for (i, &v) in x.iter().enumerate() {
        assert_eq!(to_u8(v), dit[i], "DiT conversion of {v:e}");
        assert_eq!(to_u8_diffusers(v), diff[i], "diffusers conversion of {v:e}");
        differ += usize::from(dit[i] != diff[i]);
    }
    assert!(differ > 100, "the fixture separates the two conversions ({differ} values differ)");
    println!("{} values at rounding boundaries: DiT and diffusers conversions differ on {differ}", x.len());
}

fn copy_dir(from: &Path, to: &Path, skip: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if !skip.contains(&name.to_str().unwrap()) {
            std::fs::copy(e.path(), to.join(&name)).unwrap();
        }
    }
}

#[test]
fn unknown_attention_naming_is_rejected_by_name() {
    let err = VaeModel::load(&fixture("vae/unknown_attn")).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, Error::Layout { .. }), "{err:?}");
    assert!(msg.contains("unknown mid-block attention key naming") && msg.contains("q_proj"), "{msg}");
    assert!(msg.contains("to_q") && msg.contains("query"), "{msg}");
}

#[test]
fn missing_config_with_unidentifiable_shapes_is_an_error() {
    // `new` has 8 groups and widths 16/24: without config.json the shapes do not say so.
    let d = TempDir::new("noconfig");
    copy_dir(&fixture("vae/new"), &d, &["config.json"]);
    let err = VaeModel::load(&d).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    assert!(msg.contains("no config.json") && msg.contains("do not identify"), "{msg}");
}

#[test]
fn config_that_contradicts_the_shapes_names_the_tensor() {
    let d = TempDir::new("badconfig");
    copy_dir(&fixture("vae/new"), &d, &[]);
    let text = std::fs::read_to_string(d.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["block_out_channels"] = serde_json::json!([16, 24, 32]);
    std::fs::write(d.join("config.json"), v.to_string()).unwrap();
    let err = VaeModel::load(&d).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, Error::Shape { .. }), "{err:?}");
    assert!(msg.contains("decoder.") && msg.contains("expected"), "{msg}");
}

#[test]
fn not_a_vae_and_bad_latents_are_errors() {
    let err = VaeModel::load(&fixture("hd72/official.safetensors")).unwrap_err();
    assert!(matches!(err, Error::Layout { .. }) && err.to_string().contains("decoder"), "{err}");
    let model = Arc::new(VaeModel::load(&fixture("vae/new")).unwrap());
    let mut dec = VaeDecoder::new(model, 8, 1).unwrap();
    let mut img = vec![0.0; dec.image_len()];
    let mut lat = vec![0.1f32; dec.latent_len()];
    assert!(dec.decode(&lat[1..], &mut img).is_err(), "short latent");
    lat[17] = f32::NAN;
    let err = dec.decode(&lat, &mut img).unwrap_err();
    assert!(err.to_string().contains("index 17"), "{err}");
}
