//! The `icdit._icdit` extension module: [`icdit::session::Session`] as a Python class.
//! Arrays in and out (numpy uint8 NHWC pixels or float32 NCHW latents), the GIL released
//! while sampling, Ctrl-C and `Engine.cancel()` stop a request between steps, progress and
//! preview callbacks, errors as Python exceptions whose message names the argument.
//!
//! Arrays are made by numpy and written through their `__array_interface__` data pointer
//! (checked: dtype, shape, C order, writeable), so the module needs no numpy headers or crate
//! and builds the icdit library with the same dependency features as the C ABI.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use icdit::backend::Backend;
use icdit::engine::Step;
use icdit::session::{self, Preview, Session, SessionInfo, SessionOptions, SessionRequest};
use icdit::{Error, FullSteps};
use pyo3::create_exception;
use pyo3::exceptions::{PyFileNotFoundError, PyMemoryError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

create_exception!(icdit, IcditError, PyRuntimeError, "A failure inside icdit (bad model file, device error, …).");
create_exception!(icdit, Cancelled, IcditError, "Engine.cancel() stopped the request.");

/// The Python exception for a library error.
fn py_err(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Invalid { .. } => PyValueError::new_err(msg),
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
        Error::Io { .. } => PyOSError::new_err(msg),
        Error::Memory { .. } => PyMemoryError::new_err(msg),
        Error::Interrupted { .. } => Cancelled::new_err(msg),
        _ => IcditError::new_err(msg),
    }
}

/// A session the Python object can hold. The CPU backend's session may move between
/// threads; a GPU one is used only on the thread that opened it (`Session` refuses other
/// threads) and is leaked rather than dropped on another thread.
struct Held(std::mem::ManuallyDrop<Session>);

// SAFETY: see `Held`: a thread-bound (GPU) session is only touched on its own thread, since
// every `Session` method that reaches the device checks the calling thread first.
unsafe impl Send for Held {}

impl Drop for Held {
    fn drop(&mut self) {
        if self.0.usable_here() {
            // SAFETY: dropped once, here.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.0) }
        }
    }
}

/// A model opened once, with every buffer a request needs.
#[pyclass(module = "icdit", frozen)]
struct Engine {
    session: Mutex<Held>,
    interrupt: Arc<AtomicBool>,
    /// The last request's time in the engine and in the per-step callbacks (this module's
    /// GIL re-acquisition and signal check included), in ns: for scripts/embed-overhead.py.
    last_engine_ns: std::sync::atomic::AtomicU64,
    last_callbacks_ns: std::sync::atomic::AtomicU64,
    info: SessionInfo,
    class_names: Option<Vec<String>>,
    describe: String,
}

