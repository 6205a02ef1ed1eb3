//! The official DiT state dict saved as safetensors (reference doc C.1), with the config
//! inferred from shapes (part B) and cross-checked against the `dit_config` metadata.

use super::*;

/// Config fields as the metadata may carry them; all optional so partial metadata works.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MetaConfig {
    input_size: Option<usize>,
    patch_size: Option<usize>,
    in_channels: Option<usize>,
    hidden_size: Option<usize>,
    depth: Option<usize>,
    num_heads: Option<usize>,
    mlp_ratio: Option<f64>,
    class_dropout_prob: Option<f64>,
    num_classes: Option<usize>,
    learn_sigma: Option<bool>,
}

pub(super) fn load(file: TensorFile, opts: &LoadOptions) -> Result<DitModel> {
    let path = file.path().to_path_buf();
    let origin = format!("{} (metadata `{}`)", path.display(), meta::DIT_CONFIG);
    let meta_cfg: MetaConfig = match file.metadata().get(meta::DIT_CONFIG) {
        Some(s) => serde_json::from_str(s).map_err(|e| Error::Config {
            origin: origin.clone(),
            reason: format!("not a valid DiT config object: {e}"),
        })?,
        None => MetaConfig::default(),
    };
    let mut b = StoreBuilder::new(vec![file]);
    let cfg = infer(&b, &meta_cfg, opts, &path, &origin)?;
    let (space, class_names) = extras(b.file(0), cfg.num_classes)?;
    let tensors = register(&mut b, &cfg)?;
    let (store, dtypes) = b.finish(|_| false)?;
    Ok(DitModel {
        mlp_norm_eps: match opts.numerics {
            Numerics::Official => 1e-6,
            Numerics::Diffusers => 1e-5,
        },
        config: cfg,
        layout: Layout::Official,
        numerics: opts.numerics,
        space,
        class_names,
        source: path,
        dtypes,
        tensors,
        store,
    })
}

/// Reference doc part B: every size from a shape, heads from metadata, flag or family.
fn infer(b: &StoreBuilder, m: &MetaConfig, opts: &LoadOptions, path: &Path, origin: &str) -> Result<DitConfig> {
    let layout_err = |reason: String| Error::Layout { path: path.to_path_buf(), reason };
    let xw = need_shape(b, "x_embedder.proj.weight")?;
    let [c, cin, p, p2] = *xw else {
        return Err(layout_err(format!("`x_embedder.proj.weight` has shape {xw:?}, expected (C, Cin, p, p)")));
    };
    if p != p2 || p == 0 || c == 0 {
        return Err(layout_err(format!("`x_embedder.proj.weight` has shape {xw:?}, expected a square patch")));
    }
    // Bound every size before any arithmetic on it (a tensor with a zero dimension holds
    // no data, so its other dimensions can be anything).
    if cin == 0 || p > 4096 || cin > 1 << 16 || c > 1 << 20 {
        return Err(layout_err(format!(
            "`x_embedder.proj.weight` has shape {xw:?}: expected (C, Cin, p, p) with 1 ≤ Cin ≤ 65536, p ≤ 4096, C ≤ 2^20"
        )));
    }
    let pe = need_shape(b, "pos_embed")?;
    let n = match *pe {
        [1, n, pc] if pc == c => n,
        _ => {
            return Err(Error::Shape {
                path: path.to_path_buf(),
                tensor: "pos_embed".into(),
                expected: vec![1, 0, c],
                found: pe.to_vec(),
            })
        }
    };
    let g = (n as f64).sqrt().round() as usize;
    if g.checked_mul(g) != Some(n) || n == 0 || g.saturating_mul(p) > 4096 {
        return Err(layout_err(format!("`pos_embed` has {n} tokens, not a square grid of at most 4096/p a side")));
    }
    let depth = count_blocks(b.names(), "blocks.", path)?;
    let mlp_hidden = need_shape(b, "blocks.0.mlp.fc1.weight")?.first().copied().unwrap_or(0);
    let fin = need_shape(b, "final_layer.linear.weight")?.first().copied().unwrap_or(0);
    if fin % (p * p) != 0 {
        return Err(layout_err(format!(
            "`final_layer.linear.weight` has {fin} rows, not a multiple of p² = {}",
            p * p
        )));
    }
    let cout = fin / (p * p);
    let learn_sigma = cout == 2 * cin;
    if !learn_sigma && cout != cin {
        return Err(layout_err(format!(
            "final layer gives {cout} channels per pixel; expected {cin} or {} for {cin} input channels",
            2 * cin
        )));
    }
    let label_rows = need_shape(b, "y_embedder.embedding_table.weight")?.first().copied().unwrap_or(0);
    let dropout = m.class_dropout_prob.unwrap_or(0.1);
    let num_classes = if dropout > 0.0 { label_rows.saturating_sub(1) } else { label_rows };
    let num_heads = resolve_heads(m.num_heads, opts.num_heads, c, depth, path, origin)?;
    let cfg = DitConfig {
        input_size: g * p,
        patch_size: p,
        in_channels: cin,
        hidden_size: c,
        depth,
        num_heads,
        mlp_ratio: mlp_hidden as f64 / c as f64,
        class_dropout_prob: dropout,
        num_classes,
        learn_sigma,
    };
    // The metadata must agree with the tensors wherever it speaks.
    let check = |name: &str, meta: Option<String>, found: String| -> Result<()> {
        match meta {
            Some(v) if v != found => Err(Error::Config {
                origin: origin.to_string(),
                reason: format!("{name} is {v} but the tensors say {found}"),
            }),
            _ => Ok(()),
        }
    };
    let s = |v: Option<usize>| v.map(|v| v.to_string());
    check("input_size", s(m.input_size), cfg.input_size.to_string())?;
    check("patch_size", s(m.patch_size), p.to_string())?;
    check("in_channels", s(m.in_channels), cin.to_string())?;
    check("hidden_size", s(m.hidden_size), c.to_string())?;
    check("depth", s(m.depth), depth.to_string())?;
    check("num_classes", s(m.num_classes), num_classes.to_string())?;
    check("learn_sigma", m.learn_sigma.map(|v| v.to_string()), learn_sigma.to_string())?;
    if let Some(r) = m.mlp_ratio {
        if (r * c as f64) as usize != mlp_hidden {
            check("mlp_ratio", Some(r.to_string()), cfg.mlp_ratio.to_string())?;
        }
    }
    cfg.validate(origin)?;
    Ok(cfg)
}

