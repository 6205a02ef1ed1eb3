//! `icdit bench-gpu`: the GPU pipeline on DiT-shaped random weights — step times of every kind
//! (device events over replays of each step's graph) with their kernel launches per step and
//! per block, their time and MAC ratios to a plain step, a per-op breakdown of the plain, full
//! and calibrated steps, icc's steps in each form (projected, direct and folded on the fused
//! low-rank kernel, direct on two GEMMs), 50-step sampling end
//! to end under no cache, naive reuse and icc, arena size and device memory — printed as tables
//! and, last, one JSON line (scripts/gpu-check.sh collects it). `--backend emu` runs the same on the CPU
//! emulation (for checking the command without a GPU: use a small `--depth` and `--image-size`).
//! `--pixart DIR` times PixArt-α passes of a pipeline folder instead (`bench_pixart`).

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use icdit::backend::Backend;
use icdit::cost;
use icdit::engine::{EngineOptions, FullSteps, Request};
use icdit::forward::StepKind;
use icdit::gpu::{Device, EmuDevice, GpuEngine, OpTime, StepLaunches};
use icdit::plan::Plan;
use icdit::policy::Forecast;
use icdit::{CacheMode, CachePolicy, DitConfig, DitModel, Error, Factors, IccForm, Sampler};

#[derive(Args, Debug)]
pub struct BenchGpuArgs {
    /// `cuda` (default) or `emu` (the CPU emulation: slow, for checking the command).
    #[arg(long, default_value = "cuda")]
    backend: String,
    /// A DiT family member with seeded random weights (head dim 72: the XL family).
    #[arg(long, default_value = "XL/2")]
    family: String,
    /// Image size in pixels (latent side = size / 8).
    #[arg(long, default_value_t = 256)]
    image_size: usize,
    /// Override the number of blocks (for quick emulated runs).
    #[arg(long)]
    depth: Option<usize>,
    /// Images per request (guidance doubles the model rows), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batches: Vec<usize>,
    /// Factor rank of the icc engine.
    #[arg(long, default_value_t = 128)]
    rank: usize,
    /// DDIM steps of the end-to-end runs.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Graph replays per step-time measurement.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Timed end-to-end samples per policy (the median is reported); 0 skips them.
    #[arg(long, default_value_t = 3)]
    e2e_runs: usize,
    /// Classifier-free guidance scale (4 as DiT's samples; 1 disables guidance).
    #[arg(long, default_value_t = 4.0)]
    cfg: f32,
    /// Only build each engine and print its kernel launches per step and per block (counted as
    /// the steps are recorded; nothing runs): exact on any backend, fast under emulation.
    #[arg(long)]
    launches_only: bool,
    /// Time PixArt-α passes instead: the transformer of this pipeline folder (e.g.
    /// PixArt-XL-2-256x256), per-step device time of a plain pass (no cache), a full and a
    /// reuse pass (reuse), and a calibrated pass (icc, with --pixart-factors), at each batch
    /// (rows doubled under guidance), 120 caption tokens.
    #[arg(long)]
    pixart: Option<std::path::PathBuf>,
    /// icc factors for --pixart (`icdit calibrate` on the folder); without them no icc row.
    #[arg(long, requires = "pixart")]
    pixart_factors: Option<std::path::PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// One timed kind of step of one engine.
struct StepTime {
    /// The engine: `none`, `reuse`, `icc` (the default form), `icc-direct`, `icc-folded`, `icc-gemms`,
    /// `fora`, `taylor` (order 2, warm-up 2).
    engine: String,
    kind: StepKind,
    ms: f32,
    launches: Option<StepLaunches>,
}

/// What one batch size measured.
#[derive(Default)]
struct Row {
    batch: usize,
    device: String,
    arena_mib: f64,
    device_used_mib: Option<f64>,
    steps: Vec<StepTime>,
    e2e_ms: Vec<(CachePolicy, f64)>,
    /// Per-op device time of the profiled steps: (engine, kind, ops).
    profiles: Vec<(String, StepKind, Vec<OpTime>)>,
}

impl Row {
    fn ms(&self, engine: &str, kind: StepKind) -> Option<f32> {
        self.steps.iter().find(|s| s.engine == engine && s.kind == kind).map(|s| s.ms)
    }
}

fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Builds the engine `label` of one policy, times its step kinds, then (`e2e`) samples end to end.
fn measure<D: Device>(
    model: &Arc<DitModel>,
    opts: &EngineOptions,
    args: &BenchGpuArgs,
    row: &mut Row,
    label: &str,
    e2e: bool,
    open: &dyn Fn(&Plan) -> icdit::Result<D>,
) -> Result<(), Error> {
    let mut engine = GpuEngine::new(Arc::clone(model), opts, open)?;
    row.arena_mib = row.arena_mib.max(mib(engine.arena_bytes()));
    row.device = engine.device().name().to_string();
    if let Some((free, total)) = engine.device().memory_info() {
        let used = mib(total - free);
        row.device_used_mib = Some(row.device_used_mib.map_or(used, |u: f64| u.max(used)));
    }
    let policy = opts.cache.policy();
    for &kind in policy.step_kinds() {
        if args.launches_only {
            let launches = engine.step_launches(kind);
            row.steps.push(StepTime { engine: label.to_string(), kind, ms: f32::NAN, launches });
            continue;
        }
        engine.time_step(kind, 2.min(args.iters))?; // warm-up
        let ms = engine.time_step(kind, args.iters)?;
        let launches = engine.step_launches(kind);
        eprintln!(
            "  batch {}: {label} {kind} step {ms:.3} ms, {} launches ({} per block)",
            row.batch,
            launches.map_or(0, |l| l.step),
            launches.map_or(0, |l| l.block)
        );
        row.steps.push(StepTime { engine: label.to_string(), kind, ms, launches });
        if matches!(label, "none" | "icc") {
            row.profiles.push((label.to_string(), kind, engine.profile_step(kind)?));
        }
    }
    if e2e && args.e2e_runs > 0 && !args.launches_only {
        let n = opts.max_batch;
        let classes: Vec<i64> = (0..n as i64).map(|i| i % model.config.num_classes as i64).collect();
        let mut out = vec![0.0f32; n * model.config.image_elems()];
        engine.sample(&Request::new(&classes, 0), &mut out, &mut |_| {})?; // warm-up
        let mut times = Vec::new();
        for seed in 0..args.e2e_runs {
            let t = Instant::now();
            engine.sample(&Request::new(&classes, seed as u64 + 1), &mut out, &mut |_| {})?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let ms = median(times);
        row.e2e_ms.push((policy, ms));
        eprintln!("  batch {}: {}-step DDIM, {policy}: {ms:.2} ms end to end", row.batch, args.steps);
    }
    Ok(())
}

fn bench_batches<D: Device>(
    model: &Arc<DitModel>,
    args: &BenchGpuArgs,
    open: &dyn Fn(&Plan) -> icdit::Result<D>,
) -> Result<(String, Vec<Row>), Error> {
    let factors = Arc::new(Factors::random(model, args.rank, 1)?);
    let mut rows = Vec::new();
    let mut device = String::new();
    for &batch in &args.batches {
        let base = EngineOptions {
            max_batch: batch,
            respacing: format!("ddim{}", args.steps),
            sampler: Sampler::Ddim { eta: 0.0 },
            cfg_scale: args.cfg,
            full_steps: FullSteps::Period(2),
            ..Default::default()
        };
        let mut row = Row { batch, ..Default::default() };
        let icc = CacheMode::Icc(factors.clone());
        // (label, cache, icc form, fused low-rank, end to end)
        let engines = [
            ("none", CacheMode::None, IccForm::Auto, true, true),
            ("reuse", CacheMode::Reuse, IccForm::Auto, true, true),
            ("icc", icc.clone(), IccForm::Auto, true, true),
            ("icc-direct", icc.clone(), IccForm::Direct, true, false),
            ("icc-folded", icc.clone(), IccForm::Folded, true, false),
            ("icc-gemms", icc, IccForm::Direct, false, false),
            // The other caching policies (issue 24): their step kinds only, no end-to-end run.
            ("fora", CacheMode::Fora, IccForm::Auto, true, false),
            ("taylor", CacheMode::Taylor(Forecast::CLI_DEFAULT), IccForm::Auto, true, false),
        ];
        for (label, cache, icc_form, fused_lowrank, e2e) in engines {
            let opts = EngineOptions { cache, icc_form, fused_lowrank, ..base.clone() };
            measure(model, &opts, args, &mut row, label, e2e, open)?;
        }
        device = row.device.clone();
        rows.push(row);
    }
    Ok((device, rows))
}

pub fn run(args: BenchGpuArgs) -> Result<(), Error> {
    let backend: Backend = args.backend.parse()?;
    if let Some(dir) = &args.pixart {
        return bench_pixart(dir, &args, backend);
    }
    let mut cfg = DitConfig::family(&args.family, args.image_size / 8).ok_or_else(|| {
        Error::invalid("--family", format!("`{}` at {} px: expected XL/2, XL/4 or XL/8", args.family, args.image_size))
    })?;
    if let Some(d) = args.depth {
        cfg.depth = d;
    }
    if args.batches.is_empty() || args.batches.contains(&0) {
        return Err(Error::invalid("--batches", "give one or more batch sizes ≥ 1"));
    }
    let model = Arc::new(DitModel::random(&cfg, 0)?);
    let start = Instant::now();
    eprintln!(
        "bench-gpu: DiT {} {} px ({} blocks, {} tokens), random weights, backend {}, rank {}, DDIM {}, cfg {}",
        args.family,
        args.image_size,
        cfg.depth,
        cfg.tokens(),
        backend.name(),
        args.rank,
        args.steps,
        args.cfg
    );
    let (device, rows) = match backend {
        Backend::Emu => bench_batches(&model, &args, &EmuDevice::new)?,
        Backend::Cuda => cuda(&model, &args)?,
        Backend::Cpu => {
            return Err(Error::invalid("--backend", "bench-gpu runs cuda or emu; see bench-forward for the CPU"))
        }
    };
    let model_rows = if args.cfg > 1.0 { 2 } else { 1 };
    let ranks = vec![[args.rank; 6]; cfg.depth];
    let plain_macs = cost::step_macs(&cfg, StepKind::Plain, &ranks) as f64;
    let mac_ratio = |k: StepKind| cost::step_macs(&cfg, k, &ranks) as f64 / plain_macs;
    let (_, icc_mac_ratio) = cost::schedule_macs(
        &cfg,
        (0..args.steps).map(|i| if i % 2 == 0 { StepKind::Full } else { StepKind::Calibrated }),
        &ranks,
    );
    println!("device: {device}");
    println!("icc's calibrated linears: `icc` computes the projected form (the default) with fused low-rank launches, `icc-direct` the direct form and `icc-folded` the folded form with them, `icc-gemms` the direct form as two GEMMs per linear");
    println!("| batch | engine | step | ms | time / plain | MACs / plain | launches per step | per block |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let plain = r.ms("none", StepKind::Plain);
        for s in &r.steps {
            println!(
                "| {} | {} | {} | {:.3} | {} | {:.3} | {} | {} |",
                r.batch,
                s.engine,
                s.kind,
                s.ms,
                plain.map_or(String::new(), |p| format!("{:.3}", s.ms / p)),
                mac_ratio(s.kind),
                s.launches.map_or(String::new(), |l| l.step.to_string()),
                s.launches.map_or(String::new(), |l| l.block.to_string()),
            );
        }
    }
    println!();
    println!("Device time per kind of op in one step (events around each op, launched directly):");
    println!("| batch | engine | step | op | ops | ms | share |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        for (engine, kind, ops) in &r.profiles {
            let total: f32 = ops.iter().map(|o| o.ms).sum();
            for o in ops {
                println!(
                    "| {} | {engine} | {kind} | {} | {} | {:.3} | {:.1} % |",
                    r.batch,
                    o.op,
                    o.count,
                    o.ms,
                    100.0 * o.ms / total.max(f32::MIN_POSITIVE)
                );
            }
        }
    }
    println!();
    println!("| batch | arena MiB | device used MiB | {}-step DDIM none ms | reuse ms | icc ms | icc / none (MACs {icc_mac_ratio:.3}) |", args.steps);
    println!("|---|---|---|---|---|---|---|");
    let e2e = |r: &Row, p: CachePolicy| r.e2e_ms.iter().find(|x| x.0 == p).map(|x| x.1);
    let fmt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.2}"));
    for r in &rows {
        let (none, icc) = (e2e(r, CachePolicy::None), e2e(r, CachePolicy::Icc));
        println!(
            "| {} | {:.0} | {} | {} | {} | {} | {} |",
            r.batch,
            r.arena_mib,
            r.device_used_mib.map_or(String::new(), |u| format!("{u:.0}")),
            fmt(none),
            fmt(e2e(r, CachePolicy::Reuse)),
            fmt(icc),
            none.zip(icc).map_or(String::new(), |(n, i)| format!("{:.3}", i / n)),
        );
    }
    let json = serde_json::json!({
        "tool": "icdit bench-gpu",
        "device": device,
        "backend": backend.name(),
        "family": args.family, "image_size": args.image_size, "depth": cfg.depth, "rank": args.rank,
        "steps": args.steps, "cfg": args.cfg, "iters": args.iters, "e2e_runs": args.e2e_runs,
        "forward_gflop_per_row": 2.0 * cfg.forward_macs() as f64 / 1e9,
        "mac_ratio": {"full": mac_ratio(StepKind::Full), "calibrated": mac_ratio(StepKind::Calibrated),
            "reuse": mac_ratio(StepKind::Reuse), "icc_period2_schedule": icc_mac_ratio},
        "seconds": start.elapsed().as_secs_f64(),
        "batches": rows.iter().map(|r| {
            let plain = r.ms("none", StepKind::Plain);
            serde_json::json!({
                "batch": r.batch,
                "arena_mib": r.arena_mib,
                "device_used_mib": r.device_used_mib,
                // Step times by kind, the first engine that ran each (none: plain; reuse: full,
                // reuse; icc: calibrated, in its default form); "steps" has every engine's.
                "step_ms": r.steps.iter().filter(|s| !s.engine.starts_with("icc-")).fold(serde_json::Map::new(), |mut m, s| {
                    m.entry(s.kind.name().to_string()).or_insert(serde_json::json!(s.ms));
                    m
                }),
                "steps": r.steps.iter().map(|s| serde_json::json!({
                    "engine": s.engine, "kind": s.kind.name(), "ms": s.ms,
                    "time_ratio": plain.map(|p| s.ms / p), "mac_ratio": mac_ratio(s.kind),
                    "launches_per_step": s.launches.map(|l| l.step), "launches_per_block": s.launches.map(|l| l.block),
                })).collect::<Vec<_>>(),
                "profiles": r.profiles.iter().map(|(engine, kind, ops)| serde_json::json!({
                    "engine": engine, "kind": kind.name(),
                    "ops": ops.iter().map(|o| serde_json::json!({"op": o.op, "count": o.count, "ms": o.ms})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "e2e_ms": r.e2e_ms.iter().map(|(p, v)| (p.name().to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
                "plain_tflops": plain.map(|ms|
                    2.0 * cfg.forward_macs() as f64 * (model_rows * r.batch) as f64 / (ms as f64 * 1e-3) / 1e12),
            })
        }).collect::<Vec<_>>(),
    });
    println!("{json}");
    Ok(())
}

#[cfg(feature = "cuda")]
fn cuda(model: &Arc<DitModel>, args: &BenchGpuArgs) -> Result<(String, Vec<Row>), Error> {
    let open = |plan: &Plan| {
        icdit::gpu::CudaDevice::open(plan)?
            .ok_or_else(|| Error::gpu("bench-gpu", "no CUDA GPU found (the driver reports no device)"))
    };
    bench_batches(model, args, &open)
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: &Arc<DitModel>, _: &BenchGpuArgs) -> Result<(String, Vec<Row>), Error> {
    Err(Error::gpu(
        "bench-gpu",
        "this icdit was built without CUDA support: rebuild with `--features cuda` (README: CUDA), or pass --backend emu",
    ))
}

/// `bench-gpu --pixart DIR`: per-step device time of PixArt-α passes of each kind on the
/// folder's transformer (direct launches; the table, then one JSON line).
fn bench_pixart(dir: &std::path::Path, args: &BenchGpuArgs, backend: Backend) -> Result<(), Error> {
    use icdit::gpu::pixart::{PixArtGpu, PixArtGpuOptions};
    use icdit::pixart::{PixArtCache, PixArtFactors, PixArtModel};
    if args.batches.is_empty() || args.batches.contains(&0) {
        return Err(Error::invalid("--batches", "give one or more batch sizes ≥ 1"));
    }
    let model = Arc::new(PixArtModel::load(dir)?);
    let cfg = model.config;
    let factors = args.pixart_factors.as_deref().map(|p| PixArtFactors::load(p, &model)).transpose()?.map(Arc::new);
    let start = Instant::now();
    let len = 120;
    let mut engines = vec![
        ("none", PixArtCache::None, vec![StepKind::Plain]),
        ("reuse", PixArtCache::Reuse, vec![StepKind::Full, StepKind::Reuse]),
    ];
    if let Some(f) = factors {
        engines.push(("icc", PixArtCache::Icc(f), vec![StepKind::Calibrated]));
    }
    // Seeded pseudo-random inputs in (−1, 1): the time does not depend on them.
    let mut state = 0x2545f4914f6cdd1du64;
    let mut rand = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    };
    let mut device = String::new();
    let mut results: Vec<(usize, &str, StepKind, f32)> = Vec::new();
    for &batch in &args.batches {
        let rows = if args.cfg > 1.0 { 2 * batch } else { batch };
        let (x, text) = (rand(rows * cfg.image_elems()), rand(rows * len * cfg.caption_channels));
        let (t, mask) = (vec![500.0f32; rows], vec![1i64; rows * len]);
        for (name, cache, kinds) in &engines {
            let opts = PixArtGpuOptions { max_rows: rows, max_text_len: len, cache: cache.clone() };
            let mut time = |g: &mut dyn FnMut(StepKind) -> Result<f32, Error>| -> Result<(), Error> {
                for &k in kinds {
                    results.push((batch, name, k, g(k)?));
                }
                Ok(())
            };
            macro_rules! on {
                ($open:expr) => {{
                    let mut g = PixArtGpu::new(Arc::clone(&model), &opts, $open)?;
                    device = g.device().name().to_string();
                    g.stage_text(&text, &mask, rows, len)?;
                    g.stage_inputs(&x, &t, rows)?;
                    time(&mut |k| g.time_pass(rows, k, args.iters))?;
                }};
            }
            match backend {
                Backend::Emu => on!(EmuDevice::new),
                #[cfg(feature = "cuda")]
                Backend::Cuda => on!(|plan: &Plan| {
                    icdit::gpu::CudaDevice::open(plan)?
                        .ok_or_else(|| Error::gpu("bench-gpu", "no CUDA GPU found (the driver reports no device)"))
                }),
                #[cfg(not(feature = "cuda"))]
                Backend::Cuda => {
                    return Err(Error::gpu(
                        "bench-gpu",
                        "this icdit was built without CUDA support: rebuild with `--features cuda` (README: CUDA), or pass --backend emu",
                    ))
                }
                Backend::Cpu => return Err(Error::invalid("--backend", "bench-gpu runs cuda or emu")),
            }
        }
    }
    println!("device: {device}");
    println!(
        "PixArt-α {} ({} blocks, {} tokens, {len} caption tokens), direct launches, cfg {}",
        dir.display(),
        cfg.depth,
        cfg.tokens(),
        args.cfg
    );
    println!("| batch | engine | step | ms |");
    println!("|---|---|---|---|");
    for (b, e, k, ms) in &results {
        println!("| {b} | {e} | {} | {ms:.3} |", k.name());
    }
    let json = serde_json::json!({
        "tool": "icdit bench-gpu --pixart",
        "device": device,
        "backend": backend.name(),
        "pixart": dir.display().to_string(),
        "depth": cfg.depth, "tokens": cfg.tokens(), "caption_tokens": len, "cfg": args.cfg, "iters": args.iters,
        "seconds": start.elapsed().as_secs_f64(),
        "steps": results.iter().map(|(b, e, k, ms)| serde_json::json!({"batch": b, "engine": e, "kind": k.name(), "ms": ms})).collect::<Vec<_>>(),
    });
    println!("{json}");
    Ok(())
}
