//! The C ABI of icdit (`include/icdit.h` is generated from this file): open a model once,
//! then sample requests into the caller's buffers, as latents (f32) or uint8 pixels.
//!
//! Every entry point catches panics (a panic becomes `ICDIT_STATUS_PANIC` and the handle
//! refuses further requests) and checks its pointers; errors are a status code plus a
//! message kept per handle (`icdit_last_error`). After `icdit_open`, a request allocates
//! nothing unless it fails (the message) or changes the guidance scale (the engine is
//! re-planned). Threads: see `IcditEngine`.
//!
//! Safety, for every entry point: each pointer is NULL or valid for the length the call
//! gives with it (strings NUL-terminated), and a handle is one `icdit_open` returned and
//! `icdit_close` has not freed.

// The contract above is the one C callers read in the header; it is not repeated per function.
#![allow(clippy::missing_safety_doc)]

use std::cell::Cell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use icdit::backend::Backend;
use icdit::session::{self, Preview, Session, SessionOptions, SessionRequest};
use icdit::{Error, FullSteps};

/// The version of this ABI: bumped whenever a struct or a signature changes.
pub const ICDIT_ABI_VERSION: u32 = 1;

/// What every call returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcditStatus {
    Ok = 0,
    /// An argument or a setting is wrong; the message names it.
    InvalidArgument = 1,
    /// A file could not be read (the message names it).
    Io = 2,
    /// Weights, factors or a VAE are malformed or do not fit the model.
    Model = 3,
    /// The planned memory is above the limit or what the machine has.
    Memory = 4,
    /// The GPU failed, or the backend is not in this build.
    Device = 5,
    /// The model produced NaN or Inf (the message names the step and block).
    NonFinite = 6,
    /// `icdit_cancel` stopped the request; the output is not written.
    Cancelled = 7,
    /// A callback of this handle's request called back into the handle.
    Busy = 8,
    /// A panic inside icdit was caught; the handle refuses further requests (close it).
    Panic = 9,
}

/// Settings for `icdit_open`. Fill with `icdit_options_default` first, then change fields;
/// NULL strings and zero numbers mean the default named beside each field.
#[repr(C)]
pub struct IcditOptions {
    /// Weights (official .safetensors or diffusers folder); NULL: the bundled model.
    pub weights: *const c_char,
    /// Rank-r factors for cache "icc"; NULL: none.
    pub factors: *const c_char,
    /// VAE folder for latent-space models; NULL: none (or a pipeline folder's own).
    pub vae: *const c_char,
    /// "cpu" (NULL), "cuda" (a build with the cuda feature) or "emu".
    pub backend: *const c_char,
    /// "ddpm" or "ddim"; NULL: the model's recommendation, else ddpm.
    pub sampler: *const c_char,
    /// A respacing spec ("ddim50", "250", "10,20") instead of steps; NULL: from steps.
    pub respacing: *const c_char,
    /// "none" (NULL), "reuse", "icc", "fora" or "taylor" (order 2, warm-up 2).
    pub cache: *const c_char,
    /// Float to uint8: "dit" (NULL) or "diffusers".
    pub rounding: *const c_char,
    /// Largest images per request (default 16).
    pub max_batch: u32,
    /// DiT's respacing "N"; 0: the model's recommendation, else 250.
    pub steps: u32,
    /// Under caching, every N-th step is full (default 2).
    pub period: u32,
    /// Under caching, the full steps (indices from 0) instead of period; NULL: period.
    pub full_steps: *const u32,
    pub full_steps_len: usize,
    /// CPU threads; 0: all cores.
    pub threads: u32,
    /// CUDA device ordinal.
    pub device: u32,
    /// DDIM eta (0: deterministic).
    pub eta: f32,
    /// Guidance scale (1: none); 0: the model's recommendation, else 4.
    pub cfg: f32,
    /// Check every step for NaN/Inf (default true).
    pub check_finite: bool,
}

