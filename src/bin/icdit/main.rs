//! The `icdit` command: a thin layer over the library that parses flags, calls it, and
//! writes files.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};

/// Writes a line to stdout; a closed pipe (`icdit … | head`) is not an error worth a panic.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

mod bench_gemm;
mod bench_gpu;
mod calibrate;
mod decode;
mod encode;
mod interrupt;
mod merge;
mod model_args;
mod output;
mod pixart;
mod plot;
mod report;
mod report_pixart;
mod sample;
mod shard;
use icdit::forward::StepKind;
use icdit::inspect::Report;
use icdit::tensorfile::write_safetensors;
use icdit::vae::{VaeConfig, VaeModel};
use icdit::{CacheMode, CpuEngine, CpuOptions, DitModel, Error};
use model_args::ModelArgs;

#[derive(Parser)]
#[command(name = "icdit", version, about = "DiT inference with increment-calibrated caching")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what a checkpoint is: layout, config, dtypes, sizes, planned memory.
    Inspect(InspectArgs),
    /// One model evaluation on given inputs, for cross-checking other implementations.
    Forward(ForwardArgs),
    /// Times repeated forward passes or cached steps (random weights of a DiT family, or a checkpoint).
    BenchForward(BenchArgs),
    /// Times the GPU pipeline: every step kind and 50-step sampling under each cache policy,
    /// on DiT-shaped random weights (`--backend emu` runs it on the CPU emulation).
    BenchGpu(bench_gpu::BenchGpuArgs),
    /// Times the fused GEMM on DiT-XL/2's linear-layer shapes under each launch the kernel
    /// offers (tile sizes, split-k), beside the launcher's own choice.
    BenchGemm(bench_gemm::BenchGemmArgs),
    /// Times VAE decodes (the SD-VAE architecture with random weights, or a VAE folder).
    BenchVae(BenchVaeArgs),
    /// Sample images (or latents) from a DiT; with no arguments, from the bundled model.
    Sample(Box<sample::SampleArgs>),
    /// Compute rank-r factors (SVD or channel-aware SVD) for increment-calibrated caching.
    Calibrate(calibrate::CalibrateArgs),
    /// Decode latents (from `sample --out-latents`) to images with a VAE.
    Decode(decode::DecodeArgs),
    /// Measure what caching costs and saves: every policy (reuse, icc with SVD / CA-SVD
    /// factors, fora, taylor) at several periods, ranks and orders against full compute —
    /// quality, MAC ratio and wall-clock ratio; optionally the quality–time frontier as a PNG.
    CacheReport(report::ReportArgs),
    /// Join the shards of a `sample --num-images` run into one FID `.npz` (uint8 NHWC `arr_0`).
    Merge(merge::MergeArgs),
    /// Encode prompts with a PixArt-α pipeline's T5 tokenizer and encoder (CPU) into
    /// `input_ids`, `attention_mask` and `prompt_embeds`.
    Encode(encode::EncodeArgs),
}

#[derive(Args)]
struct InspectArgs {
    /// An official-layout .safetensors file or a diffusers folder.
    path: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Images per request to plan the arena for.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Plan for classifier-free guidance (twice the model rows).
    #[arg(long)]
    cfg: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also print the arena plan buffer by buffer.
    #[arg(long)]
    plan: bool,
}

#[derive(Args)]
struct ForwardArgs {
    /// Weights: an official-layout .safetensors file or a diffusers folder.
    #[arg(long)]
    weights: PathBuf,
    /// safetensors with `x` f32 [B, C, H, W], `t` i64 [B] (original timesteps), `y` i64 [B];
    /// for a PixArt-α pipeline folder `encoder_hidden_states` f32 [B, L, D] and
    /// `encoder_attention_mask` i64 [B, L] instead of `y` (any H, W that are multiples of the
    /// patch size), and for the 1024-MS model also `resolution` f32 [B, 2] (height, width in
    /// pixels) and `aspect_ratio` f32 [B, 1].
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors with `out` f32 [B, Cout, H, W].
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Where a PixArt-α pass runs: `cpu`, `cuda` (a build with `--features cuda`) or `emu`
    /// (the GPU pipeline on the CPU emulation). DiT models: cpu only.
    #[arg(long, default_value = "cpu")]
    backend: String,
}

