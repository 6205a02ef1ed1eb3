//! A whole tiny PixArt-α pipeline folder (tests/fixtures/pixart_pipe, by
//! `tools/make_pixart_pipeline_fixtures.py`: the tiny T5 tokenizer and encoder, a transformer
//! whose caption width is the encoder's): `icdit sample --prompt` end to end against diffusers'
//! PixArtAlphaPipeline, and `icdit calibrate --calib-prompts`.

mod common;

use std::path::PathBuf;

use common::{assert_close, fixture, icdit, p, TempDir};
use icdit::tensorfile::TensorFile;

fn pipe() -> PathBuf {
    fixture("pixart_pipe")
}

const PROMPTS: [&str; 2] = ["A red square on a white table", "two blue circles"];

/// Prompts → tokenizer → T5 → 4 guided DPM-Solver++ steps (negative prompt "", 120 tokens):
/// the pipeline's latents within 1e-4 relative L2 (measured 1.3e-6).
#[test]
fn sample_from_prompts_matches_the_pipeline() {
    let dir = TempDir::new("pixart-pipe-sample");
    let (reference, latents) = (pipe().join("reference.safetensors"), dir.join("latents.safetensors"));
    let (ok, err) = icdit(&[
        "sample",
        "--weights",
        p(&pipe()),
        "--prompt",
        PROMPTS[0],
        "--prompt",
        PROMPTS[1],
        "--noise",
        p(&reference),
        "--steps",
        "4",
        "--out-latents",
        p(&latents),
    ]);
    assert!(ok, "{err}");
    let got = TensorFile::open(&latents).unwrap().read_f32("latents").unwrap().1;
    let want = TensorFile::open(&reference).unwrap().read_f32("latents").unwrap().1;
    assert_close("sample --prompt vs PixArtAlphaPipeline", &got, &want, 1e-4);
}