/// Called after each step, on the thread that called `icdit_sample_*`.
pub type IcditProgressFn = Option<unsafe extern "C" fn(user: *mut c_void, step: u32, total: u32, timestep: u32)>;

/// Called after each step with the model's current estimate of the result (x̂₀): `latents`
/// ((B, C, I, I) f32, `latents_len` floats) and, for pixel-space models, uint8 NHWC `pixels`
/// (NULL and 0 otherwise). Both point into the handle's buffers, valid during the call.
pub type IcditPreviewFn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        step: u32,
        total: u32,
        latents: *const f32,
        latents_len: usize,
        pixels: *const u8,
        pixels_len: usize,
    ),
>;

/// One request.
#[repr(C)]
pub struct IcditRequest {
    /// `count` class labels, one image each (1 ≤ count ≤ max_batch).
    pub classes: *const i64,
    pub count: usize,
    pub seed: u64,
    /// Image index of the first image: noise is keyed by (seed, index), so image k is the
    /// same alone or in any batch.
    pub first_index: u64,
    /// Guidance scale; 0: the scale the handle was opened with. Another scale re-plans the
    /// engine (one allocation per change).
    pub cfg: f32,
    /// NULL: no progress reports.
    pub progress: IcditProgressFn,
    /// NULL: no previews (and no x̂₀ computed).
    pub preview: IcditPreviewFn,
    /// Passed to both callbacks.
    pub user: *mut c_void,
}

/// Sizes of a handle's inputs and outputs.
#[repr(C)]
#[derive(Default)]
pub struct IcditInfo {
    pub num_classes: u32,
    pub max_batch: u32,
    pub steps: u32,
    pub latent_channels: u32,
    pub latent_side: u32,
    /// Floats per image for `icdit_sample_latents`.
    pub latent_len: usize,
    /// Pixels per image (0 when the handle cannot make pixels: a latent model, no VAE).
    pub image_channels: u32,
    pub image_side: u32,
    /// Bytes per image for `icdit_sample_pixels` (uint8 NHWC).
    pub pixel_len: usize,
    /// The guidance scale the handle was opened with.
    pub cfg: f32,
    /// Whether per-step previews are available (the CPU backend and the GPU pipeline).
    pub previews: bool,
}

/// An open model with every buffer a request needs. A handle may be used from any thread.
/// Calls on one handle are serialised (a second thread waits for the first); a call from
/// inside one of the handle's own callbacks returns `ICDIT_STATUS_BUSY`. `icdit_cancel` is
/// the exception: it never waits and may be called from any thread, or a callback, at any
/// time before `icdit_close`. Separate handles share nothing and sample in parallel.
/// With backend "cuda" or "emu" a handle belongs to the thread that opened it (a device
/// context is per thread): calls from other threads fail with ICDIT_STATUS_INVALID_ARGUMENT,
/// and `icdit_close` from another thread releases the handle but not the device memory.
pub struct IcditEngine {
    interrupt: Arc<AtomicBool>,
    /// Address of a thread-local of the thread inside a call, 0 when none (re-entry check).
    owner: AtomicUsize,
    inner: Mutex<Inner>,
}

struct Inner {
    session: Session,
    error: Option<CString>,
    panicked: bool,
    /// Tests only: panic inside the engine's step loop on the next request.
    panic_next: bool,
}

thread_local! {
    static THREAD_TAG: Cell<u8> = const { Cell::new(0) };
}

fn thread_tag() -> usize {
    THREAD_TAG.with(|t| t as *const Cell<u8> as usize)
}

/// The status for a library error.
fn status_of(e: &Error) -> IcditStatus {
    match e {
        Error::Invalid { .. } => IcditStatus::InvalidArgument,
        Error::Io { .. } => IcditStatus::Io,
        Error::Memory { .. } => IcditStatus::Memory,
        Error::Gpu { .. } => IcditStatus::Device,
        Error::NonFinite { .. } | Error::NonFiniteInput { .. } => IcditStatus::NonFinite,
        Error::Interrupted { .. } => IcditStatus::Cancelled,
        _ => IcditStatus::Model,
    }
}

