//! `icdit sample`: the single-binary sampler.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use icdit::backend::{AnyEngine, AnyVae, Backend};
use icdit::engine::{EngineOptions, GuidedChannels, Request};
use icdit::forward::StepKind;
use icdit::tensorfile::write_safetensors;
use icdit::vae::{VaeDecoder, VaeModel};
use icdit::{CacheMode, CachePolicy, DitModel, Error, Forecast, FullSteps, IccForm, SampleSpace};

use crate::model_args::ModelArgs;
use crate::output::ImageOut;

/// The classes DiT's sample.py draws for ImageNet models.
const SAMPLE_PY_CLASSES: [i64; 8] = [207, 360, 387, 974, 88, 979, 417, 279];

#[derive(Args)]
pub struct SampleArgs {
    /// Weights (official .safetensors or diffusers folder); default: the bundled model.
    #[arg(long)]
    weights: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// PixArt-α (--weights a pipeline folder): the prompts' embeddings, one image per prompt
    /// (`prompt_embeds` f32 [B, L, D] and `attention_mask` i64 [B, L], as `icdit encode`
    /// writes them).
    #[arg(long)]
    prompt_embeds: Option<PathBuf>,
    /// PixArt-α: the negative prompt's embeddings (1 or B rows, same L); under guidance, without
    /// it, the negative prompt is encoded with the folder's text encoder.
    #[arg(long)]
    negative_embeds: Option<PathBuf>,
    /// PixArt-α: a prompt, encoded with the folder's T5 encoder (repeat for several images).
    #[arg(long, conflicts_with = "prompt_embeds")]
    prompt: Vec<String>,
    /// PixArt-α: the negative prompt under guidance (default "", as the pipeline's).
    #[arg(long, conflicts_with = "negative_embeds")]
    negative_prompt: Option<String>,
    /// PixArt-α: tokens per prompt (default 120, PixArt-α's; at most 512).
    #[arg(long)]
    max_sequence_length: Option<usize>,
    /// PixArt-α: image height in pixels (default: the model's, sample_size × 8). With
    /// resolution binning the nearest aspect-ratio bin's size is sampled and the images are
    /// resized back, as PixArtAlphaPipeline does.
    #[arg(long)]
    height: Option<usize>,
    /// PixArt-α: image width in pixels (default: the model's).
    #[arg(long)]
    width: Option<usize>,
    /// PixArt-α: sample --height × --width as given (multiples of 8 × the patch size) instead of
    /// the nearest aspect-ratio bin's size.
    #[arg(long)]
    no_resolution_binning: bool,
    /// Comma-separated class labels, one image each.
    #[arg(long, value_delimiter = ',', conflicts_with = "random_classes")]
    class: Vec<i64>,
    /// Draw N class labels from the seed instead.
    #[arg(long)]
    random_classes: Option<usize>,
    /// Images per class when no classes are given (small models: every class, one grid row each).
    #[arg(long, default_value_t = 4)]
    per_class: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling steps: DiT's respacing "N" (includes t = 999), for either sampler.
    #[arg(long)]
    steps: Option<usize>,
    /// Respacing spec instead of --steps, e.g. `ddim50` or `250`.
    #[arg(long, conflicts_with = "steps")]
    respacing: Option<String>,
    /// `ddpm` (DiT's default) or `ddim`.
    #[arg(long)]
    sampler: Option<String>,
    /// DDIM η (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f32,
    /// Classifier-free guidance scale (1 = no guidance).
    #[arg(long)]
    cfg: Option<f32>,
    /// Guide every ε channel (diffusers) instead of the official first three.
    #[arg(long)]
    guide_all_channels: bool,
    /// Write the samples as safetensors: `latents` f32 [B, C, H, W] and `labels` i64 [B].
    #[arg(long)]
    out_latents: Option<PathBuf>,
    #[command(flatten)]
    images: ImageOut,
    #[command(flatten)]
    shard: crate::shard::ShardArgs,
    /// VAE decoder (diffusers AutoencoderKL folder) for latent-space models; default: the
    /// `vae/` folder of a diffusers DiT pipeline given as --weights.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// Start from given noise: safetensors with `z` f32 [B, C, H, W] and optionally
    /// `step_noise` f32 [steps, B, C, H, W].
    #[arg(long)]
    noise: Option<PathBuf>,
    /// Caching: `none`, `reuse` (naive caching), `icc` (increment-calibrated, needs --factors),
    /// `fora` (block-output reuse) or `taylor` (Taylor forecasting of the block outputs); see
    /// docs/caching-policies.md.
    #[arg(long, value_enum, default_value_t = CachePolicy::None)]
    cache: CachePolicy,
    /// `--cache taylor`: the expansion's order (0, 1 or 2; 0 is block-output reuse).
    #[arg(long, default_value_t = Forecast::CLI_DEFAULT.order)]
    taylor_order: usize,
    /// `--cache taylor`: the first N steps are full, besides the --period/--full-steps ones.
    #[arg(long, default_value_t = Forecast::CLI_DEFAULT.warmup)]
    taylor_warmup: usize,
    /// Under caching, every N-th step (counted from the first) is a full step.
    #[arg(long, default_value_t = 2, conflicts_with = "full_steps")]
    period: usize,
    /// Under caching, the full steps as a comma-separated list of step indices (0 first).
    #[arg(long, value_delimiter = ',')]
    full_steps: Vec<usize>,
    /// Rank-r factors for `--cache icc` (made by `icdit calibrate`).
    #[arg(long)]
    factors: Option<PathBuf>,
    /// How icc's calibrated steps compute each linear: `direct`, y_s + up·(down·(x − x_s)) as
    /// the reference code; `projected`, y_s + up·(down·x − t_s) with t_s = down·x_s kept by full
    /// steps; `folded`, b_s + up·(down·x) with b_s kept by full steps (those two: the GPU
    /// pipeline only); `auto`, direct on the CPU and projected on the GPU.
    #[arg(long, value_enum, default_value_t = IccForm::Auto)]
    icc_form: IccForm,
    /// Sample the same request under several cache policies (`none`, `reuse`, `icc`, `fora`,
    /// `taylor`; icc uses --factors, taylor --taylor-order/--taylor-warmup) and write one grid
    /// row per policy, as the paper's comparison figures.
    #[arg(long, value_enum, value_delimiter = ',')]
    compare: Vec<CachePolicy>,
    /// Images per engine call.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Where sampling runs: `cpu` (the reference backend), `cuda` (the GPU pipeline; a build
    /// with `--features cuda`) or `emu` (the GPU pipeline on the CPU emulation: slow).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Print a machine-readable report on stdout.
    #[arg(long)]
    json: bool,
    /// Refuse to start when the planned memory (weights, arenas, the request's samples and
    /// images) is above this size, e.g. 8G or 512M; the breakdown is printed.
    #[arg(long)]
    max_memory: Option<String>,
    /// Skip the per-step check for NaN/Inf in the model output (on by default; it names the
    /// step and block where non-finite values first appear).
    #[arg(long)]
    no_finite_check: bool,
}

