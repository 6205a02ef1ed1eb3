//! A sampler ready to serve requests from another program: the model, its recommended
//! settings, the cache policy, the VAE and every buffer a request needs, opened once with the
//! command line's defaults. The C ABI (`ffi/`) and the Python package (`python/`) are thin
//! wrappers around [`Session`]; Rust programs may use it too, or [`crate::Engine`] directly.
//!
//! After [`Session::open`], a request allocates nothing: the latents, the decoded images and
//! the preview buffers are sized for `max_batch` images when the session is opened, and the
//! caller's output buffer receives the result. Changing the guidance scale between requests
//! is the one exception: the engine is re-planned for the new scale (see
//! [`Session::set_guidance`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::backend::{AnyEngine, AnyVae, Backend};
use crate::config::SampleSpace;
use crate::diffusion::Sampler;
use crate::engine::{EngineOptions, GuidedChannels, Request, Step};
use crate::error::{Error, Result};
use crate::factors::Factors;
use crate::image::{self, Rounding};
use crate::policy::{CacheMode, CachePolicy, Forecast, FullSteps};
use crate::vae::VaeModel;
use crate::weights::{DitModel, LoadOptions};

/// The bundled default model (weights/README.md), used when no weights are named.
pub const DEFAULT_WEIGHTS: &str = "weights/icdit-shapes-32.safetensors";

/// The bundled model: relative to the working directory, else in the source checkout this
/// library was built from.
pub fn default_weights() -> PathBuf {
    let here = PathBuf::from(DEFAULT_WEIGHTS);
    if here.exists() {
        return here;
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_WEIGHTS);
    if built.exists() {
        built
    } else {
        here
    }
}

/// Sampling settings a model file may recommend (metadata `icdit_sampling`).
#[derive(serde::Deserialize, Default, Clone, Debug)]
pub struct Recommended {
    pub sampler: Option<String>,
    pub steps: Option<usize>,
    pub cfg: Option<f32>,
}

/// The model file's recommended settings (none when it has no `icdit_sampling` metadata).
pub fn recommended(model: &DitModel) -> Result<Recommended> {
    let Some(file) = model.store.files().first() else { return Ok(Recommended::default()) };
    match file.metadata().get("icdit_sampling") {
        None => Ok(Recommended::default()),
        Some(s) => serde_json::from_str(s).map_err(|e| Error::Config {
            origin: format!("{} (metadata `icdit_sampling`)", file.path().display()),
            reason: e.to_string(),
        }),
    }
}

/// How to open a session. [`Default`] is `icdit sample` with no flags: the bundled model
/// with the sampler, steps and guidance its file recommends, no caching, the CPU backend.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Weights (official .safetensors or diffusers folder); `None`: the bundled model.
    pub weights: Option<PathBuf>,
    pub load: LoadOptions,
    /// Rank-r factors for `cache: Icc` (made by `icdit calibrate`).
    pub factors: Option<PathBuf>,
    /// VAE decoder (diffusers AutoencoderKL folder) for latent-space models; `None`: the
    /// pipeline's own `vae/` folder when `weights` is a diffusers DiT pipeline.
    pub vae: Option<PathBuf>,
    pub backend: Backend,
    /// CUDA ordinal (GPU backends only).
    pub device: usize,
    /// Largest number of images per request.
    pub max_batch: usize,
    /// DiT's respacing "N"; `None`: the model's recommendation, else 250.
    pub steps: Option<usize>,
    /// A respacing spec instead of `steps` (`ddim50`, `250`, `10,20`).
    pub respacing: Option<String>,
    /// `ddpm` or `ddim`; `None`: the model's recommendation, else ddpm.
    pub sampler: Option<String>,
    /// DDIM η.
    pub eta: f32,
    /// Guidance scale (1: none); `None`: the model's recommendation, else 4.
    pub cfg: Option<f32>,
    pub guide_all_channels: bool,
    pub cache: CachePolicy,
    pub full_steps: FullSteps,
    /// Taylor forecasting's order and warm-up full steps (cache `taylor` only).
    pub taylor: Forecast,
    /// CPU threads (0: all cores).
    pub threads: usize,
    /// Float to uint8 for pixel outputs.
    pub rounding: Rounding,
    pub check_finite: bool,
    pub max_memory: Option<u64>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            weights: None,
            load: LoadOptions::default(),
            factors: None,
            vae: None,
            backend: Backend::Cpu,
            device: 0,
            max_batch: 16,
            steps: None,
            respacing: None,
            sampler: None,
            eta: 0.0,
            cfg: None,
            guide_all_channels: false,
            cache: CachePolicy::None,
            full_steps: FullSteps::Period(2),
            taylor: Forecast::CLI_DEFAULT,
            threads: 0,
            rounding: Rounding::Dit,
            check_finite: true,
            max_memory: None,
        }
    }
}

