//! PixArt-XL-2-1024-MS features on the CPU backend against diffusers 0.42.1 (fixtures by
//! `tools/make_pixart_ms_fixtures.py`): the resolution and aspect-ratio micro-conditions
//! (`use_additional_conditions`), latents that are not the trained size (the position table
//! computed for their grid), a guided DPM-Solver++ run on a non-square latent, resolution
//! binning and the resize back, and the `forward` / `sample` commands at such sizes.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{assert_close, fixture, icdit, p, rel_l2, TempDir};
use icdit::pixart::size::{bins_for, classify, resize_and_crop};
use icdit::pixart::{
    Embeddings, ImageSize, PixArtConfig, PixArtCpu, PixArtCpuOptions, PixArtEngine, PixArtModel, PixArtOptions,
    PixArtRequest, PixArtRunner,
};
use icdit::tensorfile::{write_safetensors, TensorFile};

fn tiny_ms() -> PathBuf {
    fixture("pixart_ms/tiny_ms")
}

fn load_at(dir: &Path, h: usize, w: usize) -> Arc<PixArtModel> {
    Arc::new(PixArtModel::load_at(dir, Some((h, w))).unwrap_or_else(|e| panic!("{e}")))
}

fn read(file: &str, name: &str) -> Vec<f32> {
    TensorFile::open(&fixture(&format!("pixart_ms/{file}.safetensors"))).unwrap().read_f32(name).unwrap().1
}

fn read_i64(file: &str, name: &str) -> Vec<i64> {
    TensorFile::open(&fixture(&format!("pixart_ms/{file}.safetensors"))).unwrap().read_i64(name).unwrap().1
}

/// A CPU transformer for 2 rows of the fixture's 6-token caption.
fn cpu(model: &Arc<PixArtModel>) -> PixArtCpu {
    PixArtCpu::new(
        Arc::clone(model),
        &PixArtCpuOptions { max_rows: 2, max_text_len: 6, threads: 2, ..Default::default() },
    )
    .unwrap()
}

fn forward(cpu: &mut PixArtCpu, x: &[f32]) -> Vec<f32> {
    let t: Vec<f32> = read_i64("forward", "t").iter().map(|&t| t as f32).collect();
    let (text, mask) = (read("forward", "encoder_hidden_states"), read_i64("forward", "encoder_attention_mask"));
    let mut out = vec![0.0; 2 * cpu.model().config.out_elems()];
    cpu.forward(x, &t, &text, &mask, 6, None, &mut out).unwrap();
    out
}

/// The micro-conditions on an 8×12 latent (trained 8×8), a different resolution and aspect
/// ratio per row: diffusers' output within 1e-5 relative L2 (measured 1.8e-6). Swapping the rows'
/// conditions changes it by far more, and a pass without them is refused.
#[test]
fn micro_conditions_match_diffusers() {
    let model = load_at(&tiny_ms(), 8, 12);
    assert!(model.config.use_additional_conditions);
    let mut cpu = cpu(&model);
    let x = read("forward", "x");
    let mut three = vec![0.0; 2 * model.config.out_elems()];
    let err = cpu
        .forward(&x, &[999.0, 420.0], &read("forward", "encoder_hidden_states"), &[1; 12], 6, None, &mut three)
        .unwrap_err();
    assert!(err.to_string().contains("use_additional_conditions"), "{err}");
    let (res, ar) = (read("forward", "resolution"), read("forward", "aspect_ratio"));
    cpu.stage_size(&res, &ar, 2).unwrap();
    let want = read("forward", "out");
    assert_close("forward with micro-conditions, 8×12 latent", &forward(&mut cpu, &x), &want, 1e-5);
    cpu.stage_size(&[res[2], res[3], res[0], res[1]], &[ar[1], ar[0]], 2).unwrap();
    let swapped = rel_l2(&forward(&mut cpu, &x), &want);
    assert!(swapped > 1e-2, "the conditions made no difference ({swapped:.3e})");
}

/// A model without micro-conditions on a 12×8 latent: the position table for that grid from
/// the trained base size, diffusers' output within 1e-5 (measured 1.4e-6); it takes no conditions.
#[test]
fn non_square_latent_matches_diffusers() {
    let model = load_at(&fixture("pixart/tiny"), 12, 8);
    let mut cpu = cpu(&model);
    assert!(cpu.stage_size(&[96.0, 64.0], &[1.5], 1).is_err());
    assert_close(
        "forward, 12×8 latent",
        &forward(&mut cpu, &read("forward", "x_plain")),
        &read("forward", "out_plain"),
        1e-5,
    );
    let err = PixArtModel::load_at(&fixture("pixart/tiny"), Some((12, 7))).unwrap_err();
    assert!(err.to_string().contains("patch_size"), "{err}");
}

fn embeds(embeds: &str, mask: &str) -> Embeddings {
    let f = TensorFile::open(&fixture("pixart_ms/sampling.safetensors")).unwrap();
    let (shape, e) = f.read_f32(embeds).unwrap();
    Embeddings::new(e, f.read_i64(mask).unwrap().1, shape[0], shape[1], shape[2]).unwrap()
}

