//! DiT model configuration: the official constructor arguments, the numerics variant, and
//! the rules that infer a config from tensor shapes (reference doc part B).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which published implementation's arithmetic the forward pass follows.
///
/// The official code and the diffusers port differ in two places (reference doc A.3, C.3):
/// the timestep-embedding frequency divisor (128 vs 127) and the pre-MLP LayerNorm eps
/// (1e-6 vs the config's `norm_eps`, 1e-5). Official is always the default; the diffusers
/// variant exists for models trained with diffusers and is only ever chosen explicitly.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Numerics {
    Official,
    Diffusers,
}

impl std::str::FromStr for Numerics {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "official" => Ok(Numerics::Official),
            "diffusers" => Ok(Numerics::Diffusers),
            other => Err(Error::invalid("numerics", format!("`{other}`: expected `official` or `diffusers`"))),
        }
    }
}

/// What the model's samples are: latents for the SD-VAE, or images directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleSpace {
    Latent,
    Pixel,
}

/// A DiT architecture, named as the official `DiT(...)` constructor names its arguments.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DitConfig {
    /// Latent (or image) side length I; the model sees I×I inputs.
    pub input_size: usize,
    /// Patch side p; tokens N = (I/p)².
    pub patch_size: usize,
    /// Input channels (4 for SD-VAE latents).
    pub in_channels: usize,
    /// Hidden size C.
    pub hidden_size: usize,
    /// Number of DiT blocks.
    pub depth: usize,
    /// Attention heads H; head dim D = C/H.
    pub num_heads: usize,
    /// MLP hidden size = mlp_ratio · C.
    pub mlp_ratio: f64,
    /// Label dropout used in training; > 0 means the label table has a null-class row.
    pub class_dropout_prob: f64,
    /// Number of classes; the null (unconditional) class index equals this.
    pub num_classes: usize,
    /// Output 2·in_channels channels: ε and the variance interpolation value.
    pub learn_sigma: bool,
}

/// Frequency embedding width of the timestep MLP input (fixed in DiT).
pub const FREQ_DIM: usize = 256;

impl DitConfig {
    /// DiT-XL/2 for 256×256 images (32×32 latents).
    pub fn xl2_256() -> Self {
        Self::family("XL/2", 32).expect("XL/2 is in the family table")
    }

    /// An official family member (`"XL/2"`, `"B/4"`, …) at the given latent size.
    pub fn family(name: &str, input_size: usize) -> Option<Self> {
        let (size, patch) = name.split_once('/')?;
        let patch_size: usize = patch.parse().ok()?;
        let (depth, hidden_size, num_heads) = match size {
            "XL" => (28, 1152, 16),
            "L" => (24, 1024, 16),
            "B" => (12, 768, 12),
            "S" => (12, 384, 6),
            _ => return None,
        };
        Some(DitConfig {
            input_size,
            patch_size,
            in_channels: 4,
            hidden_size,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            class_dropout_prob: 0.1,
            num_classes: 1000,
            learn_sigma: true,
        })
    }

