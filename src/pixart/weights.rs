//! PixArt-α transformer weights from a diffusers pipeline folder (`transformer/`): f32, f16
//! or bf16, single file, fp16 variant or sharded, memory-mapped where f32 (converted once
//! otherwise). Every tensor's name and shape is checked against the config.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::config::{check_scheduler, PixArtConfig};
use crate::error::Result;
use crate::weights::{weight_files, StoreBuilder, TRef, WeightStore};

/// The linear layers of a PixArt-α transformer, addressed by block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layer {
    /// Self-attention projections (`attn1.to_q`, `to_k`, `to_v`, `to_out.0`).
    Q1(usize),
    K1(usize),
    V1(usize),
    Out1(usize),
    /// Cross-attention projections (`attn2.*`): q from the image tokens, k and v from the caption.
    Q2(usize),
    K2(usize),
    V2(usize),
    Out2(usize),
    /// Feed-forward: `ff.net.0.proj` (GELU-tanh after it) and `ff.net.2`.
    Ff1(usize),
    Ff2(usize),
    /// Caption projection: `caption_projection.linear_1` (GELU-tanh after it) and `linear_2`.
    Caption1,
    Caption2,
    /// Timestep MLP: `adaln_single.emb.timestep_embedder.linear_1` (SiLU after it), `linear_2`.
    Time1,
    Time2,
    /// adaLN-single: `adaln_single.linear` (input SiLU(emb)), 6C wide.
    AdaLn,
    /// The final projection to p²·out_channels.
    ProjOut,
}

impl Layer {
    /// The cached linears of block i (reference doc, "Increment-calibrated caching on PixArt").
    pub fn cached(i: usize) -> [Layer; 8] {
        [
            Layer::Q1(i),
            Layer::K1(i),
            Layer::V1(i),
            Layer::Out1(i),
            Layer::Q2(i),
            Layer::Out2(i),
            Layer::Ff1(i),
            Layer::Ff2(i),
        ]
    }

    /// The diffusers name of the layer's weight without `.weight`/`.bias`.
    pub fn name(self) -> String {
        let b = |i: usize, s: &str| format!("transformer_blocks.{i}.{s}");
        match self {
            Layer::Q1(i) => b(i, "attn1.to_q"),
            Layer::K1(i) => b(i, "attn1.to_k"),
            Layer::V1(i) => b(i, "attn1.to_v"),
            Layer::Out1(i) => b(i, "attn1.to_out.0"),
            Layer::Q2(i) => b(i, "attn2.to_q"),
            Layer::K2(i) => b(i, "attn2.to_k"),
            Layer::V2(i) => b(i, "attn2.to_v"),
            Layer::Out2(i) => b(i, "attn2.to_out.0"),
            Layer::Ff1(i) => b(i, "ff.net.0.proj"),
            Layer::Ff2(i) => b(i, "ff.net.2"),
            Layer::Caption1 => "caption_projection.linear_1".into(),
            Layer::Caption2 => "caption_projection.linear_2".into(),
            Layer::Time1 => "adaln_single.emb.timestep_embedder.linear_1".into(),
            Layer::Time2 => "adaln_single.emb.timestep_embedder.linear_2".into(),
            Layer::AdaLn => "adaln_single.linear".into(),
            Layer::ProjOut => "proj_out".into(),
        }
    }

    /// (out, in) features.
    pub fn shape(self, cfg: &PixArtConfig) -> (usize, usize) {
        let (c, m, p) = (cfg.hidden_size(), cfg.mlp_hidden(), cfg.patch_size);
        match self {
            Layer::Q1(_) | Layer::K1(_) | Layer::V1(_) | Layer::Out1(_) => (c, c),
            Layer::Q2(_) | Layer::K2(_) | Layer::V2(_) | Layer::Out2(_) => (c, c),
            Layer::Ff1(_) => (m, c),
            Layer::Ff2(_) => (c, m),
            Layer::Caption1 => (c, cfg.caption_channels),
            Layer::Caption2 => (c, c),
            Layer::Time1 => (c, crate::config::FREQ_DIM),
            Layer::Time2 => (c, c),
            Layer::AdaLn => (6 * c, c),
            Layer::ProjOut => (p * p * cfg.out_channels, c),
        }
    }

    /// A dense index: block i's ten layers at 10·i.., then the six others after all blocks
    /// (tables are indexed by it instead of hashed on the hot path).
    pub fn index(self, depth: usize) -> usize {
        match self {
            Layer::Q1(i) => 10 * i,
            Layer::K1(i) => 10 * i + 1,
            Layer::V1(i) => 10 * i + 2,
            Layer::Out1(i) => 10 * i + 3,
            Layer::Q2(i) => 10 * i + 4,
            Layer::K2(i) => 10 * i + 5,
            Layer::V2(i) => 10 * i + 6,
            Layer::Out2(i) => 10 * i + 7,
            Layer::Ff1(i) => 10 * i + 8,
            Layer::Ff2(i) => 10 * i + 9,
            Layer::Caption1 => 10 * depth,
            Layer::Caption2 => 10 * depth + 1,
            Layer::Time1 => 10 * depth + 2,
            Layer::Time2 => 10 * depth + 3,
            Layer::AdaLn => 10 * depth + 4,
            Layer::ProjOut => 10 * depth + 5,
        }
    }