#[derive(Args)]
struct BenchArgs {
    /// A DiT family member with seeded random weights (XL/2, L/2, B/2, S/2, ...).
    #[arg(long, default_value = "XL/2", conflicts_with = "weights")]
    family: String,
    /// Image size in pixels for --family (latent side = size / 8).
    #[arg(long, default_value_t = 256)]
    image_size: usize,
    /// Benchmark a checkpoint instead of random weights.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Model rows per forward (2 = one image with guidance).
    #[arg(long, default_value_t = 2)]
    rows: usize,
    /// CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Timed passes (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Untimed passes first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Step kind: `plain` (no caches), `full` (refreshes the caches), `calibrated`
    /// (increment-calibrated, random factors of --rank), `reuse` (naive caching), or fora's and
    /// taylor's `branch-full`, `taylor-full` and `forecast` (order 2, three terms).
    #[arg(long, value_enum, default_value_t = StepKind::Plain)]
    step: StepKind,
    /// Factor rank for `--step calibrated`.
    #[arg(long, default_value_t = 128)]
    rank: usize,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Args)]
struct BenchVaeArgs {
    /// VAE folder; default: the SD-VAE architecture with seeded random weights.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// Latent side (32 → 256×256 images).
    #[arg(long, default_value_t = 32)]
    latent: usize,
    /// CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Timed decodes (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Untimed decodes first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// `cpu`, `cuda` (the GPU decoder; a `--features cuda` build) or `emu`.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Latents per decode call (GPU backends: batch decoding for throughput).
    #[arg(long, default_value_t = 1)]
    batch: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    interrupt::install();
    let result = match cli.command {
        Command::Inspect(args) => inspect(args),
        Command::Forward(args) => forward(args),
        Command::BenchForward(args) => bench_forward(args),
        Command::BenchVae(args) => bench_vae(args),
        Command::BenchGpu(args) => bench_gpu::run(args),
        Command::BenchGemm(args) => bench_gemm::run(args),
        Command::Sample(args) => sample::run(*args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Decode(args) => decode::run(args),
        Command::CacheReport(args) => report::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Encode(args) => encode::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn inspect(args: InspectArgs) -> Result<(), Error> {
    if icdit::pixart::is_pipeline(&args.path) {
        return pixart::inspect(&args.path, args.json);
    }
    let model = args.model.load(&args.path)?;
    let opts = CpuOptions { max_batch: args.batch, guidance: args.cfg, threads: 0, ..Default::default() };
    let report = Report::new(&model, &opts);
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report).expect("report serialises"));
    } else {
        outln!("{report}");
        if args.plan {
            outln!("{}", icdit::cpu::plan_for(&model, &opts));
        }
    }
    Ok(())
}

fn forward(args: ForwardArgs) -> Result<(), Error> {
    if icdit::pixart::is_pipeline(&args.weights) {
        return pixart::forward(&args.weights, &args.input, &args.out, args.threads, args.backend.parse()?);
    }
    if args.backend != "cpu" {
        return Err(Error::invalid(
            "--backend",
            format!(
                "`{}`: `forward` runs DiT models on the CPU backend only (GPU backends: PixArt-α folders)",
                args.backend
            ),
        ));
    }
    let model = Arc::new(args.model.load(&args.weights)?);
    let cfg = model.config;
    let input = icdit::inputs::read_forward_input(&args.input, &cfg)?;
    let (b, x, t, y) = (input.batch, input.x, input.t, input.y);
    let mut engine = CpuEngine::new(
        Arc::clone(&model),
        &CpuOptions { max_batch: b, guidance: false, threads: args.threads, ..Default::default() },
    )?;
    let mut out = vec![0.0f32; b * cfg.output_elems()];
    let start = Instant::now();
    engine.forward(&x, &t, &y, &mut out)?;
    let secs = start.elapsed().as_secs_f64();
    let shape = [b, cfg.out_channels(), cfg.input_size, cfg.input_size];
    write_safetensors(&args.out, &[("out", &shape, &out)], &[], None)?;
    eprintln!(
        "forward: batch {b} in {:.1} ms on {} threads ({} GEMM kernel); wrote {}",
        secs * 1e3,
        engine.threads(),
        engine.gemm_kernel(),
        args.out.display()
    );
    Ok(())
}

