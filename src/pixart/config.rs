//! A PixArt-α pipeline folder's settings: `transformer/config.json` (the model) and
//! `scheduler/scheduler_config.json` (the train schedule), read and checked.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::weights::{read_config, DiffusersConfig};

/// The shape of a `PixArtTransformer2DModel` (norm_type `ada_norm_single`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PixArtConfig {
    /// Latent side the model was trained at (`sample_size`): the position table's base size
    /// is `sample_size / patch_size` whatever size it runs at.
    pub sample_size: usize,
    /// Latent height and width the model runs at: `sample_size` unless loaded at another size
    /// ([`PixArtConfig::at_size`]; the 1024-MS model's aspect-ratio bins are not square).
    pub height: usize,
    pub width: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    /// Output channels: 2 × in_channels with the learned variance (PixArt-α), else in_channels.
    pub out_channels: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    /// Width of the text embeddings (T5-XXL: 4096).
    pub caption_channels: usize,
    /// The position table's `interpolation_scale` (config value, else max(sample_size / 64, 1)).
    pub interpolation_scale: f64,
    /// LayerNorm ε of the blocks and the final layer (`norm_eps`, 1e-6).
    pub norm_eps: f32,
    /// The 1024-MS model's micro-conditions (`use_additional_conditions`; diffusers' default is
    /// on when sample_size is 128): the image's resolution and aspect ratio, embedded and added
    /// to the timestep embedding ([`super::micro`]).
    pub use_additional_conditions: bool,
}

/// Pixels per latent of PixArt-α's VAE (the SD VAE, 4 blocks: 2³); the pipeline's
/// resolution condition is the latent size times this.
pub const VAE_SCALE_FACTOR: usize = 8;

impl PixArtConfig {
    pub fn hidden_size(&self) -> usize {
        self.num_heads * self.head_dim
    }
    /// The feed-forward width (diffusers' `FeedForward`, mult 4).
    pub fn mlp_hidden(&self) -> usize {
        4 * self.hidden_size()
    }
    /// Patch rows of the latent the model runs at.
    pub fn grid_h(&self) -> usize {
        self.height / self.patch_size
    }
    /// Patch columns.
    pub fn grid_w(&self) -> usize {
        self.width / self.patch_size
    }
    /// Patches per side at the trained size: the position table's `base_size`.
    pub fn base_size(&self) -> usize {
        self.sample_size / self.patch_size
    }
    pub fn tokens(&self) -> usize {
        self.grid_h() * self.grid_w()
    }
    /// Values per image of the model input, (Cin, H, W).
    pub fn image_elems(&self) -> usize {
        self.in_channels * self.height * self.width
    }
    /// Values per image of the model output, (Cout, H, W).
    pub fn out_elems(&self) -> usize {
        self.out_channels * self.height * self.width
    }
    /// Width of each micro-condition embedding (diffusers' `size_emb_dim`, hidden / 3).
    pub fn size_emb_dim(&self) -> usize {
        self.hidden_size() / 3
    }

    /// The same model run at a latent of `height` × `width` (multiples of the patch size): the
    /// position table is computed for that grid from the trained base size, as diffusers'
    /// `PatchEmbed` does when the input is not the trained size.
    pub fn at_size(&self, height: usize, width: usize) -> Result<Self> {
        let cfg = PixArtConfig { height, width, ..*self };
        cfg.validate().map_err(|reason| Error::invalid("latent size", reason))?;
        Ok(cfg)
    }
    /// Whether the output carries a learned-variance half that sampling drops.
    pub fn learn_sigma(&self) -> bool {
        self.out_channels == 2 * self.in_channels
    }
}

/// PixArt-α's own `config.json` fields (beside those every diffusers transformer has).
#[derive(serde::Deserialize)]
struct PixArtFields {
    caption_channels: Option<usize>,
    cross_attention_dim: Option<usize>,
    interpolation_scale: Option<f64>,
    use_additional_conditions: Option<bool>,
    activation_fn: Option<String>,
    attention_bias: Option<bool>,
    norm_elementwise_affine: Option<bool>,
}

