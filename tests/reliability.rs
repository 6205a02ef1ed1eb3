//! Hardening (docs/reliability.md): the fuzz corpora replayed through the fuzz entry points,
//! bad inputs across loaders and the library API, resource limits, non-finite detection,
//! interruption, determinism and engines on several threads sharing one model.

mod common;

#[path = "../fuzz/entry.rs"]
mod entry;

use std::path::{Path, PathBuf};

/// The checked-in corpus of one target (`fuzz/corpus/<target>/*`).
fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn fuzz_corpora_replay_without_panics() {
    let mut total = 0;
    for (target, run) in entry::TARGETS {
        let files = corpus(target);
        assert!(!files.is_empty(), "fuzz/corpus/{target} is empty");
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            let r = std::panic::catch_unwind(|| run(&bytes));
            assert!(r.is_ok(), "{target}: {} panicked", f.display());
            total += 1;
        }
    }
    entry::cleanup();
    println!("replayed {total} corpus files");
}

#[test]
fn fuzz_seeds_are_valid_inputs() {
    // Each target's valid seed loads, so the entry points reach the loaders' success paths.
    for (target, name, bytes, valid) in entry::seeds() {
        match entry::seed_loads(target, &bytes) {
            Err(e) if valid => panic!("{target}/{name}: {e}"),
            Ok(()) if !valid => panic!("{target}/{name} was expected to fail"),
            _ => {}
        }
    }
    entry::cleanup();
}

/// Writes the seeds into fuzz/corpus (run after changing them: `cargo test --release --test
/// reliability -- --ignored write_seed_corpus`).
#[test]
#[ignore]
fn write_seed_corpus() {
    for (target, name, bytes, _) in entry::seeds() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
    entry::cleanup();
}

// ---------------------------------------------------------------------------------------
// Helpers: modified copies of the fixtures in a private folder.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{diffusers_copy, fixture, read_all, write_all, TempDir};
use icdit::{DitModel, Engine, EngineOptions, Error, Factors, LoadOptions, Request, Sampler};
use safetensors::Dtype;