    /// Every layer of a model of `depth` blocks, in [`index`](Layer::index) order.
    pub fn all(depth: usize) -> impl Iterator<Item = Layer> {
        let blocks = (0..depth).flat_map(|i| {
            [
                Layer::Q1(i),
                Layer::K1(i),
                Layer::V1(i),
                Layer::Out1(i),
                Layer::Q2(i),
                Layer::K2(i),
                Layer::V2(i),
                Layer::Out2(i),
                Layer::Ff1(i),
                Layer::Ff2(i),
            ]
        });
        blocks.chain([Layer::Caption1, Layer::Caption2, Layer::Time1, Layer::Time2, Layer::AdaLn, Layer::ProjOut])
    }
}

/// A linear layer's weight (out, in) and bias (out).
#[derive(Clone, Copy, Debug)]
pub struct LinearTensors {
    pub w: TRef,
    pub b: TRef,
}

/// Handles to every tensor of the transformer.
#[derive(Clone, Debug)]
pub struct PixArtTensors {
    /// Patch embedding as a linear layer (C, in·p·p), PyTorch's conv weight order.
    pub patch_w: TRef,
    pub patch_b: TRef,
    /// The computed 2-D sin-cos position table (N, C).
    pub pos_embed: TRef,
    /// Per block, `scale_shift_table` (6, C).
    pub block_tables: Vec<TRef>,
    /// The final layer's `scale_shift_table` (2, C).
    pub final_table: TRef,
    /// Every linear layer, by [`Layer::index`].
    pub linears: Vec<LinearTensors>,
    /// The micro-conditions' MLPs (`use_additional_conditions` only).
    pub size: Option<SizeEmbedders>,
}

/// `adaln_single.emb.resolution_embedder` and `aspect_ratio_embedder`: each
/// `linear_2(SiLU(linear_1(·)))`, 256 → hidden/3 → hidden/3.
#[derive(Clone, Copy, Debug)]
pub struct SizeEmbedders {
    /// (hidden/3, 256) and (hidden/3, hidden/3), with biases.
    pub resolution: [LinearTensors; 2],
    pub aspect_ratio: [LinearTensors; 2],
}

/// A loaded PixArt-α transformer: config, mapped weights and handles.
pub struct PixArtModel {
    pub config: PixArtConfig,
    /// The pipeline folder.
    pub source: PathBuf,
    /// Tensors per stored dtype ("f32", "f16", "bf16").
    pub dtypes: HashMap<&'static str, usize>,
    pub tensors: PixArtTensors,
    store: WeightStore,
}

impl std::fmt::Debug for PixArtModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PixArtModel").field("config", &self.config).field("source", &self.source).finish()
    }
}

impl PixArtModel {
    /// Loads the transformer of a pipeline folder at its trained size and checks its
    /// scheduler config.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_at(dir, None)
    }

    /// As [`load`](Self::load), run at a latent of (height, width) (`None`: the trained
    /// size): the computed position table is the one for that grid.
    pub fn load_at(dir: &Path, latent: Option<(usize, usize)>) -> Result<Self> {
        let mut config = PixArtConfig::load(dir)?;
        if let Some((h, w)) = latent {
            config = config.at_size(h, w)?;
        }
        check_scheduler(dir)?;
        let files = weight_files(&dir.join("transformer"))?;
        let mut b = StoreBuilder::new(files);
        let tensors = register(&mut b, &config)?;
        let (store, dtypes) = b.finish(|_| false)?;
        Ok(PixArtModel { config, source: dir.to_path_buf(), dtypes, tensors, store })
    }

    /// A tensor as f32.
    #[inline]
    pub fn w(&self, r: TRef) -> &[f32] {
        self.store.get(r)
    }

    /// (weight, bias) of a linear layer.
    pub fn linear(&self, layer: Layer) -> (&[f32], &[f32]) {
        let t = self.tensors.linears[layer.index(self.config.depth)];
        (self.w(t.w), self.w(t.b))
    }

    /// Bytes of the mapped weight files.
    pub fn file_bytes(&self) -> usize {
        self.store.files().iter().map(|f| f.len_bytes()).sum()
    }

    /// How many weight files are mapped (shards).
    pub fn store_files(&self) -> usize {
        self.store.files().len()
    }

    /// Bytes icdit holds itself (converted tensors, the position table).
    pub fn owned_bytes(&self) -> usize {
        self.store.owned_bytes()
    }

    /// The first tensor (by name) holding a NaN or an infinity.
    pub fn find_non_finite(&self) -> Option<String> {
        let mut named: Vec<(String, TRef)> = Layer::all(self.config.depth)
            .zip(&self.tensors.linears)
            .flat_map(|(l, t)| [(format!("{}.weight", l.name()), t.w), (format!("{}.bias", l.name()), t.b)])
            .collect();
        if let Some(size) = self.tensors.size {
            for (name, mlp) in [("resolution_embedder", size.resolution), ("aspect_ratio_embedder", size.aspect_ratio)]
            {
                for (i, t) in mlp.iter().enumerate() {
                    let n = format!("adaln_single.emb.{name}.linear_{}", i + 1);
                    named.extend([(format!("{n}.weight"), t.w), (format!("{n}.bias"), t.b)]);
                }
            }
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named.into_iter().find(|(_, r)| self.w(*r).iter().any(|v| !v.is_finite())).map(|(n, _)| n)
    }
}

