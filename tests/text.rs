//! PixArt-α's text side against transformers (tests/fixtures/t5, made by
//! tools/make_t5_fixtures.py with a tiny SentencePiece tokenizer and a random 2-layer T5 v1.1
//! encoder): token ids and masks exactly; embeddings within relative L2 1e-5 of transformers'
//! f32 output (measured ~1e-7), on every CPU path; f16/bf16 weights against transformers on
//! the same rounded weights computed in f32 (same bound); sharded weights bit-identical to the
//! single file; every bad input a clear error; `icdit encode` end to end.

mod common;

use std::path::Path;
use std::process::Command;

use common::{assert_close, fixture, TempDir};
use icdit::tensorfile::TensorFile;
use icdit::text::{relative_bucket, Embeddings, T5Tokenizer, TextEncoder, TextOptions, MAX_SEQUENCE_LENGTH};
use icdit::Error;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// Relative L2 bound against transformers in f32: the issue's bar for embeddings. The tiny
/// encoder's measured error is printed by each check (~1e-7).
const TOL: f64 = 1e-5;

fn pipeline() -> std::path::PathBuf {
    fixture("t5")
}

fn prompts() -> Vec<String> {
    serde_json::from_str(&std::fs::read_to_string(pipeline().join("prompts.json")).unwrap()).unwrap()
}

fn refs() -> TensorFile {
    TensorFile::open(&pipeline().join("reference.safetensors")).unwrap()
}

fn ints(f: &TensorFile, name: &str) -> (Vec<usize>, Vec<i64>) {
    f.read_i64(name).unwrap_or_else(|e| panic!("{e}"))
}

fn floats(f: &TensorFile, name: &str) -> Vec<f32> {
    f.read_f32(name).unwrap_or_else(|e| panic!("{e}")).1
}

fn open(dir: &Path) -> TextEncoder {
    TextEncoder::open(dir, &TextOptions { threads: 2, isa: None }).unwrap_or_else(|e| panic!("{e}"))
}

fn open_err(dir: &Path) -> Error {
    TextEncoder::open(dir, &TextOptions { threads: 1, isa: None }).expect_err("must be refused")
}

#[test]
fn token_ids_and_masks_equal_transformers() {
    let enc = open(&pipeline());
    let p = prompts();
    let p: Vec<&str> = p.iter().map(String::as_str).collect();
    let r = refs();
    for (len, suffix) in [(32, ""), (120, "_120")] {
        let (shape, ids) = ints(&r, &format!("input_ids{suffix}"));
        let (_, mask) = ints(&r, &format!("attention_mask{suffix}"));
        assert_eq!(shape, [p.len(), len]);
        let (got_ids, got_mask) = enc.tokenize(&p, len).unwrap();
        for (i, prompt) in p.iter().enumerate() {
            let row = i * len..(i + 1) * len;
            assert_eq!(got_ids[row.clone()], ids[row.clone()], "ids of {prompt:?} at length {len}");
            assert_eq!(got_mask[row.clone()], mask[row], "mask of {prompt:?} at length {len}");
        }
    }
    // What the fixture's prompts exercise: the empty prompt, truncation, <unk>.
    let (ids, mask) = enc.tokenize(&[""], 5).unwrap();
    assert_eq!((ids, mask), (vec![1, 0, 0, 0, 0], vec![1, 0, 0, 0, 0]));
    let (ids, mask) = enc.tokenize(&[p[3]], 32).unwrap();
    assert_eq!((ids[31], mask.iter().sum::<i64>()), (1, 32), "the long prompt is cut to 31 pieces + </s>");
    assert!(enc.tokenize(&[p[4]], 32).unwrap().0.contains(&2), "the unicode prompt has <unk>");
    let (one, _) = enc.tokenize(&["x"], 1).unwrap();
    assert_eq!(one, [1], "length 1 holds only </s>");
}

