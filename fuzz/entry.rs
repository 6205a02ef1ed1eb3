//! The fuzz entry points: one function per parser of untrusted bytes, shared by the
//! cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`, nightly) and the corpus replay in
//! `tests/reliability.rs` (stable), so CI runs every corpus file through exactly the code
//! the fuzzer ran. Each entry writes the bytes where the public API reads them (a file or
//! a folder) and calls the loader; any `Err` is fine, a panic, hang or unbounded
//! allocation is a bug. What loads is also exercised (a forward pass, a decode) when small.
//!
//! `seeds()` builds small valid inputs for every target (tiny models of each layout,
//! factors, a VAE, request files): the starting corpus, and a check in the replay test that
//! the entry points accept valid input (so they are not vacuous).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use icdit::tensorfile::FloatType;
use icdit::vae::{VaeDecoder, VaeModel};
use icdit::{CacheMode, CpuEngine, CpuOptions, DitConfig, DitModel, Factors, LoadOptions};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A fuzz entry point.
pub type Entry = fn(&[u8]);

/// Every target: (name, entry point). The names are the folders under `fuzz/corpus/`.
pub const TARGETS: [(&str, Entry); 6] = [
    ("dit_official", dit_official),
    ("dit_diffusers", dit_diffusers),
    ("factors", factors),
    ("vae", vae),
    ("inputs", inputs),
    ("config_json", config_json),
];

/// A folder private to this process and thread (tests replay targets in parallel).
fn scratch(tag: &str) -> PathBuf {
    let d = scratch_base().join(format!("{}{tag}", scratch_prefix()));
    let _ = std::fs::create_dir_all(&d);
    d
}

fn scratch_base() -> PathBuf {
    if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    }
}

/// `icdit-fuzz-<pid>-<thread>-`: this process's and thread's folders.
fn scratch_prefix() -> String {
    let thread = format!("{:?}", std::thread::current().id()).replace(['(', ')'], "");
    format!("icdit-fuzz-{}-{thread}-", std::process::id())
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("scratch folder is writable");
}

/// `[len: u16 LE][first: len bytes][second: rest]`, the layout of two-file inputs.
fn split2(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (data, &[]);
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    (&data[2..2 + n], &data[2 + n..])
}

fn join2(first: &[u8], second: &[u8]) -> Vec<u8> {
    let mut v = (first.len() as u16).to_le_bytes().to_vec();
    v.extend_from_slice(first);
    v.extend_from_slice(second);
    v
}

/// Runs what a loaded DiT is for, when it is small enough to be quick: the inspect report,
/// the fingerprint, the memory plan, a one-row forward pass.
fn exercise_dit(model: DitModel) {
    let cfg = model.config;
    let _ = icdit::inspect::Report::new(&model, &CpuOptions::default());
    let _ = icdit::factors::fingerprint(&model);
    let _ = model.find_non_finite();
    if cfg.forward_macs() > 2_000_000 || cfg.tokens() > 256 {
        return;
    }
    let model = Arc::new(model);
    let opts = CpuOptions { max_batch: 1, threads: 1, ..Default::default() };
    if let Ok(mut e) = CpuEngine::new(Arc::clone(&model), &opts) {
        let x = vec![0.5f32; cfg.image_elems()];
        let mut out = vec![0.0f32; cfg.output_elems()];
        let _ = e.forward(&x, &[999], &[0], &mut out);
        let _ = e.forward(&x, &[0], &[cfg.null_class() as i64], &mut out);
    }
}

/// An official-layout safetensors file.
pub fn dit_official(data: &[u8]) {
    let d = scratch("official");
    let p = d.join("w.safetensors");
    write(&p, data);
    if let Ok(m) = DitModel::load(&p, &LoadOptions::default()) {
        exercise_dit(m);
    }
}

/// A diffusers folder: `[config.json][diffusion_pytorch_model.safetensors]` (see `split2`).
pub fn dit_diffusers(data: &[u8]) {
    let d = scratch("diffusers");
    let (config, weights) = split2(data);
    write(&d.join("config.json"), config);
    write(&d.join("diffusion_pytorch_model.safetensors"), weights);
    if let Ok(m) = DitModel::load(&d, &LoadOptions::default()) {
        exercise_dit(m);
    }
}