fn message(s: &str) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    let what = p.downcast_ref::<&str>().copied().or_else(|| p.downcast_ref::<String>().map(String::as_str));
    format!("internal error (a panic in icdit was caught: {}); close this handle", what.unwrap_or("no message"))
}

/// Copies `s` into the caller's `buf` of `len` bytes, cut to fit and NUL-terminated.
unsafe fn write_message(buf: *mut c_char, len: usize, s: &str) {
    if buf.is_null() || len == 0 {
        return;
    }
    let n = s.len().min(len - 1);
    std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), n);
    *buf.add(n) = 0;
}

/// A C string field: `None` for NULL; an error naming `what` if it is not UTF-8.
unsafe fn opt_str(p: *const c_char, what: &'static str) -> Result<Option<String>, Error> {
    if p.is_null() {
        return Ok(None);
    }
    CStr::from_ptr(p).to_str().map(|s| Some(s.to_owned())).map_err(|_| Error::invalid(what, "is not valid UTF-8"))
}

/// The library's session options from the C struct.
unsafe fn session_options(o: &IcditOptions) -> Result<SessionOptions, Error> {
    let d = SessionOptions::default();
    let full_steps = if o.full_steps.is_null() || o.full_steps_len == 0 {
        FullSteps::Period(if o.period == 0 { 2 } else { o.period as usize })
    } else {
        let list = std::slice::from_raw_parts(o.full_steps, o.full_steps_len);
        FullSteps::List(list.iter().map(|&s| s as usize).collect())
    };
    if !(o.eta.is_finite() && o.eta >= 0.0) {
        return Err(Error::invalid("eta", format!("{}: must be ≥ 0", o.eta)));
    }
    Ok(SessionOptions {
        weights: opt_str(o.weights, "weights")?.map(PathBuf::from),
        factors: opt_str(o.factors, "factors")?.map(PathBuf::from),
        vae: opt_str(o.vae, "vae")?.map(PathBuf::from),
        backend: opt_str(o.backend, "backend")?.as_deref().unwrap_or("cpu").parse::<Backend>()?,
        device: o.device as usize,
        max_batch: if o.max_batch == 0 { d.max_batch } else { o.max_batch as usize },
        steps: (o.steps != 0).then_some(o.steps as usize),
        respacing: opt_str(o.respacing, "respacing")?,
        sampler: opt_str(o.sampler, "sampler")?,
        eta: o.eta,
        cfg: (o.cfg != 0.0).then_some(o.cfg),
        cache: session::parse_cache(opt_str(o.cache, "cache")?.as_deref().unwrap_or("none"))?,
        full_steps,
        threads: o.threads as usize,
        rounding: session::parse_rounding(opt_str(o.rounding, "rounding")?.as_deref().unwrap_or("dit"))?,
        check_finite: o.check_finite,
        ..d
    })
}

/// Fills `options` with the defaults (`icdit sample` with no flags: the bundled model with
/// its recommended sampler, steps and guidance, no caching, the CPU backend, 16 images).
#[no_mangle]
pub unsafe extern "C" fn icdit_options_default(options: *mut IcditOptions) {
    if options.is_null() {
        return;
    }
    options.write(IcditOptions {
        weights: std::ptr::null(),
        factors: std::ptr::null(),
        vae: std::ptr::null(),
        backend: std::ptr::null(),
        sampler: std::ptr::null(),
        respacing: std::ptr::null(),
        cache: std::ptr::null(),
        rounding: std::ptr::null(),
        max_batch: 16,
        steps: 0,
        period: 2,
        full_steps: std::ptr::null(),
        full_steps_len: 0,
        threads: 0,
        device: 0,
        eta: 0.0,
        cfg: 0.0,
        check_finite: true,
    });
}

