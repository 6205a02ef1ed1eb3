//! The SD-VAE decoder DiT samples through (diffusers `AutoencoderKL`, reference doc F):
//! loading a diffusers folder (config.json + safetensors, either attention naming), the
//! decoder's graph written once (src/vae/graph.rs) and the two backends that run it, the CPU
//! decoder ([`VaeDecoder`]) and the device decoder ([`GpuVaeDecoder`]).

mod cpu;
mod gpu;
mod graph;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::tensorfile::TensorFile;
use crate::weights::{weight_files, StoreBuilder, TRef, WeightStore};

pub use cpu::VaeDecoder;
pub use gpu::GpuVaeDecoder;

/// The scaling factor DiT divides latents by when the config does not name one.
pub const DEFAULT_SCALING: f64 = 0.18215;
/// GroupNorm epsilon of every VAE norm.
pub const GN_EPS: f32 = 1e-6;

/// The decoder's architecture.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    /// Encoder order (the decoder walks it reversed), e.g. [128, 256, 512, 512].
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub latent_channels: usize,
    pub out_channels: usize,
    /// Latents are decoded as `latent / scaling_factor + shift_factor`.
    pub scaling_factor: f64,
    pub shift_factor: f64,
    pub post_quant_conv: bool,
    pub mid_attention: bool,
}

impl VaeConfig {
    /// The stable-diffusion VAE DiT uses (sd-vae-ft-ema / -mse).
    pub fn sd() -> Self {
        VaeConfig {
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            latent_channels: 4,
            out_channels: 3,
            scaling_factor: DEFAULT_SCALING,
            shift_factor: 0.0,
            post_quant_conv: true,
            mid_attention: true,
        }
    }

    /// Channels of the decoder's mid block (the last encoder block's width).
    pub fn mid_channels(&self) -> usize {
        self.block_out_channels.last().copied().unwrap_or(0)
    }

    /// Output side for a latent of side `latent`: each up block but the last doubles it.
    pub fn out_side(&self, latent: usize) -> usize {
        latent << self.block_out_channels.len().saturating_sub(1).min(16)
    }

    /// Elements of the largest activation a decode of a `latent`-side latent holds (over every
    /// stage, pixels × the wider of its channel counts), which sizes the decoders' reused
    /// activation buffers.
    pub fn largest_activation(&self, latent: usize) -> usize {
        self.largest_activation_hw((latent, latent))
    }

    /// [`largest_activation`](Self::largest_activation) of a latent of (height, width).
    pub fn largest_activation_hw(&self, latent: (usize, usize)) -> usize {
        let mut px = latent.0 * latent.1;
        let mut biggest = px * self.mid_channels();
        for i in 0..self.block_out_channels.len() {
            let (cin, cout) = self.up_channels(i);
            biggest = biggest.max(px * cin.max(cout));
            if i + 1 < self.block_out_channels.len() {
                px *= 4;
                biggest = biggest.max(px * cout);
            }
        }
        biggest.max(px * self.out_channels)
    }

    /// (input channels, output channels) of up block `i`.
    pub fn up_channels(&self, i: usize) -> (usize, usize) {
        let b = &self.block_out_channels;
        let rev = |j: usize| b[b.len() - 1 - j];
        (if i == 0 { rev(0) } else { rev(i - 1) }, rev(i))
    }

