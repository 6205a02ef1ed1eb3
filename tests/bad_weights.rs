//! Every way a weights file can be wrong gives a typed error naming the file and tensor.
//! Broken files are made from the hd72 fixture in a temporary folder.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{diffusers_copy, fixture, read_all, write_all, TempDir, Tensors};
use icdit::{DitModel, Error, LoadOptions};
use safetensors::Dtype;

fn official() -> (Tensors, HashMap<String, String>) {
    read_all(&fixture("hd72/official.safetensors"))
}

fn load(path: &Path) -> Result<DitModel, Error> {
    DitModel::load(path, &LoadOptions::default())
}

fn expect_err(path: &Path, check: impl Fn(&Error) -> bool, words: &[&str]) {
    let err = load(path).expect_err("loading must fail");
    let msg = err.to_string();
    println!("{msg}");
    assert!(check(&err), "wrong error kind: {err:?}");
    assert!(
        msg.contains(&path.display().to_string()) || msg.contains(path.file_name().unwrap().to_str().unwrap()),
        "error does not name the file: {msg}"
    );
    for w in words {
        assert!(msg.contains(w), "error lacks `{w}`: {msg}");
    }
}

#[test]
fn not_a_safetensors_file() {
    let tmp = TempDir::new("notst");
    let p = tmp.join("weights.safetensors");
    std::fs::write(&p, b"PK\x03\x04 this is a zip file, not safetensors at all").unwrap();
    expect_err(&p, |e| matches!(e, Error::BadSafetensors { .. }), &["not a valid safetensors file"]);
    std::fs::write(&p, b"abc").unwrap();
    expect_err(&p, |e| matches!(e, Error::BadSafetensors { .. }), &["too short"]);
}

#[test]
fn truncated_file() {
    let tmp = TempDir::new("trunc");
    let p = tmp.join("weights.safetensors");
    let bytes = std::fs::read(fixture("hd72/official.safetensors")).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    expect_err(&p, |e| matches!(e, Error::BadSafetensors { .. }), &["truncated"]);
}

