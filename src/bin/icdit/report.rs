//! `icdit cache-report`: what each caching policy costs in sample quality and what it saves in
//! compute and time on a model. Samples a fixed request at full compute, then under every
//! asked policy and setting (periods; icc's factor methods and ranks; taylor's orders), and
//! reports each one's error against the full-compute samples (relative L2, PSNR), its MAC
//! ratio (src/cost.rs) and its wall-clock ratio (sampling time against the full-compute run,
//! measured in the same run on the same backend); Markdown, JSON and a frontier plot.
//! The measuring and writing ([`Reference`], [`write_report`]) serve both model families; this
//! file holds DiT's settings, report_pixart.rs PixArt-α's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use icdit::backend::Backend;
use icdit::calibrate::{self, Method};
use icdit::engine::EngineOptions;
use icdit::quality::{psnr, rel_l2, sample_set_timed, SampleSet};
use icdit::{CacheMode, CachePolicy, Error, Forecast, FullSteps};

use crate::model_args::ModelArgs;

#[derive(Args)]
pub struct ReportArgs {
    /// Weights (official .safetensors or diffusers folder); default: the bundled model.
    #[arg(long)]
    pub(crate) weights: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Policies to compare: `none` (full compute, the reference; always sampled), `reuse`,
    /// `icc`, `fora`, `taylor` (docs/caching-policies.md).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "reuse,icc")]
    pub(crate) policies: Vec<CachePolicy>,
    /// icc: factor ranks to compare (uniform over the six layer types).
    #[arg(long, value_delimiter = ',', default_value = "4,8,16,32,64")]
    pub(crate) ranks: Vec<usize>,
    /// Cache periods (full-step intervals) to compare: every N-th step full.
    #[arg(long, value_delimiter = ',', default_value = "2,3,5")]
    pub(crate) periods: Vec<usize>,
    /// icc: factor methods, `svd`, `ca-svd`.
    #[arg(long, value_delimiter = ',', default_value = "svd,ca-svd")]
    pub(crate) methods: Vec<String>,
    /// taylor: orders to compare (0, 1, 2; 0 is fora's block reuse).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub(crate) orders: Vec<usize>,
    /// taylor: warm-up full steps (the first N steps full, besides every period's).
    #[arg(long, default_value_t = Forecast::CLI_DEFAULT.warmup)]
    pub(crate) taylor_warmup: usize,
    /// Samples the model draws itself for CA-SVD's statistics.
    #[arg(long, default_value_t = 64)]
    pub(crate) calib_self: usize,
    /// Images per class in the evaluated request (every class of small models; else 16 random classes).
    #[arg(long, default_value_t = 4)]
    pub(crate) per_class: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Sampling: DiT respacing "N" steps with `--sampler`, guidance `--cfg` (defaults 50, ddim,
    /// 4.0; on a PixArt-α folder 20, dpm-solver, 4.5, the pipeline's).
    #[arg(long)]
    pub(crate) steps: Option<usize>,
    #[arg(long)]
    pub(crate) sampler: Option<String>,
    #[arg(long)]
    pub(crate) cfg: Option<f32>,
    /// PixArt-α (--weights a pipeline folder): the evaluated prompts' embeddings, one image each
    /// (`prompt_embeds`, `attention_mask`, as `icdit encode` writes them).
    #[arg(long)]
    pub(crate) prompt_embeds: Option<PathBuf>,
    /// PixArt-α: the negative prompt's embeddings (1 row) for guidance; default: "" encoded with
    /// the folder's text encoder.
    #[arg(long)]
    pub(crate) negative_embeds: Option<PathBuf>,
    /// PixArt-α: CA-SVD's calibration prompts' embeddings (default: the evaluated prompts).
    #[arg(long)]
    pub(crate) calib_embeds: Option<PathBuf>,
    /// Where sampling runs (and is timed): `cpu`, `cuda` (the GPU pipeline; a build with the
    /// `cuda` feature) or `emu` (the pipeline on its CPU emulation: correct, not fast).
    #[arg(long, default_value = "cpu")]
    pub(crate) backend: String,
    /// CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub(crate) threads: usize,
    /// Sample every setting (and the timed full-compute run) this many times and keep the
    /// fastest: a machine shared with other jobs slows some runs down, never speeds one up.
    #[arg(long, default_value_t = 1)]
    pub(crate) repeats: usize,
    /// Also write the tables as Markdown to this file.
    #[arg(long)]
    pub(crate) out_md: Option<PathBuf>,
    /// Print the results as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
    /// Draw the quality–cost frontier into this PNG: PSNR against the time ratio (left panel)
    /// and against the MAC ratio (right panel), one marker series per policy, points labelled
    /// with their settings.
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
}

/// One policy at one setting, measured against full compute.
pub(crate) struct Row {
    pub(crate) policy: CachePolicy,
    /// The setting without the policy's name: "period 3", "svd r16 period 3", "order 2 period 3".
    pub(crate) setting: String,
    pub(crate) period: usize,
    pub(crate) rel_l2: f64,
    pub(crate) psnr: f64,
    pub(crate) mac_ratio: f64,
    pub(crate) time_ratio: f64,
    pub(crate) seconds: f64,
}

/// Time-ratio budgets of the summary table (issue 24's targets).
const BUDGETS: [f64; 2] = [0.5, 0.35];

pub fn run(args: ReportArgs) -> Result<(), Error> {
    if let Some(dir) = args.weights.as_deref().filter(|w| icdit::pixart::is_pipeline(w)) {
        return crate::report_pixart::run(dir, &args);
    }
    if args.prompt_embeds.is_some() || args.negative_embeds.is_some() || args.calib_embeds.is_some() {
        return Err(Error::invalid(
            "--prompt-embeds",
            "prompt embeddings drive a PixArt-α pipeline folder (--weights)",
        ));
    }
    let (steps, cfg_scale) = (args.steps.unwrap_or(50), args.cfg.unwrap_or(4.0));
    let sampler_name = args.sampler.clone().unwrap_or_else(|| "ddim".into());
    let weights = args.weights.clone().unwrap_or_else(crate::sample::default_weights);
    let model = Arc::new(args.model.load(&weights)?);
    let cfg = model.config;
    let start = Instant::now();
    let sampler = icdit::session::parse_sampler(&sampler_name, 0.0)?;
    let backend: Backend = args.backend.parse()?;
    if steps == 0 || args.per_class == 0 || args.periods.iter().any(|&p| p < 2) || args.ranks.contains(&0) {
        return Err(Error::invalid("cache-report", "steps, per-class and ranks must be ≥ 1 and periods ≥ 2"));
    }
    for &order in &args.orders {
        Forecast { order, warmup: args.taylor_warmup }.validate()?;
    }
    let methods = methods(&args)?;
    let classes: Vec<i64> = if cfg.num_classes <= 32 {
        (0..cfg.num_classes as i64).flat_map(|c| std::iter::repeat_n(c, args.per_class)).collect()
    } else {
        icdit::noise::class_labels(args.seed, 0, 16, cfg.num_classes)
    };
    let base = EngineOptions {
        max_batch: classes.len().min(40),
        respacing: if matches!(sampler, icdit::Sampler::Ddim { .. }) {
            format!("ddim{steps}")
        } else {
            steps.to_string()
        },
        sampler,
        cfg_scale,
        threads: args.threads,
        ..Default::default()
    };
    let sample = |opts: &EngineOptions| sample_set_timed(&model, opts, &classes, args.seed, backend);
    let reference = Reference::sample(&args, &base, classes.len(), steps, &sample)?;

    // icc: per method the calibration statistics once, factors per rank.
    let threads =
        if args.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { args.threads };
    let mut factor_sets = Vec::new();
    if args.policies.contains(&CachePolicy::Icc) {
        for &m in &methods {
            let vectors = if m == Method::Svd {
                None
            } else {
                let set = calibrate::self_calibration_set(&model, args.calib_self, args.seed, threads, m, &mut |_| {})?;
                let stats = calibrate::collect_stats(&model, &set, 16, threads, m, &mut |_, _| {})?;
                Some(calibrate::weight_vectors(&stats, cfg.hidden_size))
            };
            for &r in &args.ranks {
                let ranks = [r.min(cfg.hidden_size); 6];
                let (layers, report) =
                    calibrate::compute_factors(&model, ranks, vectors.as_deref(), threads, &|_, _| {})?;
                let settings = serde_json::json!({ "calib_self": args.calib_self, "seed": args.seed });
                let f = calibrate::build_factors(&model, m, ranks, layers, &report, settings)?;
                factor_sets.push((format!("{} r{r}", method_name(m)), Arc::new(f)));
            }
            eprintln!("factors: {} at ranks {:?}", method_name(m), args.ranks);
        }
    }

    let rows = reference.rows(&args, &sample, |period| {
        let mut settings = Vec::new();
        for &policy in &args.policies {
            let mut add = |setting: String, cache: CacheMode| {
                settings.push((
                    policy,
                    setting,
                    EngineOptions { cache, full_steps: FullSteps::Period(period), ..base.clone() },
                ))
            };
            match policy {
                CachePolicy::None => {}
                CachePolicy::Reuse => add(format!("period {period}"), CacheMode::Reuse),
                CachePolicy::Fora => add(format!("period {period}"), CacheMode::Fora),
                CachePolicy::Icc => {
                    for (n, f) in &factor_sets {
                        add(format!("{n} period {period}"), CacheMode::Icc(Arc::clone(f)));
                    }
                }
                CachePolicy::Taylor => {
                    for &order in &args.orders {
                        let f = Forecast { order, warmup: args.taylor_warmup };
                        let warm = if f.warmup > 0 { format!(" warm-up {}", f.warmup) } else { String::new() };
                        add(format!("order {order} period {period}{warm}"), CacheMode::Taylor(f));
                    }
                }
            }
        }
        settings
    })?;
    let title = format!(
        "{} images, {} {} steps, cfg {}, {} backend, full compute {:.2} s",
        classes.len(),
        steps,
        sampler_name,
        cfg_scale,
        backend.name(),
        reference.seconds,
    );
    let summary = serde_json::json!({"weights": weights.display().to_string(), "images": classes.len(), "steps": steps,
        "sampler": sampler_name, "cfg": cfg_scale, "seed": args.seed, "calib_self": args.calib_self,
        "backend": backend.name(), "full_compute_seconds": reference.seconds, "taylor_warmup": args.taylor_warmup,
        "repeats": args.repeats});
    write_report(&args, &rows, &title, summary)?;
    eprintln!("cache report in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// `--methods` as factor methods.
pub(crate) fn methods(args: &ReportArgs) -> Result<Vec<Method>, Error> {
    args.methods
        .iter()
        .map(|m| match m.as_str() {
            "svd" => Ok(Method::Svd),
            "ca-svd" => Ok(Method::CaSvd),
            other => Err(Error::invalid("--methods", format!("`{other}`: expected svd or ca-svd"))),
        })
        .collect()
}

pub(crate) fn method_name(m: Method) -> &'static str {
    match m {
        Method::Svd => "svd",
        Method::CaSvd => "ca-svd",
        Method::CdSvd => "cd-svd",
    }
}

/// The full-compute samples every setting is measured against, and their sampling time.
pub(crate) struct Reference {
    pub(crate) samples: Vec<f32>,
    pub(crate) seconds: f64,
}

impl Reference {
    /// Samples `base` (full compute) with `sample`: once for the reference, which also warms the
    /// caches and pages, then timed as every setting is ([`fastest`]).
    pub(crate) fn sample<O>(
        args: &ReportArgs,
        base: &O,
        images: usize,
        steps: usize,
        sample: &impl Fn(&O) -> Result<SampleSet, Error>,
    ) -> Result<Reference, Error> {
        let samples = sample(base)?.samples;
        let seconds = fastest(args.repeats, || sample(base))?.seconds;
        eprintln!("reference: {images} images, {steps} steps, full compute: {seconds:.2} s");
        Ok(Reference { samples, seconds })
    }

    /// The report's rows: full compute (where `none` is asked), then per period every setting
    /// `settings(period)` lists (policy, setting's name, sampling options), sampled with
    /// `sample` and measured against the reference.
    pub(crate) fn rows<O>(
        &self,
        args: &ReportArgs,
        sample: &impl Fn(&O) -> Result<SampleSet, Error>,
        settings: impl Fn(usize) -> Vec<(CachePolicy, String, O)>,
    ) -> Result<Vec<Row>, Error> {
        let mut rows = Vec::new();
        if args.policies.contains(&CachePolicy::None) {
            rows.push(Row {
                policy: CachePolicy::None,
                setting: "full compute".into(),
                period: 1,
                rel_l2: 0.0,
                psnr: f64::INFINITY,
                mac_ratio: 1.0,
                time_ratio: 1.0,
                seconds: self.seconds,
            });
        }
        for &period in &args.periods {
            for (policy, setting, opts) in settings(period) {
                let set = fastest(args.repeats, || sample(&opts))?;
                rows.push(Row {
                    policy,
                    setting,
                    period,
                    rel_l2: rel_l2(&set.samples, &self.samples),
                    psnr: psnr(&set.samples, &self.samples),
                    mac_ratio: set.mac_ratio,
                    time_ratio: set.seconds / self.seconds,
                    seconds: set.seconds,
                });
            }
            eprintln!("period {period} done");
        }
        Ok(rows)
    }
}

/// The fastest of `repeats` runs of one setting (their samples are identical).
fn fastest(repeats: usize, run: impl Fn() -> Result<SampleSet, Error>) -> Result<SampleSet, Error> {
    let mut best = run()?;
    for _ in 1..repeats.max(1) {
        best.seconds = best.seconds.min(run()?.seconds);
    }
    Ok(best)
}

/// Prints the tables (and writes `--out-md`, `--plot`) under `title` (`--repeats` noted) and,
/// with `--json`, `summary` with the rows as its `results`.
pub(crate) fn write_report(
    args: &ReportArgs,
    rows: &[Row],
    title: &str,
    mut summary: serde_json::Value,
) -> Result<(), Error> {
    let repeats = if args.repeats > 1 { format!(" (fastest of {})", args.repeats) } else { String::new() };
    let title = format!("{title}{repeats}");
    let md = markdown(rows, &args.policies, &title);
    outln!("{md}");
    if let Some(path) = &args.out_md {
        icdit::atomic_write(path, md.as_bytes())?;
    }
    if let Some(path) = &args.plot {
        crate::plot::frontier(path, rows, &title)?;
        eprintln!("wrote {}", path.display());
    }
    if args.json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({"policy": r.policy.name(), "setting": r.setting, "period": r.period,
                    "rel_l2": r.rel_l2, "psnr_db": if r.psnr.is_finite() { serde_json::json!(r.psnr) } else { serde_json::Value::Null },
                    "mac_ratio": r.mac_ratio, "time_ratio": r.time_ratio, "seconds": r.seconds})
            })
            .collect();
        summary["results"] = v.into();
        outln!("{summary}");
    }
    Ok(())
}

