//! Scale-out sampling: `icdit sample --num-images N` as one of S deterministic shards.
//!
//! Image k of a run always gets class `noise::class_labels(seed, k)` and the noise stream
//! (seed, k), so any sharding and any batch size give the same pixels for it. Shard i of S
//! takes the contiguous range ⌊iN/S⌋..⌊(i+1)N/S⌋. Each shard writes, into the run folder,
//! uint8 NHWC `.npz` part files named by their global image range (one per batch), optional
//! PNGs named by global index, and a manifest `shard-IIIII-of-SSSSS.json` holding the
//! settings that determine the pixels, the range and the finished parts. Every file goes
//! through a temporary name and a rename, and the manifest is rewritten after each part, so
//! a killed shard resumes where it stopped; `icdit merge` (merge.rs) joins the parts.
//!
//! Which shard a process is comes from launch.rs (flags or the launcher's environment).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use icdit::backend::{AnyEngine, Backend};
use icdit::engine::{EngineOptions, GuidedChannels, Request};
use icdit::image::{self, Rounding};
use icdit::vae::VaeDecoder;
use icdit::{CacheMode, DitModel, Error, FullSteps, Sampler};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Manifest format tag; merge refuses manifests of another format.
pub const FORMAT: &str = "icdit-shard-manifest/1";

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
    let Some(list) = &args.devices else { return Ok(0) };
    match crate::launch::parse_devices(list, backend)?[..] {
        [d] => Ok(d),
        ref several => Err(Error::invalid(
            "--devices",
            format!(
                "`{list}`: several devices are for --num-images runs (their part files are handed out to the \
                 devices); a run without --num-images samples on one device for now: pass one, e.g. --devices {}",
                several[0]
            ),
        )),
    }
}

/// What the sample command resolved that a shard run needs besides the engine options.
pub struct RunSpec {
    pub out: Option<PathBuf>,
    pub rounding: Rounding,
    pub seed: u64,
    pub batch: usize,
    pub json: bool,
    /// Where sampling runs (part of the settings: shards of different backends differ at
    /// f16 rounding level, so they are not merged).
    pub backend: icdit::backend::Backend,
}

/// One finished part file: images `first..first + count`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Part {
    pub file: String,
    pub first: u64,
    pub count: u64,
    pub bytes: u64,
}

/// A shard's manifest (`shard-IIIII-of-SSSSS.json` in the run folder).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Manifest {
    pub format: String,
    /// Everything that determines the pixels; shards merge only when these are equal.
    pub settings: Map<String, Value>,
    pub shard: u64,
    pub num_shards: u64,
    /// Global image range of this shard, [first, end).
    pub range: [u64; 2],
    pub png: bool,
    /// Finished parts, by first image.
    pub parts: Vec<Part>,
    pub images_done: u64,
    pub done: bool,
    /// Where the inputs were read from (informational: paths differ between machines).
    pub sources: Value,
    pub icdit_version: String,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Manifest, Error> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Config {
            origin: path.display().to_string(),
            reason: format!("not an icdit shard manifest: {e}"),
        })?;
        if m.format != FORMAT {
            return Err(Error::Config {
                origin: path.display().to_string(),
                reason: format!("manifest format `{}`, expected `{FORMAT}`", m.format),
            });
        }
        Ok(m)
    }

    fn write(&self, path: &Path) -> Result<(), Error> {
        let text = serde_json::to_string_pretty(self).expect("manifest serialises") + "\n";
        icdit::atomic_write(path, text.as_bytes())
    }
}

/// `shard-00001-of-00003.json`.
pub fn manifest_name(shard: u64, num_shards: u64) -> String {
    format!("shard-{shard:05}-of-{num_shards:05}.json")
}

/// Whether a file name is a shard manifest's.
pub fn is_manifest_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("shard-").and_then(|r| r.strip_suffix(".json")) else { return false };
    let Some((i, s)) = rest.split_once("-of-") else { return false };
    !i.is_empty() && !s.is_empty() && i.bytes().chain(s.bytes()).all(|b| b.is_ascii_digit())
}

