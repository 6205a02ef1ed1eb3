//! The shard driver: opens (or resumes) a shard in its run folder, hands its parts to one
//! engine on the calling thread or to one worker thread and engine per device, records each
//! finished part in the manifest, and reports what it did.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};

use super::launcher::{check_num_images, shard_range, ShardChoice};
use super::log::progress;
use super::manifest::{self, differences, manifest_name, manifests_in, Manifest, PixelSettings, FORMAT};
use super::parts::{self, PartWriter};
use super::workers::{on_devices, on_this_thread, Outcome, Progress, Work};
use crate::backend::Backend;
use crate::engine::EngineOptions;
use crate::error::Error;
use crate::image::Rounding;
use crate::vae::VaeDecoder;
use crate::weights::DitModel;

/// What a shard run needs besides the model, the engine options and the VAE.
#[derive(Clone, Debug)]
pub struct RunSettings {
    /// The run folder: part files, PNGs (in `images/`) and one manifest per shard.
    pub dir: PathBuf,
    /// Images in the whole run (all shards).
    pub num_images: u64,
    /// This process's shard ([`super::launcher::resolve_shard`] or [`super::launcher::shard_of_run`]).
    pub shard: ShardChoice,
    /// GPUs to sample on, one worker thread and engine each ([`super::launcher::parse_devices`]);
    /// `None`: one engine on device 0, on the calling thread.
    pub devices: Option<Vec<usize>>,
    /// Also one PNG per image into `dir/images`, named by global image index.
    pub png: bool,
    /// Write at most this many part files in this run, then stop (the shard stays resumable).
    pub max_parts: Option<usize>,
    pub rounding: Rounding,
    pub seed: u64,
    /// Images per part file (and per engine call).
    pub batch: usize,
    pub backend: Backend,
    /// Set by the caller (Ctrl-C) to stop between steps; finished parts stay.
    pub interrupt: Option<Arc<AtomicBool>>,
}

/// What a shard run did.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// The shard's manifest.
    pub manifest: PathBuf,
    pub shard: ShardChoice,
    /// The shard's global image range, [first, end).
    pub range: [u64; 2],
    /// Images sampled in this run, and images found in parts of an earlier run.
    pub sampled: u64,
    pub skipped: u64,
    /// Images of the shard not yet in a part (after `max_parts`).
    pub left: u64,
    pub done: bool,
    pub total_s: f64,
    pub sampling_s: f64,
    /// CPU threads of the engine (0 on GPU backends or with several devices); `None` when
    /// there was nothing to sample.
    pub threads: Option<usize>,
    pub devices: Option<Vec<usize>>,
    /// Parts written in this run per device that got a worker, in `devices` order.
    pub parts_by_device: Vec<(usize, usize)>,
}

impl RunReport {
    /// The report as `icdit sample --num-images … --json` prints it.
    pub fn to_json(&self) -> Value {
        json!({
            "manifest": self.manifest.display().to_string(),
            "shard": self.shard.index,
            "num_shards": self.shard.count,
            "shard_source": self.shard.source,
            "range": self.range,
            "sampled": self.sampled,
            "skipped": self.skipped,
            "left": self.left,
            "done": self.done,
            "total_s": self.total_s,
            "sampling_s": self.sampling_s,
            "threads": self.threads,
            "devices": self.devices,
            "parts_by_device": self.parts_by_device.iter().map(|(d, n)| json!({"device": d, "parts": n})).collect::<Vec<_>>(),
        })
    }
}