#[test]
fn spiece_model_alone_gives_transformers_ids() {
    // The published PixArt-α folders ship only spiece.model: built from it, the tokenizer
    // gives the ids transformers' T5Tokenizer gives (the fixture's were made from the same
    // spiece.model, 100 sentinels).
    let dir = TempDir::new("spiece");
    std::fs::copy(pipeline().join("tokenizer/spiece.model"), dir.join("spiece.model")).unwrap();
    let tok = T5Tokenizer::open(&dir).unwrap_or_else(|e| panic!("{e}"));
    let json = T5Tokenizer::open(&pipeline().join("tokenizer")).unwrap();
    assert_eq!(tok.vocab_size(), json.vocab_size());
    let r = refs();
    for (len, suffix) in [(32, ""), (120, "_120")] {
        let ids = ints(&r, &format!("input_ids{suffix}")).1;
        let mask = ints(&r, &format!("attention_mask{suffix}")).1;
        for (i, prompt) in prompts().iter().enumerate() {
            let (got_ids, got_mask) = tok.tokenize(prompt, len).unwrap();
            assert_eq!(got_ids, ids[i * len..(i + 1) * len], "ids of {prompt:?} at length {len}");
            assert_eq!(got_mask, mask[i * len..(i + 1) * len], "mask of {prompt:?} at length {len}");
        }
    }
    // tokenizer_config.json's extra_ids sets the sentinels: none, and `<extra_id_0>` is text.
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"extra_ids": 0}"#).unwrap();
    let none = T5Tokenizer::open(&dir).unwrap();
    assert_eq!(none.vocab_size(), json.vocab_size() - 100);
    assert!(none.tokenize("<extra_id_0>", 16).unwrap().0.iter().filter(|&&i| i != 0).count() > 2);
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"extra_ids": "many"}"#).unwrap();
    let e = T5Tokenizer::open(&dir).expect_err("extra_ids").to_string();
    assert!(e.contains("tokenizer_config.json") && e.contains("extra_ids"), "{e}");
    // Not a SentencePiece model: an error naming the file, for every truncation of a real one.
    std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
    let real = std::fs::read(pipeline().join("tokenizer/spiece.model")).unwrap();
    for cut in [0, 1, 7, 100, real.len() / 2, real.len() - 1] {
        std::fs::write(dir.join("spiece.model"), &real[..cut]).unwrap();
        if let Err(e) = T5Tokenizer::open(&dir) {
            assert!(e.to_string().contains("spiece.model"), "{e}");
        }
    }
    std::fs::write(dir.join("spiece.model"), b"\x0f\xff\xff").unwrap();
    let e = T5Tokenizer::open(&dir).expect_err("garbage").to_string();
    assert!(e.contains("spiece.model") && e.contains("not a SentencePiece model"), "{e}");
}

#[test]
fn relative_buckets_equal_transformers() {
    let r = refs();
    for (max_distance, name) in [(128, "buckets_32_128"), (64, "buckets_32_64")] {
        let (shape, want) = ints(&r, name);
        assert_eq!(shape, [261]);
        for (i, &w) in want.iter().enumerate() {
            let rel = i as i64 - 130;
            assert_eq!(
                relative_bucket(rel, 32, max_distance) as i64,
                w,
                "bucket of {rel} (max distance {max_distance})"
            );
        }
        assert!(want.iter().any(|&b| b == 31) && want.iter().any(|&b| b == 15), "both signs reach their last bucket");
    }
}