/// `part-000010-000020.npz`: images 10..20.
fn part_name(first: u64, end: u64) -> String {
    format!("part-{first:06}-{end:06}.npz")
}

/// The settings that differ between two manifests, as "key: a vs b".
pub fn differences(a: &Map<String, Value>, b: &Map<String, Value>) -> Vec<String> {
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&Value>| v.map_or("(absent)".to_string(), Value::to_string);
            format!("{k}: {} vs {}", show(a.get(k)), show(b.get(k)))
        })
        .collect()
}

/// FNV-1a over a file's size, its first MiB (a safetensors header and more) and 256
/// evenly spaced 4 KiB windows: cheap for multi-GB files and enough to tell them apart.
fn file_fingerprint(path: &Path) -> Result<String, Error> {
    let bad = |e| Error::io(path, e);
    let mut f = std::fs::File::open(path).map_err(bad)?;
    let len = f.metadata().map_err(bad)?.len();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &x in bytes {
            h ^= x as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(&len.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    let n = f.read(&mut buf).map_err(bad)?;
    eat(&buf[..n]);
    for k in 0..256u64 {
        f.seek(SeekFrom::Start(k * len / 256)).map_err(bad)?;
        let mut window = [0u8; 4096];
        let n = (&mut f).take(4096).read(&mut window).map_err(bad)?;
        eat(&window[..n]);
    }
    Ok(format!("fnv1a64:{h:016x}:{len}"))
}

fn sampler_name(s: Sampler) -> String {
    match s {
        Sampler::Ddpm => "ddpm".into(),
        Sampler::Ddim { eta } => format!("ddim(eta={eta})"),
    }
}

/// The settings that determine image k's pixels, and where the inputs came from.
fn settings(
    model: &DitModel,
    opts: &EngineOptions,
    vae: Option<&VaeDecoder>,
    spec: &RunSpec,
    num_images: u64,
    image: [usize; 3],
) -> Result<(Map<String, Value>, Value), Error> {
    // The manifest names the policy as `--cache` does (`none`, `reuse`, `icc`): runs resume
    // only when these settings match, so the spelling must not change.
    let cache = opts.cache.policy().name();
    let (factors, factors_src, full_steps) = match &opts.cache {
        CacheMode::None => (Value::Null, Value::Null, Value::Null),
        CacheMode::Reuse => (Value::Null, Value::Null, full_steps_value(&opts.full_steps)),
        CacheMode::Icc(f) => (
            json!(file_fingerprint(&f.source)?),
            json!(f.source.display().to_string()),
            full_steps_value(&opts.full_steps),
        ),
    };
    let (vae_fp, vae_src) = match vae {
        None => (Value::Null, Value::Null),
        Some(d) => {
            let m = d.model();
            let cfg_file = Path::new(&m.config_origin);
            let mut fp = file_fingerprint(&m.source)?;
            if cfg_file.is_file() {
                fp = format!("{fp} config {}", file_fingerprint(cfg_file)?);
            }
            (json!(fp), json!(m.source.display().to_string()))
        }
    };
    let mut s = Map::new();
    s.insert("model_fingerprint".into(), json!(icdit::factors::fingerprint(model)));
    s.insert("numerics".into(), serde_json::to_value(model.numerics).expect("numerics serialise"));
    s.insert("vae".into(), vae_fp);
    s.insert("sampler".into(), json!(sampler_name(opts.sampler)));
    s.insert("respacing".into(), json!(opts.respacing));
    s.insert("cfg_scale".into(), json!(opts.cfg_scale));
    let guided = match opts.guided_channels {
        GuidedChannels::OfficialThree => "official-3",
        GuidedChannels::All => "all",
    };
    s.insert("guided_channels".into(), json!(guided));
    s.insert("cache".into(), json!(cache));
    s.insert("full_steps".into(), full_steps);
    s.insert("factors".into(), factors);
    s.insert("seed".into(), json!(spec.seed));
    s.insert("num_images".into(), json!(num_images));
    s.insert("labels".into(), json!("class_labels(seed, index)"));
    s.insert("rounding".into(), json!(format!("{:?}", spec.rounding).to_lowercase()));
    s.insert("image_hwc".into(), json!(image));
    s.insert("backend".into(), json!(spec.backend.name()));
    let weights_bytes: u64 = model.store.files().iter().map(|f| f.len_bytes() as u64).sum();
    let sources = json!({
        "weights": model.source.display().to_string(),
        "weights_bytes": weights_bytes,
        "factors": factors_src,
        "vae": vae_src,
    });
    Ok((s, sources))
}

fn full_steps_value(f: &FullSteps) -> Value {
    match f {
        FullSteps::Period(p) => json!(format!("period {p}")),
        FullSteps::List(l) => json!(l),
    }
}

/// The manifests in `dir`, sorted by name.
pub fn manifests_in(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.file_name().to_str().is_some_and(is_manifest_name) {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

/// `.NAME.tmp-PID` (crate::atomic_write's temporary names) → NAME.
fn leftover_of(file_name: &str) -> Option<&str> {
    let (name, pid) = file_name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    pid.bytes().all(|b| b.is_ascii_digit()).then_some(name)
}

/// Removes temporary files a killed run of this shard left: its manifest's, its parts' and
/// its PNGs' (recognised by the image index at the start of their names).
fn remove_leftovers(dir: &Path, manifest: &str, range: (u64, u64)) {
    let ours_part = |name: &str| {
        let Some(r) = name.strip_prefix("part-").and_then(|r| r.strip_suffix(".npz")) else { return false };
        let Some((a, b)) = r.split_once('-') else { return false };
        matches!((a.parse::<u64>(), b.parse::<u64>()), (Ok(a), Ok(b)) if a >= range.0 && b <= range.1)
    };
    let ours_png = |name: &str| {
        name.ends_with(".png")
            && name.split('-').next().and_then(|i| i.parse::<u64>().ok()).is_some_and(|i| i >= range.0 && i < range.1)
    };
    for (folder, png) in [(dir.to_path_buf(), false), (dir.join("images"), true)] {
        let Ok(entries) = std::fs::read_dir(&folder) else { continue };
        for e in entries.flatten() {
            let file_name = e.file_name();
            let Some(name) = file_name.to_str().and_then(leftover_of) else { continue };
            let ours = if png { ours_png(name) } else { name == manifest || ours_part(name) };
            if ours {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// One line on stderr in a single write, so the lines of shards sharing a terminal or log
/// (torchrun, `srun` without `--output`) do not interleave mid-line.
fn log(mut line: String) {
    use std::io::Write as _;
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Runs (or resumes) this process's shard of a `--num-images` run.
pub fn run(
    args: &ShardArgs,
    num_images: u64,
    spec: &RunSpec,
    model: &Arc<DitModel>,
    opts: &EngineOptions,
    mut vae: Option<VaeDecoder>,
) -> Result<(), Error> {
    let start = Instant::now();
    let cfg = model.config;
    let dir = spec.out.clone().ok_or_else(|| {
        Error::invalid("--num-images", "needs --out DIR: the run folder for part files and shard manifests")
    })?;
    if num_images == 0 {
        return Err(Error::invalid("--num-images", "must be at least 1"));
    }
    let choice = crate::launch::resolve_shard(args.shard, args.num_shards, &|name| std::env::var(name).ok())?;
    let devices = args.devices.as_deref().map(|list| crate::launch::parse_devices(list, spec.backend)).transpose()?;
    let (first, end) = crate::launch::shard_range(num_images, choice.index, choice.count);
    let (channels, side) = match &vae {
        None => (cfg.in_channels, cfg.input_size),
        Some(d) => (d.model().config.out_channels, d.out_side()),
    };
    if channels != 1 && channels != 3 {
        return Err(Error::invalid("--num-images", format!("{channels}-channel images cannot be written as images")));
    }
    crate::output::check_writable_dir(&dir)?;
    if args.png {
        crate::output::check_writable_dir(&dir.join("images"))?;
    }
    let (settings, sources) = settings(model, opts, vae.as_ref(), spec, num_images, [side, side, channels])?;
    let name = manifest_name(choice.index, choice.count);
    let path = dir.join(&name);

    // One folder holds one run: refuse to mix in shards made with other settings.
    let mut previous = None;
    for other in manifests_in(&dir)? {
        let m = Manifest::read(&other)?;
        let diff = differences(&m.settings, &settings);
        if !diff.is_empty() {
            return Err(Error::Config {
                origin: other.display().to_string(),
                reason: format!(
                    "{} already holds shards of a run with other settings ({}: the manifest's value vs this \
                     run's); use another --out folder, or the same settings to resume",
                    dir.display(),
                    diff.join("; ")
                ),
            });
        }
        if other == path {
            previous = Some(m);
        }
    }
    let mut manifest = Manifest {
        format: FORMAT.into(),
        settings,
        shard: choice.index,
        num_shards: choice.count,
        range: [first, end],
        png: args.png,
        parts: Vec::new(),
        images_done: 0,
        done: false,
        sources,
        icdit_version: env!("CARGO_PKG_VERSION").into(),
    };
    // Resume: keep every recorded part whose file is still there, whole.
    if let Some(prev) = previous {
        if prev.range != manifest.range || prev.png != args.png {
            return Err(Error::Config {
                origin: path.display().to_string(),
                reason: format!(
                    "the shard was started with images {}..{}{}; this run asks for {first}..{end}{}",
                    prev.range[0],
                    prev.range[1],
                    if prev.png { " and --png" } else { " without --png" },
                    if args.png { " and --png" } else { " without --png" },
                ),
            });
        }
        for p in prev.parts {
            let ok = std::fs::metadata(dir.join(&p.file)).is_ok_and(|m| m.len() == p.bytes);
            if ok && p.first >= first && p.first + p.count <= end {
                manifest.parts.push(p);
            } else {
                log(format!("note: {} is missing or incomplete; its images will be sampled again", p.file));
            }
        }
    }
    remove_leftovers(&dir, &name, (first, end));
    manifest.parts.sort_by_key(|p| p.first);

    // What is left: the gaps between finished parts, cut into batches.
    let batch = spec.batch.max(1) as u64;
    let mut todo = Vec::new();
    let mut at = first;
    for p in manifest.parts.iter().map(|p| (p.first, p.first + p.count)).chain([(end, end)]) {
        while at < p.0 {
            let n = batch.min(p.0 - at);
            todo.push((at, n));
            at += n;
        }
        at = at.max(p.1);
    }
    let skipped = manifest.parts.iter().map(|p| p.count).sum::<u64>();
    manifest.images_done = skipped;
    manifest.done = todo.is_empty();
    log(format!(
        "shard {} of {} ({}): images {first}..{end} of {num_images}{}; writing to {}",
        choice.index,
        choice.count,
        choice.source,
        if skipped > 0 { format!(", {skipped} already done") } else { String::new() },
        dir.display()
    ));

    // The parts to sample in this run (--max-parts), handed out in order to whichever
    // engine is free: one on this thread, or one worker thread per --devices entry.
    let parts = &todo[..todo.len().min(args.max_parts.unwrap_or(usize::MAX))];
    let max_batch = todo.iter().map(|t| t.1).max().unwrap_or(1) as usize;
    let engine_opts = EngineOptions { max_batch, ..opts.clone() };
    let work = Work {
        args,
        spec,
        model,
        dir: &dir,
        path: &path,
        parts,
        next: AtomicUsize::new(0),
        stop: Arc::new(AtomicBool::new(false)),
        progress: Mutex::new(Progress {
            manifest,
            sampled: 0,
            // The devices that get a worker: at most one per part.
            parts_by_device: devices.iter().flatten().take(parts.len()).map(|&d| (d, 0)).collect(),
        }),
        vae: Mutex::new(vae.take()),
        channels,
        side,
        shard_images: end - first,
        name_device: devices.is_some(),
        sampling: Instant::now(),
    };
    let mut threads = None;
    let mut failure = None;
    let mut interrupted = false;
    match devices.as_deref() {
        // One engine, on this thread: the engine stops on Ctrl-C itself.
        None | Some([_]) => {
            let device = devices.as_ref().map(|d| d[0]);
            if !parts.is_empty() {
                let mut e = AnyEngine::new_on(Arc::clone(model), &engine_opts, spec.backend, device.unwrap_or(0))
                    .map_err(|e| naming_device(e, device))?;
                e.set_interrupt(Some(crate::interrupt::flag()));
                threads = Some(e.threads());
                work.progress().manifest.write(&path)?;
                match work.run_on(&mut e, device.unwrap_or(0)) {
                    Ok(()) => {}
                    Err(Error::Interrupted { .. }) => interrupted = true,
                    Err(e) => failure = Some(naming_device(e, device)),
                }
            } else {
                work.progress().manifest.write(&path)?;
            }
        }
        // One worker thread per device, each making its own engine there (a CUDA device is
        // used from the thread that opened it); the weights are shared, not copied.
        Some(list) => {
            work.progress().manifest.write(&path)?;
            let used = &list[..list.len().min(parts.len())];
            let names = |d: &[usize]| d.iter().map(usize::to_string).collect::<Vec<_>>().join(", ");
            if !used.is_empty() {
                log(format!(
                    "  {} device{} ({} {}): one worker thread and engine each; parts go to whichever is free{}",
                    used.len(),
                    if used.len() == 1 { "" } else { "s" },
                    spec.backend.name(),
                    names(used),
                    if used.len() < list.len() {
                        format!(" (device {} idle: {} part(s) to sample)", names(&list[used.len()..]), parts.len())
                    } else {
                        String::new()
                    }
                ));
            }
            let failed: Mutex<Option<Error>> = Mutex::new(None);
            std::thread::scope(|scope| {
                let workers: Vec<_> = used
                    .iter()
                    .map(|&d| {
                        let (work, engine_opts, failed) = (&work, &engine_opts, &failed);
                        let handle = std::thread::Builder::new().name(format!("icdit-device-{d}")).spawn_scoped(
                            scope,
                            move || {
                                let result =
                                    AnyEngine::new_on(Arc::clone(work.model), engine_opts, work.spec.backend, d)
                                        .and_then(|mut e| {
                                            e.set_interrupt(Some(Arc::clone(&work.stop)));
                                            work.run_on(&mut e, d)
                                        });
                                match result {
                                    Err(Error::Interrupted { .. }) => true,
                                    Err(e) => {
                                        // The first failure stops the other workers between steps.
                                        let e = naming_device(e, Some(d));
                                        let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                                        if f.is_none() {
                                            if used.len() > 1 {
                                                log(format!("  device {d} failed; stopping the other devices"));
                                            }
                                            *f = Some(e);
                                        }
                                        work.stop.store(true, Ordering::Relaxed);
                                        false
                                    }
                                    Ok(()) => false,
                                }
                            },
                        );
                        (d, handle)
                    })
                    .collect();
                // Ctrl-C reaches the workers through the run's stop flag.
                while !workers.iter().all(|(_, h)| h.as_ref().map_or(true, |h| h.is_finished())) {
                    if crate::interrupt::requested() {
                        work.stop.store(true, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                for (d, handle) in workers {
                    let outcome =
                        handle.map_err(|e| Error::io(format!("(worker thread for device {d})"), e)).and_then(|h| {
                            h.join()
                                .map_err(|_| Error::invalid("--devices", format!("the worker of device {d} panicked")))
                        });
                    match outcome {
                        Ok(stopped) => interrupted |= stopped,
                        Err(e) => {
                            work.stop.store(true, Ordering::Relaxed);
                            let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                            f.get_or_insert(e);
                        }
                    }
                }
            });
            failure = failed.into_inner().unwrap_or_else(|p| p.into_inner());
            threads = Some(0);
        }
    }
    let Progress { manifest, sampled, parts_by_device } = work.progress.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = failure {
        return Err(e);
    }
    let left = end - first - manifest.images_done;
    if left > 0 && (interrupted || crate::interrupt::requested()) {
        // Ctrl-C stops between steps or parts; finished parts stay and the run resumes.
        return Err(Error::Interrupted {
            done: format!(
                "shard {} of {}: {} of {} images are in finished parts, kept in {}; the same command resumes",
                choice.index,
                choice.count,
                manifest.images_done,
                end - first,
                dir.display()
            ),
        });
    }
    let secs = start.elapsed().as_secs_f64();
    let by_device = match &devices {
        Some(_) if !parts_by_device.is_empty() => format!(
            " on {} device{} ({})",
            parts_by_device.len(),
            if parts_by_device.len() == 1 { "" } else { "s" },
            parts_by_device
                .iter()
                .map(|(d, n)| format!("device {d}: {n} part{}", if *n == 1 { "" } else { "s" }))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => String::new(),
    };
    if manifest.done {
        log(format!(
            "shard {} of {} done: sampled {sampled} images{by_device}, skipped {skipped} finished ones, in {secs:.2} s; \
             manifest {}",
            choice.index,
            choice.count,
            path.display()
        ));
    } else {
        log(format!(
            "shard {} of {} stopped after {} part file(s) as asked (--max-parts){by_device}: {left} images left; run \
             the same command again to finish",
            choice.index,
            choice.count,
            parts_by_device.iter().map(|p| p.1).sum::<usize>()
        ));
    }
    if spec.json {
        outln!(
            "{}",
            json!({
                "manifest": path.display().to_string(),
                "shard": choice.index,
                "num_shards": choice.count,
                "shard_source": choice.source,
                "range": [first, end],
                "sampled": sampled,
                "skipped": skipped,
                "left": left,
                "done": manifest.done,
                "total_s": secs,
                "sampling_s": work.sampling.elapsed().as_secs_f64(),
                "threads": threads,
                "devices": devices,
                "parts_by_device": parts_by_device.iter().map(|(d, n)| json!({"device": d, "parts": n})).collect::<Vec<_>>(),
            })
        );
    }
    Ok(())
}

/// A shard's state while it samples.
struct Progress {
    manifest: Manifest,
    /// Images sampled in this run.
    sampled: u64,
    /// Parts written in this run per device that got a worker, in --devices order.
    parts_by_device: Vec<(usize, usize)>,
}

/// What the engines sampling one shard share: the parts to hand out, the manifest (updated
/// under its mutex after each part) and the VAE decoder (on the CPU, one image at a time).
struct Work<'a> {
    args: &'a ShardArgs,
    spec: &'a RunSpec,
    model: &'a Arc<DitModel>,
    dir: &'a Path,
    path: &'a Path,
    parts: &'a [(u64, u64)],
    /// The next part to hand out.
    next: AtomicUsize,
    /// Set on a worker's failure or Ctrl-C: the other workers stop between steps.
    stop: Arc<AtomicBool>,
    progress: Mutex<Progress>,
    vae: Mutex<Option<VaeDecoder>>,
    channels: usize,
    side: usize,
    shard_images: u64,
    /// Whether the log names the device of each part (--devices was given).
    name_device: bool,
    sampling: Instant,
}

impl Work<'_> {
    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Samples parts on `engine` until none are left or the run stops. The pixels of a part
    /// depend only on its images (seed, index, class), not on the engine or device.
    fn run_on(&self, engine: &mut AnyEngine, device: usize) -> Result<(), Error> {
        let cfg = self.model.config;
        let (seed, img, per_image) = (self.spec.seed, cfg.image_elems(), self.side * self.side * self.channels);
        let batch = self.parts.iter().map(|p| p.1).max().unwrap_or(0) as usize;
        let mut latents = vec![0.0f32; batch * img];
        let mut pixels = vec![0u8; batch * per_image];
        loop {
            let Some(&(at, n)) = self.parts.get(self.next.fetch_add(1, Ordering::Relaxed)) else { return Ok(()) };
            if crate::interrupt::requested() || self.stop.load(Ordering::Relaxed) {
                return Err(Error::Interrupted { done: String::new() });
            }
            let count = n as usize;
            let labels = icdit::noise::class_labels(seed, at, count, cfg.num_classes);
            let req = Request { classes: &labels, seed, first_index: at, noise: None, step_noise: None };
            engine.sample(&req, &mut latents[..count * img], &mut |_| {})?;
            let decoded;
            let images = {
                let mut vae = self.vae.lock().unwrap_or_else(|p| p.into_inner());
                match vae.as_mut() {
                    None => &latents[..count * img],
                    Some(d) => {
                        decoded = crate::sample::decode_chunks(
                            d.latent_len(),
                            d.image_len(),
                            1,
                            &latents[..count * img],
                            count,
                            |z, out| d.decode(z, out),
                        )?;
                        &decoded[..]
                    }
                }
            };
            let px = &mut pixels[..count * per_image];
            image::to_nhwc_u8(images, count, self.channels, self.side, self.spec.rounding, px);
            if self.args.png {
                for (i, &c) in labels.iter().enumerate() {
                    let png = self.dir.join("images").join(crate::output::png_name(at + i as u64, c, Some(seed)));
                    image::write_png(
                        &png,
                        &px[i * per_image..(i + 1) * per_image],
                        self.side,
                        self.side,
                        self.channels,
                    )?;
                }
            }
            let file = part_name(at, at + n);
            let part_path = self.dir.join(&file);
            image::write_npz(&part_path, px, count, self.side, self.channels)?;
            let bytes = std::fs::metadata(&part_path).map_err(|e| Error::io(&part_path, e))?.len();
            let mut p = self.progress();
            p.manifest.parts.push(Part { file: file.clone(), first: at, count: n, bytes });
            p.manifest.parts.sort_by_key(|p| p.first);
            p.sampled += n;
            p.manifest.images_done += n;
            p.manifest.done = p.manifest.images_done == self.shard_images;
            p.manifest.write(self.path)?;
            match p.parts_by_device.iter_mut().find(|e| e.0 == device) {
                Some(e) => e.1 += 1,
                None => p.parts_by_device.push((device, 1)),
            }
            let on = if self.name_device { format!("device {device}, ") } else { String::new() };
            log(format!(
                "  {file}: images {at}..{} ({}/{} done, {on}{:.1} images/s)",
                at + n,
                p.manifest.images_done,
                self.shard_images,
                p.sampled as f64 / self.sampling.elapsed().as_secs_f64().max(1e-9)
            ));
        }
    }
}

/// `e` with the device it happened on (when --devices named one) where the error has room
/// for it; the log line of a failing worker names the device in any case.
fn naming_device(e: Error, device: Option<usize>) -> Error {
    let Some(d) = device else { return e };
    let tag = format!("device {d}");
    match e {
        Error::Gpu { what, reason } if !reason.contains(&tag) => {
            Error::Gpu { what, reason: format!("{tag}: {reason}") }
        }
        Error::Invalid { what, reason } => Error::Invalid { what, reason: format!("{tag}: {reason}") },
        Error::Config { origin, reason } => Error::Config { origin, reason: format!("{tag}: {reason}") },
        Error::Memory { what, need, limit, limit_from, breakdown } => {
            Error::Memory { what: format!("{what} on {tag}"), need, limit, limit_from, breakdown }
        }
        Error::NonFinite { step, steps, timestep, location, cause } => {
            Error::NonFinite { step, steps, timestep, location: format!("{location} on {tag}"), cause }
        }
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_manifest_name(&manifest_name(1, 3)));
        assert!(!is_manifest_name("shard-1-of-.json") && !is_manifest_name(".shard-00001-of-00003.json.tmp-5"));
        assert_eq!(leftover_of(".part-000000-000004.npz.tmp-123"), Some("part-000000-000004.npz"));
        assert_eq!(leftover_of("part-000000-000004.npz"), None);
    }
}