    fn check(&self, origin: &str) -> Result<()> {
        let bad = |reason: String| Err(Error::Config { origin: origin.to_string(), reason });
        if self.block_out_channels.is_empty() || self.block_out_channels.contains(&0) {
            return bad(format!("block_out_channels {:?} must be non-empty and positive", self.block_out_channels));
        }
        if self.layers_per_block == 0 || self.latent_channels == 0 || self.out_channels == 0 {
            return bad("layers_per_block, latent_channels and out_channels must be positive".into());
        }
        // Bounds that keep every size computed from the config far from overflow (the
        // SD-VAE: 4 blocks of at most 512 channels, 2 layers per block, 4 latent channels).
        if self.block_out_channels.len() > 8
            || self.block_out_channels.iter().any(|&c| c > 1 << 14)
            || self.layers_per_block > 64
            || self.latent_channels > 1 << 14
            || self.out_channels > 1 << 14
        {
            return bad(format!(
                "sizes are implausibly large: {} blocks (≤ 8) of widths {:?} (≤ 16384), layers_per_block {} (≤ 64), \
                 latent_channels {} and out_channels {} (≤ 16384)",
                self.block_out_channels.len(),
                self.block_out_channels,
                self.layers_per_block,
                self.latent_channels,
                self.out_channels
            ));
        }
        let g = self.norm_num_groups;
        if g > 1024 {
            return bad(format!("norm_num_groups {g} is above the supported 1024"));
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| g == 0 || c % g != 0) {
            return bad(format!("norm_num_groups {g} does not divide block width {c}"));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0 && self.shift_factor.is_finite()) {
            return bad(format!(
                "scaling_factor {} / shift_factor {} must be finite and the scale non-zero",
                self.scaling_factor, self.shift_factor
            ));
        }
        Ok(())
    }

    /// MACs of one decode of a `latent`-side latent (convolutions, 1×1 convs, attention
    /// linears and matmuls; norms and activations not counted), as reference doc G.3.
    pub fn macs(&self, latent: usize) -> u64 {
        let conv = |side: usize, cin: usize, cout: usize, k: usize| (side * side * cin * cout * k) as u64;
        let lc = self.latent_channels;
        let cm = self.mid_channels();
        let mut total = 0u64;
        if self.post_quant_conv {
            total += conv(latent, lc, lc, 1);
        }
        total += conv(latent, lc, cm, 9);
        let resnet = |side: usize, cin: usize, cout: usize| {
            conv(side, cin, cout, 9)
                + conv(side, cout, cout, 9)
                + if cin != cout { conv(side, cin, cout, 1) } else { 0 }
        };
        total += 2 * resnet(latent, cm, cm);
        if self.mid_attention {
            let hw = (latent * latent) as u64;
            total += 4 * hw * (cm * cm) as u64 + 2 * hw * hw * cm as u64;
        }
        let mut side = latent;
        for i in 0..self.block_out_channels.len() {
            let (cin, cout) = self.up_channels(i);
            total += resnet(side, cin, cout) + self.layers_per_block as u64 * resnet(side, cout, cout);
            if i + 1 < self.block_out_channels.len() {
                side *= 2;
                total += conv(side, cout, cout, 9);
            }
        }
        total + conv(side, self.block_out_channels.first().copied().unwrap_or(0), self.out_channels, 9)
    }
}

/// How the mid-block attention's tensors are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnNaming {
    /// diffusers ≥ 0.14: `to_q`, `to_k`, `to_v`, `to_out.0`.
    New,
    /// Older diffusers `AttentionBlock` (2022-era Hub VAE files): `query`, `key`, `value`, `proj_attn`.
    Old,
}

impl AttnNaming {
    fn names(self) -> [&'static str; 4] {
        match self {
            AttnNaming::New => ["to_q", "to_k", "to_v", "to_out.0"],
            AttnNaming::Old => ["query", "key", "value", "proj_attn"],
        }
    }
}

/// A layer's weight and bias (a norm's gamma and beta).
#[derive(Clone, Copy, Debug)]
pub(crate) struct WeightBias {
    pub weight: TRef,
    pub bias: TRef,
}

#[derive(Clone, Debug)]
pub(crate) struct Resnet {
    pub cin: usize,
    pub cout: usize,
    pub norm1: WeightBias,
    pub conv1: WeightBias,
    pub norm2: WeightBias,
    pub conv2: WeightBias,
    pub shortcut: Option<WeightBias>,
}

#[derive(Clone, Debug)]
pub(crate) struct Attention {
    pub norm: WeightBias,
    pub q: WeightBias,
    pub k: WeightBias,
    pub v: WeightBias,
    pub out: WeightBias,
}

#[derive(Clone, Debug)]
pub(crate) struct UpBlock {
    pub resnets: Vec<Resnet>,
    pub upsample: Option<WeightBias>,
}