pub fn run(mut args: SampleArgs) -> Result<(), Error> {
    if let Some(weights) = args.weights.clone().filter(|w| icdit::pixart::is_pipeline(w)) {
        return pixart_sample(&weights, &mut args);
    }
    if args.prompt_embeds.is_some()
        || args.negative_embeds.is_some()
        || !args.prompt.is_empty()
        || args.negative_prompt.is_some()
        || args.max_sequence_length.is_some()
        || args.height.is_some()
        || args.width.is_some()
        || args.no_resolution_binning
    {
        return Err(Error::invalid(
            "--prompt/--prompt-embeds/--height/--width",
            "prompts drive a text-to-image model: pass a PixArt-α pipeline folder as --weights",
        ));
    }
    let weights = args.weights.clone().unwrap_or_else(default_weights);
    let model = Arc::new(args.model.load(&weights).map_err(|e| match (&args.weights, e) {
        (None, Error::Io { path, source }) => Error::Io {
            path,
            source: std::io::Error::new(
                source.kind(),
                format!("{source} (the bundled default model; pass --weights to use another)"),
            ),
        },
        (_, e) => e,
    })?);
    let cfg = model.config;
    let rec = icdit::session::recommended(&model)?;
    let vae = icdit::session::open_vae(args.vae.as_deref(), &weights, &model)?;
    let makes_images = model.space == SampleSpace::Pixel || vae.is_some();
    if makes_images && args.shard.num_images.is_none() {
        args.images.prepare()?; // a --num-images run checks its own folder (icdit::scale_out)
    } else if !makes_images && args.images.any() {
        return Err(Error::invalid(
            "--out/--grid/--npz",
            "this model samples VAE latents: pass --vae DIR (a diffusers AutoencoderKL folder) to decode \
             them, or write them with --out-latents",
        ));
    }

    let classes = choose_classes(&args, &model)?;
    let sampler = icdit::session::resolve_sampler(args.sampler.as_deref(), &rec, args.eta)?;
    let respacing = icdit::session::resolve_respacing(args.respacing.as_deref(), args.steps, &rec)?;
    let cfg_scale = args.cfg.or(rec.cfg).unwrap_or(4.0);
    let noise = args.noise.as_deref().map(|p| read_noise(p, classes.len(), &cfg)).transpose()?;
    let batch = if noise.as_ref().is_some_and(|n| n.1.is_some()) {
        classes.len() // per-step noise is laid out for the whole request
    } else {
        args.batch.clamp(1, classes.len())
    };
    let forecast = Forecast { order: args.taylor_order, warmup: args.taylor_warmup };
    let cache = match (args.cache, &args.factors) {
        // --compare names its own policies and reads --factors itself.
        (CachePolicy::None, Some(_)) if !args.compare.is_empty() => CacheMode::None,
        (CachePolicy::Icc, None) => {
            return Err(Error::invalid("--cache icc", "needs --factors FILE (see `icdit calibrate`)"))
        }
        (CachePolicy::None | CachePolicy::Reuse | CachePolicy::Fora | CachePolicy::Taylor, Some(_)) => {
            return Err(Error::invalid("--factors", "only used with --cache icc"))
        }
        (policy, factors) => icdit::session::cache_mode(policy, factors.as_deref(), forecast, &model)?,
    };
    let full_steps = if args.full_steps.is_empty() {
        FullSteps::Period(args.period)
    } else {
        FullSteps::List(args.full_steps.clone())
    };
    let opts = EngineOptions {
        cache,
        full_steps,
        max_batch: batch,
        respacing,
        sampler,
        cfg_scale,
        guided_channels: if args.guide_all_channels { GuidedChannels::All } else { GuidedChannels::OfficialThree },
        threads: args.threads,
        max_memory: args.max_memory.as_deref().map(icdit::limits::parse_size).transpose()?,
        check_finite: !args.no_finite_check,
        isa: None,
        icc_form: args.icc_form,
        fused_lowrank: true,
    };
    let backend: Backend = args.backend.parse()?;
    // The VAE decodes on the sampler's backend (on a device: its own arena, ≤ 16 latents a call).
    let any_vae = |v: Option<Arc<VaeModel>>, device: usize| {
        v.map(|v| AnyVae::new_on(v, model.config.input_size, args.threads, args.batch.clamp(1, 16), backend, device))
            .transpose()
    };
    if !args.compare.is_empty() {
        return compare(&args, &model, &opts, &classes, any_vae(vae, 0)?);
    }
    if let Some(num_images) = args.shard.num_images {
        let spec = crate::shard::RunSpec {
            out: args.images.out.clone(),
            rounding: args.images.rounding()?,
            seed: args.seed,
            batch: args.batch,
            json: args.json,
            backend,
        };
        // Sharded runs decode on the CPU (one decoder shared by the device workers).
        let vae = vae.map(|v| VaeDecoder::new(v, model.config.input_size, args.threads)).transpose()?;
        return crate::shard::run(&args.shard, num_images, &spec, &model, &opts, vae);
    }
    let device = crate::shard::plain_device(&args.shard, backend)?;
    let vae = any_vae(vae, device)?;
    let mut engine = AnyEngine::new_on(Arc::clone(&model), &opts, backend, device)?;
    let steps = engine.steps();
    let ranks = opts.cache.factors().map_or_else(Vec::new, |f| f.ranks());
    let kinds: Vec<_> = (0..steps).map(|i| engine.step_kind(i)).collect();
    let (mean_macs, macs_ratio) = icdit::cost::schedule_macs(&cfg, kinds.iter().copied(), &ranks);
    let full_steps_taken =
        kinds.iter().filter(|k| matches!(k, icdit::forward::StepKind::Full | icdit::forward::StepKind::Plain)).count();

    let img = cfg.image_elems();
    // Everything the run will hold, before the request's buffers are allocated.
    // (The GPU backends' arena is on the device, checked against the card when it is made.)
    let mut need = match backend {
        Backend::Cpu => icdit::Engine::memory_need(&model, &opts)?,
        _ => icdit::limits::MemoryNeed::default(),
    };
    need.alloc(format!("samples ({} images)", classes.len()), icdit::limits::bytes_of(&[classes.len(), img], 4));
    if makes_images {
        let (ch, side) =
            vae.as_ref().map_or((cfg.in_channels, cfg.input_size), |d| (d.model().config.out_channels, d.out_side()));
        need.alloc(
            "decoded images (f32) and pixels (uint8)",
            icdit::limits::bytes_of(&[classes.len(), ch, side, side], 5),
        );
    }
    need.check("this sample run", opts.max_memory)?;
    engine.set_interrupt(Some(crate::interrupt::flag()));
    let mut samples = vec![0.0f32; classes.len() * img];
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new((steps * classes.len().div_ceil(batch)) as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} steps ({eta} left)")
                .expect("static template")
                .progress_chars("=> "),
        );
        b
    });
    let start = Instant::now();
    let mut step_ms = Vec::with_capacity(steps * classes.len().div_ceil(batch));
    for (chunk, labels) in classes.chunks(batch).enumerate() {
        let first = chunk * batch;
        let req = Request {
            classes: labels,
            seed: args.seed,
            first_index: first as u64,
            noise: noise.as_ref().map(|n| &n.0[first * img..(first + labels.len()) * img]),
            step_noise: noise.as_ref().and_then(|n| n.1.as_deref()),
        };
        let mut last = Instant::now();
        let out = &mut samples[first * img..(first + labels.len()) * img];
        engine
            .sample(&req, out, &mut |_step| {
                let now = Instant::now();
                step_ms.push((now - last).as_secs_f64() * 1e3);
                last = now;
                if let Some(b) = &bar {
                    b.inc(1);
                }
            })
            .map_err(|e| match e {
                Error::Interrupted { done } => {
                    if let Some(b) = &bar {
                        b.abandon();
                    }
                    Error::Interrupted {
                        done: format!(
                            "{first} of {} images were sampled and {done} when Ctrl-C was pressed; no output was written",
                            classes.len()
                        ),
                    }
                }
                e => e,
            })?;
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let secs = start.elapsed().as_secs_f64();

    let mut written = Vec::new();
    if let Some(path) = &args.out_latents {
        let shape = [classes.len(), cfg.in_channels, cfg.input_size, cfg.input_size];
        let meta = std::collections::HashMap::from([("icdit_seed".to_string(), args.seed.to_string())]);
        write_safetensors(
            path,
            &[("latents", &shape, &samples)],
            &[("labels", &[classes.len()], &classes)],
            Some(meta),
        )?;
        written.push(path.clone());
    }
    let mut decode_s = 0.0;
    if makes_images {
        let cols = if args.class.is_empty() && args.random_classes.is_none() && cfg.num_classes <= 32 {
            args.per_class
        } else {
            8
        };
        let (images, channels, side) = match vae {
            None => (samples, cfg.in_channels, cfg.input_size),
            Some(mut dec) => {
                let t = Instant::now();
                let images = decode_all(&mut dec, &samples, classes.len())?;
                decode_s = t.elapsed().as_secs_f64();
                (images, dec.model().config.out_channels, dec.out_side())
            }
        };
        written.extend(args.images.write(&images, &classes, Some(args.seed), channels, side, cols)?);
    }
    if written.is_empty() {
        eprintln!("note: nothing written; pass --out-latents FILE to keep the latents, or --vae DIR to decode them");
    }
    let decode_note = if decode_s > 0.0 { format!(", VAE decode {decode_s:.2} s") } else { String::new() };

    let mut sorted = step_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median_step = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let step_kinds =
        if args.json { step_kind_report(&mut engine, &cfg, &kinds, &step_ms, &ranks)? } else { Vec::new() };
    let paths: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    eprintln!(
        "sampled {} images ({} steps, {}, cfg {}, cache {}: {full_steps_taken} full steps, compute ratio {macs_ratio:.3}) in {:.2} s ({:.1} ms per step, {}{decode_note}); wrote {}",
        classes.len(),
        steps,
        sampler.name(),
        cfg_scale,
        args.cache.name(),
        secs,
        median_step,
        engine.describe(),
        if paths.is_empty() { "nothing".to_string() } else { paths.join(", ") }
    );
    if args.json {
        let report = serde_json::json!({
            "weights": weights.display().to_string(),
            "images": classes.len(),
            "classes": classes,
            "seed": args.seed,
            "sampler": sampler.name(),
            "respacing": opts.respacing,
            "steps": steps,
            "cfg_scale": cfg_scale,
            "guided_channels": if args.guide_all_channels { "all" } else { "official-3" },
            "cache": args.cache.name(),
            "full_steps": full_steps_taken,
            "mean_gmacs_per_step_per_image": mean_macs / 1e9,
            "compute_ratio": macs_ratio,
            "batch": batch,
            "threads": engine.threads(),
            "cpu_isa": engine.cpu_isa().map(|i| i.name()),
            "backend": backend.name(),
            "device": engine.describe(),
            "arena_bytes": engine.arena_bytes(),
            "total_s": secs,
            "vae_decode_s": decode_s,
            "median_step_ms": median_step,
            "step_ms": step_ms,
            "step_kinds": step_kinds,
            "outputs": paths,
        });
        outln!("{report}");
    }
    Ok(())
}

