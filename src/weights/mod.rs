//! DiT weights: layout detection, config inference, validation of every tensor name and
//! shape, and the handles the forward pass reads through.

mod diffusers;
mod official;
mod store;
mod synth;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub(crate) use diffusers::{read_config, weight_files, DiffusersConfig};
pub use store::{StoreBuilder, TRef, WeightStore};
pub(crate) use synth::fill_uniform;
pub use synth::write_random_official;

use crate::config::{DitConfig, Numerics, SampleSpace};
use crate::error::{Error, Result};
use crate::tensorfile::TensorFile;

/// The two published checkpoint layouts (reference doc part C).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// The official state dict (`pos_embed`, `x_embedder.*`, `blocks.{i}.*`, `final_layer.*`).
    Official,
    /// diffusers' `DiTTransformer2DModel` folder (`transformer/config.json` + safetensors).
    Diffusers,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Official => "official",
            Layout::Diffusers => "diffusers",
        }
    }
}

/// Settings that loading cannot infer.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Attention heads, when neither the file nor the family table says.
    pub num_heads: Option<usize>,
    /// Arithmetic to follow; official unless the caller asks otherwise.
    pub numerics: Numerics,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { num_heads: None, numerics: Numerics::Official }
    }
}

/// One DiT block's tensors, PyTorch layout (weights are (out, in), row-major).
#[derive(Clone, Debug)]
pub struct BlockTensors {
    pub qkv_w: TRef,  // (3C, C): rows [q | k | v], each head-contiguous
    pub qkv_b: TRef,  // (3C)
    pub proj_w: TRef, // (C, C)
    pub proj_b: TRef, // (C)
    pub fc1_w: TRef,  // (M, C), M = mlp hidden
    pub fc1_b: TRef,  // (M)
    pub fc2_w: TRef,  // (C, M)
    pub fc2_b: TRef,  // (C)
    pub ada_w: TRef,  // (6C, C): shift/scale/gate MSA, shift/scale/gate MLP
    pub ada_b: TRef,  // (6C)
}

/// Every tensor of a DiT, as the official state dict names them.
#[derive(Clone, Debug)]
pub struct DitTensors {
    pub pos_embed: TRef,   // (N, C)
    pub patch_w: TRef,     // (C, Cin·p·p), the conv kernel flattened (c, kh, kw)
    pub patch_b: TRef,     // (C)
    pub t_mlp0_w: TRef,    // (C, 256)
    pub t_mlp0_b: TRef,    // (C)
    pub t_mlp2_w: TRef,    // (C, C)
    pub t_mlp2_b: TRef,    // (C)
    pub label_table: TRef, // (label_rows, C)
    pub blocks: Vec<BlockTensors>,
    pub final_ada_w: TRef, // (2C, C): shift, scale
    pub final_ada_b: TRef, // (2C)
    pub final_w: TRef,     // (p²·Cout, C), output index (a·p + b)·Cout + c
    pub final_b: TRef,     // (p²·Cout)
}

/// A loaded, validated DiT ready for any backend.
pub struct DitModel {
    pub config: DitConfig,
    pub layout: Layout,
    pub numerics: Numerics,
    /// LayerNorm eps before the MLP: 1e-6 officially, the config's norm_eps for diffusers numerics.
    pub mlp_norm_eps: f32,
    pub space: SampleSpace,
    pub class_names: Option<Vec<String>>,
    /// The file or folder the user named.
    pub source: PathBuf,
    /// Count of stored tensors per dtype name.
    pub dtypes: HashMap<&'static str, usize>,
    pub tensors: DitTensors,
    pub store: WeightStore,
}

impl std::fmt::Debug for DitModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DitModel")
            .field("config", &self.config)
            .field("layout", &self.layout)
            .field("numerics", &self.numerics)
            .field("source", &self.source)
            .finish()
    }
}