/// Runs (or resumes) one shard of a `num_images` run: image k gets class
/// `noise::class_labels(seed, k)` and the noise stream (seed, k), so the pixels of every
/// image are the same under any sharding, batch size or device. Errors leave the finished
/// parts and a manifest that lists them; an interrupted run returns [`Error::Interrupted`].
pub fn run(
    model: &Arc<DitModel>,
    opts: &EngineOptions,
    vae: Option<VaeDecoder>,
    settings: &RunSettings,
) -> Result<RunReport, Error> {
    let start = Instant::now();
    let shard = open(model, opts, vae.as_ref(), settings)?;
    // The parts to sample in this run (max_parts), handed out in order to whichever engine
    // is free: one on this thread, or one worker thread per device.
    let parts = &shard.todo[..shard.todo.len().min(settings.max_parts.unwrap_or(usize::MAX))];
    let max_batch = shard.todo.iter().map(|t| t.1).max().unwrap_or(1) as usize;
    let engine_opts = EngineOptions { max_batch, ..opts.clone() };
    let work = Work {
        model,
        backend: settings.backend,
        seed: settings.seed,
        devices: settings.devices.as_deref(),
        interrupt: settings.interrupt.clone(),
        writer: PartWriter {
            dir: &settings.dir,
            channels: shard.channels,
            side: shard.side,
            rounding: settings.rounding,
            png: settings.png,
            seed: settings.seed,
        },
        path: &shard.path,
        parts,
        next: AtomicUsize::new(0),
        stop: Arc::new(AtomicBool::new(false)),
        progress: Mutex::new(Progress {
            manifest: shard.manifest,
            sampled: 0,
            // The devices that get a worker: at most one per part.
            parts_by_device: settings.devices.iter().flatten().take(parts.len()).map(|&d| (d, 0)).collect(),
        }),
        vae: Mutex::new(vae),
        shard_images: shard.range.1 - shard.range.0,
        sampling: Instant::now(),
    };
    let outcome = match settings.devices.as_deref() {
        None | Some([_]) => on_this_thread(&work, &engine_opts)?,
        Some(list) => on_devices(&work, &engine_opts, list)?,
    };
    finish(settings, work, outcome, shard.range, shard.skipped, start)
}

/// A shard opened in its run folder: settings checked against the folder's other shards,
/// an earlier run's finished parts kept, and what is left cut into parts.
struct Opened {
    manifest: Manifest,
    path: PathBuf,
    range: (u64, u64),
    /// (first image, count) of each part still to sample.
    todo: Vec<(u64, u64)>,
    skipped: u64,
    channels: usize,
    side: usize,
}

/// Checks the settings, the image shape and the run folder, resumes an earlier run of the
/// shard, and cuts what is left into parts.
fn open(
    model: &DitModel,
    opts: &EngineOptions,
    vae: Option<&VaeDecoder>,
    settings: &RunSettings,
) -> Result<Opened, Error> {
    let (dir, choice, num_images) = (&settings.dir, &settings.shard, settings.num_images);
    check_num_images(num_images)?;
    if choice.count == 0 || choice.index >= choice.count {
        return Err(Error::invalid("shard", format!("shard {} of {} does not exist", choice.index, choice.count)));
    }
    let (first, end) = shard_range(num_images, choice.index, choice.count);
    let cfg = model.config;
    let (channels, side) = match vae {
        None => (cfg.in_channels, cfg.input_size),
        Some(d) => (d.model().config.out_channels, d.out_side()),
    };
    if channels != 1 && channels != 3 {
        return Err(Error::invalid("--num-images", format!("{channels}-channel images cannot be written as images")));
    }
    crate::fsio::check_writable_dir(dir)?;
    if settings.png {
        crate::fsio::check_writable_dir(&dir.join("images"))?;
    }
    let pixels = PixelSettings {
        vae,
        seed: settings.seed,
        num_images,
        rounding: settings.rounding,
        image_hwc: [side, side, channels],
        backend: settings.backend,
    };
    let (run_settings, sources) = manifest::settings(model, opts, &pixels)?;
    let name = manifest_name(choice.index, choice.count);
    let path = dir.join(&name);
    let previous = same_run(dir, &path, &run_settings)?;
    let mut manifest = Manifest {
        format: FORMAT.into(),
        settings: run_settings,
        shard: choice.index,
        num_shards: choice.count,
        range: [first, end],
        png: settings.png,
        parts: Vec::new(),
        images_done: 0,
        done: false,
        sources,
        icdit_version: env!("CARGO_PKG_VERSION").into(),
    };
    // Resume: keep every recorded part whose file is still there, whole.
    if let Some(prev) = previous {
        if prev.range != manifest.range || prev.png != settings.png {
            let png = |p: bool| if p { " and --png" } else { " without --png" };
            return Err(Error::Config {
                origin: path.display().to_string(),
                reason: format!(
                    "the shard was started with images {}..{}{}; this run asks for {first}..{end}{}",
                    prev.range[0],
                    prev.range[1],
                    png(prev.png),
                    png(settings.png),
                ),
            });
        }
        manifest.parts = parts::still_there(dir, prev.parts, (first, end));
    }
    parts::remove_leftovers(dir, &name, (first, end));
    manifest.parts.sort_by_key(|p| p.first);

    let todo = parts::gaps(&manifest.parts, (first, end), settings.batch.max(1) as u64);
    let skipped = manifest.parts.iter().map(|p| p.count).sum::<u64>();
    manifest.images_done = skipped;
    manifest.done = todo.is_empty();
    progress(format!(
        "shard {} of {} ({}): images {first}..{end} of {num_images}{}; writing to {}",
        choice.index,
        choice.count,
        choice.source,
        if skipped > 0 { format!(", {skipped} already done") } else { String::new() },
        dir.display()
    ));
    Ok(Opened { manifest, path, range: (first, end), todo, skipped, channels, side })
}

