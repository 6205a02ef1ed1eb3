//! diffusers' `DiTTransformer2DModel` layout (reference doc C.2, C.3): a folder with
//! `config.json` and the weights (single file, fp16 variant, or sharded with an index).
//! The 28 embedder copies must be identical (the official architecture has one), q/k/v are
//! concatenated once into the official qkv layout, and `pos_embed` is recomputed.

use super::*;

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
const WEIGHTS_FP16: &str = "diffusion_pytorch_model.fp16.safetensors";
const INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";

/// The `config.json` fields of a diffusers 2-D transformer that DiT's (`DiTTransformer2DModel`)
/// and PixArt-α's (`PixArtTransformer2DModel`) configs share.
#[derive(serde::Deserialize)]
pub(crate) struct DiffusersConfig {
    pub sample_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub norm_type: Option<String>,
    pub norm_eps: Option<f64>,
}

/// Reads the diffusers `config.json` at `path`: the shared fields and the model's own (`E`).
/// One that does not parse is a config error naming the file, the place in it and `what` it
/// should be.
pub(crate) fn read_config<E: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<(DiffusersConfig, E)> {
    let text = crate::tensorfile::read_json_text(path)?;
    let bad = |e: serde_json::Error| Error::Config {
        origin: path.display().to_string(),
        reason: format!("not a {what} config: {e}"),
    };
    Ok((serde_json::from_str(&text).map_err(bad)?, serde_json::from_str(&text).map_err(bad)?))
}

/// DiT's own config.json field.
#[derive(serde::Deserialize)]
struct DitFields {
    num_embeds_ada_norm: Option<usize>,
}

pub(super) fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<DitModel> {
    let dir =
        if dir.join("transformer").join("config.json").is_file() { dir.join("transformer") } else { dir.to_path_buf() };
    if !dir.join("config.json").is_file() {
        return Err(Error::Layout {
            path: dir.clone(),
            reason: "a folder must be a diffusers DiT (with `config.json` or `transformer/config.json`)".into(),
        });
    }
    let files = weight_files(&dir)?;
    let source = files[0].path().to_path_buf();
    load_files(&source, &dir, files, opts)
}

/// The weights of a diffusers model folder: the single file, its fp16 variant, or the
/// shards a sharded checkpoint's index lists.
pub(crate) fn weight_files(dir: &Path) -> Result<Vec<TensorFile>> {
    if dir.join(WEIGHTS).is_file() {
        Ok(vec![TensorFile::open(&dir.join(WEIGHTS))?])
    } else if dir.join(WEIGHTS_FP16).is_file() {
        Ok(vec![TensorFile::open(&dir.join(WEIGHTS_FP16))?])
    } else if dir.join(INDEX).is_file() {
        shards(&dir.join(INDEX))
    } else {
        Err(Error::Layout {
            path: dir.to_path_buf(),
            reason: format!("none of {WEIGHTS}, {WEIGHTS_FP16} or {INDEX} is in the folder"),
        })
    }
}

/// The files listed by a sharded checkpoint's index, each opened once.
fn shards(index: &Path) -> Result<Vec<TensorFile>> {
    let text = crate::tensorfile::read_json_text(index)?;
    let bad = |reason: String| Error::Layout { path: index.to_path_buf(), reason };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(bad("`weight_map` names no shard files".into()));
    }
    let dir = index.parent().unwrap_or(Path::new("."));
    names
        .into_iter()
        .map(|n| {
            if n.contains('/') || n.contains("..") {
                return Err(bad(format!("shard name `{n}` must be a plain file name")));
            }
            TensorFile::open(&dir.join(n))
        })
        .collect()
}

pub(super) fn load_files(source: &Path, dir: &Path, files: Vec<TensorFile>, opts: &LoadOptions) -> Result<DitModel> {
    let cfg_path = dir.join("config.json");
    let (hf, own): (DiffusersConfig, DitFields) = read_config(&cfg_path, "diffusers DiT")?;
    let origin = cfg_path.display().to_string();
    if let Some(t) = hf.norm_type.as_deref() {
        if t != "ada_norm_zero" {
            return Err(Error::Config {
                origin,
                reason: format!("norm_type is `{t}`; only DiT's `ada_norm_zero` is supported"),
            });
        }
    }
    let mut b = StoreBuilder::new(files);
    let path = b.file(0).path().to_path_buf();
    let cfg = infer(&b, &hf, own.num_embeds_ada_norm, opts, &path, &origin)?;
    check_embedder_copies(&b, &cfg, &path)?;
    let tensors = register(&mut b, &cfg)?;
    // Blocks other than 0 carry copies of the embedders; they were compared above.
    let (store, dtypes) = b.finish(|n| is_embedder_copy(n) || n == "pos_embed.pos_embed")?;
    let norm_eps = hf.norm_eps.unwrap_or(1e-5) as f32;
    Ok(DitModel {
        mlp_norm_eps: match opts.numerics {
            Numerics::Official => 1e-6,
            Numerics::Diffusers => norm_eps,
        },
        config: cfg,
        layout: Layout::Diffusers,
        numerics: opts.numerics,
        space: SampleSpace::Latent,
        class_names: None,
        source: source.to_path_buf(),
        dtypes,
        tensors,
        store,
    })
}