/// `ddpm` or `ddim` (with DDIM's η), as the command line spells them.
pub fn parse_sampler(name: &str, eta: f32) -> Result<Sampler> {
    match name {
        "ddpm" => Ok(Sampler::Ddpm),
        "ddim" => Ok(Sampler::Ddim { eta }),
        other => Err(Error::invalid("sampler", format!("`{other}`: expected ddpm or ddim"))),
    }
}

/// The sampler of a run: the one named, else the model's recommendation, else DDPM (DiT's).
pub fn resolve_sampler(name: Option<&str>, rec: &Recommended, eta: f32) -> Result<Sampler> {
    parse_sampler(name.or(rec.sampler.as_deref()).unwrap_or("ddpm"), eta)
}

/// The respacing of a run: the spec given, else `steps` or the model's recommended steps,
/// else DiT's 250.
pub fn resolve_respacing(spec: Option<&str>, steps: Option<usize>, rec: &Recommended) -> Result<String> {
    match (spec, steps.or(rec.steps)) {
        (Some(spec), _) => Ok(spec.to_string()),
        (None, Some(0)) => Err(Error::invalid("steps", "must be at least 1")),
        (None, Some(n)) => Ok(n.to_string()),
        (None, None) => Ok("250".into()),
    }
}

/// `none`, `reuse`, `icc`, `fora` or `taylor`, as the command line spells them.
pub fn parse_cache(s: &str) -> Result<CachePolicy> {
    match s {
        "none" => Ok(CachePolicy::None),
        "reuse" => Ok(CachePolicy::Reuse),
        "icc" => Ok(CachePolicy::Icc),
        "fora" => Ok(CachePolicy::Fora),
        "taylor" => Ok(CachePolicy::Taylor),
        other => Err(Error::invalid("cache", format!("`{other}`: expected none, reuse, icc, fora or taylor"))),
    }
}

/// The cache mode of a policy by name: icc loads its factors from `factors` (required, and
/// refused under the other policies); taylor takes `forecast` (its order checked).
pub fn cache_mode(
    policy: CachePolicy,
    factors: Option<&std::path::Path>,
    forecast: Forecast,
    model: &DitModel,
) -> Result<CacheMode> {
    match (policy, factors) {
        (CachePolicy::Icc, Some(f)) => Ok(CacheMode::Icc(Arc::new(Factors::load(f, model)?))),
        (CachePolicy::Icc, None) => {
            Err(Error::invalid("factors", "cache icc needs a factors file (see `icdit calibrate`)"))
        }
        (_, Some(_)) => Err(Error::invalid("factors", "only used with cache icc")),
        (CachePolicy::None, None) => Ok(CacheMode::None),
        (CachePolicy::Reuse, None) => Ok(CacheMode::Reuse),
        (CachePolicy::Fora, None) => Ok(CacheMode::Fora),
        (CachePolicy::Taylor, None) => {
            forecast.validate()?;
            Ok(CacheMode::Taylor(forecast))
        }
    }
}

/// `dit` or `diffusers`.
pub fn parse_rounding(s: &str) -> Result<Rounding> {
    match s {
        "dit" => Ok(Rounding::Dit),
        "diffusers" => Ok(Rounding::Diffusers),
        other => Err(Error::invalid("rounding", format!("`{other}`: expected dit or diffusers"))),
    }
}

/// One request to a session.
#[derive(Clone, Copy, Debug)]
pub struct SessionRequest<'a> {
    /// One class label per image.
    pub classes: &'a [i64],
    pub seed: u64,
    /// Image index of the first image (noise is keyed by seed and index).
    pub first_index: u64,
    /// Guidance scale for this request; `None`: the one the session was opened with.
    pub cfg: Option<f32>,
    /// Compute x̂₀ after each step and pass it to the step callback.
    pub preview: bool,
}

impl<'a> SessionRequest<'a> {
    pub fn new(classes: &'a [i64], seed: u64) -> Self {
        SessionRequest { classes, seed, first_index: 0, cfg: None, preview: false }
    }
}

/// What the step callback sees when previews are asked for: x̂₀ of every image of the
/// request in latent layout (B, C, I, I), and as uint8 NHWC pixels for pixel-space models.
/// Both are the session's buffers, valid during the callback.
#[derive(Clone, Copy, Debug)]
pub struct Preview<'a> {
    pub latents: &'a [f32],
    pub pixels: Option<&'a [u8]>,
}