/// `calibrate --calib-prompts` encodes the file's prompts and "" and calibrates exactly as
/// `--calib-embeds` on `icdit encode`'s embeddings of them with `--negative-embeds` does
/// (bit-identical factors); an empty prompt file is refused.
#[test]
fn calibrate_from_prompts() {
    let dir = TempDir::new("pixart-pipe-calibrate");
    let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    let (e, n) = (dir.join("e.safetensors"), dir.join("n.safetensors"));
    let weights = pipe();
    let base = ["calibrate", "--weights", p(&weights), "--method", "ca-svd", "--rank", "2", "--threads", "2"];
    let prompts = pipe().join("prompts.txt");
    let (ok, err) = icdit(&[&base[..], &["--calib-prompts", p(&prompts), "--out", p(&a)]].concat());
    assert!(ok, "{err}");
    let (ok, err) =
        icdit(&["encode", "--weights", p(&pipe()), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", p(&e)]);
    assert!(ok, "{err}");
    let (ok, err) = icdit(&["encode", "--weights", p(&pipe()), "--prompt", "", "--out", p(&n)]);
    assert!(ok, "{err}");
    let (ok, err) =
        icdit(&[&base[..], &["--calib-embeds", p(&e), "--negative-embeds", p(&n), "--out", p(&b)]].concat());
    assert!(ok, "{err}");
    let (fa, fb) = (TensorFile::open(&a).unwrap(), TensorFile::open(&b).unwrap());
    assert_eq!(fa.metadata().get("calib_prompts").map(String::as_str), Some("2"));
    let mut names: Vec<&str> = fa.names().collect();
    names.sort();
    assert_eq!(names.len(), 2 * 8 * 2, "up and down of 8 cached layers in 2 blocks");
    for name in names {
        let (x, y) = (fa.read_f32(name).unwrap(), fb.read_f32(name).unwrap());
        assert!(x.1.iter().any(|v| v.abs() > 1e-3), "{name} is all zeros");
        assert_eq!(x, y, "{name}");
    }
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let (ok, err) = icdit(&[&base[..], &["--calib-prompts", p(&empty), "--out", p(&a)]].concat());
    assert!(!ok && err.contains("no prompts"), "{err}");
}

/// `cache-report` on the pipeline folder (prompt embeddings from `icdit encode`, the negative
/// prompt "" encoded by the report): one row per setting; icc's relative L2 is what sampling
/// the same request with the same plain-SVD factors through the library gives (1e-9), reuse
/// costs fewer MACs than icc, which costs fewer than full compute.
#[test]
fn cache_report_on_pixart() {
    use icdit::pixart::{Embeddings, PixArtCache, PixArtFactors, PixArtModel, PixArtOptions};
    use std::sync::Arc;
    let dir = TempDir::new("pixart-pipe-report");
    let e = dir.join("e.safetensors");
    let (ok, err) =
        icdit(&["encode", "--weights", p(&pipe()), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", p(&e)]);
    assert!(ok, "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_icdit"))
        .args([
            "cache-report",
            "--weights",
            p(&pipe()),
            "--prompt-embeds",
            p(&e),
            "--policies",
            "none,reuse,icc",
            "--methods",
            "svd",
            "--ranks",
            "4",
            "--periods",
            "2",
            "--steps",
            "4",
            "--threads",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
    let rows = v["results"].as_array().unwrap();
    let settings: Vec<&str> = rows.iter().map(|r| r["setting"].as_str().unwrap()).collect();
    assert_eq!(settings, ["full compute", "period 2", "svd r4 period 2"]);
    let mac = |i: usize| rows[i]["mac_ratio"].as_f64().unwrap();
    assert!(mac(1) < mac(2) && mac(2) < mac(0), "{rows:?}");

    // The same icc run through the library.
    let model = Arc::new(PixArtModel::load(&pipe()).unwrap());
    let prompt = Embeddings::load(&e).unwrap();
    let n = dir.join("n.safetensors");
    assert!(icdit(&["encode", "--weights", p(&pipe()), "--prompt", "", "--out", p(&n)]).0);
    let negative = Embeddings::load(&n).unwrap();
    let f = dir.join("f.safetensors");
    icdit::pixart::factors::calibrate_svd(&model, 4, &f).unwrap();
    let base = PixArtOptions { max_batch: 2, max_text_len: prompt.len, steps: 4, threads: 2, ..Default::default() };
    let icc = PixArtOptions {
        cache: PixArtCache::Icc(Arc::new(PixArtFactors::load(&f, &model).unwrap())),
        full_steps: icdit::policy::FullSteps::Period(2),
        ..base.clone()
    };
    let set =
        |o: &PixArtOptions| icdit::quality::pixart_sample_set_timed(&model, o, &prompt, Some(&negative), 0).unwrap();
    let err = icdit::quality::rel_l2(&set(&icc).samples, &set(&base).samples);
    assert!(err > 1e-4 && (err - rows[2]["rel_l2"].as_f64().unwrap()).abs() < 1e-9, "{err} vs {rows:?}");
}

/// Samples `prompt` at `h`×`w` with resolution binning from `noise` (a reference tensor) and
/// compares the grid PNG (diffusers' rounding) with every 4th row and column of the pipeline's
/// image `reference` in 8-bit levels: (values that differ, the largest difference).
fn binned_request(prompt: &str, noise: &str, (h, w): (usize, usize), reference: &str, bin: &str) -> (usize, i32) {
    use icdit::tensorfile::write_safetensors;
    let dir = TempDir::new("pixart-pipe-binned");
    let file = TensorFile::open(&pipe().join("reference.safetensors")).unwrap();
    let (shape, z) = file.read_f32(noise).unwrap();
    let one = shape[1..].iter().product::<usize>();
    let noise = dir.join("z.safetensors");
    write_safetensors(&noise, &[("z", &[1, shape[1], shape[2], shape[3]], &z[..one])], &[], None).unwrap();
    let grid = dir.join("g.png");
    let (hs, ws) = (h.to_string(), w.to_string());
    let (ok, err) = icdit(&[
        "sample",
        "--weights",
        p(&pipe()),
        "--prompt",
        prompt,
        "--noise",
        p(&noise),
        "--steps",
        "3",
        "--height",
        &hs,
        "--width",
        &ws,
        "--rounding",
        "diffusers",
        "--grid",
        p(&grid),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains(bin), "{err}");
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&grid).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    let gw = info.width as usize;
    assert_eq!((gw, info.height as usize), (2 + w + 2, 2 + h + 2), "one {h}×{w} image with a 2-pixel border");
    let want = file.read_f32(reference).unwrap().1; // (3, h/4, w/4) in [0, 1]
    let (sh, sw) = (h / 4, w / 4);
    let (mut worst, mut differ) = (0i32, 0usize);
    for c in 0..3 {
        for y in 0..sh {
            for x in 0..sw {
                let got = buf[((2 + 4 * y) * gw + 2 + 4 * x) * 3 + c] as i32;
                let e = (want[(c * sh + y) * sw + x] * 255.0).round_ties_even() as i32;
                worst = worst.max((got - e).abs());
                differ += (got != e) as usize;
            }
        }
    }
    println!("binned {h}×{w}: {differ} of {} sampled values differ, worst by {worst}", 3 * sh * sw);
    assert!(worst <= 1 && differ * 100 <= 3 * sh * sw, "{differ} values differ, worst by {worst}");
    (differ, worst)
}

/// Resolution binning end to end on the sample_size-32 pipeline: a 240×240 request is sampled
/// at the 256×256 bin, a 200×320 one at the 192×320 bin (a 24×40 latent), each decoded by the
/// folder's 8× VAE and resized back; the PNGs (diffusers' rounding) equal the pipeline's images
/// rounded to 8 bits within one level, at most 1% off, on every 4th row and column (measured:
/// 2 of 10800 and 0 of 12000 values differ, by 1 level).
#[test]
fn binned_requests_match_the_pipeline() {
    binned_request(PROMPTS[0], "z", (240, 240), "binned_every4", "256×256");
    binned_request(PROMPTS[1], "z_wide", (200, 320), "wide_every4", "192×320");
}