/// Whether `dir` is a PixArt-α pipeline folder (its `model_index.json` names a PixArt
/// pipeline, or its transformer config a `PixArtTransformer2DModel`).
pub fn is_pipeline(dir: &Path) -> bool {
    let class_of = |p: PathBuf| -> Option<String> {
        let text = crate::tensorfile::read_json_text(&p).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v.get("_class_name")?.as_str().map(str::to_string)
    };
    if !dir.is_dir() {
        return false;
    }
    class_of(dir.join("model_index.json")).is_some_and(|c| c.starts_with("PixArt"))
        || class_of(dir.join("transformer").join("config.json")).is_some_and(|c| c == "PixArtTransformer2DModel")
}

impl PixArtConfig {
    /// Reads `transformer/config.json` of a pipeline folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("transformer").join("config.json");
        if !path.is_file() {
            return Err(Error::Layout {
                path: dir.to_path_buf(),
                reason: "a PixArt-α pipeline folder needs `transformer/config.json` (and the transformer's weights)"
                    .into(),
            });
        }
        let (hf, own): (DiffusersConfig, PixArtFields) = read_config(&path, "PixArtTransformer2DModel")?;
        let origin = path.display().to_string();
        let bad = |reason: String| Error::Config { origin: origin.clone(), reason };
        let norm = hf.norm_type.as_deref().unwrap_or("ada_norm_single");
        if norm != "ada_norm_single" {
            return Err(bad(format!("norm_type is `{norm}`; PixArt-α's is `ada_norm_single`")));
        }
        if let Some(a) = own.activation_fn.as_deref() {
            if a != "gelu-approximate" {
                return Err(bad(format!("activation_fn is `{a}`; only `gelu-approximate` is supported")));
            }
        }
        if own.attention_bias == Some(false) {
            return Err(bad("attention_bias is false; PixArt-α's attention projections have biases".into()));
        }
        if own.norm_elementwise_affine == Some(true) {
            return Err(bad("norm_elementwise_affine is true; PixArt-α's LayerNorms have no affine parameters".into()));
        }
        let hidden = hf.num_attention_heads * hf.attention_head_dim;
        let caption_channels = own.caption_channels.ok_or_else(|| bad("caption_channels is missing".into()))?;
        if let Some(x) = own.cross_attention_dim {
            if x != hidden {
                return Err(bad(format!(
                    "cross_attention_dim {x} differs from the hidden size {hidden} (heads × head dim)"
                )));
            }
        }
        let cfg = PixArtConfig {
            sample_size: hf.sample_size,
            height: hf.sample_size,
            width: hf.sample_size,
            patch_size: hf.patch_size,
            in_channels: hf.in_channels,
            out_channels: hf.out_channels.unwrap_or(hf.in_channels),
            depth: hf.num_layers,
            num_heads: hf.num_attention_heads,
            head_dim: hf.attention_head_dim,
            caption_channels,
            interpolation_scale: own.interpolation_scale.unwrap_or((hf.sample_size / 64).max(1) as f64),
            norm_eps: hf.norm_eps.unwrap_or(1e-6) as f32,
            // diffusers turns the micro-conditions on by default for the 1024 model (sample_size 128).
            use_additional_conditions: own.use_additional_conditions.unwrap_or(hf.sample_size == 128),
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("sample_size", self.sample_size),
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("num_layers", self.depth),
            ("num_attention_heads", self.num_heads),
            ("attention_head_dim", self.head_dim),
            ("caption_channels", self.caption_channels),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0 || *v > 1 << 16) {
            return Err(format!("{name} must be 1 to 65536"));
        }
        if self.hidden_size() > 1 << 16 {
            return Err(format!("hidden size {} (heads × head dim) is above 65536", self.hidden_size()));
        }
        if !self.sample_size.is_multiple_of(self.patch_size) {
            return Err(format!(
                "sample_size {} is not a multiple of patch_size {}",
                self.sample_size, self.patch_size
            ));
        }
        if self.height == 0 || self.width == 0 || self.height > 1 << 16 || self.width > 1 << 16 {
            return Err(format!("latent size {}×{} must be 1 to 65536 per side", self.height, self.width));
        }
        if !self.height.is_multiple_of(self.patch_size) || !self.width.is_multiple_of(self.patch_size) {
            return Err(format!(
                "latent size {}×{} is not a multiple of patch_size {} (images: multiples of {} pixels)",
                self.height,
                self.width,
                self.patch_size,
                self.patch_size * VAE_SCALE_FACTOR
            ));
        }
        if self.use_additional_conditions && !self.hidden_size().is_multiple_of(3) {
            return Err(format!(
                "use_additional_conditions needs a hidden size divisible by 3 (resolution and aspect-ratio \
                 embeddings of hidden/3 each); it is {}",
                self.hidden_size()
            ));
        }
        if !self.hidden_size().is_multiple_of(4) {
            return Err(format!("hidden size {} must be a multiple of 4 (the 2-D position table)", self.hidden_size()));
        }
        if self.out_channels != self.in_channels && self.out_channels != 2 * self.in_channels {
            return Err(format!(
                "out_channels {} must be in_channels {} or twice it (learned variance)",
                self.out_channels, self.in_channels
            ));
        }
        if !(self.interpolation_scale.is_finite() && self.interpolation_scale > 0.0) {
            return Err(format!("interpolation_scale {} must be positive", self.interpolation_scale));
        }
        if self.tokens() > 1 << 16 {
            return Err(format!("{} tokens; at most 65536", self.tokens()));
        }
        Ok(())
    }
}

