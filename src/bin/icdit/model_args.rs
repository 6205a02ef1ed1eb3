//! `--num-heads` and `--numerics`: how to read a checkpoint, for every command that loads one.

use clap::Args;
use icdit::{DitModel, Error, LoadOptions, Numerics};

/// Flags shared by every command that loads weights.
#[derive(Args)]
pub(crate) struct ModelArgs {
    /// Attention heads, when neither the file nor the DiT family table tells.
    #[arg(long)]
    num_heads: Option<usize>,
    /// Arithmetic to follow: `official` (default) or `diffusers` (for models trained with diffusers).
    #[arg(long, default_value = "official")]
    numerics: Numerics,
}

impl ModelArgs {
    pub(crate) fn load(&self, path: &std::path::Path) -> Result<DitModel, Error> {
        DitModel::load(path, &LoadOptions { num_heads: self.num_heads, numerics: self.numerics })
    }
}