#[derive(Clone, Debug)]
pub(crate) struct VaeTensors {
    pub post_quant: Option<WeightBias>,
    pub conv_in: WeightBias,
    pub mid: [Resnet; 2],
    pub attn: Option<Attention>,
    pub up: Vec<UpBlock>,
    pub norm_out: WeightBias,
    pub conv_out: WeightBias,
}

/// A loaded VAE decoder: config, mapped weights and their handles.
pub struct VaeModel {
    pub config: VaeConfig,
    /// The weights file (the first, for sharded ones).
    pub source: PathBuf,
    /// Where the config came from: a config.json path, or how it was inferred.
    pub config_origin: String,
    pub naming: Option<AttnNaming>,
    /// Parameters the decoder uses.
    pub params: usize,
    pub(crate) store: WeightStore,
    pub(crate) tensors: VaeTensors,
}

impl std::fmt::Debug for VaeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaeModel").field("config", &self.config).field("source", &self.source).finish()
    }
}

/// The config.json fields the decoder depends on, with diffusers' class defaults.
#[derive(serde::Deserialize)]
struct HfVaeConfig {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    block_out_channels: Option<Vec<usize>>,
    layers_per_block: Option<usize>,
    norm_num_groups: Option<usize>,
    latent_channels: Option<usize>,
    out_channels: Option<usize>,
    scaling_factor: Option<f64>,
    shift_factor: Option<f64>,
    use_post_quant_conv: Option<bool>,
    up_block_types: Option<Vec<String>>,
    act_fn: Option<String>,
    mid_block_add_attention: Option<bool>,
}

const MID_ATTN: &str = "decoder.mid_block.attentions.0.";

impl VaeModel {
    /// Loads a diffusers `AutoencoderKL`: a folder with config.json and the weights (single
    /// file, fp16 variant or sharded), a pipeline folder with a `vae/` subfolder (e.g.
    /// `facebook/DiT-XL-2-256`), or a weights file (config.json beside it is used when
    /// present; otherwise the config is inferred from the tensor shapes).
    pub fn load(path: &Path) -> Result<VaeModel> {
        let (dir, files) = if path.is_dir() {
            let dir = if path.join("vae").is_dir() && !path.join("config.json").is_file() {
                path.join("vae")
            } else {
                path.to_path_buf()
            };
            let files = weight_files(&dir)?;
            (dir, files)
        } else {
            let file = TensorFile::open(path)?;
            (path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf(), vec![file])
        };
        let source = files[0].path().to_path_buf();
        let b = StoreBuilder::new(files);
        if !b.names().any(|n| n.starts_with("decoder.")) {
            return Err(Error::Layout {
                path: source,
                reason: "no `decoder.*` tensors: not a diffusers AutoencoderKL (original LDM/CompVis \
                         VAE files must be converted to the diffusers layout first)"
                    .into(),
            });
        }
        let cfg_path = dir.join("config.json");
        let (config, origin) = if cfg_path.is_file() {
            (read_config(&cfg_path)?, cfg_path.display().to_string())
        } else {
            let origin = format!("{} (no config.json: config inferred from the tensor shapes)", source.display());
            (infer_config(&b, &source)?, origin)
        };
        config.check(&origin)?;
        let naming = attention_naming(&b, &source, config.mid_attention)?;
        let cm = config.mid_channels();
        let attn_conv_form = naming.is_some_and(|n| {
            b.shape(&format!("{MID_ATTN}{}.weight", n.names()[0])).is_some_and(|s| s == [cm, cm, 1, 1])
        });
        let mut b = b;
        let tensors =
            register(&mut |name: &str, shape: &[usize]| b.tensor(name, shape), &config, naming, attn_conv_form)?;
        let (store, _) = b.finish(|n| n.starts_with("encoder.") || n.starts_with("quant_conv."))?;
        let params = tensor_params(&tensors);
        Ok(VaeModel { config, source, config_origin: origin, naming, params, store, tensors })
    }

    #[inline]
    pub(crate) fn weight(&self, r: TRef) -> &[f32] {
        self.store.get(r)
    }
}