/// 5 guided DPM-Solver++ steps on a 12×8 latent with the pipeline's added_cond_kwargs
/// (resolution 96×64, aspect 1.5 on every row): diffusers' final latents within 1e-4
/// relative L2 (measured 1.6e-6).
#[test]
fn sampling_non_square_with_conditions() {
    let model = load_at(&tiny_ms(), 12, 8);
    let opts = PixArtOptions { max_batch: 2, max_text_len: 6, steps: 5, threads: 2, ..Default::default() };
    let mut engine = PixArtEngine::new(Arc::clone(&model), &opts).unwrap();
    let want_ts: Vec<usize> = read_i64("sampling", "timesteps").iter().map(|&t| t as usize).collect();
    assert_eq!(engine.schedule().timesteps, want_ts);
    let (prompt, negative) = (embeds("prompt_embeds", "attention_mask"), embeds("negative_embeds", "negative_mask"));
    let z = read("sampling", "z");
    let req = PixArtRequest { prompt: &prompt, negative: Some(&negative), noise: Some(&z), seed: 0, first_index: 0 };
    let mut out = vec![0.0; z.len()];
    engine.sample(&req, &mut out, &mut |_| {}).unwrap();
    let traj = read("sampling", "trajectory");
    assert_close("guided DPM-Solver++, 12×8 latent, micro-conditions", &out, &traj[traj.len() - z.len()..], 1e-4);
}

/// Resolution binning picks diffusers' bins for ten requests on each table; the resize back
/// is `resize_and_crop_tensor`'s within 1e-6 relative L2 (measured 2e-7; bilinear weights formed as torch forms them).
#[test]
fn binning_and_resize_match_diffusers() {
    let text = std::fs::read_to_string(fixture("pixart_ms/bins.json")).unwrap();
    let bins: std::collections::HashMap<String, Vec<[usize; 4]>> = serde_json::from_str(&text).unwrap();
    for (name, sample_size) in [("1024", 128), ("512", 64), ("256", 32)] {
        let table = bins_for(sample_size).unwrap();
        for &[h, w, bh, bw] in &bins[name] {
            assert_eq!(classify(h, w, table), (bh, bw), "{h}×{w} on the {name} table");
        }
    }
    for (i, (src, dst)) in [((12, 20), (16, 16)), ((24, 16), (10, 14)), ((8, 8), (13, 9))].into_iter().enumerate() {
        let want = read("resize", &format!("out_{i}"));
        let mut got = vec![0.0; want.len()];
        resize_and_crop(&read("resize", &format!("in_{i}")), 3, src, dst, &mut got);
        assert_close(&format!("resize_and_crop {src:?} → {dst:?}"), &got, &want, 1e-6);
    }
}

/// The sizes a request samples: binning on a 1024-MS config, refused for a sample_size
/// without bins, and sides that are not multiples of 8 × the patch size refused without it.
#[test]
fn image_sizes() {
    let tiny = PixArtConfig::load(&tiny_ms()).unwrap();
    let ms = PixArtConfig { sample_size: 128, height: 128, width: 128, ..tiny };
    let s = ImageSize::plan(&ms, Some(1080), Some(1920), true).unwrap();
    assert_eq!((s.sampled, s.latent(), s.resized()), ((768, 1344), (96, 168), true));
    assert_eq!(ImageSize::plan(&ms, None, None, true).unwrap().sampled, (1024, 1024));
    let err = ImageSize::plan(&tiny, Some(96), Some(64), true).unwrap_err().to_string();
    assert!(err.contains("--no-resolution-binning"), "{err}");
    assert_eq!(ImageSize::plan(&tiny, Some(96), Some(64), false).unwrap().latent(), (12, 8));
    let err = ImageSize::plan(&tiny, Some(100), Some(64), false).unwrap_err().to_string();
    assert!(err.contains("multiple of 16"), "{err}");
}