/// Opens a model: loads the weights (and factors, VAE), plans and allocates every buffer.
/// `options` NULL: the defaults. On success `*engine` is the new handle; on failure it is
/// NULL and the message goes to `error` (`error_len` bytes, may be NULL).
#[no_mangle]
pub unsafe extern "C" fn icdit_open(
    options: *const IcditOptions,
    engine: *mut *mut IcditEngine,
    error: *mut c_char,
    error_len: usize,
) -> IcditStatus {
    if engine.is_null() {
        write_message(error, error_len, "invalid engine: the handle pointer is NULL");
        return IcditStatus::InvalidArgument;
    }
    *engine = std::ptr::null_mut();
    let result = catch_unwind(|| {
        let mut defaults = std::mem::MaybeUninit::<IcditOptions>::uninit();
        let o = if options.is_null() {
            icdit_options_default(defaults.as_mut_ptr());
            defaults.assume_init_ref()
        } else {
            &*options
        };
        Session::open(&session_options(o)?)
    });
    match result {
        Ok(Ok(session)) => {
            let handle = IcditEngine {
                interrupt: session.interrupt_flag(),
                owner: AtomicUsize::new(0),
                inner: Mutex::new(Inner { session, error: None, panicked: false, panic_next: false }),
            };
            *engine = Box::into_raw(Box::new(handle));
            IcditStatus::Ok
        }
        Ok(Err(e)) => {
            write_message(error, error_len, &e.to_string());
            status_of(&e)
        }
        Err(p) => {
            write_message(error, error_len, &panic_text(&*p));
            IcditStatus::Panic
        }
    }
}

/// Holds a handle's lock for one call; refuses re-entry from the handle's own callbacks.
struct Call<'a> {
    handle: &'a IcditEngine,
    inner: MutexGuard<'a, Inner>,
}

impl<'a> Call<'a> {
    fn enter(handle: &'a IcditEngine) -> Option<Call<'a>> {
        if handle.owner.load(Ordering::SeqCst) == thread_tag() {
            return None;
        }
        let inner = handle.inner.lock().unwrap_or_else(|p| p.into_inner());
        handle.owner.store(thread_tag(), Ordering::SeqCst);
        Some(Call { handle, inner })
    }

    /// Records a result: clears or sets the handle's message.
    fn finish(&mut self, r: Result<(), Error>) -> IcditStatus {
        match r {
            Ok(()) => {
                self.inner.error = None;
                IcditStatus::Ok
            }
            Err(e) => {
                self.inner.error = Some(message(&e.to_string()));
                status_of(&e)
            }
        }
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        self.handle.owner.store(0, Ordering::SeqCst);
    }
}

/// Output a request writes: pixels or latents.
enum Out<'a> {
    Pixels(&'a mut [u8]),
    Latents(&'a mut [f32]),
}

/// The request's validation, callbacks and panic boundary, for both outputs.
unsafe fn sample(engine: *mut IcditEngine, request: *const IcditRequest, out: Out) -> IcditStatus {
    let Some(handle) = engine.as_ref() else { return IcditStatus::InvalidArgument };
    let Some(mut call) = Call::enter(handle) else { return IcditStatus::Busy };
    if call.inner.panicked {
        call.inner.error = Some(message("an earlier call on this handle panicked; close it and open another"));
        return IcditStatus::Panic;
    }
    let Some(req) = request.as_ref() else {
        return call.finish(Err(Error::invalid("request", "is NULL")));
    };
    if req.classes.is_null() && req.count != 0 {
        return call.finish(Err(Error::invalid("classes", "is NULL")));
    }
    let classes = if req.count == 0 { &[][..] } else { std::slice::from_raw_parts(req.classes, req.count) };
    let cfg = if req.cfg == 0.0 { None } else { Some(req.cfg) };
    let sreq =
        SessionRequest { classes, seed: req.seed, first_index: req.first_index, cfg, preview: req.preview.is_some() };
    let (progress, preview, user) = (req.progress, req.preview, req.user);
    let inner = &mut *call.inner;
    let panic_next = std::mem::take(&mut inner.panic_next);
    let session = &mut inner.session;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut on_step = |s: icdit::engine::Step, p: Option<Preview>| {
            if panic_next {
                panic!("injected by icdit_c::testing::panic_in_next_request");
            }
            if let Some(f) = progress {
                f(user, s.index as u32, s.total as u32, s.timestep as u32);
            }
            if let (Some(f), Some(p)) = (preview, p) {
                let (px, px_len) = p.pixels.map_or((std::ptr::null(), 0), |x| (x.as_ptr(), x.len()));
                f(user, s.index as u32, s.total as u32, p.latents.as_ptr(), p.latents.len(), px, px_len);
            }
        };
        match out {
            Out::Pixels(o) => session.sample_pixels(&sreq, o, &mut on_step),
            Out::Latents(o) => session.sample_latents(&sreq, o, &mut on_step),
        }
    }));
    match result {
        Ok(r) => call.finish(r),
        Err(p) => {
            call.inner.panicked = true;
            call.inner.error = Some(message(&panic_text(&*p)));
            IcditStatus::Panic
        }
    }
}