/// Sizes of a session's inputs and outputs.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    pub num_classes: usize,
    pub max_batch: usize,
    pub steps: usize,
    /// Latents per image: channels and side.
    pub latent_channels: usize,
    pub latent_side: usize,
    /// Pixels per image (after the VAE, or the latents themselves for pixel-space models);
    /// 0 when this session cannot make pixels (a latent model without a VAE).
    pub image_channels: usize,
    pub image_side: usize,
    pub cfg: f32,
    pub previews: bool,
}

impl SessionInfo {
    pub fn latent_len(&self) -> usize {
        self.latent_channels * self.latent_side * self.latent_side
    }
    pub fn pixel_len(&self) -> usize {
        self.image_channels * self.image_side * self.image_side
    }
}

/// A model on a backend with every buffer a request needs.
pub struct Session {
    model: Arc<DitModel>,
    opts: EngineOptions,
    /// The guidance scale the session was opened with (requests without one use it).
    default_cfg: f32,
    backend: Backend,
    device: usize,
    engine: AnyEngine,
    vae: Option<AnyVae>,
    rounding: Rounding,
    interrupt: Arc<AtomicBool>,
    /// max_batch latents, (B, C, I, I).
    latents: Vec<f32>,
    /// max_batch decoded images (VAE models only), (B, C, H, W).
    images: Vec<f32>,
    /// x̂₀ of the current step, and its pixels for pixel-space models.
    preview: Vec<f32>,
    preview_pixels: Vec<u8>,
    /// The thread that opened a GPU session (a device context is bound to it); `None` for
    /// the CPU backend, whose engine may move between threads.
    opener: Option<std::thread::ThreadId>,
    /// Time the last request spent in the engine's sampling loop (for overhead measurements).
    last_engine: std::time::Duration,
}

impl Session {
    /// Loads the model, resolves the settings as `icdit sample` does, and builds the engine
    /// (and the VAE decoder) with every buffer.
    pub fn open(o: &SessionOptions) -> Result<Session> {
        let weights = o.weights.clone().unwrap_or_else(default_weights);
        let model = Arc::new(DitModel::load(&weights, &o.load)?);
        let rec = recommended(&model)?;
        let sampler = resolve_sampler(o.sampler.as_deref(), &rec, o.eta)?;
        let respacing = resolve_respacing(o.respacing.as_deref(), o.steps, &rec)?;
        let cache = cache_mode(o.cache, o.factors.as_deref(), o.taylor, &model)?;
        let opts = EngineOptions {
            max_batch: o.max_batch,
            respacing,
            sampler,
            cfg_scale: o.cfg.or(rec.cfg).unwrap_or(4.0),
            guided_channels: if o.guide_all_channels { GuidedChannels::All } else { GuidedChannels::OfficialThree },
            threads: o.threads,
            isa: None,
            cache,
            full_steps: o.full_steps.clone(),
            max_memory: o.max_memory,
            check_finite: o.check_finite,
            ..Default::default()
        };
        let vae = open_vae(o.vae.as_deref(), &weights, &model)?
            .map(|v| {
                AnyVae::new_on(v, model.config.input_size, o.threads, o.max_batch.clamp(1, 16), o.backend, o.device)
            })
            .transpose()?;
        let interrupt = Arc::new(AtomicBool::new(false));
        let mut engine = AnyEngine::new_on(Arc::clone(&model), &opts, o.backend, o.device)?;
        engine.set_interrupt(Some(Arc::clone(&interrupt)));
        let img = model.config.image_elems();
        let n = opts.max_batch;
        let images = vae.as_ref().map_or(Vec::new(), |d| vec![0.0; n * d.image_len()]);
        let pixel_model = model.space == SampleSpace::Pixel;
        let previews = engine.previews();
        Ok(Session {
            preview: if previews { vec![0.0; n * img] } else { Vec::new() },
            preview_pixels: if previews && pixel_model { vec![0; n * img] } else { Vec::new() },
            latents: vec![0.0; n * img],
            images,
            rounding: o.rounding,
            interrupt,
            vae,
            engine,
            backend: o.backend,
            device: o.device,
            default_cfg: opts.cfg_scale,
            opener: (o.backend != Backend::Cpu).then(|| std::thread::current().id()),
            last_engine: std::time::Duration::ZERO,
            opts,
            model,
        })
    }

    pub fn model(&self) -> &Arc<DitModel> {
        &self.model
    }