    /// Heads of the official family with this hidden size and depth, if any
    /// (reference doc part B: heads cannot be read from any shape).
    pub fn family_heads(hidden_size: usize, depth: usize) -> Option<usize> {
        match (hidden_size, depth) {
            (1152, 28) => Some(16),
            (1024, 24) => Some(16),
            (768, 12) => Some(12),
            (384, 12) => Some(6),
            _ => None,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    pub fn grid(&self) -> usize {
        self.input_size / self.patch_size
    }
    pub fn tokens(&self) -> usize {
        self.grid() * self.grid()
    }
    pub fn out_channels(&self) -> usize {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }
    /// `int(hidden_size * mlp_ratio)` as the official code computes it, except that a
    /// product within floating-point noise of an integer is that integer: a ratio inferred
    /// as M/C must give back M (28 × (61/28) is 60.999… in f64).
    pub fn mlp_hidden(&self) -> usize {
        let v = self.hidden_size as f64 * self.mlp_ratio;
        if (v - v.round()).abs() < 1e-6 {
            v.round() as usize
        } else {
            v as usize
        }
    }
    /// Length of one flattened patch, Cin·p².
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.patch_size * self.patch_size
    }
    /// Rows of the label table: one extra (null) row when label dropout was used.
    pub fn label_rows(&self) -> usize {
        self.num_classes + usize::from(self.class_dropout_prob > 0.0)
    }
    /// The class index meaning "unconditional".
    pub fn null_class(&self) -> usize {
        self.num_classes
    }
    /// Elements of one model input or ε-output image: Cin·I².
    pub fn image_elems(&self) -> usize {
        self.in_channels * self.input_size * self.input_size
    }
    /// Elements of one model output: Cout·I².
    pub fn output_elems(&self) -> usize {
        self.out_channels() * self.input_size * self.input_size
    }

    /// Parameters of the official layout, counting `pos_embed` (reference doc G.1).
    pub fn param_count(&self) -> usize {
        let (c, n, h) = (self.hidden_size, self.tokens(), self.mlp_hidden());
        let p2 = self.patch_size * self.patch_size;
        let embed = c * self.patch_dim() + c + n * c;
        let t_mlp = FREQ_DIM * c + c + c * c + c;
        let labels = self.label_rows() * c;
        let block = (3 * c * c + 3 * c) + (c * c + c) + (h * c + h) + (c * h + c) + (6 * c * c + 6 * c);
        let fin = (2 * c * c + 2 * c) + (p2 * self.out_channels() * c + p2 * self.out_channels());
        embed + t_mlp + labels + self.depth * block + fin
    }

    /// Multiply-accumulates of one single-sample forward (reference doc G.1 accounting).
    pub fn forward_macs(&self) -> u64 {
        let (c, n, h) = (self.hidden_size as u64, self.tokens() as u64, self.mlp_hidden() as u64);
        let p2co = (self.patch_size * self.patch_size * self.out_channels()) as u64;
        let block = n * 3 * c * c + 2 * n * n * c + n * c * c + 2 * n * c * h + 6 * c * c;
        let pre_post = n * c * self.patch_dim() as u64 + FREQ_DIM as u64 * c + c * c + 2 * c * c + n * c * p2co;
        self.depth as u64 * block + pre_post
    }

    /// Checks the config is one the forward pass can run; `origin` names where it came from.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let fail = |reason: String| Err(Error::Config { origin: origin.to_string(), reason });
        let positive = [
            ("input_size", self.input_size),
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("hidden_size", self.hidden_size),
            ("depth", self.depth),
            ("num_heads", self.num_heads),
            ("num_classes", self.num_classes),
        ];
        for (name, v) in positive {
            if v == 0 {
                return fail(format!("{name} must be positive"));
            }
        }
        if !self.input_size.is_multiple_of(self.patch_size) {
            return fail(format!("input_size {} is not a multiple of patch_size {}", self.input_size, self.patch_size));
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return fail(format!("hidden_size {} is not divisible by num_heads {}", self.hidden_size, self.num_heads));
        }
        // The sin-cos position embedding splits C into four equal parts (reference doc A.2).
        if !self.hidden_size.is_multiple_of(4) {
            return fail(format!("hidden_size {} is not a multiple of 4", self.hidden_size));
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) || self.mlp_hidden() == 0 {
            return fail(format!("mlp_ratio {} must be a positive number", self.mlp_ratio));
        }
        if !(0.0..1.0).contains(&self.class_dropout_prob) {
            return fail(format!("class_dropout_prob {} must be in [0, 1)", self.class_dropout_prob));
        }
        // Guard the arithmetic of every size computed from the config.
        let big = 1usize << 20;
        if self.input_size > 4096
            || self.hidden_size > big
            || self.depth > 4096
            || self.num_classes > big
            || self.in_channels > 1 << 16
            || self.mlp_hidden() > 1 << 24
        {
            return fail(format!(
                "sizes are implausibly large (input_size {} ≤ 4096, hidden_size {} ≤ 2^20, depth {} ≤ 4096, \
                 num_classes {} ≤ 2^20, in_channels {} ≤ 65536, MLP width {} ≤ 2^24)",
                self.input_size,
                self.hidden_size,
                self.depth,
                self.num_classes,
                self.in_channels,
                self.mlp_hidden()
            ));
        }
        Ok(())
    }
}