/// Heads from (in order) the file, the caller, the family table; they must agree.
pub(super) fn resolve_heads(
    from_file: Option<usize>,
    from_caller: Option<usize>,
    hidden: usize,
    depth: usize,
    path: &Path,
    origin: &str,
) -> Result<usize> {
    match (from_file, from_caller) {
        (Some(f), Some(c)) if f != c => Err(Error::Config {
            origin: origin.to_string(),
            reason: format!("num_heads is {f} but --num-heads says {c}"),
        }),
        (Some(h), _) | (None, Some(h)) => Ok(h),
        (None, None) => DitConfig::family_heads(hidden, depth).ok_or(Error::UnknownHeads {
            path: path.to_path_buf(),
            hidden_size: hidden,
            depth,
        }),
    }
}

fn register(b: &mut StoreBuilder, cfg: &DitConfig) -> Result<DitTensors> {
    let (c, n) = (cfg.hidden_size, cfg.tokens());
    let p = cfg.patch_size;
    let fin = p * p * cfg.out_channels();
    let [qkv, proj, fc1, fc2, ada] = block_shapes(cfg);
    let mut blocks = Vec::with_capacity(cfg.depth);
    for i in 0..cfg.depth {
        let mut t = |suffix: &str, shape: &[usize]| b.tensor(&format!("blocks.{i}.{suffix}"), shape);
        blocks.push(BlockTensors {
            qkv_w: t("attn.qkv.weight", &[qkv.0, qkv.1])?,
            qkv_b: t("attn.qkv.bias", &[qkv.0])?,
            proj_w: t("attn.proj.weight", &[proj.0, proj.1])?,
            proj_b: t("attn.proj.bias", &[proj.0])?,
            fc1_w: t("mlp.fc1.weight", &[fc1.0, fc1.1])?,
            fc1_b: t("mlp.fc1.bias", &[fc1.0])?,
            fc2_w: t("mlp.fc2.weight", &[fc2.0, fc2.1])?,
            fc2_b: t("mlp.fc2.bias", &[fc2.0])?,
            ada_w: t("adaLN_modulation.1.weight", &[ada.0, ada.1])?,
            ada_b: t("adaLN_modulation.1.bias", &[ada.0])?,
        });
    }
    Ok(DitTensors {
        pos_embed: b.tensor("pos_embed", &[1, n, c])?,
        patch_w: b.tensor("x_embedder.proj.weight", &[c, cfg.in_channels, p, p])?,
        patch_b: b.tensor("x_embedder.proj.bias", &[c])?,
        t_mlp0_w: b.tensor("t_embedder.mlp.0.weight", &[c, crate::config::FREQ_DIM])?,
        t_mlp0_b: b.tensor("t_embedder.mlp.0.bias", &[c])?,
        t_mlp2_w: b.tensor("t_embedder.mlp.2.weight", &[c, c])?,
        t_mlp2_b: b.tensor("t_embedder.mlp.2.bias", &[c])?,
        label_table: b.tensor("y_embedder.embedding_table.weight", &[cfg.label_rows(), c])?,
        blocks,
        final_ada_w: b.tensor("final_layer.adaLN_modulation.1.weight", &[2 * c, c])?,
        final_ada_b: b.tensor("final_layer.adaLN_modulation.1.bias", &[2 * c])?,
        final_w: b.tensor("final_layer.linear.weight", &[fin, c])?,
        final_b: b.tensor("final_layer.linear.bias", &[fin])?,
    })
}