/// The bundled model: packaged beside the module, else the source checkout's.
fn bundled_weights(py: Python<'_>) -> PathBuf {
    let beside = py
        .import("icdit")
        .and_then(|m| m.getattr("__file__"))
        .and_then(|f| f.extract::<PathBuf>())
        .ok()
        .and_then(|f| f.parent().map(|d| d.join("icdit-shapes-32.safetensors")))
        .filter(|p| p.is_file());
    beside.unwrap_or_else(session::default_weights)
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (weights=None, factors=None, vae=None, backend="cpu", max_batch=16, steps=None,
        respacing=None, sampler=None, eta=0.0, cfg=None, cache="none", period=2, full_steps=None, threads=0,
        rounding="dit", check_finite=true, device=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        weights: Option<PathBuf>,
        factors: Option<PathBuf>,
        vae: Option<PathBuf>,
        backend: &str,
        max_batch: usize,
        steps: Option<usize>,
        respacing: Option<String>,
        sampler: Option<String>,
        eta: f32,
        cfg: Option<f32>,
        cache: &str,
        period: usize,
        full_steps: Option<Vec<usize>>,
        threads: usize,
        rounding: &str,
        check_finite: bool,
        device: usize,
    ) -> PyResult<Self> {
        let opts = SessionOptions {
            weights: Some(weights.unwrap_or_else(|| bundled_weights(py))),
            factors,
            vae,
            backend: backend.parse::<Backend>().map_err(py_err)?,
            device,
            max_batch,
            steps,
            respacing,
            sampler,
            eta,
            cfg,
            cache: session::parse_cache(cache).map_err(py_err)?,
            full_steps: match full_steps {
                Some(list) => FullSteps::List(list),
                None => FullSteps::Period(period),
            },
            threads,
            rounding: session::parse_rounding(rounding).map_err(py_err)?,
            check_finite,
            ..SessionOptions::default()
        };
        // Opened with the GIL held: a GPU session must not be made on a detached thread.
        let session = Session::open(&opts).map_err(py_err)?;
        Ok(Engine {
            interrupt: session.interrupt_flag(),
            last_engine_ns: Default::default(),
            last_callbacks_ns: Default::default(),
            info: session.info(),
            class_names: session.model().class_names.clone(),
            describe: session.engine().describe(),
            session: Mutex::new(Held(std::mem::ManuallyDrop::new(session))),
        })
    }

    /// Samples one image per class. Returns uint8 pixels (N, H, W, C), or with
    /// `output="latents"` float32 latents (N, C, I, I); `out` may be such an array to fill.
    #[pyo3(signature = (classes, seed=0, cfg=None, *, first_index=0, output="pixels", out=None, progress=None, preview=None))]
    #[allow(clippy::too_many_arguments)]
    fn sample<'py>(
        &self,
        py: Python<'py>,
        classes: Vec<i64>,
        seed: u64,
        cfg: Option<f32>,
        first_index: u64,
        output: &str,
        out: Option<Bound<'py, PyAny>>,
        progress: Option<Py<PyAny>>,
        preview: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let n = classes.len();
        let i = &self.info;
        let pixels = match output {
            "pixels" => true,
            "latents" => false,
            other => {
                return Err(PyValueError::new_err(format!("invalid output: `{other}`: expected pixels or latents")))
            }
        };
        if pixels && i.pixel_len() == 0 {
            return Err(PyValueError::new_err(
                "invalid output: this model samples VAE latents and the engine has no VAE: pass vae=… or output=\"latents\"",
            ));
        }
        let shape = if pixels {
            [n, i.image_side, i.image_side, i.image_channels]
        } else {
            [n, i.latent_channels, i.latent_side, i.latent_side]
        };
        let np = py.import("numpy")?;
        let (dtype, elem) = if pixels { ("uint8", 1) } else { ("float32", 4) };
        let array = match out {
            Some(o) => o,
            None => np.call_method1("zeros", (shape, dtype))?,
        };
        // The array is held (and so its memory kept) until this call returns.
        let (ptr, len) = writable(&array, dtype, shape)?;
        debug_assert_eq!(ptr % elem, 0);
        let req = SessionRequest { classes: &classes, seed, first_index, cfg, preview: preview.is_some() };
        let latent_shape = [n, i.latent_channels, i.latent_side, i.latent_side];
        let pixel_shape = [n, i.latent_side, i.latent_side, i.latent_channels];
        let mut failure: Option<PyErr> = None;
        let interrupt = &*self.interrupt;
        let mut callbacks = std::time::Duration::ZERO;
        let mut on_step = |s: Step, p: Option<Preview>| {
            if failure.is_some() {
                return;
            }
            let t = std::time::Instant::now();
            let r = Python::attach(|py| -> PyResult<()> {
                py.check_signals()?;
                if let Some(cb) = &progress {
                    cb.call1(py, (s.index, s.total))?;
                }
                if let (Some(cb), Some(p)) = (&preview, p) {
                    let np = py.import("numpy")?;
                    let lat = filled(&np, "float32", latent_shape, bytemuck_f32(p.latents))?;
                    let px = p.pixels.map(|x| filled(&np, "uint8", pixel_shape, x)).transpose()?;
                    cb.call1(py, (s.index, s.total, lat, px))?;
                }
                Ok(())
            });
            if let Err(e) = r {
                failure = Some(e);
                interrupt.store(true, Ordering::SeqCst);
            }
            callbacks += t.elapsed();
        };
        let result = if pixels {
            // SAFETY: `writable` checked a C-ordered, writeable uint8 array of `len` bytes.
            let buf = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
            py.detach(|| self.timed(|s| s.sample_pixels(&req, buf, &mut on_step)))
        } else {
            // SAFETY: as above, a float32 array of `len / 4` elements, aligned (numpy aligns
            // its own arrays; `writable` refuses unaligned ones).
            let buf = unsafe { std::slice::from_raw_parts_mut(ptr as *mut f32, len / 4) };
            py.detach(|| self.timed(|s| s.sample_latents(&req, buf, &mut on_step)))
        };
        self.last_callbacks_ns.store(callbacks.as_nanos() as u64, Ordering::Relaxed);
        match (result, failure) {
            (_, Some(e)) => Err(e),
            (Err(e), None) => Err(py_err(e)),
            (Ok(()), None) => Ok(array),
        }
    }

    /// `sample(..., output="latents")`.
    #[pyo3(signature = (classes, seed=0, cfg=None, *, first_index=0, out=None, progress=None, preview=None))]
    #[allow(clippy::too_many_arguments)]
    fn sample_latents<'py>(
        &self,
        py: Python<'py>,
        classes: Vec<i64>,
        seed: u64,
        cfg: Option<f32>,
        first_index: u64,
        out: Option<Bound<'py, PyAny>>,
        progress: Option<Py<PyAny>>,
        preview: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.sample(py, classes, seed, cfg, first_index, "latents", out, progress, preview)
    }

    /// For scripts/embed-overhead.py: `iters` requests straight through the Rust API
    /// (`icdit::Engine::sample` into f32 latents, an engine of its own with this one's model
    /// and options, CPU backend, after one request to warm it), timed in Rust; seconds per
    /// request.
    #[pyo3(signature = (classes, seed=0, iters=10))]
    fn _time_rust_api(&self, py: Python<'_>, classes: Vec<i64>, seed: u64, iters: usize) -> PyResult<Vec<f64>> {
        let (model, opts) = {
            let s = self.lock();
            (Arc::clone(s.0.model()), s.0.options().clone())
        };
        py.detach(|| -> icdit::Result<Vec<f64>> {
            let mut engine = icdit::Engine::new(model, &opts)?;
            let mut out = vec![0.0f32; classes.len() * self.info.latent_len()];
            let req = icdit::Request::new(&classes, seed);
            engine.sample(&req, &mut out, &mut |_| {})?; // first touch of the new arenas
            (0..iters)
                .map(|_| {
                    let t = std::time::Instant::now();
                    engine.sample(&req, &mut out, &mut |_| {})?;
                    Ok(t.elapsed().as_secs_f64())
                })
                .collect()
        })
        .map_err(py_err)
    }

    /// For scripts/embed-overhead.py: (seconds in the engine's sampling loop, seconds of that
    /// in this module's per-step callbacks) of the last request.
    fn _last_timing(&self) -> (f64, f64) {
        let s = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
        (s(&self.last_engine_ns), s(&self.last_callbacks_ns))
    }

    /// Stops the request in progress (or the next one) before its next step; it raises
    /// `icdit.Cancelled`. Safe from any thread.
    fn cancel(&self) {
        self.interrupt.store(true, Ordering::SeqCst);
    }

    #[getter]
    fn num_classes(&self) -> usize {
        self.info.num_classes
    }
    #[getter]
    fn max_batch(&self) -> usize {
        self.info.max_batch
    }
    #[getter]
    fn steps(&self) -> usize {
        self.info.steps
    }
    /// The guidance scale requests use when they name none.
    #[getter]
    fn cfg(&self) -> f32 {
        self.info.cfg
    }
    /// (H, W, C) of a pixel output; None for a latent model without a VAE.
    #[getter]
    fn image_shape(&self) -> Option<(usize, usize, usize)> {
        (self.info.pixel_len() > 0).then_some((self.info.image_side, self.info.image_side, self.info.image_channels))
    }
    /// (C, I, I) of a latent output.
    #[getter]
    fn latent_shape(&self) -> (usize, usize, usize) {
        (self.info.latent_channels, self.info.latent_side, self.info.latent_side)
    }
    #[getter]
    fn class_names(&self) -> Option<Vec<String>> {
        self.class_names.clone()
    }
    #[getter]
    fn previews(&self) -> bool {
        self.info.previews
    }
    #[getter]
    fn device(&self) -> String {
        self.describe.clone()
    }

    fn __repr__(&self) -> String {
        format!(
            "icdit.Engine({} classes, {} steps, cfg {}, max_batch {}, {})",
            self.info.num_classes, self.info.steps, self.info.cfg, self.info.max_batch, self.describe
        )
    }
}