#[test]
fn embeddings_match_transformers_on_every_cpu_path() {
    let p = prompts();
    let p: Vec<&str> = p.iter().map(String::as_str).collect();
    let r = refs();
    let want = floats(&r, "prompt_embeds");
    let want_120 = floats(&r, "prompt_embeds_120");
    let mut first: Option<Vec<f32>> = None;
    for isa in common::isas("T5 encoder") {
        let enc = TextEncoder::open(&pipeline(), &TextOptions { threads: 2, isa: Some(isa) }).unwrap();
        let e = enc.encode(&p, 32).unwrap();
        assert_eq!((e.batch, e.len, e.dim), (p.len(), 32, 64));
        assert_eq!(e.input_ids, ints(&r, "input_ids").1);
        assert_eq!(e.mask, ints(&r, "attention_mask").1);
        assert_close(&format!("T5 embeddings, f32 weights, {}", isa.name()), &e.embeds, &want, TOL);
        // Each prompt on its own too (the padded rows' share of the error is not hidden).
        for (i, prompt) in p.iter().enumerate() {
            let rows = i * 32 * 64..(i + 1) * 32 * 64;
            let err = common::rel_l2(&e.embeds[rows.clone()], &want[rows]);
            assert!(err <= TOL, "{prompt:?}: relative L2 {err:.3e}");
        }
        let long = enc.encode(&p[..2], 120).unwrap();
        assert_close(&format!("T5 embeddings at length 120, {}", isa.name()), &long.embeds, &want_120, TOL);
        // A batch of one gives the batch's row (sequences do not see each other).
        let alone = enc.encode(&[p[2]], 32).unwrap();
        assert_eq!(alone.embeds, e.embeds[2 * 32 * 64..3 * 32 * 64], "batch independence");
        if isa.name() != "scalar" {
            match &first {
                None => first = Some(e.embeds),
                Some(f) => assert_eq!(&e.embeds, f, "SIMD paths agree bit for bit"),
            }
        }
    }
}

/// The fixture's tensors as (name, shape, f32 values).
fn fixture_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let f = TensorFile::open(&pipeline().join("text_encoder/model.safetensors")).unwrap();
    let mut names: Vec<String> = f.names().map(String::from).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let (shape, v) = f.read_f32(&n).unwrap();
            (n, shape, v)
        })
        .collect()
}

/// Bytes of `v` stored as `dtype` (f16/bf16 rounded to nearest even, as torch's `.to()`).
fn encode_as(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => bytemuck::cast_slice(v).to_vec(),
        Dtype::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        Dtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        Dtype::F64 => v.iter().flat_map(|x| (*x as f64).to_le_bytes()).collect(),
        Dtype::I32 => v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect(),
        other => panic!("{other:?}"),
    }
}