/// One folder holds one run: refuses a folder whose manifests have other settings, and
/// returns this shard's manifest (at `path`) from an earlier run, if any.
fn same_run(dir: &Path, path: &Path, settings: &serde_json::Map<String, Value>) -> Result<Option<Manifest>, Error> {
    let mut previous = None;
    for other in manifests_in(dir)? {
        let m = Manifest::read(&other)?;
        let diff = differences(&m.settings, settings);
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
    Ok(previous)
}

/// The end of a run: the first failure, or the interruption (finished parts stay and the
/// run resumes), or the summary line and the report.
fn finish(
    settings: &RunSettings,
    work: Work,
    outcome: Outcome,
    (first, end): (u64, u64),
    skipped: u64,
    start: Instant,
) -> Result<RunReport, Error> {
    let choice = &settings.shard;
    let interrupted = outcome.interrupted || work.interrupt_requested();
    let Progress { manifest, sampled, parts_by_device } = work.progress.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = outcome.failure {
        return Err(e);
    }
    let left = end - first - manifest.images_done;
    if left > 0 && interrupted {
        return Err(Error::Interrupted {
            done: format!(
                "shard {} of {}: {} of {} images are in finished parts, kept in {}; the same command resumes",
                choice.index,
                choice.count,
                manifest.images_done,
                end - first,
                settings.dir.display()
            ),
        });
    }
    let total_s = start.elapsed().as_secs_f64();
    let by_device = match &settings.devices {
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
        progress(format!(
            "shard {} of {} done: sampled {sampled} images{by_device}, skipped {skipped} finished ones, in \
             {total_s:.2} s; manifest {}",
            choice.index,
            choice.count,
            work.path.display()
        ));
    } else {
        progress(format!(
            "shard {} of {} stopped after {} part file(s) as asked (--max-parts){by_device}: {left} images left; run \
             the same command again to finish",
            choice.index,
            choice.count,
            parts_by_device.iter().map(|p| p.1).sum::<usize>()
        ));
    }
    Ok(RunReport {
        manifest: work.path.to_path_buf(),
        shard: choice.clone(),
        range: [first, end],
        sampled,
        skipped,
        left,
        done: manifest.done,
        total_s,
        sampling_s: work.sampling.elapsed().as_secs_f64(),
        threads: outcome.threads,
        devices: settings.devices.clone(),
        parts_by_device,
    })
}