fn bench_vae(args: BenchVaeArgs) -> Result<(), Error> {
    let model = Arc::new(match &args.vae {
        Some(p) => VaeModel::load(p)?,
        None => VaeModel::random(&VaeConfig::sd(), 1)?,
    });
    let cfg = model.config.clone();
    let backend: icdit::backend::Backend = args.backend.parse()?;
    if args.batch == 0 || (backend == icdit::backend::Backend::Cpu && args.batch != 1) {
        return Err(Error::invalid("--batch", "1 on the CPU; 1 or more on a GPU backend"));
    }
    let mut dec = icdit::backend::AnyVae::new(Arc::clone(&model), args.latent, args.threads, args.batch, backend)?;
    let lat: Vec<f32> =
        (0..args.batch * dec.latent_len()).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.8).collect();
    let mut img = vec![0.0f32; args.batch * dec.image_len()];
    for _ in 0..args.warmup {
        dec.decode(&lat, &mut img)?;
    }
    let mut ms = Vec::with_capacity(args.runs);
    for _ in 0..args.runs.max(1) {
        let start = Instant::now();
        dec.decode(&lat, &mut img)?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let macs = cfg.macs(args.latent) as f64 * args.batch as f64;
    outln!(
        "{}",
        serde_json::json!({
            "impl": format!("icdit-{}-vae", backend.name()),
            "batch": args.batch,
            "ms_per_image": median / args.batch as f64,
            "model": model.source.display().to_string(),
            "latent": args.latent,
            "out_side": dec.out_side(),
            "threads": args.threads,
            "cpu_isa": dec.cpu_isa().map(|i| i.name()),
            "hopper_kernels": dec.hopper_kernels(),
            "gmacs": macs / 1e9,
            "median_ms": median,
            "min_ms": sorted[0],
            "runs_ms": ms,
            "gmacs_per_s": macs / (median * 1e-3) / 1e9,
        })
    );
    Ok(())
}

fn bench_forward(args: BenchArgs) -> Result<(), Error> {
    let model = match &args.weights {
        Some(p) => args.model.load(p)?,
        None => {
            let cfg = icdit::DitConfig::family(&args.family, args.image_size / 8).ok_or_else(|| Error::Invalid {
                what: "family",
                reason: format!("`{}`: expected XL/2, XL/4, XL/8, L/2, …, S/8", args.family),
            })?;
            DitModel::random(&cfg, 0)?
        }
    };
    let model = Arc::new(model);
    let cfg = model.config;
    let rows = args.rows.max(1);
    let kind = args.step;
    let cache = match kind {
        StepKind::Plain => CacheMode::None,
        StepKind::Calibrated => CacheMode::Icc(Arc::new(icdit::Factors::random(&model, args.rank, 1)?)),
        StepKind::BranchFull => CacheMode::Fora,
        StepKind::TaylorFull | StepKind::Forecast => CacheMode::Taylor(icdit::Forecast { order: 2, warmup: 0 }),
        StepKind::Full | StepKind::Reuse => CacheMode::Reuse,
    };
    let fill = cache.full_kind();
    let ranks = cache.factors().map_or_else(Vec::new, |f| f.ranks());
    let mut engine = CpuEngine::new(
        Arc::clone(&model),
        &CpuOptions { max_batch: rows, guidance: false, threads: args.threads, cache, isa: None },
    )?;
    let x: Vec<f32> = (0..rows * cfg.image_elems()).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    let t: Vec<i64> = (0..rows).map(|r| (500 + r as i64) % 1000).collect();
    let y: Vec<i64> = (0..rows).map(|r| (r % cfg.label_rows()) as i64).collect();
    let mut out = vec![0.0f32; rows * cfg.output_elems()];
    if kind != StepKind::Plain {
        engine.forward_step(&x, &t, &y, &mut out, fill)?; // fills the caches
    }
    // Taylor steps as in a sampling run with a full history: order 2, Δ = 1, k = 1.
    engine.set_forecast_step(icdit::policy::ForecastStep { orders: 2, delta: 1.0, weights: [1.0, 1.0, 0.5] });
    for _ in 0..args.warmup {
        engine.forward_step(&x, &t, &y, &mut out, kind)?;
    }
    let mut ms = Vec::with_capacity(args.runs);
    for _ in 0..args.runs.max(1) {
        let start = Instant::now();
        engine.forward_step(&x, &t, &y, &mut out, kind)?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let macs = icdit::cost::step_macs(&cfg, kind, &ranks);
    let gflops = 2.0 * macs as f64 * rows as f64 / (median * 1e-3) / 1e9;
    outln!(
        "{}",
        serde_json::json!({
            "impl": "icdit-cpu",
            "model": model.source.display().to_string(),
            "step": kind.name(),
            "rank": if kind == StepKind::Calibrated { Some(args.rank) } else { None },
            "gmacs_per_row": macs as f64 / 1e9,
            "rows": rows,
            "threads": engine.threads(),
            "gemm_kernel": engine.gemm_kernel(),
            "median_ms": median,
            "min_ms": sorted[0],
            "runs_ms": ms,
            "gflops": gflops,
        })
    );
    Ok(())
}