    /// The engine's options as resolved (sampler, respacing, guidance, cache, …).
    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    pub fn engine(&self) -> &AnyEngine {
        &self.engine
    }

    pub fn info(&self) -> SessionInfo {
        let cfg = self.model.config;
        let (image_channels, image_side) = match (&self.vae, self.model.space) {
            (Some(d), _) => (d.model().config.out_channels, d.out_side()),
            (None, SampleSpace::Pixel) => (cfg.in_channels, cfg.input_size),
            (None, SampleSpace::Latent) => (0, 0),
        };
        SessionInfo {
            num_classes: cfg.num_classes,
            max_batch: self.opts.max_batch,
            steps: self.engine.steps(),
            latent_channels: cfg.in_channels,
            latent_side: cfg.input_size,
            image_channels,
            image_side,
            cfg: self.opts.cfg_scale,
            previews: self.engine.previews(),
        }
    }

    /// The flag [`cancel`](Session::cancel) sets, for a caller that cancels from a signal
    /// handler or another thread without holding the session.
    pub fn interrupt_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.interrupt)
    }

    /// Makes the request in progress — or, if none is, the next one — stop before its next
    /// step with [`Error::Interrupted`]. Safe from any thread through
    /// [`interrupt_flag`](Session::interrupt_flag).
    pub fn cancel(&self) {
        self.interrupt.store(true, Ordering::SeqCst);
    }

    /// Sets the guidance scale of later requests. The engine's plan depends on the scale
    /// (guidance doubles the model rows), so a new scale re-plans and re-allocates the
    /// engine; requests at an unchanged scale allocate nothing.
    pub fn set_guidance(&mut self, cfg: f32) -> Result<()> {
        self.check_thread()?;
        if cfg == self.opts.cfg_scale {
            return Ok(());
        }
        let opts = EngineOptions { cfg_scale: cfg, ..self.opts.clone() };
        opts.validate(&self.model.config)?;
        let mut engine = AnyEngine::new_on(Arc::clone(&self.model), &opts, self.backend, self.device)?;
        engine.set_interrupt(Some(Arc::clone(&self.interrupt)));
        self.engine = engine;
        self.opts = opts;
        Ok(())
    }

    /// Whether the session must be used and dropped on the thread that opened it (the GPU
    /// backends: a device context belongs to one thread).
    pub fn thread_bound(&self) -> bool {
        self.opener.is_some()
    }

    /// Whether the calling thread may use this session (always, on the CPU backend).
    pub fn usable_here(&self) -> bool {
        self.opener.is_none_or(|t| t == std::thread::current().id())
    }

    fn check_thread(&self) -> Result<()> {
        if self.usable_here() {
            return Ok(());
        }
        Err(Error::invalid(
            "thread",
            "this session runs on a GPU backend and was opened on another thread: use it from the thread that opened it",
        ))
    }

    /// Wall time the last request spent inside the engine's sampling loop (the step
    /// callbacks included): what a wrapper adds is a call's time minus this.
    pub fn last_engine_time(&self) -> std::time::Duration {
        self.last_engine
    }

    /// Refuses an empty request or one above the session's batch before anything else.
    fn check_batch(&self, req: &SessionRequest) -> Result<()> {
        self.check_thread()?;
        let n = req.classes.len();
        if n == 0 || n > self.opts.max_batch {
            return Err(Error::invalid(
                "classes",
                format!("{n} images; this session was opened for 1 to {} per request", self.opts.max_batch),
            ));
        }
        Ok(())
    }

    /// Samples the request's latents into `out` ((B, C, I, I) f32; for pixel-space models
    /// these are the images in [−1, 1]). `on_step` runs after each step, with x̂₀ when the
    /// request asks for previews.
    pub fn sample_latents(
        &mut self,
        req: &SessionRequest,
        out: &mut [f32],
        on_step: &mut dyn FnMut(Step, Option<Preview>),
    ) -> Result<()> {
        self.check_batch(req)?;
        let want = req.classes.len() * self.model.config.image_elems();
        if out.len() != want {
            return Err(Error::invalid(
                "output buffer",
                format!(
                    "{} floats, expected {want} ({} images × {})",
                    out.len(),
                    req.classes.len(),
                    want / req.classes.len()
                ),
            ));
        }
        let r = self.run(req, Some(out), on_step);
        self.interrupt.store(false, Ordering::SeqCst);
        r
    }

    /// Samples the request and writes uint8 NHWC pixels into `out` (decoded by the VAE for
    /// latent models), converted as the command line converts them.
    pub fn sample_pixels(
        &mut self,
        req: &SessionRequest,
        out: &mut [u8],
        on_step: &mut dyn FnMut(Step, Option<Preview>),
    ) -> Result<()> {
        let r = self.sample_pixels_inner(req, out, on_step);
        self.interrupt.store(false, Ordering::SeqCst);
        r
    }

    fn sample_pixels_inner(
        &mut self,
        req: &SessionRequest,
        out: &mut [u8],
        on_step: &mut dyn FnMut(Step, Option<Preview>),
    ) -> Result<()> {
        self.check_batch(req)?;
        let info = self.info();
        if info.pixel_len() == 0 {
            return Err(Error::invalid(
                "output",
                "this model samples VAE latents and the session has no VAE: open it with a VAE, or ask for latents",
            ));
        }
        let n = req.classes.len();
        if out.len() != n * info.pixel_len() {
            return Err(Error::invalid(
                "output buffer",
                format!("{} bytes, expected {} ({n} images × {})", out.len(), n * info.pixel_len(), info.pixel_len()),
            ));
        }
        self.run(req, None, on_step)?;
        let (ch, side) = (info.image_channels, info.image_side);
        let img = self.model.config.image_elems();
        match &mut self.vae {
            None => image::to_nhwc_u8(&self.latents[..n * img], n, ch, side, self.rounding, out),
            Some(dec) => {
                let (ll, il, per) = (dec.latent_len(), dec.image_len(), dec.batch().max(1));
                for i in (0..n).step_by(per) {
                    if self.interrupt.load(Ordering::SeqCst) {
                        return Err(Error::Interrupted {
                            done: format!("the latents were sampled and {i} of {n} decoded"),
                        });
                    }
                    let k = per.min(n - i);
                    dec.decode(&self.latents[i * ll..(i + k) * ll], &mut self.images[i * il..(i + k) * il])?;
                }
                image::to_nhwc_u8(&self.images[..n * il], n, ch, side, self.rounding, out);
            }
        }
        Ok(())
    }

    /// Runs the engine into `out`, or into the session's latents when `out` is `None`.
    fn run(
        &mut self,
        req: &SessionRequest,
        out: Option<&mut [f32]>,
        on_step: &mut dyn FnMut(Step, Option<Preview>),
    ) -> Result<()> {
        self.set_guidance(req.cfg.unwrap_or(self.default_cfg))?;
        let n = req.classes.len();
        let cfg = self.model.config;
        let img = cfg.image_elems();
        let request = Request { first_index: req.first_index, ..Request::new(req.classes, req.seed) };
        let out = match out {
            Some(o) => o,
            None => &mut self.latents[..n * img],
        };
        if req.preview && !self.engine.previews() {
            return Err(Error::invalid("preview", "this backend does not give per-step previews"));
        }
        let start = std::time::Instant::now();
        let r = if !req.preview {
            self.engine.sample(&request, out, &mut |s| on_step(s, None))
        } else {
            let pixels = &mut self.preview_pixels;
            let rounding = self.rounding;
            let pixel_model = self.model.space == SampleSpace::Pixel;
            self.engine.sample_previewed(&request, out, &mut self.preview[..n * img], &mut |s, x0| {
                let px = if pixel_model {
                    let p = &mut pixels[..n * img];
                    image::to_nhwc_u8(x0, n, cfg.in_channels, cfg.input_size, rounding, p);
                    Some(&p[..])
                } else {
                    None
                };
                on_step(s, Some(Preview { latents: x0, pixels: px }));
            })
        };
        self.last_engine = start.elapsed();
        r
    }
}

/// The VAE for a latent-space model: the one named, or a diffusers pipeline's own `vae/`.
pub fn open_vae(vae: Option<&Path>, weights: &Path, model: &DitModel) -> Result<Option<Arc<VaeModel>>> {
    let path = match vae {
        Some(p) => p.to_path_buf(),
        None if weights.is_dir() && weights.join("vae").join("config.json").is_file() => weights.join("vae"),
        None => return Ok(None),
    };
    if model.space == SampleSpace::Pixel {
        return Err(Error::invalid("vae", "this model samples pixels directly; it has no latents to decode"));
    }
    let vae = Arc::new(VaeModel::load(&path)?);
    let (lc, c) = (vae.config.latent_channels, model.config.in_channels);
    if lc != c {
        return Err(Error::Config {
            origin: format!("{} with {}", path.display(), weights.display()),
            reason: format!("the VAE decodes {lc}-channel latents but the DiT samples {c} channels"),
        });
    }
    Ok(Some(vae))
}