/// A factor file for the tiny model (`tiny_model()`); what loads runs a calibrated step.
pub fn factors(data: &[u8]) {
    let d = scratch("factors");
    let p = d.join("f.safetensors");
    write(&p, data);
    let model = tiny_model();
    let Ok(f) = Factors::load(&p, model) else { return };
    let _ = f.ranks();
    let opts = CpuOptions { max_batch: 1, threads: 1, cache: CacheMode::Icc(Arc::new(f)), ..Default::default() };
    if let Ok(mut e) = CpuEngine::new(Arc::clone(model), &opts) {
        use icdit::forward::StepKind;
        let cfg = model.config;
        let x = vec![0.25f32; cfg.image_elems()];
        let mut out = vec![0.0f32; cfg.output_elems()];
        let _ = e.forward_step(&x, &[500], &[1], &mut out, StepKind::Full);
        let _ = e.forward_step(&x, &[480], &[1], &mut out, StepKind::Calibrated);
    }
}

/// A VAE: first byte even → a folder `[config.json][weights]`; odd → a weights file alone
/// (config inferred from the shapes).
pub fn vae(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let d = scratch("vae");
    let loaded = if mode.is_multiple_of(2) {
        let (config, weights) = split2(rest);
        write(&d.join("config.json"), config);
        write(&d.join("diffusion_pytorch_model.safetensors"), weights);
        VaeModel::load(&d)
    } else {
        let sub = d.join("alone");
        let _ = std::fs::create_dir_all(&sub);
        let p = sub.join("vae.safetensors");
        write(&p, rest);
        VaeModel::load(&p)
    };
    let Ok(m) = loaded else { return };
    if m.config.macs(2) > 5_000_000 || m.config.block_out_channels.len() > 4 {
        return;
    }
    if let Ok(mut dec) = VaeDecoder::new(Arc::new(m), 2, 1) {
        let lat = vec![0.5f32; dec.latent_len()];
        let mut img = vec![0.0f32; dec.image_len()];
        let _ = dec.decode(&lat, &mut img);
    }
}

/// Request files: first byte selects noise (`z`, `step_noise`), latents, or forward input,
/// read against the tiny model's config.
pub fn inputs(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let d = scratch("inputs");
    let p = d.join("in.safetensors");
    write(&p, rest);
    let cfg = tiny_config();
    match mode % 3 {
        0 => drop(icdit::inputs::read_noise(&p, 1, &cfg)),
        1 => drop(icdit::inputs::read_latents(&p, cfg.in_channels)),
        _ => drop(icdit::inputs::read_forward_input(&p, &cfg)),
    }
}