/// One row per policy and setting; then, per policy, the best PSNR within each time budget.
pub(crate) fn markdown(rows: &[Row], policies: &[CachePolicy], title: &str) -> String {
    let mut s = format!("{title}\n\n| policy | setting | rel. L2 | PSNR dB | MAC ratio | time ratio |\n");
    s.push_str("| --- | --- | ---: | ---: | ---: | ---: |\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.4} | {:.2} | {:.3} | {:.3} |\n",
            r.policy.name(),
            r.setting,
            r.rel_l2,
            r.psnr,
            r.mac_ratio,
            r.time_ratio
        ));
    }
    s.push_str("\nBest PSNR (dB) within a time budget (time ratio against full compute):\n\n| policy |");
    for b in BUDGETS {
        s.push_str(&format!(" time ≤ {b} |"));
    }
    s.push_str("\n| --- |");
    s.push_str(&" ---: |".repeat(BUDGETS.len()));
    s.push('\n');
    for &p in policies.iter().filter(|&&p| p != CachePolicy::None) {
        s.push_str(&format!("| {} |", p.name()));
        for b in BUDGETS {
            let best =
                rows.iter().filter(|r| r.policy == p && r.time_ratio <= b).max_by(|a, b| a.psnr.total_cmp(&b.psnr));
            match best {
                Some(r) => s.push_str(&format!(" {:.2} ({}, {:.3}) |", r.psnr, r.setting, r.time_ratio)),
                None => s.push_str(" — |"),
            }
        }
        s.push('\n');
    }
    s
}
