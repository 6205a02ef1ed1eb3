//! The `icdit` command: a thin layer over the library that parses flags, calls it, and
//! writes files.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use icdit::inspect::Report;
use icdit::tensorfile::{write_safetensors, TensorFile};
use icdit::{CpuEngine, CpuOptions, DitModel, Error, LoadOptions, Numerics};

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
}

/// Flags shared by every command that loads weights.
#[derive(Args)]
struct ModelArgs {
    /// Attention heads, when neither the file nor the DiT family table tells.
    #[arg(long)]
    num_heads: Option<usize>,
    /// Arithmetic to follow: `official` (default) or `diffusers` (for models trained with diffusers).
    #[arg(long, default_value = "official")]
    numerics: Numerics,
}

impl ModelArgs {
    fn load(&self, path: &std::path::Path) -> Result<DitModel, Error> {
        DitModel::load(
            path,
            &LoadOptions {
                num_heads: self.num_heads,
                numerics: self.numerics,
            },
        )
    }
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
    /// safetensors with `x` f32 [B, C, H, W], `t` i64 [B] (original timesteps), `y` i64 [B].
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => inspect(a),
        Command::Forward(a) => forward(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn inspect(a: InspectArgs) -> Result<(), Error> {
    let model = a.model.load(&a.path)?;
    let opts = CpuOptions {
        max_batch: a.batch,
        guidance: a.cfg,
        threads: 0,
    };
    let report = Report::new(&model, &opts);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("report serialises"));
    } else {
        println!("{report}");
        if a.plan {
            print!("{}", icdit::cpu::plan_for(&model, &opts));
        }
    }
    Ok(())
}

fn forward(a: ForwardArgs) -> Result<(), Error> {
    let model = Arc::new(a.model.load(&a.weights)?);
    let cfg = model.config;
    let input = TensorFile::open(&a.input)?;
    let (xs, x) = input.read_f32("x")?;
    let (ts, t) = input.read_i64("t")?;
    let (ys, y) = input.read_i64("y")?;
    let b = ts.first().copied().unwrap_or(0);
    let want_x = [b, cfg.in_channels, cfg.input_size, cfg.input_size];
    for (name, found, expected) in [("x", &xs, &want_x[..]), ("t", &ts, &[b][..]), ("y", &ys, &[b][..])] {
        if found.as_slice() != expected || b == 0 {
            return Err(Error::Shape {
                path: a.input.clone(),
                tensor: name.into(),
                expected: expected.to_vec(),
                found: found.clone(),
            });
        }
    }
    let mut engine = CpuEngine::new(
        Arc::clone(&model),
        &CpuOptions {
            max_batch: b,
            guidance: false,
            threads: a.threads,
        },
    )?;
    let mut out = vec![0.0f32; b * cfg.output_elems()];
    let start = Instant::now();
    engine.forward(&x, &t, &y, &mut out)?;
    let secs = start.elapsed().as_secs_f64();
    let shape = [b, cfg.out_channels(), cfg.input_size, cfg.input_size];
    write_safetensors(&a.out, &[("out", &shape, &out)], &[], None)?;
    eprintln!(
        "forward: batch {b} in {:.1} ms on {} threads ({} GEMM kernel); wrote {}",
        secs * 1e3,
        engine.threads(),
        engine.gemm_kernel(),
        a.out.display()
    );
    Ok(())
}