#[test]
fn header_lies_about_offsets() {
    let tmp = TempDir::new("lies");
    let p = tmp.join("weights.safetensors");
    let bytes = std::fs::read(fixture("hd72/official.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    // Point the first tensor's data at a range that overlaps another tensor.
    let at = header.find("\"data_offsets\":[").unwrap() + "\"data_offsets\":[".len();
    let end = header[at..].find(']').unwrap() + at;
    let lied = format!("{}0,8{}", &header[..at], &header[end..]);
    let mut out = (lied.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(lied.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&p, out).unwrap();
    expect_err(&p, |e| matches!(e, Error::BadSafetensors { .. }), &[]);
    // A header length that points past the end of the file.
    let mut out = (u64::MAX / 2).to_le_bytes().to_vec();
    out.extend_from_slice(&bytes[8..]);
    std::fs::write(&p, out).unwrap();
    expect_err(&p, |e| matches!(e, Error::BadSafetensors { .. }), &[]);
}

#[test]
fn missing_tensor_is_named() {
    let tmp = TempDir::new("missing");
    let p = tmp.join("weights.safetensors");
    let (mut t, meta) = official();
    t.retain(|(n, ..)| n != "blocks.1.mlp.fc2.bias" && n != "final_layer.linear.bias");
    write_all(&p, &t, &meta);
    expect_err(
        &p,
        |e| matches!(e, Error::MissingTensors { names, .. } if names.len() == 2),
        &["blocks.1.mlp.fc2.bias", "final_layer.linear.bias"],
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let tmp = TempDir::new("extra");
    let p = tmp.join("weights.safetensors");
    let (mut t, meta) = official();
    t.push(("blocks.0.attn.q_norm.weight".into(), Dtype::F32, vec![72], vec![0u8; 288]));
    write_all(&p, &t, &meta);
    expect_err(&p, |e| matches!(e, Error::UnexpectedTensors { .. }), &["blocks.0.attn.q_norm.weight"]);
}

#[test]
fn unexpected_shape_is_named() {
    let tmp = TempDir::new("shape");
    let p = tmp.join("weights.safetensors");
    let (mut t, meta) = official();
    let e = t.iter_mut().find(|(n, ..)| n == "blocks.1.attn.proj.weight").unwrap();
    e.2 = vec![72, 288]; // same byte size, wrong shape
    write_all(&p, &t, &meta);
    expect_err(
        &p,
        |e| matches!(e, Error::Shape { tensor, .. } if tensor == "blocks.1.attn.proj.weight"),
        &["[144, 144]", "[72, 288]"],
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let tmp = TempDir::new("dtype");
    let p = tmp.join("weights.safetensors");
    let (mut t, meta) = official();
    let e = t.iter_mut().find(|(n, ..)| n == "blocks.0.mlp.fc1.bias").unwrap();
    e.1 = Dtype::I32;
    write_all(&p, &t, &meta);
    expect_err(
        &p,
        |e| matches!(e, Error::Dtype { tensor, .. } if tensor == "blocks.0.mlp.fc1.bias"),
        &["I32", "f32, f16, bf16"],
    );
}

#[test]
fn inconsistent_config_is_refused() {
    let tmp = TempDir::new("config");
    let p = tmp.join("weights.safetensors");
    let (t, mut meta) = official();
    let cfg = meta["dit_config"].replace("\"depth\": 2", "\"depth\": 3");
    assert_ne!(cfg, meta["dit_config"]);
    meta.insert("dit_config".into(), cfg);
    write_all(&p, &t, &meta);
    expect_err(&p, |e| matches!(e, Error::Config { .. }), &["depth is 3 but the tensors say 2"]);
    // Heads that do not divide the hidden size.
    let (t, mut meta) = official();
    meta.insert("dit_config".into(), meta["dit_config"].replace("\"num_heads\": 2", "\"num_heads\": 5"));
    write_all(&p, &t, &meta);
    expect_err(&p, |e| matches!(e, Error::Config { .. }), &["not divisible by num_heads 5"]);
    // Garbage metadata.
    let (t, mut meta) = official();
    meta.insert("dit_config".into(), "{not json".into());
    write_all(&p, &t, &meta);
    expect_err(&p, |e| matches!(e, Error::Config { .. }), &["dit_config"]);
}

#[test]
fn unknown_head_count_needs_the_flag() {
    let tmp = TempDir::new("heads");
    let p = tmp.join("weights.safetensors");
    let (t, mut meta) = official();
    meta.remove("dit_config");
    write_all(&p, &t, &meta);
    expect_err(&p, |e| matches!(e, Error::UnknownHeads { hidden_size: 144, .. }), &["--num-heads"]);
    // With the flag it loads, and a flag contradicting the metadata is refused.
    let m = DitModel::load(&p, &LoadOptions { num_heads: Some(2), ..Default::default() }).unwrap();
    assert_eq!(m.config.num_heads, 2);
    let err = DitModel::load(
        &fixture("hd72/official.safetensors"),
        &LoadOptions { num_heads: Some(4), ..Default::default() },
    )
    .unwrap_err();
    assert!(err.to_string().contains("--num-heads says 4"), "{err}");
}

#[test]
fn unknown_layout_is_refused() {
    let tmp = TempDir::new("layout");
    let p = tmp.join("weights.safetensors");
    let (t, meta) = official();
    let renamed: Tensors = t.into_iter().map(|(n, d, s, b)| (format!("model.{n}"), d, s, b)).collect();
    write_all(&p, &renamed, &meta);
    expect_err(&p, |e| matches!(e, Error::Layout { .. }), &["x_embedder.proj.weight"]);
    let err = load(&tmp).unwrap_err();
    assert!(matches!(err, Error::Layout { .. }), "{err}");
    let err = load(&tmp.join("does-not-exist.safetensors")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("does-not-exist"), "{err}");
}

#[test]
fn diffusers_config_mismatch_is_refused() {
    let tmp = TempDir::new("hfcfg");
    let dir = diffusers_copy(&tmp);
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let bad = cfg.replace("\"num_attention_heads\": 2", "\"num_attention_heads\": 4");
    assert_ne!(bad, cfg);
    std::fs::write(dir.join("config.json"), bad).unwrap();
    let err = load(&tmp).unwrap_err();
    println!("{err}");
    assert!(matches!(err, Error::Config { .. }) && err.to_string().contains("config.json"), "{err}");
    std::fs::write(dir.join("config.json"), "{\"sample_size\": 8}").unwrap();
    let err = load(&tmp).unwrap_err();
    assert!(err.to_string().contains("not a diffusers DiT config"), "{err}");
}

#[test]
fn diffusers_embedder_copies_must_agree() {
    let tmp = TempDir::new("hfemb");
    let dir = diffusers_copy(&tmp);
    let p = dir.join("diffusion_pytorch_model.safetensors");
    let (mut t, meta) = read_all(&p);
    let name = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias";
    let e = t.iter_mut().find(|(n, ..)| n == name).unwrap();
    e.3[0] ^= 0x40;
    write_all(&p, &t, &meta);
    let err = load(&tmp).unwrap_err();
    println!("{err}");
    assert!(matches!(err, Error::Config { .. }) && err.to_string().contains(name), "{err}");
}