/// Config text with valid tensors: first byte selects a diffusers DiT config.json (tiny
/// diffusers weights), a VAE config.json (tiny VAE weights), or a metadata value of the
/// tiny official file (`dit_config`, `icdit_class_names`, `icdit_space` by the second byte).
pub fn config_json(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let d = scratch("config");
    match mode % 3 {
        0 => {
            write(&d.join("config.json"), rest);
            write(&d.join("diffusion_pytorch_model.safetensors"), &tiny_diffusers().1);
            if let Ok(m) = DitModel::load(&d, &LoadOptions::default()) {
                exercise_dit(m);
            }
        }
        1 => {
            write(&d.join("config.json"), rest);
            write(&d.join("diffusion_pytorch_model.safetensors"), &tiny_vae().1);
            if let Ok(m) = VaeModel::load(&d) {
                if m.config.macs(2) < 5_000_000 && m.config.block_out_channels.len() <= 4 {
                    if let Ok(mut dec) = VaeDecoder::new(Arc::new(m), 2, 1) {
                        let lat = vec![0.5f32; dec.latent_len()];
                        let mut img = vec![0.0f32; dec.image_len()];
                        let _ = dec.decode(&lat, &mut img);
                    }
                }
            }
        }
        _ => {
            let Some((&key, text)) = rest.split_first() else { return };
            let key = ["dit_config", "icdit_class_names", "icdit_space"][key as usize % 3];
            let text = String::from_utf8_lossy(text).into_owned();
            let p = d.join("w.safetensors");
            write(&p, &with_metadata(tiny_official(), key, &text));
            if let Ok(m) = DitModel::load(&p, &LoadOptions::default()) {
                exercise_dit(m);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tiny valid inputs.

/// A DiT small enough to run in microseconds: 2×2 latents of one channel, hidden size 8,
/// one block of two heads, two classes with a null row, learned sigma.
pub fn tiny_config() -> DitConfig {
    DitConfig {
        input_size: 2,
        patch_size: 1,
        in_channels: 1,
        hidden_size: 8,
        depth: 1,
        num_heads: 2,
        mlp_ratio: 1.0,
        class_dropout_prob: 0.1,
        num_classes: 2,
        learn_sigma: true,
    }
}

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| (((i * 7 + seed * 13) % 17) as f32 - 8.0) / 16.0).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect()
}

/// safetensors bytes of f16 tensors `(name, shape)` with deterministic values.
fn serialize_f16(spec: &[(String, Vec<usize>)], meta: Option<HashMap<String, String>>) -> Vec<u8> {
    let data: Vec<Vec<u8>> =
        spec.iter().enumerate().map(|(i, (_, s))| f16_bytes(&values(s.iter().product(), i))).collect();
    let views: Vec<(String, TensorView)> = spec
        .iter()
        .zip(&data)
        .map(|((n, s), b)| (n.clone(), TensorView::new(Dtype::F16, s.clone(), b).expect("sizes match")))
        .collect();
    safetensors::serialize(views, meta).expect("serialises")
}

/// The tiny model as an official-layout file (f16, with `dit_config`).
pub fn tiny_official() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let p = scratch("seed").join("tiny-official.safetensors");
        icdit::weights::write_random_official(&p, &tiny_config(), 7, FloatType::F16).expect("tiny model writes");
        std::fs::read(&p).expect("reads back")
    })
}

/// The tiny model loaded (from `tiny_official`), for factor files.
pub fn tiny_model() -> &'static Arc<DitModel> {
    static MODEL: OnceLock<Arc<DitModel>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let p = scratch("seed").join("tiny-model.safetensors");
        write(&p, tiny_official());
        Arc::new(DitModel::load(&p, &LoadOptions::default()).expect("tiny model loads"))
    })
}

/// The same file with metadata `key` set to `value`.
fn with_metadata(bytes: &[u8], key: &str, value: &str) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(bytes).expect("tiny file is valid");
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).expect("valid");
    let mut m = meta.metadata().clone().unwrap_or_default();
    m.insert(key.to_string(), value.to_string());
    let views: Vec<(String, TensorView)> = st.tensors();
    safetensors::serialize(views, Some(m)).expect("serialises")
}

