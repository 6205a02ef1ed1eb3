//! The engines of a shard run: one on the calling thread, or one worker thread and engine
//! per device taking parts from a shared queue; each finished part is written, recorded in
//! the manifest (under its mutex) and logged.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::log::progress;
use super::manifest::{Manifest, Part};
use super::parts::PartWriter;
use crate::backend::{AnyEngine, Backend};
use crate::engine::{EngineOptions, Request};
use crate::error::Error;
use crate::vae::VaeDecoder;
use crate::weights::DitModel;

/// A shard's state while it samples.
pub(super) struct Progress {
    pub manifest: Manifest,
    /// Images sampled in this run.
    pub sampled: u64,
    /// Parts written in this run per device that got a worker, in device-list order.
    pub parts_by_device: Vec<(usize, usize)>,
}

/// What the engines sampling one shard share: the parts to hand out, the manifest (updated
/// under its mutex after each part) and the VAE decoder (on the CPU, one image at a time).
pub(super) struct Work<'a> {
    pub model: &'a Arc<DitModel>,
    pub backend: Backend,
    pub seed: u64,
    /// The devices to sample on (`None`: one engine on device 0, on the calling thread).
    pub devices: Option<&'a [usize]>,
    /// Set by the caller (Ctrl-C) to stop the run.
    pub interrupt: Option<Arc<AtomicBool>>,
    pub writer: PartWriter<'a>,
    /// The shard's manifest.
    pub path: &'a Path,
    pub parts: &'a [(u64, u64)],
    /// The next part to hand out.
    pub next: AtomicUsize,
    /// Set on a worker's failure or an interrupt: the other workers stop between steps.
    pub stop: Arc<AtomicBool>,
    pub progress: Mutex<Progress>,
    pub vae: Mutex<Option<VaeDecoder>>,
    pub shard_images: u64,
    pub sampling: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Work<'_> {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        lock(&self.progress)
    }

    /// Whether the caller asked the run to stop (Ctrl-C).
    pub fn interrupt_requested(&self) -> bool {
        self.interrupt.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
    }

    /// A device worker's body: its engine samples parts until none are left or the run
    /// stops. Returns whether it was stopped; records the first failure in `failed`.
    fn worker(&self, engine_opts: &EngineOptions, d: usize, workers: usize, failed: &Mutex<Option<Error>>) -> bool {
        let result = AnyEngine::new_on(Arc::clone(self.model), engine_opts, self.backend, d).and_then(|mut e| {
            e.set_interrupt(Some(Arc::clone(&self.stop)));
            self.run_on(&mut e, d)
        });
        match result {
            Err(Error::Interrupted { .. }) => true,
            Err(e) => {
                // The first failure stops the other workers between steps.
                let e = naming_device(e, Some(d));
                let mut f = lock(failed);
                if f.is_none() {
                    if workers > 1 {
                        progress(format!("  device {d} failed; stopping the other devices"));
                    }
                    *f = Some(e);
                }
                self.stop.store(true, Ordering::Relaxed);
                false
            }
            Ok(()) => false,
        }
    }

    /// Samples parts on `engine` until none are left or the run stops. The pixels of a part
    /// depend only on its images (seed, index, class), not on the engine or device.
    fn run_on(&self, engine: &mut AnyEngine, device: usize) -> Result<(), Error> {
        let cfg = self.model.config;
        let (seed, img) = (self.seed, cfg.image_elems());
        let batch = self.parts.iter().map(|p| p.1).max().unwrap_or(0) as usize;
        let mut latents = vec![0.0f32; batch * img];
        let mut pixels = vec![0u8; batch * self.writer.image_bytes()];
        loop {
            let Some(&(at, n)) = self.parts.get(self.next.fetch_add(1, Ordering::Relaxed)) else { return Ok(()) };
            if self.interrupt_requested() || self.stop.load(Ordering::Relaxed) {
                return Err(Error::Interrupted { done: String::new() });
            }
            let count = n as usize;
            let labels = crate::noise::class_labels(seed, at, count, cfg.num_classes);
            let req = Request { classes: &labels, seed, first_index: at, noise: None, step_noise: None };
            let latents = &mut latents[..count * img];
            engine.sample(&req, latents, &mut |_| {})?;
            let decoded = self.decode(latents, count)?;
            let images = decoded.as_deref().unwrap_or(&latents[..]);
            let part = self.writer.write(at, &labels, images, &mut pixels)?;
            self.record(part, device)?;
        }
    }

    /// Decodes `count` latents one at a time on the shared decoder (`None` without a VAE),
    /// stopping between images on an interrupt.
    fn decode(&self, latents: &[f32], count: usize) -> Result<Option<Vec<f32>>, Error> {
        let mut vae = lock(&self.vae);
        let Some(d) = vae.as_mut() else { return Ok(None) };
        let (ll, il) = (d.latent_len(), d.image_len());
        let mut images = vec![0.0f32; count * il];
        for i in 0..count {
            if self.interrupt_requested() {
                return Err(Error::Interrupted { done: String::new() });
            }
            d.decode(&latents[i * ll..(i + 1) * ll], &mut images[i * il..(i + 1) * il])?;
        }
        Ok(Some(images))
    }

    /// Adds a written part to the manifest, rewrites it and logs the part.
    fn record(&self, part: Part, device: usize) -> Result<(), Error> {
        let (file, at, n) = (part.file.clone(), part.first, part.count);
        let mut p = self.progress();
        p.manifest.parts.push(part);
        p.manifest.parts.sort_by_key(|p| p.first);
        p.sampled += n;
        p.manifest.images_done += n;
        p.manifest.done = p.manifest.images_done == self.shard_images;
        p.manifest.write(self.path)?;
        match p.parts_by_device.iter_mut().find(|e| e.0 == device) {
            Some(e) => e.1 += 1,
            None => p.parts_by_device.push((device, 1)),
        }
        let on = if self.devices.is_some() { format!("device {device}, ") } else { String::new() };
        progress(format!(
            "  {file}: images {at}..{} ({}/{} done, {on}{:.1} images/s)",
            at + n,
            p.manifest.images_done,
            self.shard_images,
            p.sampled as f64 / self.sampling.elapsed().as_secs_f64().max(1e-9)
        ));
        Ok(())
    }
}

