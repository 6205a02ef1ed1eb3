//! `icdit cache-report` on a PixArt-α pipeline folder: the prompts of `--prompt-embeds`
//! sampled at full compute (the reference, CPU backend), then under reuse and icc (plain SVD
//! and CA-SVD factors at each rank) for each period; each setting's relative L2 and PSNR of
//! the latents against the reference, MAC ratio (src/pixart/cost.rs) and time ratio, measured
//! and written by report.rs's shared part (the DiT report's tables, JSON and frontier plot).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use icdit::calibrate::Method;
use icdit::pixart::calibrate::{ca_svd_factors, ca_svd_statistics};
use icdit::pixart::factors::calibrate_svd;
use icdit::pixart::{Embeddings, PixArtCache, PixArtFactors, PixArtModel, PixArtOptions, PixArtSampler};
use icdit::quality::pixart_sample_set_timed;
use icdit::{CachePolicy, Error, FullSteps};

use crate::report::{method_name, methods, write_report, Reference, ReportArgs};

/// A folder for the factor files, removed when dropped.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn run(dir: &Path, args: &ReportArgs) -> Result<(), Error> {
    let start = Instant::now();
    if args.backend != "cpu" {
        return Err(Error::invalid("--backend", "cache-report on PixArt-α runs on the CPU backend only for now"));
    }
    if let Some(p) = args.policies.iter().find(|p| matches!(p, CachePolicy::Fora | CachePolicy::Taylor)) {
        return Err(Error::invalid(
            "--policies",
            format!("`{p}` runs on DiT models only; PixArt-α takes none, reuse, icc"),
        ));
    }
    let (steps, cfg_scale) = (args.steps.unwrap_or(20), args.cfg.unwrap_or(4.5));
    let sampler_name = args.sampler.clone().unwrap_or_else(|| "dpm-solver".into());
    let sampler = match sampler_name.as_str() {
        "dpm-solver" => PixArtSampler::DpmSolver,
        "ddim" => PixArtSampler::Ddim,
        other => {
            return Err(Error::invalid("--sampler", format!("`{other}`: PixArt-α samples with dpm-solver or ddim")))
        }
    };
    if steps == 0 || args.periods.iter().any(|&p| p < 2) || args.ranks.contains(&0) {
        return Err(Error::invalid("cache-report", "steps and ranks must be ≥ 1 and periods ≥ 2"));
    }
    let methods = methods(args)?;
    let model = Arc::new(PixArtModel::load(dir)?);
    let prompt_path = args.prompt_embeds.as_deref().ok_or_else(|| {
        Error::invalid(
            "--prompt-embeds",
            "cache-report on a PixArt-α folder samples given prompts: pass --prompt-embeds FILE (`icdit encode`'s output)",
        )
    })?;
    let prompt = Embeddings::load(prompt_path)?;
    let negative = match (&args.negative_embeds, cfg_scale > 1.0) {
        (_, false) => None,
        (Some(p), true) => Some(Embeddings::load(p)?),
        (None, true) if dir.join("text_encoder").join("config.json").is_file() => {
            let enc =
                icdit::text::TextEncoder::open(dir, &icdit::text::TextOptions { threads: args.threads, isa: None })?;
            let e = enc.encode(&[""], prompt.len)?;
            Some(Embeddings::new(e.embeds, e.mask, e.batch, e.len, e.dim)?)
        }
        (None, true) => {
            return Err(Error::invalid(
                "--negative-embeds",
                format!(
                    "guidance (--cfg {cfg_scale}) needs the negative prompt's embeddings: {} has no text_encoder/",
                    dir.display()
                ),
            ))
        }
    };
    let base = PixArtOptions {
        max_batch: prompt.rows.min(8),
        max_text_len: prompt.len,
        sampler,
        steps,
        cfg_scale,
        threads: args.threads,
        ..Default::default()
    };
    let sample = |opts: &PixArtOptions| pixart_sample_set_timed(&model, opts, &prompt, negative.as_ref(), args.seed);
    let reference = Reference::sample(args, &base, prompt.rows, steps, &sample)?;

    let scratch = Scratch(std::env::temp_dir().join(format!("icdit-cache-report-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0).map_err(|e| Error::Io { path: scratch.0.clone(), source: e })?;
    let mut factor_sets: Vec<(String, Arc<PixArtFactors>)> = Vec::new();
    if args.policies.contains(&CachePolicy::Icc) {
        for &m in &methods {
            let m_name = method_name(m);
            // CA-SVD: the statistics once (on --calib-embeds, else the evaluated prompts), factors per rank.
            let stats = if m == Method::CaSvd {
                let calib = args.calib_embeds.as_deref().map(Embeddings::load).transpose()?;
                let calib = calib.as_ref().unwrap_or(&prompt);
                Some(ca_svd_statistics(
                    &model,
                    calib,
                    negative.as_ref(),
                    steps,
                    args.seed,
                    args.threads,
                    &mut |_, _| {},
                )?)
            } else {
                None
            };
            for &r in &args.ranks {
                let path = scratch.0.join(format!("{m_name}-r{r}.safetensors"));
                match &stats {
                    Some(s) => ca_svd_factors(&model, s, r, args.seed, &path)?,
                    None => calibrate_svd(&model, r, &path)?,
                };
                factor_sets.push((format!("{m_name} r{r}"), Arc::new(PixArtFactors::load(&path, &model)?)));
            }
            eprintln!("factors: {m_name} at ranks {:?}", args.ranks);
        }
    }

    let rows = reference.rows(args, &sample, |period| {
        let mut settings = Vec::new();
        for &policy in &args.policies {
            let mut add = |setting: String, cache: PixArtCache| {
                settings.push((
                    policy,
                    setting,
                    PixArtOptions { cache, full_steps: FullSteps::Period(period), ..base.clone() },
                ))
            };
            match policy {
                CachePolicy::Reuse => add(format!("period {period}"), PixArtCache::Reuse),
                CachePolicy::Icc => {
                    for (n, f) in &factor_sets {
                        add(format!("{n} period {period}"), PixArtCache::Icc(Arc::clone(f)));
                    }
                }
                _ => {}
            }
        }
        settings
    })?;
    let title = format!(
        "PixArt-α, {} prompts, {steps} {sampler_name} steps, cfg {cfg_scale}, cpu backend, full compute {:.2} s",
        prompt.rows, reference.seconds,
    );
    let summary = serde_json::json!({"weights": dir.display().to_string(), "family": "PixArt-α", "images": prompt.rows,
        "steps": steps, "sampler": sampler_name, "cfg": cfg_scale, "seed": args.seed,
        "full_compute_seconds": reference.seconds, "repeats": args.repeats});
    write_report(args, &rows, &title, summary)?;
    eprintln!("cache report in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
