//! `icdit calibrate`: rank-r factors for increment-calibrated caching.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use icdit::calibrate::{self, CalibSet, Method};
use icdit::Error;

use crate::model_args::ModelArgs;

#[derive(Args)]
pub struct CalibrateArgs {
    /// Weights (official .safetensors or diffusers folder); default: the bundled model.
    #[arg(long)]
    weights: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// `svd`, `ca-svd` (channel-aware) or `cd-svd` (change-aware); the last two need
    /// calibration data.
    #[arg(long, default_value = "ca-svd")]
    method: String,
    /// Rank of every factorised layer.
    #[arg(long, default_value_t = 128)]
    rank: usize,
    /// Per-type ranks overriding --rank.
    #[arg(long)]
    rank_qkv: Option<usize>,
    #[arg(long)]
    rank_proj: Option<usize>,
    #[arg(long)]
    rank_fc1: Option<usize>,
    #[arg(long)]
    rank_fc2: Option<usize>,
    /// Output factor file.
    #[arg(long)]
    out: PathBuf,
    /// Calibration data: safetensors with `latents` f32 [M, C, H, W] and `labels` i64 [M],
    /// optionally `timesteps` i64 [M] (original timesteps) and `noise` f32 [M, C, H, W].
    #[arg(long, conflicts_with = "calib_self")]
    calib_latents: Option<PathBuf>,
    /// Calibrate on N samples the model draws itself (full compute), noised as icc does.
    #[arg(long)]
    calib_self: Option<usize>,
    /// PixArt-α, `--method ca-svd`: the calibration prompts' embeddings (`prompt_embeds`,
    /// `attention_mask`, as `icdit encode` writes them); the model samples each itself.
    #[arg(long, conflicts_with = "calib_prompts")]
    calib_embeds: Option<PathBuf>,
    /// PixArt-α, `--method ca-svd`: a text file of calibration prompts, one a line (blank
    /// lines skipped), encoded with the folder's text encoder (120 tokens); the model samples
    /// each itself, guided at 4.5 by the negative prompt "" (or --negative-embeds).
    #[arg(long)]
    calib_prompts: Option<PathBuf>,
    /// PixArt-α: the negative prompt's embeddings (1 row); calibration samples are then
    /// guided at 4.5 (with --calib-embeds and without it: unguided).
    #[arg(long)]
    negative_embeds: Option<PathBuf>,
    /// Samples per statistics forward (icc: 16).
    #[arg(long, default_value_t = 16)]
    calib_batch: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn bar(len: usize, what: &str) -> Option<indicatif::ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(len as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{what} {{elapsed_precise}} [{{bar:40}}] {{pos}}/{{len}}"
            ))
            .expect("static template")
            .progress_chars("=> "),
        );
        b
    })
}

pub fn run(args: CalibrateArgs) -> Result<(), Error> {
    if let Some(dir) = args.weights.as_deref().filter(|w| icdit::pixart::is_pipeline(w)) {
        return pixart(dir, &args);
    }
    let weights = args.weights.clone().unwrap_or_else(crate::sample::default_weights);
    let model = Arc::new(args.model.load(&weights)?);
    let method = match args.method.as_str() {
        "svd" => Method::Svd,
        "ca-svd" => Method::CaSvd,
        "cd-svd" => Method::CdSvd,
        other => return Err(Error::invalid("method", format!("`{other}`: expected svd, ca-svd or cd-svd"))),
    };
    let ranks = [
        args.rank_qkv.unwrap_or(args.rank),
        args.rank_qkv.unwrap_or(args.rank),
        args.rank_qkv.unwrap_or(args.rank),
        args.rank_proj.unwrap_or(args.rank),
        args.rank_fc1.unwrap_or(args.rank),
        args.rank_fc2.unwrap_or(args.rank),
    ];
    let threads =
        if args.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { args.threads };
    let start = Instant::now();
    let mut settings = serde_json::json!({ "method": args.method, "seed": args.seed });

    let vectors = if method != Method::Svd {
        let set = match (&args.calib_latents, args.calib_self) {
            (Some(p), _) => {
                settings["calib_latents"] = p.display().to_string().into();
                CalibSet::load(p, &model, args.seed, method)?
            }
            (None, Some(n)) => {
                settings["calib_self"] = n.into();
                let b = bar(n.div_ceil(16), "self-sampling");
                let set = calibrate::self_calibration_set(&model, n, args.seed, threads, method, &mut |_| {
                    if let Some(b) = &b {
                        b.inc(1);
                    }
                })?;
                if let Some(b) = b {
                    b.finish_and_clear();
                }
                set
            }
            (None, None) => {
                return Err(Error::invalid(
                    "calibration data",
                    "ca-svd and cd-svd need --calib-latents FILE or --calib-self N",
                ))
            }
        };
        settings["calib_samples"] = set.len().into();
        settings["calib_batch"] = args.calib_batch.into();
        let b = bar(set.len() / args.calib_batch.max(1), "statistics");
        let stats = calibrate::collect_stats(&model, &set, args.calib_batch, args.threads, method, &mut |d, _| {
            if let Some(b) = &b {
                b.set_position(d as u64);
            }
        })?;
        if let Some(b) = b {
            b.finish_and_clear();
        }
        Some(calibrate::weight_vectors(&stats, model.config.hidden_size))
    } else {
        None
    };
    let stats_s = start.elapsed().as_secs_f64();
    let b = bar(6 * model.config.depth, "factorising");
    let (layers, report) = calibrate::compute_factors(&model, ranks, vectors.as_deref(), threads, &|d, _| {
        if let Some(b) = &b {
            b.set_position(d as u64);
        }
    })?;
    if let Some(b) = b {
        b.finish_and_clear();
    }
    let factors = calibrate::build_factors(&model, method, ranks, layers, &report, settings)?;
    factors.save(&args.out)?;
    let secs = start.elapsed().as_secs_f64();

    if args.json {
        outln!(
            "{}",
            serde_json::json!({ "out": args.out.display().to_string(), "seconds": secs, "statistics_seconds": stats_s, "info": factors.info })
        );
    } else {
        outln!("{:>5} {:>5} {:>5} {:>8} {:>10} {:>10}", "block", "layer", "rank", "energy", "rel_err", "weighted");
        for r in &report {
            outln!(
                "{:>5} {:>5} {:>5} {:>8.4} {:>10.4e} {:>10.4e}",
                r.block,
                r.layer.name(),
                r.rank,
                r.energy,
                r.rel_error,
                r.rel_error_weighted
            );
        }
    }
    eprintln!(
        "calibrated {} factors ({}, ranks q/k/v {} proj {} fc1 {} fc2 {}) in {secs:.1} s ({stats_s:.1} s statistics); wrote {}",
        6 * model.config.depth,
        args.method,
        ranks[0],
        ranks[3],
        ranks[4],
        ranks[5],
        args.out.display()
    );
    Ok(())
}