fn register(b: &mut StoreBuilder, cfg: &PixArtConfig) -> Result<PixArtTensors> {
    let (c, p) = (cfg.hidden_size(), cfg.patch_size);
    let patch_w = b.tensor("pos_embed.proj.weight", &[c, cfg.in_channels, p, p])?;
    let patch_b = b.tensor("pos_embed.proj.bias", &[c])?;
    let block_tables = (0..cfg.depth)
        .map(|i| b.tensor(&format!("transformer_blocks.{i}.scale_shift_table"), &[6, c]))
        .collect::<Result<_>>()?;
    let final_table = b.tensor("scale_shift_table", &[2, c])?;
    let mut linears = Vec::new();
    for layer in Layer::all(cfg.depth) {
        let (out, inp) = layer.shape(cfg);
        let name = layer.name();
        let w = b.tensor(&format!("{name}.weight"), &[out, inp])?;
        let bias = b.tensor(&format!("{name}.bias"), &[out])?;
        linears.push(LinearTensors { w, b: bias });
    }
    let size = if cfg.use_additional_conditions {
        let (s, f) = (cfg.size_emb_dim(), crate::config::FREQ_DIM);
        let mut mlp = |name: &str| -> Result<[LinearTensors; 2]> {
            let lin = |b: &mut StoreBuilder, i: usize, inp: usize| -> Result<LinearTensors> {
                let n = format!("adaln_single.emb.{name}.linear_{i}");
                Ok(LinearTensors {
                    w: b.tensor(&format!("{n}.weight"), &[s, inp])?,
                    b: b.tensor(&format!("{n}.bias"), &[s])?,
                })
            };
            Ok([lin(b, 1, f)?, lin(b, 2, s)?])
        };
        Some(SizeEmbedders { resolution: mlp("resolution_embedder")?, aspect_ratio: mlp("aspect_ratio_embedder")? })
    } else {
        None
    };
    // The table for the grid the model runs at, from the trained base size.
    let (gh, gw, base, scale) = (cfg.grid_h(), cfg.grid_w(), cfg.base_size(), cfg.interpolation_scale);
    let pos_embed = b.generated(cfg.tokens() * c, move |out| pos_embed_2d(c, gh, gw, base, scale, out));
    Ok(PixArtTensors { patch_w, patch_b, pos_embed, block_tables, final_table, linears, size })
}

/// Fills `out` (N·C, N = gh·gw, row-major) with diffusers' `get_2d_sincos_pos_embed` for a
/// gh×gw grid of base size `base`: positions row i / (gh / base) / scale and column
/// j / (gw / base) / scale (in f32, as torch forms them), then
/// `[sin(col·ω), cos(col·ω), sin(row·ω), cos(row·ω)]`, each C/4 wide,
/// ω_k = 10000^(−k/(C/4)), in f64 and rounded to f32.
pub fn pos_embed_2d(c: usize, gh: usize, gw: usize, base: usize, scale: f64, out: &mut [f32]) {
    let q = c / 4;
    let omega: Vec<f64> = (0..q).map(|k| 1.0 / 10000f64.powf(k as f64 / q as f64)).collect();
    // torch divides the f32 arange by the Python float g / base, then by the scale.
    let pos = |i: usize, g: usize| (i as f32 / (g as f64 / base as f64) as f32 / scale as f32) as f64;
    for i in 0..gh {
        for j in 0..gw {
            let row = &mut out[(i * gw + j) * c..][..c];
            let (pj, pi) = (pos(j, gw), pos(i, gh));
            for k in 0..q {
                row[k] = (pj * omega[k]).sin() as f32;
                row[q + k] = (pj * omega[k]).cos() as f32;
                row[2 * q + k] = (pi * omega[k]).sin() as f32;
                row[3 * q + k] = (pi * omega[k]).cos() as f32;
            }
        }
    }
}