fn f32_tensor(name: &str, shape: &[usize], v: &[f32]) -> (String, Dtype, Vec<usize>, Vec<u8>) {
    (name.into(), Dtype::F32, shape.to_vec(), v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

fn i64_tensor(name: &str, shape: &[usize], v: &[i64]) -> (String, Dtype, Vec<usize>, Vec<u8>) {
    (name.into(), Dtype::I64, shape.to_vec(), v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

fn hd72_path() -> PathBuf {
    fixture("hd72/official.safetensors")
}

fn hd72() -> Arc<DitModel> {
    Arc::new(DitModel::load(&hd72_path(), &LoadOptions::default()).unwrap())
}

fn opts(batch: usize, steps: &str, threads: usize) -> EngineOptions {
    EngineOptions {
        max_batch: batch,
        respacing: steps.into(),
        sampler: Sampler::Ddim { eta: 0.0 },
        cfg_scale: 3.0,
        threads,
        ..Default::default()
    }
}

fn sample(engine: &mut Engine, classes: &[i64], seed: u64) -> Result<Vec<f32>, Error> {
    let mut out = vec![0.0; classes.len() * engine.model().config.image_elems()];
    engine.sample(&Request::new(classes, seed), &mut out, &mut |_| {})?;
    Ok(out)
}

/// The error's message contains every word.
fn assert_says(err: &Error, words: &[&str]) {
    let msg = err.to_string();
    println!("{msg}");
    for w in words {
        assert!(msg.contains(w), "error lacks `{w}`: {msg}");
    }
}

// ---------------------------------------------------------------------------------------
// Non-finite values.

#[test]
fn nan_in_weights_names_the_step_the_block_and_the_tensor() {
    let tmp = TempDir::new("nan");
    let p = tmp.join("nan.safetensors");
    let (mut t, meta) = read_all(&hd72_path());
    let e = t.iter_mut().find(|(n, ..)| n == "blocks.1.mlp.fc1.weight").unwrap();
    e.3[20..24].copy_from_slice(&f32::NAN.to_le_bytes());
    write_all(&p, &t, &meta);
    // Loading is fine (the scan is not forced on every load), sampling stops at step 0.
    let m = Arc::new(DitModel::load(&p, &LoadOptions::default()).unwrap());
    let mut engine = Engine::new(Arc::clone(&m), &opts(1, "10", 1)).unwrap();
    let err = sample(&mut engine, &[3], 0).unwrap_err();
    assert!(matches!(err, Error::NonFinite { step: 0, .. }), "{err:?}");
    assert_says(&err, &["step 0 of 10", "block 1 (mlp.fc1 output)", "blocks.1.mlp.fc1.weight", "element 5 is NaN"]);
    assert_eq!(err.exit_code(), 3);
    // The whole-model scan finds it too, naming the file.
    let found = m.find_non_finite().unwrap();
    assert!(found.contains("blocks.1.mlp.fc1.weight") && found.contains("nan.safetensors"), "{found}");
    // Without the per-step check the final result is still refused (nothing garbage returned).
    let mut o = opts(1, "10", 1);
    o.check_finite = false;
    let mut engine = Engine::new(m, &o).unwrap();
    let err = sample(&mut engine, &[3], 0).unwrap_err();
    assert_says(&err, &["NaN"]);
}

#[test]
fn absurd_guidance_is_stopped_at_the_sampler_update() {
    let m = hd72();
    let mut o = opts(1, "10", 1);
    o.cfg_scale = 1e38;
    let mut engine = Engine::new(m, &o).unwrap();
    let err = sample(&mut engine, &[2], 0).unwrap_err();
    assert_says(&err, &["step 0 of 10", "the sampler update", "guidance scale"]);
}

#[test]
fn non_finite_request_inputs_are_refused_by_name() {
    let m = hd72();
    let img = m.config.image_elems();
    let mut engine = Engine::new(Arc::clone(&m), &EngineOptions { sampler: Sampler::Ddpm, ..opts(1, "4", 1) }).unwrap();
    let z = vec![0.0; img];
    let mut s = vec![0.0; 4 * img];
    s[7] = f32::NAN;
    let req = Request { noise: Some(&z), step_noise: Some(&s), ..Request::new(&[1], 0) };
    let err = engine.sample(&req, &mut vec![0.0; img], &mut |_| {}).unwrap_err();
    assert_says(&err, &["step noise", "element 7 is not finite"]);
}

// ---------------------------------------------------------------------------------------
// Factors that do not fit the model.

fn factor_file(m: &DitModel, rank: usize, fingerprint: bool, path: &Path) {
    let f = Factors::random(m, rank, 3).unwrap();
    let mut info = f.info.clone();
    if fingerprint {
        info.model_fingerprint = Some(icdit::factors::fingerprint(m));
    }
    f.with_info(info).save(path).unwrap();
}

#[test]
fn factors_that_do_not_fit_are_refused_by_name() {
    let tmp = TempDir::new("factors");
    let m = hd72();
    let p = tmp.join("f.safetensors");
    factor_file(&m, 4, false, &p);
    assert!(Factors::load(&p, &m).is_ok());
    // Rank larger than the matrix: fc1 of hd72 is (576, 144); give it rank 200.
    let (mut t, meta) = read_all(&p);
    for (n, _, s, b) in t.iter_mut() {
        if n == "blocks.0.mlp.fc1.up" {
            *s = vec![576, 200];
            *b = vec![0u8; 576 * 200 * 4];
        } else if n == "blocks.0.mlp.fc1.down" {
            *s = vec![200, 144];
            *b = vec![0u8; 200 * 144 * 4];
        }
    }
    write_all(&p, &t, &meta);
    let err = Factors::load(&p, &m).unwrap_err();
    assert_says(&err, &["f.safetensors", "blocks.0.mlp.fc1.up", "rank 200", "more than min(576, 144)"]);
    // up and down that disagree on the rank.
    factor_file(&m, 4, false, &p);
    let (mut t, meta) = read_all(&p);
    let e = t.iter_mut().find(|(n, ..)| n == "blocks.1.attn.q.down").unwrap();
    e.2 = vec![2, 288];
    write_all(&p, &t, &meta);
    let err = Factors::load(&p, &m).unwrap_err();
    assert_says(&err, &["blocks.1.attn.q.up", "blocks.1.attn.q.down", "[2, 288]", "(144, 144)"]);
    // A missing layer.
    factor_file(&m, 4, false, &p);
    let (mut t, meta) = read_all(&p);
    t.retain(|(n, ..)| n != "blocks.1.mlp.fc2.down");
    write_all(&p, &t, &meta);
    let err = Factors::load(&p, &m).unwrap_err();
    assert_says(&err, &["missing tensors", "blocks.1.mlp.fc2.down"]);
    // Bad metadata.
    factor_file(&m, 4, false, &p);
    let (t, mut meta) = read_all(&p);
    meta.insert("icdit_factors".into(), "{\"rank\": \"four\"}".into());
    write_all(&p, &t, &meta);
    let err = Factors::load(&p, &m).unwrap_err();
    assert_says(&err, &["f.safetensors", "icdit_factors"]);
}

#[test]
fn factors_made_for_the_256px_model_are_refused_by_a_512px_model() {
    // The same architecture at twice the resolution has the same factor shapes: only the
    // fingerprint (which covers the config and the weights) can tell them apart.
    let tmp = TempDir::new("fp512");
    let m256 = hd72();
    let p = tmp.join("f256.safetensors");
    factor_file(&m256, 4, true, &p);
    let mut cfg = m256.config;
    cfg.input_size *= 2;
    let m512 = DitModel::random(&cfg, 0).unwrap();
    let err = Factors::load(&p, &m512).unwrap_err();
    assert_says(&err, &["f256.safetensors", "made for another model", "fingerprint", "random(seed 0)"]);
}

// ---------------------------------------------------------------------------------------
// Request files (noise, latents, forward inputs).

#[test]
fn request_file_errors_name_the_file_the_tensor_and_the_expectation() {
    let tmp = TempDir::new("inputs");
    let cfg = hd72().config;
    let p = tmp.join("in.safetensors");
    let img = cfg.image_elems();
    let meta = HashMap::new();
    // Noise for another shape (3 images asked, 2 given).
    write_all(&p, &vec![f32_tensor("z", &[2, 4, 8, 8], &vec![0.0; 2 * img])], &meta);
    let err = icdit::inputs::read_noise(&p, 3, &cfg).unwrap_err();
    assert_says(&err, &["in.safetensors", "`z`", "[3, 4, 8, 8]", "[2, 4, 8, 8]"]);
    // step_noise of the wrong rank.
    let t =
        vec![f32_tensor("z", &[1, 4, 8, 8], &vec![0.0; img]), f32_tensor("step_noise", &[4, 8, 8], &vec![0.0; 256])];
    write_all(&p, &t, &meta);
    let err = icdit::inputs::read_noise(&p, 1, &cfg).unwrap_err();
    assert_says(&err, &["`step_noise`", "[4, 1, 4, 8, 8]", "[4, 8, 8]"]);
    // NaN noise.
    let mut z = vec![0.0; img];
    z[9] = f32::INFINITY;
    write_all(&p, &vec![f32_tensor("z", &[1, 4, 8, 8], &z)], &meta);
    let err = icdit::inputs::read_noise(&p, 1, &cfg).unwrap_err();
    assert_says(&err, &["in.safetensors", "`z` element 9 is inf"]);
    // Integer noise.
    write_all(&p, &vec![i64_tensor("z", &[1, 4, 8, 8], &vec![0; img])], &meta);
    let err = icdit::inputs::read_noise(&p, 1, &cfg).unwrap_err();
    assert_says(&err, &["`z`", "I64", "f32"]);
    // Latents for a VAE with other latent channels, and a bad seed.
    write_all(&p, &vec![f32_tensor("latents", &[1, 3, 8, 8], &vec![0.0; 192])], &meta);
    let err = icdit::inputs::read_latents(&p, 4).unwrap_err();
    assert_says(&err, &["`latents`", "[1, 4, 8, 8]", "[1, 3, 8, 8]"]);
    let m = HashMap::from([("icdit_seed".to_string(), "-1".to_string())]);
    write_all(&p, &vec![f32_tensor("latents", &[1, 4, 8, 8], &vec![0.0; 256])], &m);
    let err = icdit::inputs::read_latents(&p, 4).unwrap_err();
    assert_says(&err, &["icdit_seed", "`-1`"]);
    // Forward inputs: a timestep and a label out of range, a missing tensor.
    let fwd = |t: i64, y: i64| {
        vec![f32_tensor("x", &[1, 4, 8, 8], &vec![0.0; img]), i64_tensor("t", &[1], &[t]), i64_tensor("y", &[1], &[y])]
    };
    write_all(&p, &fwd(1000, 0), &meta);
    assert_says(&icdit::inputs::read_forward_input(&p, &cfg).unwrap_err(), &["`t`", "1000", "0..=999"]);
    write_all(&p, &fwd(5, 11), &meta);
    assert_says(&icdit::inputs::read_forward_input(&p, &cfg).unwrap_err(), &["`y`", "11", "0..=10"]);
    write_all(&p, &fwd(5, 1)[1..].to_vec(), &meta);
    assert_says(&icdit::inputs::read_forward_input(&p, &cfg).unwrap_err(), &["missing tensors", "x"]);
}

// ---------------------------------------------------------------------------------------
// Loader bugs found while writing the fuzz targets (each was a panic, a hang or an unbounded
// allocation on some input), kept as regression tests.

#[test]
fn malformed_shapes_and_names_are_errors_not_panics_or_hangs() {
    let tmp = TempDir::new("shapes");
    let p = tmp.join("w.safetensors");
    let load = |p: &Path| DitModel::load(p, &LoadOptions::default());
    // A 0-d (scalar) tensor where config inference reads a dimension.
    let (mut t, meta) = read_all(&hd72_path());
    let e = t.iter_mut().find(|(n, ..)| n == "blocks.0.mlp.fc1.weight").unwrap();
    *e = f32_tensor("blocks.0.mlp.fc1.weight", &[], &[1.0]);
    write_all(&p, &t, &meta);
    assert_says(&load(&p).unwrap_err(), &["w.safetensors"]);
    // A block index of 10^11: the missing-block list must be bounded (it was a hang).
    let (mut t, meta) = read_all(&hd72_path());
    t.push(f32_tensor("blocks.99999999999.mlp.fc1.bias", &[1], &[0.0]));
    write_all(&p, &t, &meta);
    let start = std::time::Instant::now();
    let err = load(&p).unwrap_err();
    assert!(start.elapsed().as_secs() < 5, "took {:?}", start.elapsed());
    assert_says(&err, &["missing tensors", "blocks.2.*"]);
    // A patch embedding with an empty dimension and an absurd patch size.
    let (mut t, mut meta) = read_all(&hd72_path());
    meta.remove("dit_config");
    let e = t.iter_mut().find(|(n, ..)| n == "x_embedder.proj.weight").unwrap();
    *e = f32_tensor("x_embedder.proj.weight", &[144, 0, 1 << 40, 1 << 40], &[]);
    write_all(&p, &t, &meta);
    assert_says(&load(&p).unwrap_err(), &["x_embedder.proj.weight", "p ≤ 4096"]);
}

#[test]
fn diffusers_folders_that_would_allocate_without_bound_are_refused() {
    let tmp = TempDir::new("hfbig");
    let dir = diffusers_copy(&tmp);
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    // sample_size 4096 at patch 2: a 4M-token position embedding (2.4 G floats) for a model
    // of 0.9 M weights. It was generated (allocated) before anything checked it.
    let big = cfg.replace("\"sample_size\": 8", "\"sample_size\": 4096");
    assert_ne!(big, cfg);
    std::fs::write(dir.join("config.json"), big).unwrap();
    let err = DitModel::load(&dir, &LoadOptions::default()).unwrap_err();
    assert_says(&err, &["config.json", "sample_size 4096", "position embedding"]);
    // Heads × head dim that overflows.
    let bad = cfg.replace("\"attention_head_dim\": 72", "\"attention_head_dim\": 18446744073709551615");
    assert_ne!(bad, cfg);
    std::fs::write(dir.join("config.json"), bad).unwrap();
    assert_says(&DitModel::load(&dir, &LoadOptions::default()).unwrap_err(), &["attention_head_dim"]);
    // A config.json that is not a config (17 MiB) is not read whole.
    std::fs::write(dir.join("config.json"), vec![b' '; 17 << 20]).unwrap();
    assert_says(&DitModel::load(&dir, &LoadOptions::default()).unwrap_err(), &["config.json", "larger than 16 MiB"]);
    // A sharded checkpoint whose index names no shard.
    std::fs::remove_file(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), &cfg).unwrap();
    std::fs::write(dir.join("diffusion_pytorch_model.safetensors.index.json"), "{\"weight_map\": {}}").unwrap();
    assert_says(&DitModel::load(&dir, &LoadOptions::default()).unwrap_err(), &["index.json", "names no shard"]);
}

#[test]
fn vae_configs_out_of_bounds_are_refused() {
    let tmp = TempDir::new("vaecfg");
    let dir = tmp.join("vae");
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture("vae/new");
    std::fs::copy(src.join("diffusion_pytorch_model.safetensors"), dir.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    for (from, to, words) in [
        ("\"latent_channels\": 4", "\"latent_channels\": 0", &["latent_channels", "positive"][..]),
        ("\"sample_size\": 32", "\"scaling_factor\": 0, \"sample_size\": 32", &["scaling_factor 0"][..]),
        (
            "\"layers_per_block\": 1",
            "\"layers_per_block\": 100000",
            &["implausibly large", "layers_per_block 100000"][..],
        ),
        ("\"norm_num_groups\": 8", "\"norm_num_groups\": 7", &["norm_num_groups 7 does not divide"][..]),
    ] {
        let bad = cfg.replace(from, to);
        assert_ne!(bad, cfg, "{from}");
        std::fs::write(dir.join("config.json"), bad).unwrap();
        let err = icdit::vae::VaeModel::load(&dir).unwrap_err();
        assert_says(&err, &[&["config.json"][..], words].concat());
    }
}

// ---------------------------------------------------------------------------------------
// Resource limits.

#[test]
fn memory_limits_refuse_before_allocating_with_the_breakdown() {
    let m = hd72();
    let need = Engine::memory_need(&m, &opts(4, "10", 1)).unwrap();
    assert!(need.total() > 3_000_000, "{}", need.breakdown());
    let mut o = opts(4, "10", 1);
    o.max_memory = Some(1 << 20);
    let err = Engine::new(Arc::clone(&m), &o).err().unwrap();
    assert!(matches!(err, Error::Memory { .. }), "{err:?}");
    assert_says(
        &err,
        &["the sampling engine needs", "--max-memory", "1.00 MiB", "CPU forward plan", "sampler state", "total"],
    );
    assert_eq!(err.exit_code(), 2);
    o.max_memory = Some(need.total());
    assert!(Engine::new(Arc::clone(&m), &o).is_ok());
    // A batch far beyond any machine fails at once, against the available memory: 4096
    // tokens of width 48, 60,000 guided images (≈ 100 GB of activations).
    let wide = icdit::DitConfig {
        input_size: 64,
        patch_size: 1,
        in_channels: 1,
        hidden_size: 16,
        depth: 1,
        num_heads: 1,
        mlp_ratio: 1.0,
        class_dropout_prob: 0.1,
        num_classes: 2,
        learn_sigma: false,
    };
    let wide = Arc::new(DitModel::random(&wide, 0).unwrap());
    let start = std::time::Instant::now();
    let need = Engine::memory_need(&wide, &opts(60_000, "10", 1)).unwrap();
    println!("{}", need.breakdown());
    let err = Engine::new(Arc::clone(&wide), &opts(60_000, "10", 1)).err().unwrap();
    assert_says(&err, &["needs", "MemAvailable", "CPU forward plan (120000 rows"]);
    let err = Engine::new(Arc::clone(&m), &opts(1 << 20, "10", 1)).err().unwrap();
    assert_says(&err, &["max batch", "1048576"]);
    assert!(start.elapsed().as_secs() < 2, "took {:?}", start.elapsed());
    // Absurd step counts are refused by the respacing.
    let err = Engine::new(m, &opts(1, "1000000", 1)).err().unwrap();
    assert_says(&err, &["respacing", "1000000"]);
    assert_eq!(icdit::limits::parse_size("8G").unwrap(), 8 << 30);
}

#[test]
fn period_zero_and_bad_full_step_lists_are_refused() {
    let m = hd72();
    let mut o = opts(1, "10", 1);
    o.cache = icdit::CacheMode::Reuse;
    o.full_steps = icdit::FullSteps::Period(0);
    assert_says(&Engine::new(Arc::clone(&m), &o).err().unwrap(), &["period", "at least 1"]);
    o.full_steps = icdit::FullSteps::List(vec![1, 3]);
    assert_says(&Engine::new(Arc::clone(&m), &o).err().unwrap(), &["full steps", "step 0"]);
    o.full_steps = icdit::FullSteps::List(vec![0, 10]);
    assert_says(&Engine::new(m, &o).err().unwrap(), &["step 10 is past the last step 9"]);
}

// ---------------------------------------------------------------------------------------
// Interruption, determinism, concurrency.

#[test]
fn an_interrupt_flag_stops_sampling_between_steps() {
    let m = hd72();
    let mut engine = Engine::new(m, &opts(2, "10", 1)).unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    engine.set_interrupt(Some(Arc::clone(&flag)));
    let mut out = vec![0.0; 2 * engine.model().config.image_elems()];
    let err = engine
        .sample(&Request::new(&[1, 2], 0), &mut out, &mut |s| {
            if s.index == 2 {
                flag.store(true, Ordering::Relaxed);
            }
        })
        .unwrap_err();
    assert!(matches!(err, Error::Interrupted { .. }), "{err:?}");
    assert_says(&err, &["interrupted", "3 of 10 steps"]);
    assert_eq!(err.exit_code(), 130);
    // Cleared, the same engine samples normally.
    flag.store(false, Ordering::Relaxed);
    assert!(sample(&mut engine, &[1, 2], 0).is_ok());
}

#[test]
fn cached_sampling_is_bit_identical_across_thread_counts() {
    let m = hd72();
    let mut o = opts(3, "12", 1);
    o.cache = icdit::CacheMode::Reuse;
    let a = sample(&mut Engine::new(Arc::clone(&m), &o).unwrap(), &[0, 5, 9], 7).unwrap();
    o.threads = 2;
    let b = sample(&mut Engine::new(Arc::clone(&m), &o).unwrap(), &[0, 5, 9], 7).unwrap();
    assert!(a == b, "reuse caching: 1 vs 2 threads differ");
    let f = Arc::new(Factors::random(&m, 8, 1).unwrap());
    o.cache = icdit::CacheMode::Icc(f);
    let c = sample(&mut Engine::new(Arc::clone(&m), &o).unwrap(), &[0, 5, 9], 7).unwrap();
    o.threads = 1;
    let d = sample(&mut Engine::new(m, &o).unwrap(), &[0, 5, 9], 7).unwrap();
    assert!(c == d, "icc caching: 1 vs 2 threads differ");
}

#[test]
fn engines_on_two_threads_share_one_model() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send_sync::<DitModel>();
    send_sync::<Factors>();
    send_sync::<icdit::vae::VaeModel>();
    send::<Engine>();
    send::<icdit::CpuEngine>();
    send::<icdit::vae::VaeDecoder>();

    let m = hd72();
    let alone = sample(&mut Engine::new(Arc::clone(&m), &opts(2, "8", 1)).unwrap(), &[4, 8], 11).unwrap();
    let handles: Vec<_> = (0..2)
        .map(|k| {
            let m = Arc::clone(&m);
            std::thread::spawn(move || {
                let mut e = Engine::new(m, &opts(2, "8", 1 + k)).unwrap();
                (0..2).map(|_| sample(&mut e, &[4, 8], 11).unwrap()).collect::<Vec<_>>()
            })
        })
        .collect();
    for h in handles {
        for out in h.join().unwrap() {
            assert!(out == alone, "a concurrent engine gave other bits");
        }
    }
    // Two engines, one model: the weights are shared, not copied.
    assert_eq!(Arc::strong_count(&m), 1);
}

// ---------------------------------------------------------------------------------------
// The command line: limits, flags, Ctrl-C.

fn icdit(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_icdit")).args(args).output().expect("run icdit")
}

#[test]
fn cli_limits_and_flags_fail_early_with_documented_codes() {
    let w = hd72_path().display().to_string();
    #[allow(clippy::type_complexity)]
    let cases: &[(&[&str], i32, &[&str])] = &[
        (&["--class", "1", "--steps", "2", "--max-memory", "1M"], 2, &["needs", "--max-memory", "1.00 MiB", "total"]),
        (&["--class", "1", "--steps", "2", "--max-memory", "lots"], 2, &["memory size", "`lots`"]),
        (&["--class", "1", "--steps", "100000"], 2, &["respacing", "100000"]),
        (&["--random-classes", "0", "--steps", "2"], 2, &["--random-classes"]),
        (&["--random-classes", "100000000000", "--steps", "2"], 2, &["--random-classes", "2^24"]),
        (&["--class", "1", "--steps", "2", "--batch", "0"], 0, &[]),
        (&["--class", "1", "--steps", "2", "--cache", "reuse", "--period", "0"], 2, &["period"]),
        (&["--class", "1", "--steps", "3", "--cache", "reuse", "--full-steps", "1,2"], 2, &["step 0"]),
        (&["--class", "1", "--steps", "2", "--no-finite-check"], 0, &[]),
    ];
    for (extra, code, words) in cases {
        let mut args = vec!["sample", "--weights", &w];
        args.extend_from_slice(extra);
        let start = std::time::Instant::now();
        let o = icdit(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        println!("{extra:?} → {:?} in {:?}: {err}", o.status.code(), start.elapsed());
        assert_eq!(o.status.code(), Some(*code), "{extra:?}: {err}");
        for w in *words {
            assert!(err.contains(w), "{extra:?}: lacks `{w}`: {err}");
        }
        assert!(start.elapsed().as_secs() < 20, "{extra:?} took {:?}", start.elapsed());
    }
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_sampling_leaves_no_files_and_says_what_was_done() {
    let tmp = TempDir::new("sigint");
    let (latents, grid) = (tmp.join("l.safetensors"), tmp.join("g.png"));
    // The bundled pixel model, 1000 DDPM steps: far longer than the half second we wait.
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_icdit"))
        .args(["sample", "--steps", "1000", "--sampler", "ddpm", "--threads", "1"])
        .args(["--out-latents", &latents.display().to_string(), "--grid", &grid.display().to_string()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the child has installed its handler (SIGINT in /proc's caught-signal mask),
    // then let it sample a little.
    let status = format!("/proc/{}/status", child.id());
    for _ in 0..200 {
        let caught = std::fs::read_to_string(&status).ok().and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("SigCgt:"))?.split_whitespace().nth(1)?.to_string();
            u64::from_str_radix(&line, 16).ok()
        });
        if caught.is_some_and(|m| m & (1 << (libc::SIGINT - 1)) != 0) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: sends SIGINT to the child we started.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    println!("{err}");
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.starts_with("error: interrupted: ") && err.contains("no output was written"), "{err}");
    assert!(err.contains("steps of a"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}