/// Per kind of step the run took: how many, the median time (host-timed as each step ran on
/// the CPU; on a GPU backend, where the host only issues steps, device-timed over replays of
/// the kind's recorded step after the run), the time ratio to the run's full (or plain) step and
/// icc's MAC ratio beside it, and on a GPU the kernel launches per step and per block.
fn step_kind_report(
    engine: &mut AnyEngine,
    cfg: &icdit::DitConfig,
    kinds: &[StepKind],
    step_ms: &[f64],
    ranks: &[[usize; 6]],
) -> Result<Vec<serde_json::Value>, Error> {
    let mut seen: Vec<StepKind> = Vec::new();
    for &k in kinds {
        if !seen.contains(&k) {
            seen.push(k);
        }
    }
    let mut timed: Vec<(StepKind, usize, f64, &str)> = Vec::new();
    for &kind in &seen {
        let count = kinds.iter().filter(|&&k| k == kind).count();
        let (ms, how) = match engine.device_step_ms(kind, count.min(8))? {
            Some(ms) => (ms as f64, "device events"),
            None => {
                // Step i of every request chunk is kinds[i mod steps].
                let mut v: Vec<f64> = step_ms
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| kinds[i % kinds.len()] == kind)
                    .map(|(_, &t)| t)
                    .collect();
                v.sort_by(f64::total_cmp);
                (v.get(v.len() / 2).copied().unwrap_or(f64::NAN), "host")
            }
        };
        timed.push((kind, count, ms, how));
    }
    let full_ms = timed.iter().find(|t| matches!(t.0, StepKind::Full | StepKind::Plain)).map(|t| t.2);
    let plain_macs = icdit::cost::step_macs(cfg, StepKind::Plain, ranks) as f64;
    Ok(timed
        .iter()
        .map(|&(kind, count, ms, how)| {
            let launches = engine.step_launches(kind);
            serde_json::json!({
                "kind": kind.name(),
                "steps": count,
                "median_ms": ms,
                "timing": how,
                "time_ratio": full_ms.map(|f| ms / f),
                "mac_ratio": icdit::cost::step_macs(cfg, kind, ranks) as f64 / plain_macs,
                "launches_per_step": launches.map(|l| l.step),
                "launches_per_block": launches.map(|l| l.block),
            })
        })
        .collect())
}