/// A caller's output buffer: NULL only when empty, aligned for `T`.
unsafe fn out_slice<'a, T>(engine: *mut IcditEngine, p: *mut T, len: usize) -> Result<&'a mut [T], IcditStatus> {
    let bad = if p.is_null() && len != 0 {
        Some("out: is NULL")
    } else if !(p as usize).is_multiple_of(std::mem::align_of::<T>()) {
        Some("out: is not aligned for its element type")
    } else {
        None
    };
    match (bad, engine.as_ref()) {
        (None, _) if len == 0 => Ok(&mut []),
        (None, _) => Ok(std::slice::from_raw_parts_mut(p, len)),
        (Some(_), None) => Err(IcditStatus::InvalidArgument),
        (Some(m), Some(h)) => match Call::enter(h) {
            None => Err(IcditStatus::Busy),
            Some(mut c) => Err(c.finish(Err(Error::invalid("output buffer", m)))),
        },
    }
}

/// Samples `request` and writes uint8 NHWC pixels (count × `pixel_len` bytes of
/// `icdit_info`) into `out` (`out_len` bytes), converted as the command line converts them.
#[no_mangle]
pub unsafe extern "C" fn icdit_sample_pixels(
    engine: *mut IcditEngine,
    request: *const IcditRequest,
    out: *mut u8,
    out_len: usize,
) -> IcditStatus {
    catch_unwind(|| match out_slice(engine, out, out_len) {
        Ok(o) => sample(engine, request, Out::Pixels(o)),
        Err(s) => s,
    })
    .unwrap_or(IcditStatus::Panic)
}

/// Samples `request` and writes f32 latents (count × `latent_len` floats, (B, C, I, I);
/// images in [−1, 1] for pixel-space models) into `out` (`out_len` floats).
#[no_mangle]
pub unsafe extern "C" fn icdit_sample_latents(
    engine: *mut IcditEngine,
    request: *const IcditRequest,
    out: *mut f32,
    out_len: usize,
) -> IcditStatus {
    catch_unwind(|| match out_slice(engine, out, out_len) {
        Ok(o) => sample(engine, request, Out::Latents(o)),
        Err(s) => s,
    })
    .unwrap_or(IcditStatus::Panic)
}

/// Makes the request in progress on `engine` — or the next one, if none is — stop before its
/// next step with `ICDIT_STATUS_CANCELLED`. Never waits; safe from any thread and from
/// callbacks.
#[no_mangle]
pub unsafe extern "C" fn icdit_cancel(engine: *const IcditEngine) -> IcditStatus {
    match engine.as_ref() {
        None => IcditStatus::InvalidArgument,
        Some(h) => {
            h.interrupt.store(true, Ordering::SeqCst);
            IcditStatus::Ok
        }
    }
}

