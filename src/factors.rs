//! Rank-r factors of every block's linear layers for increment-calibrated caching
//! (reference doc E.4, E.8): W ≈ up·down with `up` (out, r) and `down` (r, in). q, k and v
//! are factorised separately; ranks may differ per layer and are read from the shapes.
//!
//! File format (safetensors): `blocks.{i}.attn.{q,k,v,proj}.{up,down}` and
//! `blocks.{i}.mlp.{fc1,fc2}.{up,down}`, f32/f16/bf16, with metadata `icdit_factors`: a
//! JSON object recording the method, ranks, calibration settings and the fingerprint of
//! the model the factors were made for.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tensorfile::TensorFile;
use crate::weights::{DitModel, StoreBuilder, TRef, WeightStore};

/// The six factorised layer types of a block, in file order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerType {
    Q,
    K,
    V,
    Proj,
    Fc1,
    Fc2,
}

impl LayerType {
    pub const ALL: [LayerType; 6] =
        [LayerType::Q, LayerType::K, LayerType::V, LayerType::Proj, LayerType::Fc1, LayerType::Fc2];

    pub fn name(self) -> &'static str {
        match self {
            LayerType::Q => "q",
            LayerType::K => "k",
            LayerType::V => "v",
            LayerType::Proj => "proj",
            LayerType::Fc1 => "fc1",
            LayerType::Fc2 => "fc2",
        }
    }

    /// Tensor name prefix in a factor file.
    pub fn prefix(self, block: usize) -> String {
        match self {
            LayerType::Fc1 | LayerType::Fc2 => format!("blocks.{block}.mlp.{}", self.name()),
            _ => format!("blocks.{block}.attn.{}", self.name()),
        }
    }

    /// (out, in) of the layer's weight for a model of hidden size C and MLP width M.
    pub fn shape(self, c: usize, m: usize) -> (usize, usize) {
        match self {
            LayerType::Fc1 => (m, c),
            LayerType::Fc2 => (c, m),
            _ => (c, c),
        }
    }
}

/// One layer's factors as computed: (`up` (out, r), `down` (r, in), r).
pub type LayerData = (Vec<f32>, Vec<f32>, usize);

/// One layer's factors.
#[derive(Clone, Copy, Debug)]
pub struct LayerFactors {
    pub up: TRef,   // (out, r)
    pub down: TRef, // (r, in)
    pub rank: usize,
}

/// A block's factors; `qkv_down` stacks q, k and v's `down` (r_q + r_k + r_v, C) so the
/// three low-rank projections of the same input run as one GEMM.
#[derive(Clone, Debug)]
pub struct BlockFactors {
    pub layers: [LayerFactors; 6],
    pub qkv_down: TRef,
}

impl BlockFactors {
    pub fn get(&self, t: LayerType) -> &LayerFactors {
        &self.layers[t as usize]
    }
    pub fn qkv_rank(&self) -> usize {
        self.layers[0].rank + self.layers[1].rank + self.layers[2].rank
    }
}

/// What the metadata says about how the factors were made.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FactorInfo {
    /// "svd", "ca-svd", "cd-svd", "icc-import", …
    pub method: String,
    /// The uniform rank, when all layers share one.
    #[serde(default)]
    pub rank: Option<usize>,
    /// Fingerprint of the model (see [`fingerprint`]); absent for imported factors.
    #[serde(default)]
    pub model_fingerprint: Option<String>,
    /// Free-form calibration settings and report.
    #[serde(default)]
    pub calibration: serde_json::Value,
}

/// Metadata key of the factor description.
pub const META_KEY: &str = "icdit_factors";

/// Validated factors for one model.
pub struct Factors {
    pub info: FactorInfo,
    pub source: PathBuf,
    pub blocks: Vec<BlockFactors>,
    store: WeightStore,
}

impl std::fmt::Debug for Factors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Factors").field("info", &self.info).field("source", &self.source).finish()
    }
}