/// The bundled model (see [`icdit::session::default_weights`]).
pub fn default_weights() -> PathBuf {
    icdit::session::default_weights()
}

fn choose_classes(args: &SampleArgs, model: &DitModel) -> Result<Vec<i64>, Error> {
    let n = model.config.num_classes;
    if !args.class.is_empty() {
        return Ok(args.class.clone());
    }
    if let Some(count) = args.random_classes {
        if count == 0 || count > 1 << 24 {
            return Err(Error::invalid("--random-classes", format!("{count}: must be 1 to 2^24 images per run")));
        }
        return Ok(icdit::noise::class_labels(args.seed, 0, count, n));
    }
    if args.per_class == 0 {
        return Err(Error::invalid("--per-class", "must be at least 1"));
    }
    if n <= 32 {
        Ok((0..n as i64).flat_map(|c| std::iter::repeat_n(c, args.per_class)).collect())
    } else {
        Ok(SAMPLE_PY_CLASSES.iter().copied().filter(|&c| (c as usize) < n).collect())
    }
}

/// z (and optionally the per-step noise) from a safetensors file, checked against the request.
fn read_noise(path: &Path, n: usize, cfg: &icdit::DitConfig) -> Result<(Vec<f32>, Option<Vec<f32>>), Error> {
    let noise = icdit::inputs::read_noise(path, n, cfg)?;
    Ok((noise.z, noise.step_noise))
}