/// Sizes and settings of an open handle.
#[no_mangle]
pub unsafe extern "C" fn icdit_info(engine: *mut IcditEngine, info: *mut IcditInfo) -> IcditStatus {
    catch_unwind(|| {
        let (Some(h), false) = (engine.as_ref(), info.is_null()) else { return IcditStatus::InvalidArgument };
        let Some(call) = Call::enter(h) else { return IcditStatus::Busy };
        let i = call.inner.session.info();
        info.write(IcditInfo {
            num_classes: i.num_classes as u32,
            max_batch: i.max_batch as u32,
            steps: i.steps as u32,
            latent_channels: i.latent_channels as u32,
            latent_side: i.latent_side as u32,
            latent_len: i.latent_len(),
            image_channels: i.image_channels as u32,
            image_side: i.image_side as u32,
            pixel_len: i.pixel_len(),
            cfg: i.cfg,
            previews: i.previews,
        });
        IcditStatus::Ok
    })
    .unwrap_or(IcditStatus::Panic)
}

/// The message of the handle's last failed call ("" after a success), valid until the next
/// call on the handle. Call it from the thread that made the failed call.
#[no_mangle]
pub unsafe extern "C" fn icdit_last_error(engine: *mut IcditEngine) -> *const c_char {
    static NONE: &CStr = c"";
    static NULL_HANDLE: &CStr = c"invalid engine: the handle is NULL";
    static BUSY: &CStr = c"the handle is inside a call (from one of its callbacks)";
    let Some(h) = engine.as_ref() else { return NULL_HANDLE.as_ptr() };
    let Some(call) = Call::enter(h) else { return BUSY.as_ptr() };
    call.inner.error.as_ref().map_or(NONE.as_ptr(), |e| e.as_ptr())
}

/// A name for a status code ("ok", "invalid argument", …, "unknown status"); never NULL.
/// Takes an int so that any value is safe to pass.
#[no_mangle]
pub extern "C" fn icdit_status_name(status: i32) -> *const c_char {
    const NAMES: [&CStr; 10] = [
        c"ok",
        c"invalid argument",
        c"i/o error",
        c"bad model file",
        c"not enough memory",
        c"device error",
        c"non-finite values",
        c"cancelled",
        c"busy",
        c"internal error",
    ];
    usize::try_from(status).ok().and_then(|i| NAMES.get(i)).unwrap_or(&c"unknown status").as_ptr()
}

/// Frees the handle and everything it holds (model, buffers, threads). NULL is ignored. No
/// other call on the handle may be in progress or follow.
#[no_mangle]
pub unsafe extern "C" fn icdit_close(engine: *mut IcditEngine) {
    if !engine.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            let handle = Box::from_raw(engine);
            let inner = handle.inner.into_inner().unwrap_or_else(|p| p.into_inner());
            if !inner.session.usable_here() {
                // A GPU session may not be dropped away from its device thread.
                std::mem::forget(inner.session);
            }
        }));
    }
}

/// The library's version, e.g. "0.1.0".
#[no_mangle]
pub extern "C" fn icdit_version() -> *const c_char {
    static V: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => c"unknown",
    };
    V.as_ptr()
}

/// `ICDIT_ABI_VERSION` of the library actually loaded: compare with the header's.
#[no_mangle]
pub extern "C" fn icdit_abi_version() -> u32 {
    ICDIT_ABI_VERSION
}

/// Hooks for this crate's tests and overhead measurement; not part of the C ABI.
#[doc(hidden)]
pub mod testing {
    /// Seconds the last request on `engine` spent in the engine's sampling loop.
    ///
    /// # Safety
    /// `engine` is a live handle with no call in progress.
    pub unsafe fn last_engine_seconds(engine: *mut super::IcditEngine) -> f64 {
        engine
            .as_ref()
            .map_or(0.0, |h| h.inner.lock().unwrap_or_else(|p| p.into_inner()).session.last_engine_time().as_secs_f64())
    }

    /// Makes the next request on `engine` panic inside the engine's step loop (in the step
    /// callback the sampling loop runs), to prove the panic reaches C as a status.
    ///
    /// # Safety
    /// `engine` is a live handle.
    pub unsafe fn panic_in_next_request(engine: *mut super::IcditEngine) {
        if let Some(h) = engine.as_ref() {
            h.inner.lock().unwrap_or_else(|p| p.into_inner()).panic_next = true;
        }
    }
}