fn infer(
    b: &StoreBuilder,
    hf: &DiffusersConfig,
    num_embeds_ada_norm: Option<usize>,
    opts: &LoadOptions,
    path: &Path,
    origin: &str,
) -> Result<DitConfig> {
    let conflict = |reason: String| Error::Config { origin: origin.to_string(), reason };
    let pw = need_shape(b, "pos_embed.proj.weight")?;
    let [c, cin, p, p2] = *pw else {
        return Err(Error::Layout {
            path: path.to_path_buf(),
            reason: format!("`pos_embed.proj.weight` has shape {pw:?}, expected (C, Cin, p, p)"),
        });
    };
    // Bound every size before any arithmetic on it (a tensor with a zero dimension holds
    // no data, so its other dimensions can be anything).
    if p != p2 || p == 0 || p > 4096 || c == 0 || c > 1 << 20 || cin == 0 || cin > 1 << 16 {
        return Err(Error::Layout {
            path: path.to_path_buf(),
            reason: format!(
                "`pos_embed.proj.weight` has shape {pw:?}: expected (C, Cin, p, p) with 1 ≤ Cin ≤ 65536, \
                 1 ≤ p ≤ 4096, 1 ≤ C ≤ 2^20"
            ),
        });
    }
    let heads = official::resolve_heads(Some(hf.num_attention_heads), opts.num_heads, c, hf.num_layers, path, origin)?;
    if heads.checked_mul(hf.attention_head_dim) != Some(c) {
        return Err(conflict(format!(
            "num_attention_heads {} × attention_head_dim {} != hidden size {c} of `pos_embed.proj.weight`",
            hf.num_attention_heads, hf.attention_head_dim
        )));
    }
    if p != hf.patch_size || cin != hf.in_channels {
        return Err(conflict(format!(
            "patch_size {} / in_channels {} disagree with `pos_embed.proj.weight` {pw:?}",
            hf.patch_size, hf.in_channels
        )));
    }
    let depth = count_blocks(b.names(), "transformer_blocks.", path)?;
    if depth != hf.num_layers {
        return Err(conflict(format!("num_layers is {} but the file has {depth} blocks", hf.num_layers)));
    }
    let out = need_shape(b, "proj_out_2.weight")?.first().copied().unwrap_or(0);
    let cout = out / (p * p);
    if let Some(oc) = hf.out_channels {
        if oc != cout || out % (p * p) != 0 {
            return Err(conflict(format!("out_channels is {oc} but `proj_out_2.weight` has {out} rows")));
        }
    }
    let learn_sigma = cout == 2 * cin;
    if !learn_sigma && cout != cin {
        return Err(conflict(format!("out_channels {cout} is neither {cin} nor {}", 2 * cin)));
    }
    let rows = need_shape(b, "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight")?
        .first()
        .copied()
        .unwrap_or(0);
    let num_classes = num_embeds_ada_norm.unwrap_or(rows.saturating_sub(1));
    let dropout = if Some(rows) == num_classes.checked_add(1) {
        0.1
    } else if rows == num_classes {
        0.0
    } else {
        return Err(conflict(format!("num_embeds_ada_norm is {num_classes} but the label table has {rows} rows")));
    };
    let mlp_hidden = need_shape(b, "transformer_blocks.0.ff.net.0.proj.weight")?.first().copied().unwrap_or(0);
    let cfg = DitConfig {
        input_size: hf.sample_size,
        patch_size: p,
        in_channels: cin,
        hidden_size: c,
        depth,
        num_heads: heads,
        mlp_ratio: mlp_hidden as f64 / c as f64,
        class_dropout_prob: dropout,
        num_classes,
        learn_sigma,
    };
    cfg.validate(origin)?;
    // The position embedding is not stored in this layout but generated from sample_size:
    // refuse a sample_size whose embedding would dwarf the weights themselves (a real DiT's
    // is well under 1% of them) rather than allocate it.
    let stored: usize = b.names().filter_map(|n| b.shape(n)).map(|s| s.iter().product::<usize>()).sum();
    let pos = cfg.tokens().saturating_mul(c);
    if pos > stored.max(1 << 20) {
        return Err(conflict(format!(
            "sample_size {} gives {} tokens, a {pos}-element position embedding for {stored} stored weights: \
             sample_size does not fit this model",
            hf.sample_size,
            cfg.tokens()
        )));
    }
    Ok(cfg)
}