/// Decodes `n` latents into (C, H, W) images, as many a call as the decoder takes,
/// stopping cleanly on Ctrl-C.
pub fn decode_all(dec: &mut AnyVae, latents: &[f32], n: usize) -> Result<Vec<f32>, Error> {
    let (ll, il, per) = (dec.latent_len(), dec.image_len(), dec.batch().max(1));
    let mut images = vec![0.0f32; n * il];
    for i in (0..n).step_by(per) {
        if crate::interrupt::requested() {
            return Err(Error::Interrupted {
                done: format!(
                    "all latents were sampled and {i} of {n} decoded when Ctrl-C was pressed; no output was written"
                ),
            });
        }
        let k = per.min(n - i);
        dec.decode(&latents[i * ll..(i + k) * ll], &mut images[i * il..(i + k) * il])?;
    }
    Ok(images)
}

/// `--compare`: one grid row per cache policy, each the same request (classes, seed, noise).
fn compare(
    args: &SampleArgs,
    model: &Arc<DitModel>,
    opts: &EngineOptions,
    classes: &[i64],
    vae: Option<AnyVae>,
) -> Result<(), Error> {
    let cfg = model.config;
    if args.noise.is_some() || args.out_latents.is_some() {
        return Err(Error::invalid("--compare", "cannot be combined with --noise or --out-latents"));
    }
    if model.space != SampleSpace::Pixel && vae.is_none() {
        return Err(Error::invalid("--compare", "writes images: this latent model needs --vae DIR"));
    }
    let start = Instant::now();
    let mut rows: Vec<(CachePolicy, Vec<f32>, f64)> = Vec::new();
    for &policy in &args.compare {
        let forecast = Forecast { order: args.taylor_order, warmup: args.taylor_warmup };
        let cache = match (policy, &args.factors) {
            (CachePolicy::Icc, None) => {
                return Err(Error::invalid("--compare icc", "needs --factors FILE (see `icdit calibrate`)"))
            }
            (CachePolicy::Icc, f) => icdit::session::cache_mode(policy, f.as_deref(), forecast, model)?,
            (_, _) => icdit::session::cache_mode(policy, None, forecast, model)?,
        };
        let o = EngineOptions { cache, ..opts.clone() };
        let (samples, ratio) = icdit::quality::sample_set_on(model, &o, classes, args.seed, args.backend.parse()?)?;
        rows.push((policy, samples, ratio));
    }
    let reference = rows.iter().find(|r| r.0 == CachePolicy::None).map(|r| r.1.clone());
    let mut summary = Vec::new();
    for (policy, samples, ratio) in &rows {
        let (l2, psnr) = match &reference {
            Some(r) if *policy != CachePolicy::None => {
                (icdit::quality::rel_l2(samples, r), icdit::quality::psnr(samples, r))
            }
            _ => (0.0, f64::INFINITY),
        };
        let name = policy.name();
        eprintln!("{name:>6}: compute ratio {ratio:.3}, relative L2 to `none` {l2:.4}, PSNR {psnr:.2} dB");
        summary.push(serde_json::json!({"policy": name, "compute_ratio": ratio, "rel_l2_to_none": l2,
            "psnr_db_to_none": if psnr.is_finite() { serde_json::json!(psnr) } else { serde_json::Value::Null }}));
    }
    // Images: all of row 0, then row 1, … so the grid has one row per policy.
    let all: Vec<f32> = rows.iter().flat_map(|r| r.1.iter().copied()).collect();
    let n = classes.len() * rows.len();
    let (images, channels, side) = match vae {
        None => (all, cfg.in_channels, cfg.input_size),
        Some(mut dec) => {
            let images = decode_all(&mut dec, &all, n)?;
            (images, dec.model().config.out_channels, dec.out_side())
        }
    };
    let mut out = ImageOut { grid: args.images.grid.clone(), grid_cols: Some(classes.len()), ..Default::default() };
    out.rounding = args.images.rounding.clone();
    if out.grid.is_none() {
        out.grid = Some(PathBuf::from("samples/compare.png"));
    }
    out.prepare()?;
    let labels: Vec<i64> = rows.iter().flat_map(|_| classes.iter().copied()).collect();
    let written = out.write(&images, &labels, Some(args.seed), channels, side, classes.len())?;
    eprintln!(
        "compared {} policies on {} images in {:.2} s; wrote {} (rows: {})",
        rows.len(),
        classes.len(),
        start.elapsed().as_secs_f64(),
        written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        args.compare.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
    );
    if args.json {
        outln!("{}", serde_json::json!({"policies": summary, "images": classes.len(), "steps": opts.respacing}));
    }
    Ok(())
}