impl DitModel {
    /// Loads a checkpoint in either layout: an official safetensors file, a diffusers
    /// folder (the repository root or its `transformer/`), or a diffusers weights file
    /// beside its `config.json`.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<DitModel> {
        if path.is_dir() {
            return diffusers::load_dir(path, opts);
        }
        let file = TensorFile::open(path)?;
        if file.get("x_embedder.proj.weight").is_some() {
            official::load(file, opts)
        } else if file.get("pos_embed.proj.weight").is_some() {
            let dir = path.parent().unwrap_or(Path::new("."));
            diffusers::load_files(path, dir, vec![file], opts)
        } else {
            Err(Error::Layout {
                path: path.to_path_buf(),
                reason: "neither `x_embedder.proj.weight` (official DiT) nor `pos_embed.proj.weight` \
                         (diffusers DiTTransformer2DModel) is present"
                    .into(),
            })
        }
    }

    /// Shorthand for `store.get`.
    #[inline]
    pub fn w(&self, r: TRef) -> &[f32] {
        self.store.get(r)
    }

    /// Bytes of the mapped files (0 for a model generated in memory).
    pub fn file_bytes(&self) -> usize {
        self.store.files().iter().map(TensorFile::len_bytes).sum()
    }

    /// Every tensor with its official state-dict name: block `i`'s when `block` is
    /// `Some(i)`, the embeddings' and the final layer's when it is `None`.
    pub fn named_tensors(&self, block: Option<usize>) -> Vec<(String, TRef)> {
        let t = &self.tensors;
        match block {
            Some(i) => {
                let Some(b) = t.blocks.get(i) else { return Vec::new() };
                [
                    ("attn.qkv.weight", b.qkv_w),
                    ("attn.qkv.bias", b.qkv_b),
                    ("attn.proj.weight", b.proj_w),
                    ("attn.proj.bias", b.proj_b),
                    ("mlp.fc1.weight", b.fc1_w),
                    ("mlp.fc1.bias", b.fc1_b),
                    ("mlp.fc2.weight", b.fc2_w),
                    ("mlp.fc2.bias", b.fc2_b),
                    ("adaLN_modulation.1.weight", b.ada_w),
                    ("adaLN_modulation.1.bias", b.ada_b),
                ]
                .into_iter()
                .map(|(n, r)| (format!("blocks.{i}.{n}"), r))
                .collect()
            }
            None => [
                ("pos_embed", t.pos_embed),
                ("x_embedder.proj.weight", t.patch_w),
                ("x_embedder.proj.bias", t.patch_b),
                ("t_embedder.mlp.0.weight", t.t_mlp0_w),
                ("t_embedder.mlp.0.bias", t.t_mlp0_b),
                ("t_embedder.mlp.2.weight", t.t_mlp2_w),
                ("t_embedder.mlp.2.bias", t.t_mlp2_b),
                ("y_embedder.embedding_table.weight", t.label_table),
                ("final_layer.adaLN_modulation.1.weight", t.final_ada_w),
                ("final_layer.adaLN_modulation.1.bias", t.final_ada_b),
                ("final_layer.linear.weight", t.final_w),
                ("final_layer.linear.bias", t.final_b),
            ]
            .into_iter()
            .map(|(n, r)| (n.to_string(), r))
            .collect(),
        }
    }

    /// The first tensor of `block` (or of the embeddings and final layer, for `None`) that
    /// holds NaN or Inf, described with the element and its value.
    pub fn non_finite_tensor(&self, block: Option<usize>) -> Option<String> {
        self.named_tensors(block).into_iter().find_map(|(name, r)| {
            let v = self.w(r);
            v.iter().position(|x| !x.is_finite()).map(|i| format!("tensor `{name}` element {i} is {}", v[i]))
        })
    }

    /// The first tensor of the whole model that holds NaN or Inf (reads every weight once).
    pub fn find_non_finite(&self) -> Option<String> {
        std::iter::once(None)
            .chain((0..self.config.depth).map(Some))
            .find_map(|b| self.non_finite_tensor(b))
            .map(|s| format!("{}: {s}", self.source.display()))
    }
}