impl Factors {
    /// Seeded random factors of uniform `rank` (values uniform in ±0.01): for benchmarks,
    /// where only the shapes matter.
    pub fn random(model: &DitModel, rank: usize, seed: u32) -> Result<Factors> {
        let (c, m) = (model.config.hidden_size, model.config.mlp_hidden());
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let mut v = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (state >> 8) as f32 / (1u32 << 24) as f32 * 0.02 - 0.01
                })
                .collect()
        };
        let layers = (0..model.config.depth)
            .map(|_| {
                LayerType::ALL.map(|t| {
                    let (o, i) = t.shape(c, m);
                    let r = rank.min(o).min(i);
                    (v(o * r), v(r * i), r)
                })
            })
            .collect();
        Factors::from_parts(model, FactorInfo { method: "random".into(), ..Default::default() }, layers)
    }

    /// Loads a factor file and checks it against `model`: every tensor present with
    /// matching shapes, ranks within min(out, in), and the fingerprint (when recorded).
    pub fn load(path: &Path, model: &DitModel) -> Result<Factors> {
        let file = TensorFile::open(path)?;
        let info: FactorInfo = match file.metadata().get(META_KEY) {
            Some(s) => serde_json::from_str(s).map_err(|e| Error::Config {
                origin: format!("{} (metadata `{META_KEY}`)", path.display()),
                reason: e.to_string(),
            })?,
            None => FactorInfo { method: "unknown".into(), ..Default::default() },
        };
        if let Some(fp) = &info.model_fingerprint {
            let ours = fingerprint(model);
            if *fp != ours {
                return Err(Error::Config {
                    origin: path.display().to_string(),
                    reason: format!(
                        "these factors were made for another model (fingerprint {fp}), not for {} (fingerprint {ours})",
                        model.source.display()
                    ),
                });
            }
        }
        let mut b = StoreBuilder::new(vec![file]);
        let blocks = register(&mut b, model, path)?;
        let (store, _) = b.finish(|_| false)?;
        Ok(Factors { info, source: path.to_path_buf(), blocks, store })
    }

    /// Factors held in memory: `layers[block][type] = (up (out·r), down (r·in), r)`.
    pub fn from_parts(model: &DitModel, info: FactorInfo, layers: Vec<[LayerData; 6]>) -> Result<Factors> {
        let cfg = &model.config;
        if layers.len() != cfg.depth {
            return Err(Error::invalid("factors", format!("{} blocks for a {}-block model", layers.len(), cfg.depth)));
        }
        let (c, m) = (cfg.hidden_size, cfg.mlp_hidden());
        let mut b = StoreBuilder::new(Vec::new());
        let mut blocks = Vec::with_capacity(cfg.depth);
        for (i, block) in layers.into_iter().enumerate() {
            let mut refs = Vec::with_capacity(6);
            let mut qkv_down = Vec::new();
            for (t, (up, down, r)) in LayerType::ALL.into_iter().zip(block) {
                let (o, inp) = t.shape(c, m);
                if up.len() != o * r || down.len() != r * inp || r > o.min(inp) {
                    return Err(Error::invalid(
                        "factors",
                        format!("{}: rank {r} does not fit ({o}, {inp})", t.prefix(i)),
                    ));
                }
                if matches!(t, LayerType::Q | LayerType::K | LayerType::V) {
                    qkv_down.extend_from_slice(&down);
                }
                let (ul, dl) = (up.len(), down.len());
                let up = b.generated(ul, move |out| out.copy_from_slice(&up));
                let down = b.generated(dl, move |out| out.copy_from_slice(&down));
                refs.push(LayerFactors { up, down, rank: r });
            }
            let ql = qkv_down.len();
            let qkv_down = b.generated(ql, move |out| out.copy_from_slice(&qkv_down));
            blocks.push(BlockFactors { layers: refs.try_into().expect("six layer types"), qkv_down });
        }
        let (store, _) = b.finish(|_| false)?;
        Ok(Factors { info, source: PathBuf::from("(in memory)"), blocks, store })
    }

    /// The same factors described by `info` (e.g. with the model fingerprint filled in).
    pub fn with_info(self, info: FactorInfo) -> Factors {
        Factors { info, ..self }
    }

    #[inline]
    pub fn w(&self, r: TRef) -> &[f32] {
        self.store.get(r)
    }

    /// Largest r_q + r_k + r_v and largest single rank over all blocks (for planning).
    pub fn max_ranks(&self) -> (usize, usize) {
        let qkv = self.blocks.iter().map(BlockFactors::qkv_rank).max().unwrap_or(0);
        let one = self.blocks.iter().flat_map(|b| b.layers.iter().map(|l| l.rank)).max().unwrap_or(0);
        (qkv, one)
    }

    /// The first factor tensor of `block` holding NaN or Inf, described with the element.
    pub fn non_finite_tensor(&self, block: usize) -> Option<String> {
        let b = self.blocks.get(block)?;
        LayerType::ALL.iter().zip(&b.layers).find_map(|(t, l)| {
            [("up", l.up), ("down", l.down)].into_iter().find_map(|(which, r)| {
                let v = self.w(r);
                v.iter().position(|x| !x.is_finite()).map(|i| {
                    format!("factor `{}.{which}` element {i} is {} ({})", t.prefix(block), v[i], self.source.display())
                })
            })
        })
    }

    /// Ranks per layer type, block by block.
    pub fn ranks(&self) -> Vec<[usize; 6]> {
        self.blocks.iter().map(|b| b.layers.map(|l| l.rank)).collect()
    }

    /// Writes the factors as a factor file (f32), with `info` as metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut names = Vec::new();
        let mut shapes = Vec::new();
        let mut data: Vec<&[f32]> = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            for (t, l) in LayerType::ALL.iter().zip(&b.layers) {
                let up = self.w(l.up);
                let down = self.w(l.down);
                let (o, inp) = (up.len() / l.rank.max(1), down.len() / l.rank.max(1));
                let (o, inp) = if l.rank == 0 { (0, 0) } else { (o, inp) };
                names.push(format!("{}.up", t.prefix(i)));
                shapes.push(vec![o, l.rank]);
                data.push(up);
                names.push(format!("{}.down", t.prefix(i)));
                shapes.push(vec![l.rank, inp]);
                data.push(down);
            }
        }
        let tensors: Vec<(&str, &[usize], &[f32])> =
            names.iter().zip(&shapes).zip(&data).map(|((n, s), d)| (n.as_str(), s.as_slice(), *d)).collect();
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert(META_KEY.to_string(), serde_json::to_string(&self.info).expect("info serialises"));
        crate::tensorfile::write_safetensors(path, &tensors, &[], Some(meta))
    }
}