/// `e` with the device it happened on (when a device list named one) where the error has
/// room for it; the log line of a failing worker names the device in any case.
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

/// How the engines' sampling ended.
pub(super) struct Outcome {
    pub threads: Option<usize>,
    pub interrupted: bool,
    pub failure: Option<Error>,
}

/// One engine, on this thread (no devices, or one): the engine stops on the caller's
/// interrupt flag itself.
pub(super) fn on_this_thread(work: &Work, engine_opts: &EngineOptions) -> Result<Outcome, Error> {
    let mut outcome = Outcome { threads: None, interrupted: false, failure: None };
    if work.parts.is_empty() {
        work.progress().manifest.write(work.path)?;
        return Ok(outcome);
    }
    let device = work.devices.map(|d| d[0]);
    let mut e = AnyEngine::new_on(Arc::clone(work.model), engine_opts, work.backend, device.unwrap_or(0))
        .map_err(|e| naming_device(e, device))?;
    e.set_interrupt(work.interrupt.clone());
    outcome.threads = Some(e.threads());
    work.progress().manifest.write(work.path)?;
    match work.run_on(&mut e, device.unwrap_or(0)) {
        Ok(()) => {}
        Err(Error::Interrupted { .. }) => outcome.interrupted = true,
        Err(e) => outcome.failure = Some(naming_device(e, device)),
    }
    Ok(outcome)
}

/// One worker thread per device, each making its own engine there (a CUDA device is used
/// from the thread that opened it); the weights are shared, not copied. The first failure
/// stops the other workers between steps.
pub(super) fn on_devices(work: &Work, engine_opts: &EngineOptions, list: &[usize]) -> Result<Outcome, Error> {
    work.progress().manifest.write(work.path)?;
    let used = &list[..list.len().min(work.parts.len())];
    log_devices(used, list, work.backend, work.parts.len());
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    let mut interrupted = false;
    std::thread::scope(|scope| {
        let workers: Vec<_> = used
            .iter()
            .map(|&d| {
                let failed = &failed;
                let handle = std::thread::Builder::new()
                    .name(format!("icdit-device-{d}"))
                    .spawn_scoped(scope, move || work.worker(engine_opts, d, used.len(), failed));
                (d, handle)
            })
            .collect();
        // The caller's interrupt reaches the workers through the run's stop flag.
        while !workers.iter().all(|(_, h)| h.as_ref().map_or(true, |h| h.is_finished())) {
            if work.interrupt_requested() {
                work.stop.store(true, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for (d, handle) in workers {
            let outcome = handle.map_err(|e| Error::io(format!("(worker thread for device {d})"), e)).and_then(|h| {
                h.join().map_err(|_| Error::invalid("--devices", format!("the worker of device {d} panicked")))
            });
            match outcome {
                Ok(stopped) => interrupted |= stopped,
                Err(e) => {
                    work.stop.store(true, Ordering::Relaxed);
                    lock(&failed).get_or_insert(e);
                }
            }
        }
    });
    let failure = failed.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok(Outcome { threads: Some(0), interrupted, failure })
}

/// The log line naming the devices that get a worker (and those left idle).
fn log_devices(used: &[usize], list: &[usize], backend: Backend, parts: usize) {
    if used.is_empty() {
        return;
    }
    let names = |d: &[usize]| d.iter().map(usize::to_string).collect::<Vec<_>>().join(", ");
    progress(format!(
        "  {} device{} ({} {}): one worker thread and engine each; parts go to whichever is free{}",
        used.len(),
        if used.len() == 1 { "" } else { "s" },
        backend.name(),
        names(used),
        if used.len() < list.len() {
            format!(" (device {} idle: {parts} part(s) to sample)", names(&list[used.len()..]))
        } else {
            String::new()
        }
    ));
}