fn tensor_params(t: &VaeTensors) -> usize {
    let len = |x: &WeightBias| x.weight.len() + x.bias.len();
    let resnet =
        |r: &Resnet| len(&r.norm1) + len(&r.conv1) + len(&r.norm2) + len(&r.conv2) + r.shortcut.as_ref().map_or(0, len);
    let mut n = t.post_quant.as_ref().map_or(0, len) + len(&t.conv_in) + resnet(&t.mid[0]) + resnet(&t.mid[1]);
    if let Some(a) = &t.attn {
        n += len(&a.norm) + len(&a.q) + len(&a.k) + len(&a.v) + len(&a.out);
    }
    for u in &t.up {
        n += u.resnets.iter().map(resnet).sum::<usize>() + u.upsample.as_ref().map_or(0, len);
    }
    n + len(&t.norm_out) + len(&t.conv_out)
}

fn read_config(path: &Path) -> Result<VaeConfig> {
    let text = crate::tensorfile::read_json_text(path)?;
    let origin = path.display().to_string();
    let bad = |reason: String| Error::Config { origin: origin.clone(), reason };
    let hf: HfVaeConfig = serde_json::from_str(&text).map_err(|e| bad(format!("not a VAE config.json: {e}")))?;
    if let Some(c) = &hf.class_name {
        if c != "AutoencoderKL" {
            return Err(bad(format!("_class_name is {c:?}, expected \"AutoencoderKL\"")));
        }
    }
    if let Some(a) = &hf.act_fn {
        if a != "silu" {
            return Err(bad(format!("act_fn {a:?} is not supported (DiT's VAE uses \"silu\")")));
        }
    }
    if let Some(types) = &hf.up_block_types {
        if let Some(t) = types.iter().find(|t| t.as_str() != "UpDecoderBlock2D") {
            return Err(bad(format!("up block type {t:?} is not supported (expected UpDecoderBlock2D)")));
        }
    }
    // diffusers' AutoencoderKL defaults where a key is absent.
    let cfg = VaeConfig {
        block_out_channels: hf.block_out_channels.unwrap_or_else(|| vec![64]),
        layers_per_block: hf.layers_per_block.unwrap_or(1),
        norm_num_groups: hf.norm_num_groups.unwrap_or(32),
        latent_channels: hf.latent_channels.unwrap_or(4),
        out_channels: hf.out_channels.unwrap_or(3),
        scaling_factor: hf.scaling_factor.unwrap_or(DEFAULT_SCALING),
        shift_factor: hf.shift_factor.unwrap_or(0.0),
        post_quant_conv: hf.use_post_quant_conv.unwrap_or(true),
        mid_attention: hf.mid_block_add_attention.unwrap_or(true),
    };
    if let Some(types) = &hf.up_block_types {
        if types.len() != cfg.block_out_channels.len() {
            return Err(bad(format!(
                "{} up_block_types for {} block_out_channels",
                types.len(),
                cfg.block_out_channels.len()
            )));
        }
    }
    Ok(cfg)
}