/// The tiny model as a diffusers folder: (config.json, weights).
pub fn tiny_diffusers() -> &'static (Vec<u8>, Vec<u8>) {
    static BYTES: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    BYTES.get_or_init(|| {
        let cfg = tiny_config();
        let (c, m, p) = (cfg.hidden_size, cfg.mlp_hidden(), cfg.patch_size);
        let fin = p * p * cfg.out_channels();
        let mut spec: Vec<(String, Vec<usize>)> = vec![
            ("pos_embed.proj.weight".into(), vec![c, cfg.in_channels, p, p]),
            ("pos_embed.proj.bias".into(), vec![c]),
            ("proj_out_1.weight".into(), vec![2 * c, c]),
            ("proj_out_1.bias".into(), vec![2 * c]),
            ("proj_out_2.weight".into(), vec![fin, c]),
            ("proj_out_2.bias".into(), vec![fin]),
        ];
        for i in 0..cfg.depth {
            let b = |x: &str| format!("transformer_blocks.{i}.{x}");
            for (n, s) in [
                ("norm1.emb.timestep_embedder.linear_1.weight", vec![c, 256]),
                ("norm1.emb.timestep_embedder.linear_1.bias", vec![c]),
                ("norm1.emb.timestep_embedder.linear_2.weight", vec![c, c]),
                ("norm1.emb.timestep_embedder.linear_2.bias", vec![c]),
                ("norm1.emb.class_embedder.embedding_table.weight", vec![cfg.label_rows(), c]),
                ("norm1.linear.weight", vec![6 * c, c]),
                ("norm1.linear.bias", vec![6 * c]),
                ("attn1.to_q.weight", vec![c, c]),
                ("attn1.to_q.bias", vec![c]),
                ("attn1.to_k.weight", vec![c, c]),
                ("attn1.to_k.bias", vec![c]),
                ("attn1.to_v.weight", vec![c, c]),
                ("attn1.to_v.bias", vec![c]),
                ("attn1.to_out.0.weight", vec![c, c]),
                ("attn1.to_out.0.bias", vec![c]),
                ("ff.net.0.proj.weight", vec![m, c]),
                ("ff.net.0.proj.bias", vec![m]),
                ("ff.net.2.weight", vec![c, m]),
                ("ff.net.2.bias", vec![c]),
            ] {
                spec.push((b(n), s));
            }
        }
        let config = format!(
            r#"{{"_class_name": "DiTTransformer2DModel", "sample_size": {}, "patch_size": {p}, "in_channels": {},
"out_channels": {}, "num_layers": {}, "num_attention_heads": {}, "attention_head_dim": {},
"num_embeds_ada_norm": {}, "norm_type": "ada_norm_zero", "norm_eps": 1e-05}}"#,
            cfg.input_size,
            cfg.in_channels,
            cfg.out_channels(),
            cfg.depth,
            cfg.num_heads,
            c / cfg.num_heads,
            cfg.num_classes
        );
        (config.into_bytes(), serialize_f16(&spec, None))
    })
}

/// A two-level VAE decoder of width 2 (one norm group), one latent channel, one output
/// channel, with mid-block attention: (config.json, weights).
pub fn tiny_vae() -> &'static (Vec<u8>, Vec<u8>) {
    static BYTES: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    BYTES.get_or_init(|| {
        let (w, lc, oc) = (2usize, 1usize, 1usize);
        let mut spec: Vec<(String, Vec<usize>)> = Vec::new();
        let mut wb = |name: &str, shape: Vec<usize>| {
            let n = shape[0];
            spec.push((format!("{name}.weight"), shape));
            spec.push((format!("{name}.bias"), vec![n]));
        };
        wb("post_quant_conv", vec![lc, lc, 1, 1]);
        wb("decoder.conv_in", vec![w, lc, 3, 3]);
        let resnet = |wb: &mut dyn FnMut(&str, Vec<usize>), name: &str| {
            wb(&format!("{name}.norm1"), vec![w]);
            wb(&format!("{name}.conv1"), vec![w, w, 3, 3]);
            wb(&format!("{name}.norm2"), vec![w]);
            wb(&format!("{name}.conv2"), vec![w, w, 3, 3]);
        };
        resnet(&mut wb, "decoder.mid_block.resnets.0");
        resnet(&mut wb, "decoder.mid_block.resnets.1");
        let a = "decoder.mid_block.attentions.0";
        wb(&format!("{a}.group_norm"), vec![w]);
        for q in ["to_q", "to_k", "to_v", "to_out.0"] {
            wb(&format!("{a}.{q}"), vec![w, w]);
        }
        for i in 0..2 {
            for j in 0..2 {
                resnet(&mut wb, &format!("decoder.up_blocks.{i}.resnets.{j}"));
            }
            if i == 0 {
                wb("decoder.up_blocks.0.upsamplers.0.conv", vec![w, w, 3, 3]);
            }
        }
        wb("decoder.conv_norm_out", vec![w]);
        wb("decoder.conv_out", vec![oc, w, 3, 3]);
        let config = format!(
            r#"{{"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [{w}, {w}], "layers_per_block": 1,
"latent_channels": {lc}, "norm_num_groups": 1, "out_channels": {oc}, "scaling_factor": 0.18215,
"up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "use_post_quant_conv": true}}"#
        );
        (config.into_bytes(), serialize_f16(&spec, None))
    })
}