/// The calibration prompts of `--calib-prompts` (one a line, blank lines skipped) and the
/// negative prompt "", encoded with the pipeline's text encoder, which is closed again before
/// sampling (its weights unmapped).
fn encode_calib_prompts(
    dir: &std::path::Path,
    file: &std::path::Path,
    threads: usize,
) -> Result<(icdit::pixart::Embeddings, icdit::pixart::Embeddings), Error> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::Io { path: file.to_path_buf(), source: e })?;
    let prompts: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if prompts.is_empty() {
        return Err(Error::invalid("--calib-prompts", format!("{} holds no prompts (one a line)", file.display())));
    }
    let enc = icdit::text::TextEncoder::open(dir, &icdit::text::TextOptions { threads, isa: None })?;
    let len = icdit::text::DEFAULT_MAX_LEN;
    let as_embeddings =
        |e: icdit::text::Embeddings| icdit::pixart::Embeddings::new(e.embeds, e.mask, e.batch, e.len, e.dim);
    Ok((as_embeddings(enc.encode(&prompts, len)?)?, as_embeddings(enc.encode(&[""], len)?)?))
}

/// `icdit calibrate` on a PixArt-α pipeline folder: plain SVD of the weights, or CA-SVD
/// calibrated on prompts (`--calib-prompts`, encoded here) or their embeddings
/// (`--calib-embeds`) that the model samples itself.
fn pixart(dir: &std::path::Path, args: &CalibrateArgs) -> Result<(), Error> {
    if args.calib_latents.is_some() || args.calib_self.is_some() {
        return Err(Error::invalid(
            "calibration data",
            "PixArt-α calibrates on prompts: --calib-prompts FILE or --calib-embeds FILE (with --method ca-svd), not \
             --calib-latents/--calib-self",
        ));
    }
    let model = Arc::new(icdit::pixart::PixArtModel::load(dir)?);
    let start = Instant::now();
    let calib = match (&args.calib_prompts, &args.calib_embeds) {
        (Some(file), _) => {
            let (prompts, empty) = encode_calib_prompts(dir, file, args.threads)?;
            let negative = match &args.negative_embeds {
                Some(p) => icdit::pixart::Embeddings::load(p)?,
                None => empty,
            };
            Some((prompts, Some(negative)))
        }
        (None, Some(p)) => Some((
            icdit::pixart::Embeddings::load(p)?,
            args.negative_embeds.as_deref().map(icdit::pixart::Embeddings::load).transpose()?,
        )),
        (None, None) => None,
    };
    let report = match (args.method.as_str(), calib) {
        ("svd", None) => icdit::pixart::factors::calibrate_svd(&model, args.rank, &args.out)?,
        ("svd", Some(_)) => {
            return Err(Error::invalid("--calib-prompts/--calib-embeds", "only used with --method ca-svd"))
        }
        ("ca-svd", Some((prompts, negative))) => {
            let b = bar(2 * prompts.rows.div_ceil(8), "sampling, statistics");
            let report = icdit::pixart::calibrate::calibrate_ca_svd(
                &model,
                &prompts,
                negative.as_ref(),
                20,
                args.rank,
                args.seed,
                args.threads,
                &args.out,
                &mut |d, _| {
                    if let Some(b) = &b {
                        b.set_position(d as u64);
                    }
                },
            )?;
            if let Some(b) = b {
                b.finish_and_clear();
            }
            report
        }
        ("ca-svd", None) => {
            return Err(Error::invalid(
                "calibration data",
                "ca-svd on PixArt-α needs --calib-prompts FILE (prompts, one a line) or --calib-embeds FILE (their \
                 embeddings)",
            ))
        }
        (other, _) => return Err(Error::invalid("method", format!("`{other}` on PixArt-α: expected svd or ca-svd"))),
    };
    if args.json {
        let v = serde_json::json!({ "method": args.method, "rank": args.rank, "layers": report });
        outln!("{}", serde_json::to_string_pretty(&v).expect("report serialises"));
    } else {
        for l in &report {
            outln!("{:<40} rank {:>4}  energy kept {:.4}  rel. error {:.4}", l.name, l.rank, l.energy, l.rel_error);
        }
    }
    eprintln!(
        "calibrate (PixArt-α, {}): {} layers in {:.2} s; wrote {}",
        args.method,
        report.len(),
        start.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