/// A config from the shapes alone: block widths from each up block's last conv, layers per
/// block from the resnet count, 32 groups and the 0.18215 scale (the SD-VAE values).
fn infer_config(b: &StoreBuilder, source: &Path) -> Result<VaeConfig> {
    let bad = |reason: String| Error::Config {
        origin: format!("{} (no config.json)", source.display()),
        reason: format!(
            "{reason}; the tensor shapes do not identify a decoder config — put its config.json beside the weights"
        ),
    };
    let mut widths = Vec::new();
    let mut resnets = None;
    for i in 0.. {
        let Some(shape) = b.shape(&format!("decoder.up_blocks.{i}.resnets.0.conv2.weight")) else { break };
        widths.push(shape.first().copied().unwrap_or(0));
        let n = (0..).take_while(|j| b.has(&format!("decoder.up_blocks.{i}.resnets.{j}.conv2.weight"))).count();
        match resnets {
            None => resnets = Some(n),
            Some(m) if m != n => return Err(bad(format!("up block {i} has {n} resnets, block 0 has {m}"))),
            _ => {}
        }
    }
    let resnets = resnets.ok_or_else(|| bad("no `decoder.up_blocks.0.resnets.0.conv2.weight`".into()))?;
    if resnets < 2 {
        return Err(bad(format!("up blocks have {resnets} resnet(s), expected layers_per_block + 1 ≥ 2")));
    }
    let latent = b
        .shape("decoder.conv_in.weight")
        .filter(|s| s.len() == 4)
        .map(|s| s[1])
        .ok_or_else(|| bad("no 4-D `decoder.conv_in.weight`".into()))?;
    let out = b
        .shape("decoder.conv_out.weight")
        .filter(|s| s.len() == 4)
        .map(|s| s[0])
        .ok_or_else(|| bad("no 4-D `decoder.conv_out.weight`".into()))?;
    widths.reverse();
    let cfg = VaeConfig {
        block_out_channels: widths,
        layers_per_block: resnets - 1,
        norm_num_groups: 32,
        latent_channels: latent,
        out_channels: out,
        scaling_factor: DEFAULT_SCALING,
        shift_factor: 0.0,
        post_quant_conv: b.has("post_quant_conv.weight"),
        mid_attention: b.names().any(|n| n.starts_with(MID_ATTN)),
    };
    if let Some(c) = cfg.block_out_channels.iter().find(|&&c| c % 32 != 0) {
        return Err(bad(format!("block width {c} is not a multiple of the default 32 norm groups")));
    }
    Ok(cfg)
}

fn attention_naming(b: &StoreBuilder, source: &Path, wanted: bool) -> Result<Option<AttnNaming>> {
    if !wanted {
        return Ok(None);
    }
    for naming in [AttnNaming::New, AttnNaming::Old] {
        if b.has(&format!("{MID_ATTN}{}.weight", naming.names()[0])) {
            return Ok(Some(naming));
        }
    }
    let mut found: Vec<&str> = b.names().filter(|n| n.starts_with(MID_ATTN)).collect();
    if found.is_empty() {
        // Reported with every other missing tensor by the store.
        return Ok(Some(AttnNaming::New));
    }
    found.sort();
    Err(Error::Layout {
        path: source.to_path_buf(),
        reason: format!(
            "unknown mid-block attention key naming ({}); expected `to_q/to_k/to_v/to_out.0` \
             (diffusers ≥ 0.14) or `query/key/value/proj_attn` (older diffusers)",
            found.join(", ")
        ),
    })
}

/// Hands out a tensor handle for (name, shape): validated from files, or generated.
type Get<'a> = dyn FnMut(&str, &[usize]) -> Result<TRef> + 'a;

fn weight_bias(get: &mut Get, name: &str, shape: &[usize], n: usize) -> Result<WeightBias> {
    Ok(WeightBias { weight: get(&format!("{name}.weight"), shape)?, bias: get(&format!("{name}.bias"), &[n])? })
}

fn norm(get: &mut Get, name: &str, c: usize) -> Result<WeightBias> {
    weight_bias(get, name, &[c], c)
}

fn resnet(get: &mut Get, name: &str, cin: usize, cout: usize) -> Result<Resnet> {
    Ok(Resnet {
        cin,
        cout,
        norm1: norm(get, &format!("{name}.norm1"), cin)?,
        conv1: weight_bias(get, &format!("{name}.conv1"), &[cout, cin, 3, 3], cout)?,
        norm2: norm(get, &format!("{name}.norm2"), cout)?,
        conv2: weight_bias(get, &format!("{name}.conv2"), &[cout, cout, 3, 3], cout)?,
        shortcut: if cin != cout {
            Some(weight_bias(get, &format!("{name}.conv_shortcut"), &[cout, cin, 1, 1], cout)?)
        } else {
            None
        },
    })
}