/// A pipeline folder in `dir`: the fixture's tokenizer, `config` (the fixture's when None),
/// and the tensors in `shards` files (one: model.safetensors; more: an index), each tensor
/// passed through `edit` (which may change its dtype, shape or drop it).
fn write_pipeline(
    dir: &Path,
    config: Option<&str>,
    shards: usize,
    edit: impl Fn(&str, Vec<usize>, Vec<f32>) -> Option<(Dtype, Vec<usize>, Vec<f32>)>,
) {
    let tok = dir.join("tokenizer");
    std::fs::create_dir_all(&tok).unwrap();
    std::fs::copy(pipeline().join("tokenizer/tokenizer.json"), tok.join("tokenizer.json")).unwrap();
    let te = dir.join("text_encoder");
    std::fs::create_dir_all(&te).unwrap();
    let cfg = config
        .map(String::from)
        .unwrap_or_else(|| std::fs::read_to_string(pipeline().join("text_encoder/config.json")).unwrap());
    std::fs::write(te.join("config.json"), cfg).unwrap();
    let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = fixture_tensors()
        .into_iter()
        .filter_map(|(n, s, v)| edit(&n, s, v).map(|(d, s, v)| (n, d, s, encode_as(d, &v))))
        .collect();
    let mut map = serde_json::Map::new();
    for (k, part) in tensors.chunks(tensors.len().div_ceil(shards)).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", k + 1)
        };
        let views: Vec<(&str, TensorView)> =
            part.iter().map(|(n, d, s, b)| (n.as_str(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        for (n, _) in &views {
            map.insert(n.to_string(), serde_json::Value::String(file.clone()));
        }
        safetensors::serialize_to_file(views, None, &te.join(&file)).unwrap();
    }
    if shards > 1 {
        let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": map });
        std::fs::write(te.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

fn same(_: &str, s: Vec<usize>, v: Vec<f32>) -> Option<(Dtype, Vec<usize>, Vec<f32>)> {
    Some((Dtype::F32, s, v))
}

#[test]
fn half_precision_weights_match_transformers_on_the_same_rounded_weights() {
    let p = prompts();
    let p: Vec<&str> = p.iter().map(String::as_str).collect();
    let r = refs();
    let f32_ref = floats(&r, "prompt_embeds");
    for (dtype, name) in [(Dtype::BF16, "prompt_embeds_bf16"), (Dtype::F16, "prompt_embeds_f16")] {
        let dir = TempDir::new(&format!("{dtype:?}"));
        write_pipeline(&dir, None, 1, |_, s, v| Some((dtype, s, v)));
        let enc = open(&dir);
        assert!(enc.encoder.weights().view("encoder.block.0.layer.0.SelfAttention.q.weight").is_none());
        let e = enc.encode(&p, 32).unwrap();
        let want = floats(&r, name);
        assert_close(&format!("T5 embeddings, {dtype:?} weights"), &e.embeds, &want, TOL);
        // The rounding itself moves the output far more than our error: the check can fail.
        let moved = common::rel_l2(&want, &f32_ref);
        println!("{dtype:?}: the rounded weights move transformers' output by {moved:.2e}");
        assert!(moved > 100.0 * TOL);
    }
}

#[test]
fn sharded_weights_give_the_single_files_bits() {
    let p = ["a red fox", "", "two dogs playing"];
    let single = open(&pipeline()).encode(&p, 32).unwrap();
    let dir = TempDir::new("sharded");
    write_pipeline(&dir, None, 3, same);
    let enc = open(&dir);
    assert_eq!(enc.encoder.weights().paths().len(), 3);
    assert_eq!(enc.encode(&p, 32).unwrap(), single);
    // diffusers' fp16 variant names are found too.
    let variant = TempDir::new("variant");
    write_pipeline(&variant, None, 1, |_, s, v| Some((Dtype::F16, s, v)));
    let te = variant.join("text_encoder");
    std::fs::rename(te.join("model.safetensors"), te.join("model.fp16.safetensors")).unwrap();
    assert_eq!(open(&variant).encode(&p, 32).unwrap().len, 32);
    // A shard the index names but that lacks the tensor.
    let te = dir.join("text_encoder");
    let index = std::fs::read_to_string(te.join("model.safetensors.index.json")).unwrap();
    let moved = index.replacen("model-00001-of-00003", "model-00002-of-00003", 1);
    std::fs::write(te.join("model.safetensors.index.json"), moved).unwrap();
    let e = open_err(&dir);
    assert!(matches!(e, Error::MissingTensors { .. }), "{e}");
    // A shard that is not there.
    std::fs::write(te.join("model.safetensors.index.json"), index).unwrap();
    std::fs::remove_file(te.join("model-00003-of-00003.safetensors")).unwrap();
    let e = open_err(&dir).to_string();
    assert!(e.contains("model-00003-of-00003.safetensors"), "{e}");
}

#[test]
fn missing_files_are_named() {
    let dir = TempDir::new("missing");
    let e = open_err(&dir).to_string();
    assert!(e.contains("tokenizer.json") && e.contains("spiece.model"), "{e}");
    std::fs::create_dir_all(dir.join("tokenizer")).unwrap();
    std::fs::write(dir.join("tokenizer/tokenizer.json"), "{\"not\": \"a tokenizer\"}").unwrap();
    let e = open_err(&dir).to_string();
    assert!(e.contains("tokenizer.json") && e.contains("tokenizers crate"), "{e}");
    std::fs::copy(pipeline().join("tokenizer/tokenizer.json"), dir.join("tokenizer/tokenizer.json")).unwrap();
    let e = open_err(&dir).to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::create_dir_all(dir.join("text_encoder")).unwrap();
    std::fs::copy(pipeline().join("text_encoder/config.json"), dir.join("text_encoder/config.json")).unwrap();
    let e = open_err(&dir).to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn bad_weights_are_refused_naming_the_tensor() {
    let q = "encoder.block.1.layer.0.SelfAttention.q.weight";
    // Wrong shape.
    let dir = TempDir::new("shape");
    write_pipeline(&dir, None, 1, |n, s, v| {
        if n == q {
            Some((Dtype::F32, vec![s[0] / 2, s[1]], v[..v.len() / 2].to_vec()))
        } else {
            Some((Dtype::F32, s, v))
        }
    });
    match open_err(&dir) {
        Error::Shape { tensor, expected, found, .. } => {
            assert_eq!((tensor.as_str(), expected, found), (q, vec![64, 64], vec![32, 64]))
        }
        e => panic!("{e}"),
    }
    // Wrong dtype (integers; f64 is not an encoder dtype either).
    for dtype in [Dtype::I32, Dtype::F64] {
        let dir = TempDir::new("dtype");
        write_pipeline(&dir, None, 1, |n, s, v| Some((if n == q { dtype } else { Dtype::F32 }, s, v)));
        match open_err(&dir) {
            Error::Dtype { tensor, expected, .. } => assert_eq!((tensor.as_str(), expected), (q, "f32, f16 or bf16")),
            e => panic!("{e}"),
        }
    }
    // Missing and unexpected tensors, all named.
    let dir = TempDir::new("names");
    write_pipeline(&dir, None, 1, |n, s, v| (!n.contains("block.1.layer.1")).then_some((Dtype::F32, s, v)));
    match open_err(&dir) {
        Error::MissingTensors { names, .. } => assert_eq!(names.len(), 4, "{names:?}"),
        e => panic!("{e}"),
    }
    let cfg = std::fs::read_to_string(pipeline().join("text_encoder/config.json")).unwrap();
    let one_layer = cfg.replace("\"num_layers\": 2", "\"num_layers\": 1");
    write_pipeline(&dir, Some(&one_layer), 1, same);
    match open_err(&dir) {
        Error::UnexpectedTensors { names, .. } => assert!(names.iter().all(|n| n.contains("block.1.")), "{names:?}"),
        e => panic!("{e}"),
    }
}

#[test]
fn unknown_or_inconsistent_configs_are_refused() {
    let cfg = std::fs::read_to_string(pipeline().join("text_encoder/config.json")).unwrap();
    let cases = [
        (cfg.replace("\"gated-gelu\"", "\"relu\""), "feed_forward_proj is \"relu\""),
        (cfg.replace("\"gated-gelu\"", "\"gated-silu\""), "gated-silu"),
        (cfg.replace("\"d_model\": 64,", ""), "`d_model` is missing"),
        (cfg.replace("\"num_heads\": 4", "\"num_heads\": -4"), "`num_heads` is -4"),
        (cfg.replace("\"relative_attention_num_buckets\": 32", "\"relative_attention_num_buckets\": 2"), "at least 4"),
        (cfg.replace("\"layer_norm_epsilon\": 1e-06", "\"layer_norm_epsilon\": \"small\""), "layer_norm_epsilon"),
        (cfg.replace("\"is_gated_act\": true", "\"is_gated_act\": false"), "is_gated_act"),
        (cfg.replace("\"vocab_size\": 232", "\"vocab_size\": 100"), "vocab_size"),
        ("{ not json".to_string(), "not valid JSON"),
    ];
    for (text, want) in cases {
        let dir = TempDir::new("config");
        write_pipeline(&dir, Some(&text), 1, same);
        let e = open_err(&dir);
        assert!(matches!(e, Error::Config { .. } | Error::Shape { .. }), "{e}");
        let e = e.to_string();
        assert!(e.contains(want) && e.contains("config.json"), "{want}: {e}");
    }
}

#[test]
fn bad_requests_are_refused() {
    let enc = open(&pipeline());
    for len in [0, MAX_SEQUENCE_LENGTH + 1] {
        let e = enc.encode(&["a fox"], len).expect_err("length").to_string();
        assert!(e.contains("max sequence length") && e.contains("512"), "{e}");
    }
    assert!(enc.encode(&[], 32).is_err());
    // The encoder refuses masks that are not a prefix of ones and ids past the embedding.
    let (ids, mut mask) = enc.tokenize(&["a fox"], 8).unwrap();
    mask[6] = 1;
    let e = enc.encoder.encode(&ids, &mask, 1, 8).expect_err("mask").to_string();
    assert!(e.contains("attention mask"), "{e}");
    let e = enc.encoder.encode(&[232, 1], &[1, 1], 1, 2).expect_err("id").to_string();
    assert!(e.contains("token id 232") && e.contains("232 rows"), "{e}");
}

#[test]
fn embeddings_files_round_trip_and_bad_ones_are_refused() {
    let dir = TempDir::new("embeds");
    let e = open(&pipeline()).encode(&["a red fox", ""], 16).unwrap();
    let path = dir.join("e.safetensors");
    e.save(&path).unwrap();
    assert_eq!(Embeddings::load(&path).unwrap(), e);
    let bad = dir.join("bad.safetensors");
    icdit::tensorfile::write_safetensors(
        &bad,
        &[("prompt_embeds", &[2, 16, 64], &e.embeds)],
        &[("attention_mask", &[2, 15], &e.mask[..30])],
        None,
    )
    .unwrap();
    match Embeddings::load(&bad).expect_err("shape") {
        Error::Shape { tensor, expected, found, .. } => {
            assert_eq!((tensor.as_str(), expected, found), ("attention_mask", vec![2, 16], vec![2, 15]))
        }
        e => panic!("{e}"),
    }
}

#[test]
fn encode_command_writes_the_three_tensors_atomically() {
    let dir = TempDir::new("cli");
    let out = dir.join("e.safetensors");
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_icdit")).args(args).output().unwrap();
    let weights = pipeline();
    let w = weights.to_str().unwrap();
    let o = out.to_str().unwrap();
    let args = ["encode", "--weights", w, "--prompt", "A photo of a red fox", "--prompt", "", "--threads", "2"];
    let res = run(&[&args[..], &["--max-sequence-length", "24", "--out", o]].concat());
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let f = TensorFile::open(&out).unwrap();
    let names: std::collections::BTreeSet<&str> = f.names().collect();
    assert_eq!(names, ["attention_mask", "input_ids", "prompt_embeds"].into_iter().collect());
    for (name, dtype, shape) in [
        ("input_ids", Dtype::I64, vec![2, 24]),
        ("attention_mask", Dtype::I64, vec![2, 24]),
        ("prompt_embeds", Dtype::F32, vec![2, 24, 64]),
    ] {
        let t = f.get(name).unwrap();
        assert_eq!((t.dtype, &t.shape), (dtype, &shape), "{name}");
    }
    let lib = open(&pipeline()).encode(&["A photo of a red fox", ""], 24).unwrap();
    assert_eq!(Embeddings::load(&out).unwrap(), lib, "the command writes what the library computes");
    let listing: Vec<String> =
        std::fs::read_dir(&*dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(listing, ["e.safetensors"], "no temporary file left beside the output");
    // Errors: exit status 2 for a bad setting, 3 for a bad folder; never a panic; no file.
    let bad_len = run(&[&args[..], &["--max-sequence-length", "9999", "--out", &format!("{o}2")]].concat());
    assert_eq!(bad_len.status.code(), Some(2), "{}", String::from_utf8_lossy(&bad_len.stderr));
    let no_dir = run(&["encode", "--weights", dir.to_str().unwrap(), "--prompt", "x", "--out", &format!("{o}3")]);
    assert_eq!(no_dir.status.code(), Some(3));
    let err = String::from_utf8_lossy(&no_dir.stderr);
    assert!(err.contains("tokenizer.json") && !err.contains("panicked"), "{err}");
    assert!(!Path::new(&format!("{o}2")).exists() && !Path::new(&format!("{o}3")).exists());
}