/// `icdit sample` on a PixArt-α pipeline folder (src/bin/icdit/pixart.rs); the class-label
/// and DiT-only flags are refused.
fn pixart_sample(weights: &Path, args: &mut SampleArgs) -> Result<(), Error> {
    let dit_only = [
        ("--class", !args.class.is_empty()),
        ("--random-classes", args.random_classes.is_some()),
        ("--respacing", args.respacing.is_some()),
        ("--num-images", args.shard.num_images.is_some()),
        ("--guide-all-channels", args.guide_all_channels),
        ("--eta", args.eta != 0.0),
    ];
    if let Some((flag, _)) = dit_only.iter().find(|(_, given)| *given) {
        return Err(Error::invalid("flags", format!("{flag} is for class-conditional DiT models, not PixArt-α")));
    }
    let not_yet = [
        ("--icc-form", args.icc_form != IccForm::Auto),
        ("--json", args.json),
        ("--max-memory", args.max_memory.is_some()),
        ("--no-finite-check", args.no_finite_check),
    ];
    if let Some((flag, _)) = not_yet.iter().find(|(_, given)| *given) {
        return Err(Error::invalid("flags", format!("{flag} is not supported for PixArt-α yet (docs/pixart.md)")));
    }
    crate::pixart::sample(crate::pixart::SampleFlags {
        weights,
        prompt_embeds: args.prompt_embeds.as_deref(),
        negative_embeds: args.negative_embeds.as_deref(),
        prompts: &args.prompt,
        negative_prompt: args.negative_prompt.as_deref(),
        max_sequence_length: args.max_sequence_length,
        steps: args.steps,
        sampler: args.sampler.as_deref(),
        cfg: args.cfg,
        seed: args.seed,
        noise: args.noise.as_deref(),
        cache: args.cache,
        compare: &args.compare,
        period: args.period,
        full_steps: &args.full_steps,
        factors: args.factors.as_deref(),
        out_latents: args.out_latents.as_deref(),
        images: &mut args.images,
        vae: args.vae.as_deref(),
        threads: args.threads,
        backend: &args.backend,
        height: args.height,
        width: args.width,
        resolution_binning: !args.no_resolution_binning,
    })
}