/// Rank-1 factors for the tiny model, with the model's fingerprint when `fingerprinted`.
fn tiny_factors(fingerprinted: bool) -> Vec<u8> {
    let cfg = tiny_config();
    let (c, m) = (cfg.hidden_size, cfg.mlp_hidden());
    let mut spec = Vec::new();
    for i in 0..cfg.depth {
        for (t, o, inp) in [
            ("attn.q", c, c),
            ("attn.k", c, c),
            ("attn.v", c, c),
            ("attn.proj", c, c),
            ("mlp.fc1", m, c),
            ("mlp.fc2", c, m),
        ] {
            spec.push((format!("blocks.{i}.{t}.up"), vec![o, 1]));
            spec.push((format!("blocks.{i}.{t}.down"), vec![1, inp]));
        }
    }
    let fp = if fingerprinted {
        format!(r#", "model_fingerprint": "{}""#, icdit::factors::fingerprint(tiny_model()))
    } else {
        String::new()
    };
    let meta = HashMap::from([(
        icdit::factors::META_KEY.to_string(),
        format!(r#"{{"method": "svd", "rank": 1{fp}, "calibration": null}}"#),
    )]);
    serialize_f16(&spec, Some(meta))
}

fn f32_file(
    tensors: &[(&str, Vec<usize>, Vec<f32>)],
    i64s: &[(&str, Vec<usize>, Vec<i64>)],
    meta: &[(&str, &str)],
) -> Vec<u8> {
    let f: Vec<Vec<u8>> = tensors.iter().map(|t| bytemuck_f32(&t.2)).collect();
    let i: Vec<Vec<u8>> = i64s.iter().map(|t| t.2.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
    let mut views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&f)
        .map(|(t, b)| (t.0.to_string(), TensorView::new(Dtype::F32, t.1.clone(), b).expect("sizes")))
        .collect();
    views.extend(
        i64s.iter()
            .zip(&i)
            .map(|(t, b)| (t.0.to_string(), TensorView::new(Dtype::I64, t.1.clone(), b).expect("sizes"))),
    );
    let meta = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    safetensors::serialize(views, Some(meta)).expect("serialises")
}

fn bytemuck_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Seed inputs for every target: (target, name, bytes, valid). All are valid but the VAE
/// weights without config.json, whose 2-wide blocks cannot be inferred (32 norm groups are
/// assumed) — kept because it reaches the shape inference.
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>, bool)> {
    let (dc, dw) = tiny_diffusers();
    let (vc, vw) = tiny_vae();
    let img = tiny_config().image_elems();
    let mut vae_folder = vec![0u8];
    vae_folder.extend(join2(vc, vw));
    let mut vae_alone = vec![1u8];
    vae_alone.extend_from_slice(vw);
    let with = |mode: u8, bytes: Vec<u8>| [vec![mode], bytes].concat();
    let noise = f32_file(
        &[("z", vec![1, 1, 2, 2], values(img, 1)), ("step_noise", vec![3, 1, 1, 2, 2], values(3 * img, 2))],
        &[],
        &[],
    );
    let latents = f32_file(
        &[("latents", vec![2, 1, 2, 2], values(2 * img, 3))],
        &[("labels", vec![2], vec![0, 1])],
        &[("icdit_seed", "5")],
    );
    let fwd = f32_file(
        &[("x", vec![1, 1, 2, 2], values(img, 4))],
        &[("t", vec![1], vec![999]), ("y", vec![1], vec![2])],
        &[],
    );
    vec![
        ("dit_official", "tiny-f16", tiny_official().to_vec(), true),
        ("dit_diffusers", "tiny-f16", join2(dc, dw), true),
        ("factors", "rank1", tiny_factors(false), true),
        ("factors", "rank1-fingerprinted", tiny_factors(true), true),
        ("vae", "tiny-folder", vae_folder, true),
        ("vae", "tiny-alone", vae_alone, false),
        ("inputs", "noise", with(0, noise), true),
        ("inputs", "latents", with(1, latents), true),
        ("inputs", "forward", with(2, fwd), true),
        ("config_json", "dit", with(0, dc.clone()), true),
        ("config_json", "vae", with(1, vc.clone()), true),
        (
            "config_json",
            "dit-config-meta",
            with(2, [&[0u8][..], &serde_json::to_vec(&tiny_config()).expect("json")].concat()),
            true,
        ),
        ("config_json", "class-names-meta", with(2, [&[1u8][..], br#"["circle", "square"]"#].concat()), true),
        ("config_json", "space-meta", with(2, [&[2u8][..], b"pixel"].concat()), true),
    ]
}

/// Whether the seed (a valid input) is accepted by the loader behind its target; the
/// replay test asserts this so a broken entry point cannot pass silently.
pub fn seed_loads(target: &str, bytes: &[u8]) -> Result<(), String> {
    let d = scratch("check");
    let e = |r: Result<(), icdit::Error>| r.map_err(|e| e.to_string());
    match target {
        "dit_official" => {
            write(&d.join("w.safetensors"), bytes);
            e(DitModel::load(&d.join("w.safetensors"), &LoadOptions::default()).map(drop))
        }
        "dit_diffusers" | "config_json" if target == "dit_diffusers" || bytes[0].is_multiple_of(3) => {
            let (c, w) = if target == "dit_diffusers" { split2(bytes) } else { (&bytes[1..], &tiny_diffusers().1[..]) };
            write(&d.join("config.json"), c);
            write(&d.join("diffusion_pytorch_model.safetensors"), w);
            e(DitModel::load(&d, &LoadOptions::default()).map(drop))
        }
        "config_json" if bytes[0] % 3 == 1 => {
            write(&d.join("config.json"), &bytes[1..]);
            write(&d.join("diffusion_pytorch_model.safetensors"), &tiny_vae().1);
            e(VaeModel::load(&d).map(drop))
        }
        "config_json" => {
            let key = ["dit_config", "icdit_class_names", "icdit_space"][bytes[1] as usize % 3];
            let p = d.join("m.safetensors");
            write(&p, &with_metadata(tiny_official(), key, &String::from_utf8_lossy(&bytes[2..])));
            e(DitModel::load(&p, &LoadOptions::default()).map(drop))
        }
        "factors" => {
            write(&d.join("f.safetensors"), bytes);
            e(Factors::load(&d.join("f.safetensors"), tiny_model()).map(drop))
        }
        "vae" if bytes[0].is_multiple_of(2) => {
            let (c, w) = split2(&bytes[1..]);
            let sub = d.join("vae");
            let _ = std::fs::create_dir_all(&sub);
            write(&sub.join("config.json"), c);
            write(&sub.join("diffusion_pytorch_model.safetensors"), w);
            e(VaeModel::load(&sub).map(drop))
        }
        "vae" => {
            let sub = d.join("alone");
            let _ = std::fs::create_dir_all(&sub);
            write(&sub.join("v.safetensors"), &bytes[1..]);
            e(VaeModel::load(&sub.join("v.safetensors")).map(drop))
        }
        "inputs" => {
            let p = d.join("in.safetensors");
            write(&p, &bytes[1..]);
            let cfg = tiny_config();
            match bytes[0] % 3 {
                0 => e(icdit::inputs::read_noise(&p, 1, &cfg).map(drop)),
                1 => e(icdit::inputs::read_latents(&p, 1).map(drop)),
                _ => e(icdit::inputs::read_forward_input(&p, &cfg).map(drop)),
            }
        }
        other => Err(format!("unknown target {other}")),
    }
}

/// Removes this thread's scratch folders (tests run in parallel threads of one process).
pub fn cleanup() {
    let prefix = scratch_prefix();
    if let Ok(rd) = std::fs::read_dir(scratch_base()) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}
