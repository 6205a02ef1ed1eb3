//! `icdit decode`: latents saved by `icdit sample --out-latents` → images.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use icdit::tensorfile::write_safetensors;
use icdit::vae::VaeModel;
use icdit::Error;

use crate::output::ImageOut;

#[derive(Args)]
pub struct DecodeArgs {
    /// VAE decoder: a diffusers AutoencoderKL folder (or a pipeline folder with `vae/`).
    #[arg(long)]
    vae: PathBuf,
    /// Safetensors with `latents` f32 [B, C, h, w] (and optionally `labels` i64 [B]).
    #[arg(long)]
    latents: PathBuf,
    #[command(flatten)]
    images: ImageOut,
    /// Also save the decoder's float output as `decoded` f32 [B, C, H, W].
    #[arg(long)]
    out_decoded: Option<PathBuf>,
    /// CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Where to decode: `cpu`, `cuda` (a build with `--features cuda`) or `emu` (the GPU
    /// decoder on the CPU emulation).
    #[arg(long, default_value = "cpu")]
    backend: String,
}

pub fn run(mut args: DecodeArgs) -> Result<(), Error> {
    let vae = Arc::new(VaeModel::load(&args.vae)?);
    let lc = vae.config.latent_channels;
    let input = icdit::inputs::read_latents(&args.latents, lc)?;
    let (n, side, labels, seed, latents) = (input.count, input.side, input.labels, input.seed, input.latents);
    let shape = [n, lc, side, side];
    if args.images.any() || args.out_decoded.is_none() {
        args.images.prepare()?;
    }
    let backend: icdit::backend::Backend = args.backend.parse()?;
    let mut dec = icdit::backend::AnyVae::new(vae, shape[2], args.threads, n.clamp(1, 16), backend)?;
    let t = Instant::now();
    let images = crate::sample::decode_all(&mut dec, &latents, n)?;
    let secs = t.elapsed().as_secs_f64();
    let (oc, side) = (dec.model().config.out_channels, dec.out_side());
    let mut written = Vec::new();
    if let Some(path) = &args.out_decoded {
        write_safetensors(path, &[("decoded", &[n, oc, side, side], &images)], &[], None)?;
        written.push(path.clone());
    }
    if args.images.any() {
        written.extend(args.images.write(&images, &labels, seed, oc, side, 8)?);
    }
    let paths: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    eprintln!(
        "decoded {n} latents ({lc}×{}² → {oc}×{side}²) in {secs:.2} s ({:.0} ms per image, {:.1} GMAC/s); wrote {}",
        shape[2],
        secs * 1e3 / n as f64,
        dec.model().config.macs(shape[2]) as f64 * n as f64 / secs / 1e9,
        paths.join(", ")
    );
    Ok(())
}