/// Every decoder tensor of `cfg`, in diffusers' names. The attention linears are (C, C), or
/// (C, C, 1, 1) with `attn_conv_form`.
fn register(get: &mut Get, cfg: &VaeConfig, naming: Option<AttnNaming>, attn_conv_form: bool) -> Result<VaeTensors> {
    let (lc, cm) = (cfg.latent_channels, cfg.mid_channels());
    let post_quant =
        if cfg.post_quant_conv { Some(weight_bias(get, "post_quant_conv", &[lc, lc, 1, 1], lc)?) } else { None };
    let conv_in = weight_bias(get, "decoder.conv_in", &[cm, lc, 3, 3], cm)?;
    let mid =
        [resnet(get, "decoder.mid_block.resnets.0", cm, cm)?, resnet(get, "decoder.mid_block.resnets.1", cm, cm)?];
    let attn = match naming {
        None => None,
        Some(naming) => {
            let [q, k, v, o] = naming.names();
            let shape: &[usize] = if attn_conv_form { &[cm, cm, 1, 1] } else { &[cm, cm] };
            Some(Attention {
                norm: norm(get, &format!("{MID_ATTN}group_norm"), cm)?,
                q: weight_bias(get, &format!("{MID_ATTN}{q}"), shape, cm)?,
                k: weight_bias(get, &format!("{MID_ATTN}{k}"), shape, cm)?,
                v: weight_bias(get, &format!("{MID_ATTN}{v}"), shape, cm)?,
                out: weight_bias(get, &format!("{MID_ATTN}{o}"), shape, cm)?,
            })
        }
    };
    let nb = cfg.block_out_channels.len();
    let mut up = Vec::with_capacity(nb);
    for i in 0..nb {
        let (cin, cout) = cfg.up_channels(i);
        let mut resnets = Vec::new();
        for j in 0..=cfg.layers_per_block {
            let c_in = if j == 0 { cin } else { cout };
            resnets.push(resnet(get, &format!("decoder.up_blocks.{i}.resnets.{j}"), c_in, cout)?);
        }
        let upsample = if i + 1 < nb {
            Some(weight_bias(get, &format!("decoder.up_blocks.{i}.upsamplers.0.conv"), &[cout, cout, 3, 3], cout)?)
        } else {
            None
        };
        up.push(UpBlock { resnets, upsample });
    }
    let c0 = cfg.block_out_channels[0];
    let norm_out = norm(get, "decoder.conv_norm_out", c0)?;
    let conv_out = weight_bias(get, "decoder.conv_out", &[cfg.out_channels, c0, 3, 3], cfg.out_channels)?;
    Ok(VaeTensors { post_quant, conv_in, mid, attn, up, norm_out, conv_out })
}

impl VaeModel {
    /// A decoder of `cfg` with seeded random weights in memory (no file), for benchmarks at
    /// full SD-VAE size: norms 1 ± 0.1, weights of std 1/√fan_in, biases of std 0.05.
    pub fn random(cfg: &VaeConfig, seed: u64) -> Result<VaeModel> {
        cfg.check("random VAE config")?;
        let mut b = StoreBuilder::new(Vec::new());
        let mut index = 0u64;
        let tensors = {
            let mut get = |name: &str, shape: &[usize]| -> Result<TRef> {
                index += 1;
                let len: usize = shape.iter().product();
                let (mean, std) = if shape.len() == 1 {
                    if name.contains("norm") && name.ends_with(".weight") {
                        (1.0, 0.1)
                    } else {
                        (0.0, 0.05)
                    }
                } else {
                    (0.0, 1.0 / ((len / shape[0]) as f32).sqrt())
                };
                let key = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                Ok(b.generated(len, move |out| crate::weights::fill_uniform(key, mean, std, out)))
            };
            register(&mut get, cfg, cfg.mid_attention.then_some(AttnNaming::New), false)?
        };
        let (store, _) = b.finish(|_| false)?;
        let params = tensor_params(&tensors);
        Ok(VaeModel {
            config: cfg.clone(),
            source: format!("random(seed {seed})").into(),
            config_origin: "random".into(),
            naming: cfg.mid_attention.then_some(AttnNaming::New),
            params,
            store,
            tensors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_vae_macs_match_the_reference_doc() {
        // Reference doc G.3: 311.09 GMACs for a 32×32 latent (256×256 output).
        let m = VaeConfig::sd().macs(32);
        assert!((m as f64 / 1e9 - 311.09).abs() < 0.01, "{m}");
        assert_eq!(VaeConfig::sd().out_side(32), 256);
    }
}