impl Engine {
    /// Runs `f` on the session and records its engine time.
    fn timed<T>(&self, f: impl FnOnce(&mut Session) -> T) -> T {
        let mut held = self.lock();
        let r = f(&mut held.0);
        self.last_engine_ns.store(held.0.last_engine_time().as_nanos() as u64, Ordering::Relaxed);
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The data pointer and byte length of `o`, a numpy array that must be C-ordered, writeable,
/// aligned and of `dtype` and `shape`; a TypeError or ValueError naming `out` otherwise.
fn writable(o: &Bound<'_, PyAny>, dtype: &str, shape: [usize; 4]) -> PyResult<(usize, usize)> {
    let want = format!("a C-ordered, writeable {dtype} numpy array of shape {shape:?}");
    let Ok(iface) = o.getattr("__array_interface__") else {
        return Err(PyTypeError::new_err(format!("out: expected {want}, got a {}", o.get_type().name()?)));
    };
    let typestr: String = iface.get_item("typestr")?.extract()?;
    let expected = if dtype == "uint8" { "|u1" } else { "<f4" };
    if typestr != expected {
        let found: String = o.getattr("dtype")?.str()?.extract()?;
        return Err(PyTypeError::new_err(format!("out: expected {want}, got dtype {found}")));
    }
    let found: Vec<usize> = iface.get_item("shape")?.extract()?;
    let strides_none = iface.get_item("strides")?.is_none();
    let (ptr, readonly): (usize, bool) = iface.get_item("data")?.extract()?;
    let elem = if dtype == "uint8" { 1 } else { 4 };
    if found != shape || !strides_none || readonly || ptr % elem != 0 {
        return Err(PyValueError::new_err(format!(
            "out: expected {want}, got shape {found:?}{}{}",
            if strides_none { "" } else { ", not C-ordered" },
            if readonly { ", read-only" } else { "" }
        )));
    }
    Ok((ptr, shape.iter().product::<usize>() * elem))
}

/// A new numpy array of `dtype` and `shape` holding `bytes`.
fn filled<'py>(np: &Bound<'py, PyModule>, dtype: &str, shape: [usize; 4], bytes: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let a = np.call_method1("empty", (shape, dtype))?;
    let (ptr, len) = writable(&a, dtype, shape)?;
    if len != bytes.len() {
        return Err(PyRuntimeError::new_err(format!("preview: {} bytes for an array of {len}", bytes.len())));
    }
    // SAFETY: a fresh array of exactly `len` bytes, not shared yet.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr as *mut u8, len) };
    Ok(a)
}

/// The bytes of an f32 slice.
fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Computes rank-r factors for increment-calibrated caching and writes them to `out`
/// (`icdit calibrate`): plain SVD, or channel-aware (`ca-svd`) / change-aware (`cd-svd`)
/// SVD calibrated on `calib_self` samples the model draws itself. Returns `out`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (out, *, weights=None, method="ca-svd", rank=128, calib_self=None, seed=0, threads=0))]
fn calibrate(
    py: Python<'_>,
    out: PathBuf,
    weights: Option<PathBuf>,
    method: &str,
    rank: usize,
    calib_self: Option<usize>,
    seed: u64,
    threads: usize,
) -> PyResult<PathBuf> {
    use icdit::calibrate::Method;
    let method = match method {
        "svd" => Method::Svd,
        "ca-svd" => Method::CaSvd,
        "cd-svd" => Method::CdSvd,
        other => {
            return Err(PyValueError::new_err(format!("invalid method: `{other}`: expected svd, ca-svd or cd-svd")))
        }
    };
    let calib = match (method, calib_self) {
        (Method::Svd, _) => 0,
        (_, Some(n)) => n,
        (_, None) => {
            return Err(PyValueError::new_err("invalid calib_self: ca-svd and cd-svd need calib_self=N samples"))
        }
    };
    let weights = weights.unwrap_or_else(|| bundled_weights(py));
    py.detach(|| -> icdit::Result<()> {
        let model = Arc::new(icdit::DitModel::load(&weights, &icdit::LoadOptions::default())?);
        let factors = icdit::calibrate::self_calibrated_factors(&model, method, rank, calib, seed, threads)?;
        factors.save(&out)
    })
    .map_err(py_err)?;
    Ok(out)
}

#[pymodule]
fn _icdit(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_function(wrap_pyfunction!(calibrate, m)?)?;
    m.add("IcditError", m.py().get_type::<IcditError>())?;
    m.add("Cancelled", m.py().get_type::<Cancelled>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
