//! `icdit cache-report`: what caching costs in sample quality on a model. Samples a fixed
//! request at full compute, then under naive reuse and under increment-calibrated caching
//! with SVD and self-calibrated CA-SVD factors at several ranks and periods, and reports
//! each policy's error against the full-compute samples and its compute ratio.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use icdit::calibrate::{self, Method};
use icdit::engine::EngineOptions;
use icdit::quality::{psnr, rel_l2, sample_set};
use icdit::{CacheMode, CachePolicy, Error, FullSteps};

use crate::model_args::ModelArgs;

#[derive(Args)]
pub struct ReportArgs {
    /// Weights (official .safetensors or diffusers folder); default: the bundled model.
    #[arg(long)]
    weights: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Factor ranks to compare (uniform over the six layer types).
    #[arg(long, value_delimiter = ',', default_value = "4,8,16,32,64")]
    ranks: Vec<usize>,
    /// Cache periods to compare (every N-th step full).
    #[arg(long, value_delimiter = ',', default_value = "2,3,5")]
    periods: Vec<usize>,
    /// Factor methods: `svd`, `ca-svd`.
    #[arg(long, value_delimiter = ',', default_value = "svd,ca-svd")]
    methods: Vec<String>,
    /// Samples the model draws itself for CA-SVD's statistics.
    #[arg(long, default_value_t = 64)]
    calib_self: usize,
    /// Images per class in the evaluated request (every class of small models; else 16 random classes).
    #[arg(long, default_value_t = 4)]
    per_class: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling: DiT respacing "N" steps with `--sampler`, guidance `--cfg`.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, default_value = "ddim")]
    sampler: String,
    #[arg(long, default_value_t = 4.0)]
    cfg: f32,
    /// CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Also write the table as Markdown to this file.
    #[arg(long)]
    out_md: Option<PathBuf>,
    /// Print the results as JSON on stdout.
    #[arg(long)]
    json: bool,
}

struct Row {
    policy: String,
    period: usize,
    rel_l2: f64,
    psnr: f64,
    ratio: f64,
}

pub fn run(args: ReportArgs) -> Result<(), Error> {
    let weights = args.weights.clone().unwrap_or_else(crate::sample::default_weights);
    let model = Arc::new(args.model.load(&weights)?);
    let cfg = model.config;
    let start = Instant::now();
    let sampler = icdit::session::parse_sampler(&args.sampler, 0.0)?;
    if args.steps == 0 || args.per_class == 0 || args.periods.iter().any(|&p| p < 2) || args.ranks.contains(&0) {
        return Err(Error::invalid("cache-report", "steps, per-class and ranks must be ≥ 1 and periods ≥ 2"));
    }
    let methods: Vec<Method> = args
        .methods
        .iter()
        .map(|m| match m.as_str() {
            "svd" => Ok(Method::Svd),
            "ca-svd" => Ok(Method::CaSvd),
            other => Err(Error::invalid("--methods", format!("`{other}`: expected svd or ca-svd"))),
        })
        .collect::<Result<_, _>>()?;
    let classes: Vec<i64> = if cfg.num_classes <= 32 {
        (0..cfg.num_classes as i64).flat_map(|c| std::iter::repeat_n(c, args.per_class)).collect()
    } else {
        icdit::noise::class_labels(args.seed, 0, 16, cfg.num_classes)
    };
    let base = EngineOptions {
        max_batch: classes.len().min(40),
        respacing: if matches!(sampler, icdit::Sampler::Ddim { .. }) {
            format!("ddim{}", args.steps)
        } else {
            args.steps.to_string()
        },
        sampler,
        cfg_scale: args.cfg,
        threads: args.threads,
        ..Default::default()
    };
    let (reference, _) = sample_set(&model, &base, &classes, args.seed)?;
    eprintln!("reference: {} images, {} steps, full compute", classes.len(), args.steps);

    // Per method, the calibration statistics once; factors per rank.
    let threads =
        if args.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { args.threads };
    let mut factor_sets = Vec::new();
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
            let (layers, report) = calibrate::compute_factors(&model, ranks, vectors.as_deref(), threads, &|_, _| {})?;
            let settings = serde_json::json!({ "calib_self": args.calib_self, "seed": args.seed });
            let f = calibrate::build_factors(&model, m, ranks, layers, &report, settings)?;
            factor_sets.push((format!("{} {} r{r}", CachePolicy::Icc.name(), method_name(m)), Arc::new(f)));
        }
        eprintln!("factors: {} at ranks {:?}", method_name(m), args.ranks);
    }

    let mut rows = Vec::new();
    for &period in &args.periods {
        let reuse = format!("{} (naive caching)", CachePolicy::Reuse.name());
        let mut policies: Vec<(String, CacheMode)> = vec![(reuse, CacheMode::Reuse)];
        policies.extend(factor_sets.iter().map(|(n, f)| (n.clone(), CacheMode::Icc(Arc::clone(f)))));
        for (name, cache) in policies {
            let opts = EngineOptions { cache, full_steps: FullSteps::Period(period), ..base.clone() };
            let (samples, ratio) = sample_set(&model, &opts, &classes, args.seed)?;
            rows.push(Row {
                policy: name,
                period,
                rel_l2: rel_l2(&samples, &reference),
                psnr: psnr(&samples, &reference),
                ratio,
            });
        }
        eprintln!("period {period} done");
    }
    let md = markdown(&rows, &args.periods);
    outln!("{md}");
    if let Some(path) = &args.out_md {
        icdit::atomic_write(path, md.as_bytes())?;
    }
    if args.json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({"policy": r.policy, "period": r.period, "rel_l2": r.rel_l2, "psnr_db": r.psnr, "compute_ratio": r.ratio}))
            .collect();
        outln!(
            "{}",
            serde_json::json!({"weights": weights.display().to_string(), "images": classes.len(), "steps": args.steps,
                "sampler": args.sampler, "cfg": args.cfg, "seed": args.seed, "calib_self": args.calib_self, "results": v})
        );
    }
    eprintln!("cache report in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

fn method_name(m: Method) -> &'static str {
    match m {
        Method::Svd => "svd",
        Method::CaSvd => "ca-svd",
        Method::CdSvd => "cd-svd",
    }
}

/// One row per policy, one column group per period: relative L2, PSNR, compute ratio.
fn markdown(rows: &[Row], periods: &[usize]) -> String {
    let mut s = String::from("| policy |");
    for p in periods {
        s.push_str(&format!(" period {p}: rel. L2 | PSNR dB | compute |"));
    }
    s.push_str("\n| --- |");
    s.push_str(&" ---: | ---: | ---: |".repeat(periods.len()));
    s.push('\n');
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        if !names.contains(&r.policy.as_str()) {
            names.push(&r.policy);
        }
    }
    for name in names {
        s.push_str(&format!("| {name} |"));
        for &p in periods {
            match rows.iter().find(|r| r.policy == name && r.period == p) {
                Some(r) => s.push_str(&format!(" {:.4} | {:.2} | {:.3} |", r.rel_l2, r.psnr, r.ratio)),
                None => s.push_str(" | | |"),
            }
        }
        s.push('\n');
    }
    s
}