/// Metadata keys icdit writes and reads in official-layout safetensors files.
pub mod meta {
    /// JSON object with the official `DiT(...)` constructor arguments.
    pub const DIT_CONFIG: &str = "dit_config";
    /// `"pixel"` for models that sample images directly, `"latent"` (default) for SD-VAE latents.
    pub const SPACE: &str = "icdit_space";
    /// JSON list of class names, index = class label.
    pub const CLASS_NAMES: &str = "icdit_class_names";
}

/// Reads the optional sample space and class names from file metadata.
fn extras(file: &TensorFile, num_classes: usize) -> Result<(SampleSpace, Option<Vec<String>>)> {
    let origin = || format!("{} (metadata)", file.path().display());
    let space = match file.metadata().get(meta::SPACE).map(String::as_str) {
        None | Some("latent") => SampleSpace::Latent,
        Some("pixel") => SampleSpace::Pixel,
        Some(other) => {
            return Err(Error::Config {
                origin: origin(),
                reason: format!("{} is `{other}`, expected `latent` or `pixel`", meta::SPACE),
            })
        }
    };
    let names = match file.metadata().get(meta::CLASS_NAMES) {
        None => None,
        Some(s) => {
            let names: Vec<String> = serde_json::from_str(s).map_err(|e| Error::Config {
                origin: origin(),
                reason: format!("{} is not a JSON list of strings: {e}", meta::CLASS_NAMES),
            })?;
            if names.len() != num_classes {
                return Err(Error::Config {
                    origin: origin(),
                    reason: format!("{} lists {} names for {num_classes} classes", meta::CLASS_NAMES, names.len()),
                });
            }
            Some(names)
        }
    };
    Ok((space, names))
}

/// Number of distinct `{prefix}{i}.` indices, requiring them to be exactly 0..depth.
fn count_blocks<'a>(names: impl Iterator<Item = &'a str>, prefix: &str, path: &Path) -> Result<usize> {
    let mut seen = std::collections::BTreeSet::new();
    for n in names {
        if let Some(rest) = n.strip_prefix(prefix) {
            if let Some((i, _)) = rest.split_once('.') {
                if let Ok(i) = i.parse::<usize>() {
                    seen.insert(i);
                }
            }
        }
    }
    let depth = seen.len();
    if depth == 0 {
        return Err(Error::Layout { path: path.to_path_buf(), reason: format!("no `{prefix}{{i}}.*` tensors") });
    }
    if seen.iter().next_back() != Some(&(depth - 1)) {
        // Only the first gaps are listed: a name like `blocks.99999999999.x` must not make
        // the list (or the time to build it) unbounded.
        let missing: Vec<String> = (0..*seen.iter().next_back().unwrap_or(&0))
            .filter(|i| !seen.contains(i))
            .take(64)
            .map(|i| format!("{prefix}{i}.*"))
            .collect();
        return Err(Error::MissingTensors { path: path.to_path_buf(), names: missing });
    }
    Ok(depth)
}

/// Shape of a tensor that must exist for config inference, or a missing-tensor error.
fn need_shape<'a>(b: &'a StoreBuilder, name: &str) -> Result<&'a [usize]> {
    b.shape(name).ok_or_else(|| Error::MissingTensors { path: b.path_of(name), names: vec![name.to_string()] })
}

/// The sin-cos position embedding as an owned tensor (for layouts that do not store it).
fn generated_pos_embed(b: &mut StoreBuilder, cfg: &DitConfig) -> TRef {
    let (c, g) = (cfg.hidden_size, cfg.grid());
    b.generated(g * g * c, move |out| crate::embed::pos_embed_2d(c, g, out))
}

/// (out, in) of a block's qkv, proj, fc1, fc2 and adaLN weights.
fn block_shapes(cfg: &DitConfig) -> [(usize, usize); 5] {
    let (c, m) = (cfg.hidden_size, cfg.mlp_hidden());
    [(3 * c, c), (c, c), (m, c), (c, m), (6 * c, c)]
}
