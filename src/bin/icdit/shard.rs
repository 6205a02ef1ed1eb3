//! `icdit sample --num-images`: the scale-out flags, handed to [`icdit::scale_out`] (the
//! shards, part files, manifests, resume and device workers all live there).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use icdit::backend::Backend;
use icdit::engine::EngineOptions;
use icdit::image::Rounding;
use icdit::scale_out::{self, RunSettings};
use icdit::vae::VaeDecoder;
use icdit::{DitModel, Error};

#[derive(Args, Default)]
pub struct ShardArgs {
    /// FID-style run of N images: class labels drawn per image index from the seed (as
    /// DiT's sample_ddp.py draws one per image), written to the --out folder as .npz part
    /// files plus a manifest per shard; join shards with `icdit merge`.
    #[arg(long, conflicts_with_all = ["class", "random_classes", "noise", "compare", "out_latents", "grid", "npz"])]
    pub num_images: Option<u64>,
    /// This process's shard, 0-based (default: from RANK, SLURM_PROCID, JOB_COMPLETION_INDEX
    /// or ICDIT_SHARD; unsharded when none is set).
    #[arg(long, requires = "num_images")]
    pub shard: Option<u64>,
    /// Number of shards (default: from WORLD_SIZE, SLURM_NTASKS or ICDIT_NUM_SHARDS, beside
    /// the index variable the shard came from).
    #[arg(long, requires = "num_images")]
    pub num_shards: Option<u64>,
    /// Also write one PNG per image into DIR/images, named by global image index.
    #[arg(long, requires = "num_images")]
    pub png: bool,
    /// Write at most N part files in this run, then stop (the shard stays resumable: the
    /// same command carries on). For time-limited or preemptible jobs.
    #[arg(long, requires = "num_images")]
    pub max_parts: Option<usize>,
    /// GPUs to sample on, e.g. `0,1,2,3` (--backend cuda; --backend emu emulates each): one
    /// worker thread and engine per device, sharing the mapped weights. A --num-images
    /// shard hands its parts to whichever device is free; other runs take one device.
    #[arg(long, conflicts_with = "compare")]
    pub devices: Option<String>,
}

/// The device a run without --num-images samples on: the one --devices names, else 0.
pub fn plain_device(args: &ShardArgs, backend: Backend) -> Result<usize, Error> {
    args.devices.as_deref().map_or(Ok(0), |list| scale_out::one_device(list, backend))
}

/// What the sample command resolved that a shard run needs besides the engine options.
pub struct RunSpec {
    pub out: Option<PathBuf>,
    pub rounding: Rounding,
    pub seed: u64,
    pub batch: usize,
    pub json: bool,
    pub backend: Backend,
}

/// Runs (or resumes) this process's shard of a `--num-images` run: the shard from the flags
/// or the launcher's environment, the devices from --devices, Ctrl-C through the command's
/// interrupt flag.
pub fn run(
    args: &ShardArgs,
    num_images: u64,
    spec: &RunSpec,
    model: &Arc<DitModel>,
    opts: &EngineOptions,
    vae: Option<VaeDecoder>,
) -> Result<(), Error> {
    let dir = spec.out.clone().ok_or_else(|| {
        Error::invalid("--num-images", "needs --out DIR: the run folder for part files and shard manifests")
    })?;
    let shard = scale_out::shard_of_run(num_images, args.shard, args.num_shards, &|name| std::env::var(name).ok())?;
    let devices = args.devices.as_deref().map(|list| scale_out::parse_devices(list, spec.backend)).transpose()?;
    let settings = RunSettings {
        dir,
        num_images,
        shard,
        devices,
        png: args.png,
        max_parts: args.max_parts,
        rounding: spec.rounding,
        seed: spec.seed,
        batch: spec.batch,
        backend: spec.backend,
        interrupt: Some(crate::interrupt::flag()),
    };
    let report = scale_out::run(model, opts, vae, &settings)?;
    if spec.json {
        outln!("{}", report.to_json());
    }
    Ok(())
}
