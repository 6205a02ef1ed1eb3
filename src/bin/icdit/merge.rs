//! `icdit merge`: joins the shards of a `sample --num-images` run into one FID `.npz`
//! ([`icdit::scale_out::merge`] checks and writes it).

use std::path::PathBuf;

use clap::Args;
use icdit::Error;

#[derive(Args)]
pub struct MergeArgs {
    /// Output .npz (array `arr_0`, uint8 NHWC).
    #[arg(long)]
    out: PathBuf,
    /// Run folders (every `shard-*-of-*.json` in them) or manifest files.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

pub fn run(args: MergeArgs) -> Result<(), Error> {
    icdit::scale_out::merge(&args.inputs, &args.out).map(|_| ())
}
