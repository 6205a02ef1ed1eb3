//! icc's rank-r factors for PixArt-α: for every cached linear of every block (reference doc,
//! "Increment-calibrated caching on PixArt"), `up` (out, r) and `down` (r, in), named after
//! the layer's weight with `.weight` replaced by `.up` / `.down`
//! (`transformer_blocks.0.attn1.to_out.0.up`). f32, f16 or bf16, one safetensors file.

use std::path::{Path, PathBuf};

use super::weights::{Layer, PixArtModel};
use crate::error::{Error, Result};
use crate::tensorfile::TensorFile;
use crate::weights::{StoreBuilder, TRef, WeightStore};

/// One layer's factors.
#[derive(Clone, Copy, Debug)]
pub struct LayerFactors {
    pub up: TRef,
    pub down: TRef,
    pub rank: usize,
}

/// The factors of every cached linear.
pub struct PixArtFactors {
    pub source: PathBuf,
    depth: usize,
    /// By [`Layer::index`]; `None` for the layers icc does not cache.
    layers: Vec<Option<LayerFactors>>,
    store: WeightStore,
}

impl std::fmt::Debug for PixArtFactors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PixArtFactors").field("source", &self.source).field("depth", &self.depth).finish()
    }
}

impl PixArtFactors {
    /// Loads and checks a factor file against a model: every cached linear's `.up` and
    /// `.down`, shapes (out, r) and (r, in) with one r per layer, 1 ≤ r ≤ min(out, in), and
    /// nothing else.
    pub fn load(path: &Path, model: &PixArtModel) -> Result<Self> {
        let cfg = &model.config;
        let mut b = StoreBuilder::new(vec![TensorFile::open(path)?]);
        let mut layers = vec![None; Layer::all(cfg.depth).count()];
        for i in 0..cfg.depth {
            for layer in Layer::cached(i) {
                let (out, inp) = layer.shape(cfg);
                let (up_name, down_name) = (format!("{}.up", layer.name()), format!("{}.down", layer.name()));
                let rank = match b.shape(&up_name) {
                    Some(&[o, r]) if o == out && r >= 1 && r <= out.min(inp) => r,
                    Some(found) => {
                        return Err(Error::invalid(
                            "factors",
                            format!(
                                "{}: `{up_name}` has shape {found:?}; expected [{out}, r] with 1 ≤ r ≤ {}",
                                path.display(),
                                out.min(inp)
                            ),
                        ))
                    }
                    None => 1,
                };
                let up = b.tensor(&up_name, &[out, rank])?;
                let down = b.tensor(&down_name, &[rank, inp])?;
                layers[layer.index(cfg.depth)] = Some(LayerFactors { up, down, rank });
            }
        }
        let (store, _) = b.finish(|_| false)?;
        Ok(PixArtFactors { source: path.to_path_buf(), depth: cfg.depth, layers, store })
    }

    /// Refuses factors made for a model of another depth.
    pub fn check(&self, model: &PixArtModel) -> Result<()> {
        if self.depth != model.config.depth {
            return Err(Error::invalid(
                "factors",
                format!(
                    "{}: {} blocks of factors for a {}-block model",
                    self.source.display(),
                    self.depth,
                    model.config.depth
                ),
            ));
        }
        Ok(())
    }

    /// A cached layer's factors (`None`: the layer is not one icc caches).
    pub fn get(&self, layer: Layer) -> Option<LayerFactors> {
        self.layers.get(layer.index(self.depth)).copied().flatten()
    }

    pub fn w(&self, r: TRef) -> &[f32] {
        self.store.get(r)
    }

    /// The largest rank of any layer.
    pub fn max_rank(&self) -> usize {
        self.layers.iter().flatten().map(|f| f.rank).max().unwrap_or(0)
    }
}

/// One factorised layer's report: its name, rank, the share of singular-value energy kept and
/// the relative reconstruction error ‖W − up·down‖ / ‖W‖.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SvdLayer {
    pub name: String,
    pub rank: usize,
    pub energy: f64,
    pub rel_error: f64,
}

/// Plain-SVD factors of every cached linear at rank min(`rank`, out, in) (icc's `svd`
/// method: W = U S Vᵀ, up = U_r·S_r, down = V_rᵀ), written to `path` under the layers' names.
pub fn calibrate_svd(model: &PixArtModel, rank: usize, path: &Path) -> Result<Vec<SvdLayer>> {
    if rank == 0 {
        return Err(Error::invalid("rank", "must be at least 1"));
    }
    let cfg = &model.config;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut report = Vec::new();
    for i in 0..cfg.depth {
        for layer in Layer::cached(i) {
            let (out, inp) = layer.shape(cfg);
            let r = rank.min(out).min(inp);
            let (w, _) = model.linear(layer);
            let (up, down, energy, rel_error, _) = crate::calibrate::factorize(w, out, inp, r, None)?;
            let name = layer.name();
            tensors.push((format!("{name}.up"), vec![out, r], up));
            tensors.push((format!("{name}.down"), vec![r, inp], down));
            report.push(SvdLayer { name, rank: r, energy, rel_error });
        }
    }
    let views: Vec<(&str, &[usize], &[f32])> =
        tensors.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())).collect();
    let meta = [("method".to_string(), "svd".to_string()), ("model".to_string(), model.source.display().to_string())];
    crate::tensorfile::write_safetensors(path, &views, &[], Some(meta.into_iter().collect()))?;
    Ok(report)
}