/// `icdit forward` reads `resolution`/`aspect_ratio` and sizes the model from `x`; `icdit
/// sample --height 96 --width 64 --no-resolution-binning` samples the 12×8 latent with the
/// pipeline's conditions (diffusers' latents within 1e-4); decoding needs a VAE the folder lacks.
#[test]
fn cli_forward_and_sample_at_a_size() {
    let dir = TempDir::new("pixart-ms-cli");
    let out = dir.join("out.safetensors");
    let input = fixture("pixart_ms/forward.safetensors");
    let (ok, err) = icdit(&["forward", "--weights", p(&tiny_ms()), "--input", p(&input), "--out", p(&out)]);
    assert!(ok, "{err}");
    let got = TensorFile::open(&out).unwrap().read_f32("out").unwrap();
    assert_eq!(got.0, vec![2, 8, 8, 12]);
    assert_close("icdit forward, micro-conditions", &got.1, &read("forward", "out"), 1e-5);
    // Without the conditions the input is refused, naming them.
    let f = TensorFile::open(&input).unwrap();
    let bare = dir.join("bare.safetensors");
    let (xs, x) = f.read_f32("x").unwrap();
    let (es, e) = f.read_f32("encoder_hidden_states").unwrap();
    let t: Vec<f32> = vec![999.0, 420.0];
    let ti: Vec<i64> = t.iter().map(|&v| v as i64).collect();
    let m = f.read_i64("encoder_attention_mask").unwrap().1;
    write_safetensors(
        &bare,
        &[("x", &xs, &x), ("encoder_hidden_states", &es, &e)],
        &[("t", &[2], &ti), ("encoder_attention_mask", &[2, 6], &m)],
        None,
    )
    .unwrap();
    let (ok, err) = icdit(&["forward", "--weights", p(&tiny_ms()), "--input", p(&bare), "--out", p(&out)]);
    assert!(!ok && err.contains("resolution"), "{err}");

    let lat = dir.join("latents.safetensors");
    let sampling = fixture("pixart_ms/sampling.safetensors");
    let neg = fixture("pixart_ms/negative_embeds.safetensors");
    let weights = tiny_ms();
    let args = [
        "sample",
        "--weights",
        p(&weights),
        "--prompt-embeds",
        p(&sampling),
        "--negative-embeds",
        p(&neg),
        "--noise",
        p(&sampling),
        "--steps",
        "5",
        "--height",
        "96",
        "--width",
        "64",
    ];
    let (ok, err) = icdit(&[&args[..], &["--out-latents", p(&lat)]].concat());
    assert!(!ok && err.contains("--no-resolution-binning"), "{err}");
    let (ok, err) = icdit(&[&args[..], &["--no-resolution-binning", "--out-latents", p(&lat)]].concat());
    assert!(ok, "{err}");
    let got = TensorFile::open(&lat).unwrap().read_f32("latents").unwrap();
    assert_eq!(got.0, vec![2, 4, 12, 8]);
    let traj = read("sampling", "trajectory");
    assert_close("icdit sample --height 96 --width 64", &got.1, &traj[traj.len() - got.1.len()..], 1e-4);
    let (ok, err) = icdit(&[&args[..], &["--no-resolution-binning", "--grid", p(&dir.join("g.png"))]].concat());
    assert!(!ok && err.contains("VAE"), "{err}");
}

/// tools/convert_pixart_checkpoint.py's output for tiny_ms written in the official `.pth`
/// layout (tests/fixtures/pixart_ms/converted): the same config, and our forward on it is
/// diffusers' on the original within 1e-5 (measured 1.8e-6; the round trip is exact).
#[test]
fn converted_official_checkpoint() {
    let converted = fixture("pixart_ms/converted");
    assert_eq!(PixArtConfig::load(&converted).unwrap(), PixArtConfig::load(&tiny_ms()).unwrap());
    let model = load_at(&converted, 8, 12);
    let mut cpu = cpu(&model);
    cpu.stage_size(&read("forward", "resolution"), &read("forward", "aspect_ratio"), 2).unwrap();
    let got = forward(&mut cpu, &read("forward", "x"));
    assert_close("forward of the converted official checkpoint", &got, &read("forward", "out"), 1e-5);
}

/// CA-SVD calibration on the micro-conditioned model (both passes stage the pipeline's
/// conditions): factors at rank 8 (of 24) whose icc run is closer to full compute than reuse
/// (measured 2.5e-2 against 3.7e-2 relative L2, 6 guided steps, period 3).
#[test]
fn ca_svd_on_the_micro_conditioned_model() {
    use icdit::pixart::calibrate::calibrate_ca_svd;
    use icdit::pixart::{PixArtCache, PixArtFactors};
    let dir = TempDir::new("pixart-ms-ca-svd");
    let model = Arc::new(PixArtModel::load(&tiny_ms()).unwrap());
    let (prompt, negative) = (embeds("prompt_embeds", "attention_mask"), embeds("negative_embeds", "negative_mask"));
    let path = dir.join("f.safetensors");
    calibrate_ca_svd(&model, &prompt, Some(&negative), 4, 8, 0, 2, &path, &mut |_, _| {}).unwrap();
    let factors = Arc::new(PixArtFactors::load(&path, &model).unwrap());
    let run = |cache: PixArtCache| {
        let opts = PixArtOptions {
            max_batch: 2,
            max_text_len: 6,
            steps: 6,
            threads: 2,
            cache,
            full_steps: icdit::policy::FullSteps::Period(3),
            ..Default::default()
        };
        let mut e = PixArtEngine::new(Arc::clone(&model), &opts).unwrap();
        let req = PixArtRequest { prompt: &prompt, negative: Some(&negative), noise: None, seed: 1, first_index: 0 };
        let mut out = vec![0.0; 2 * model.config.image_elems()];
        e.sample(&req, &mut out, &mut |_| {}).unwrap();
        out
    };
    let none = run(PixArtCache::None);
    let (icc, reuse) = (rel_l2(&run(PixArtCache::Icc(factors)), &none), rel_l2(&run(PixArtCache::Reuse), &none));
    println!("1024-MS tiny, period 3: icc (ca-svd r8) {icc:.3e}, reuse {reuse:.3e}");
    assert!(icc > 0.0 && icc < reuse, "icc {icc:.3e}, reuse {reuse:.3e}");
}