/// The train schedule of `scheduler/scheduler_config.json`: PixArt-α's is the linear one
/// (β from 1e-4 to 0.02 over 1000 steps), ε-prediction, linspace timestep spacing.
pub fn check_scheduler(dir: &Path) -> Result<()> {
    let path = dir.join("scheduler").join("scheduler_config.json");
    if !path.is_file() {
        // Older folders may lack it; the schedule is PixArt-α's fixed one.
        return Ok(());
    }
    let text = crate::tensorfile::read_json_text(&path)?;
    let origin = path.display().to_string();
    let bad = |reason: String| Error::Config { origin: origin.clone(), reason };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let num = |k: &str, want: f64| -> Result<()> {
        match v.get(k).and_then(|x| x.as_f64()) {
            Some(x) if (x - want).abs() > 1e-12 * want.abs().max(1.0) => {
                Err(bad(format!("{k} is {x}; icdit's PixArt schedule has {want}")))
            }
            _ => Ok(()),
        }
    };
    let text_is = |k: &str, want: &str| -> Result<()> {
        match v.get(k).and_then(|x| x.as_str()) {
            Some(x) if x != want => Err(bad(format!("{k} is `{x}`; icdit's PixArt schedule has `{want}`"))),
            _ => Ok(()),
        }
    };
    num("beta_start", 1e-4)?;
    num("beta_end", 0.02)?;
    num("num_train_timesteps", 1000.0)?;
    num("steps_offset", 0.0)?;
    text_is("beta_schedule", "linear")?;
    text_is("prediction_type", "epsilon")?;
    text_is("timestep_spacing", "linspace")?;
    if v.get("trained_betas").is_some_and(|b| !b.is_null()) {
        return Err(bad("trained_betas are set; icdit's PixArt schedule is the linear one".into()));
    }
    // The DPM-Solver++ variant icdit computes (PixArt-α's published one); keys that are absent
    // take diffusers' defaults, which are these.
    if v.get("_class_name").and_then(|c| c.as_str()).unwrap_or("DPMSolverMultistepScheduler")
        == "DPMSolverMultistepScheduler"
    {
        num("solver_order", 2.0)?;
        text_is("algorithm_type", "dpmsolver++")?;
        text_is("solver_type", "midpoint")?;
        text_is("final_sigmas_type", "zero")?;
        for (key, want) in [
            ("lower_order_final", true),
            ("thresholding", false),
            ("euler_at_final", false),
            ("use_karras_sigmas", false),
            ("use_exponential_sigmas", false),
            ("use_beta_sigmas", false),
            ("use_lu_lambdas", false),
            ("use_flow_sigmas", false),
            ("rescale_betas_zero_snr", false),
        ] {
            if let Some(x) = v.get(key).and_then(|x| x.as_bool()) {
                if x != want {
                    return Err(bad(format!("{key} is {x}; icdit's DPM-Solver++ has {want}")));
                }
            }
        }
        if v.get("variance_type").is_some_and(|x| !x.is_null()) {
            return Err(bad("variance_type is set; icdit's DPM-Solver++ predicts ε only".into()));
        }
    }
    Ok(())
}