fn register(b: &mut StoreBuilder, model: &DitModel, path: &Path) -> Result<Vec<BlockFactors>> {
    let cfg = &model.config;
    let (c, m) = (cfg.hidden_size, cfg.mlp_hidden());
    let mut blocks = Vec::with_capacity(cfg.depth);
    for i in 0..cfg.depth {
        let mut layers = Vec::with_capacity(6);
        let mut qkv_parts = Vec::new();
        for t in LayerType::ALL {
            let (o, inp) = t.shape(c, m);
            let (up_name, down_name) = (format!("{}.up", t.prefix(i)), format!("{}.down", t.prefix(i)));
            let rank = match (b.shape(&up_name), b.shape(&down_name)) {
                (Some(&[uo, ur]), Some(&[dr, di])) if uo == o && di == inp && ur == dr => ur,
                (Some(us), Some(ds)) => {
                    return Err(Error::Config {
                        origin: path.display().to_string(),
                        reason: format!(
                            "`{up_name}` {us:?} and `{down_name}` {ds:?} do not factor a ({o}, {inp}) weight \
                             (expected up ({o}, r) and down (r, {inp}))"
                        ),
                    })
                }
                // One of the pair missing: take the rank from the other, so the error lists
                // the missing tensor rather than a shape mismatch.
                (Some(&[uo, ur]), None) if uo == o => ur,
                (None, Some(&[dr, di])) if di == inp => dr,
                _ => 0, // missing: recorded by `tensor` below
            };
            if rank > o.min(inp) {
                return Err(Error::Config {
                    origin: path.display().to_string(),
                    reason: format!("`{up_name}` has rank {rank}, more than min({o}, {inp})"),
                });
            }
            let up = b.tensor(&up_name, &[o, rank])?;
            let down = b.tensor(&down_name, &[rank, inp])?;
            if matches!(t, LayerType::Q | LayerType::K | LayerType::V) {
                qkv_parts.push((down_name, vec![rank, inp]));
            }
            layers.push(LayerFactors { up, down, rank });
        }
        let qkv_down = b.concat(&qkv_parts)?;
        blocks.push(BlockFactors { layers: layers.try_into().expect("six layer types"), qkv_down });
    }
    Ok(blocks)
}

/// A fingerprint of a model's weights that does not depend on the file layout or dtype:
/// FNV-1a over the config and, for every tensor in a fixed order, its length and 64
/// evenly spaced values. Cheap (no full read of a 2.7 GB model) and enough to tell models apart.
pub fn fingerprint(model: &DitModel) -> String {
    let t = &model.tensors;
    let mut refs =
        vec![t.pos_embed, t.patch_w, t.patch_b, t.t_mlp0_w, t.t_mlp0_b, t.t_mlp2_w, t.t_mlp2_b, t.label_table];
    for b in &t.blocks {
        refs.extend([b.qkv_w, b.qkv_b, b.proj_w, b.proj_b, b.fc1_w, b.fc1_b, b.fc2_w, b.fc2_b, b.ada_w, b.ada_b]);
    }
    refs.extend([t.final_ada_w, t.final_ada_b, t.final_w, t.final_b]);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &x in bytes {
            h ^= x as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(serde_json::to_string(&model.config).expect("config serialises").as_bytes());
    for r in refs {
        let v = model.w(r);
        eat(&(v.len() as u64).to_le_bytes());
        let n = v.len().min(64);
        for k in 0..n {
            eat(&v[k * v.len() / n].to_le_bytes());
        }
    }
    format!("fnv1a64:{h:016x}")
}