const EMBEDDERS: [&str; 5] = [
    "norm1.emb.timestep_embedder.linear_1.weight",
    "norm1.emb.timestep_embedder.linear_1.bias",
    "norm1.emb.timestep_embedder.linear_2.weight",
    "norm1.emb.timestep_embedder.linear_2.bias",
    "norm1.emb.class_embedder.embedding_table.weight",
];

fn is_embedder_copy(name: &str) -> bool {
    name.strip_prefix("transformer_blocks.")
        .and_then(|r| r.split_once('.'))
        .is_some_and(|(i, rest)| i != "0" && EMBEDDERS.contains(&rest))
}

/// diffusers gives every block its own embedder copy; the official architecture (and so
/// icdit) has one. Refuse files whose copies differ instead of silently using block 0's.
fn check_embedder_copies(b: &StoreBuilder, cfg: &DitConfig, path: &Path) -> Result<()> {
    for suffix in EMBEDDERS {
        let first = format!("transformer_blocks.0.{suffix}");
        let Some(reference) = b.raw(&first) else { continue };
        for i in 1..cfg.depth {
            let name = format!("transformer_blocks.{i}.{suffix}");
            match b.raw(&name) {
                None => return Err(Error::MissingTensors { path: path.to_path_buf(), names: vec![name] }),
                Some(bytes) if bytes != reference => {
                    return Err(Error::Config {
                        origin: path.display().to_string(),
                        reason: format!(
                            "`{name}` differs from block 0's copy; the DiT architecture has one \
                             timestep/label embedder, so per-block embedders cannot be represented"
                        ),
                    })
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

fn register(b: &mut StoreBuilder, cfg: &DitConfig) -> Result<DitTensors> {
    let c = cfg.hidden_size;
    let p = cfg.patch_size;
    let fin = p * p * cfg.out_channels();
    let [_, proj, fc1, fc2, ada] = block_shapes(cfg);
    let mut blocks = Vec::with_capacity(cfg.depth);
    for i in 0..cfg.depth {
        let pre = format!("transformer_blocks.{i}.");
        let parts = |kind: &str, shape: Vec<usize>| -> Vec<(String, Vec<usize>)> {
            ["to_q", "to_k", "to_v"].iter().map(|q| (format!("{pre}attn1.{q}.{kind}"), shape.clone())).collect()
        };
        let qkv_w = b.concat(&parts("weight", vec![c, c]))?;
        let qkv_b = b.concat(&parts("bias", vec![c]))?;
        let mut t = |suffix: &str, shape: &[usize]| b.tensor(&format!("{pre}{suffix}"), shape);
        blocks.push(BlockTensors {
            qkv_w,
            qkv_b,
            proj_w: t("attn1.to_out.0.weight", &[proj.0, proj.1])?,
            proj_b: t("attn1.to_out.0.bias", &[proj.0])?,
            fc1_w: t("ff.net.0.proj.weight", &[fc1.0, fc1.1])?,
            fc1_b: t("ff.net.0.proj.bias", &[fc1.0])?,
            fc2_w: t("ff.net.2.weight", &[fc2.0, fc2.1])?,
            fc2_b: t("ff.net.2.bias", &[fc2.0])?,
            ada_w: t("norm1.linear.weight", &[ada.0, ada.1])?,
            ada_b: t("norm1.linear.bias", &[ada.0])?,
        });
    }
    let emb = |s: &str| format!("transformer_blocks.0.norm1.emb.{s}");
    Ok(DitTensors {
        pos_embed: generated_pos_embed(b, cfg),
        patch_w: b.tensor("pos_embed.proj.weight", &[c, cfg.in_channels, p, p])?,
        patch_b: b.tensor("pos_embed.proj.bias", &[c])?,
        t_mlp0_w: b.tensor(&emb("timestep_embedder.linear_1.weight"), &[c, crate::config::FREQ_DIM])?,
        t_mlp0_b: b.tensor(&emb("timestep_embedder.linear_1.bias"), &[c])?,
        t_mlp2_w: b.tensor(&emb("timestep_embedder.linear_2.weight"), &[c, c])?,
        t_mlp2_b: b.tensor(&emb("timestep_embedder.linear_2.bias"), &[c])?,
        label_table: b.tensor(&emb("class_embedder.embedding_table.weight"), &[cfg.label_rows(), c])?,
        blocks,
        final_ada_w: b.tensor("proj_out_1.weight", &[2 * c, c])?,
        final_ada_b: b.tensor("proj_out_1.bias", &[2 * c])?,
        final_w: b.tensor("proj_out_2.weight", &[fin, c])?,
        final_b: b.tensor("proj_out_2.bias", &[fin])?,
    })
}
