//! PixArt-α on any backend: the CPU ([`PixArtCpu`]), the GPU pipeline's device on a CUDA GPU
//! (feature `cuda`) or under the CPU emulation of CUDA ([`PixArtGpu`]). [`AnyPixArtEngine`]
//! gives the three engines one interface; [`forward_on`] runs one plain pass on any of them.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::cpu::{PixArtCpu, PixArtCpuOptions};
use super::engine::{PixArtEngine, PixArtOptions, PixArtRequest, PixArtRunner};
use super::weights::PixArtModel;
use crate::backend::Backend;
use crate::engine::Step;
use crate::error::{Error, Result};
use crate::gpu::pixart::{PixArtGpu, PixArtGpuOptions};
use crate::gpu::{Device, EmuDevice};

/// A PixArt-α sampler on any backend.
pub enum AnyPixArtEngine {
    Cpu(Box<PixArtEngine>),
    Emu(Box<PixArtEngine<PixArtGpu<EmuDevice>>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<PixArtEngine<PixArtGpu<crate::gpu::CudaDevice>>>),
}

macro_rules! each {
    ($self:expr, $e:ident => $body:expr) => {
        match $self {
            AnyPixArtEngine::Cpu($e) => $body,
            AnyPixArtEngine::Emu($e) => $body,
            #[cfg(feature = "cuda")]
            AnyPixArtEngine::Cuda($e) => $body,
        }
    };
}

#[cfg(feature = "cuda")]
fn open_cuda(plan: &crate::plan::Plan) -> Result<crate::gpu::CudaDevice> {
    crate::gpu::CudaDevice::open(plan)?.ok_or_else(|| {
        Error::gpu("--backend cuda", "no CUDA GPU found (the driver reports no device); use --backend cpu")
    })
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> Error {
    Error::gpu(
        "--backend cuda",
        "this icdit was built without CUDA support: rebuild with `cargo build --release --features cuda` \
         on a machine with a CUDA toolkit (README: CUDA), or use --backend cpu (the default) or emu",
    )
}

impl AnyPixArtEngine {
    pub fn new(model: Arc<PixArtModel>, opts: &PixArtOptions, backend: Backend) -> Result<Self> {
        Ok(match backend {
            Backend::Cpu => AnyPixArtEngine::Cpu(Box::new(PixArtEngine::new(model, opts)?)),
            Backend::Emu => AnyPixArtEngine::Emu(Box::new(PixArtEngine::new_gpu(model, opts, EmuDevice::new)?)),
            #[cfg(feature = "cuda")]
            Backend::Cuda => AnyPixArtEngine::Cuda(Box::new(PixArtEngine::new_gpu(model, opts, open_cuda)?)),
            #[cfg(not(feature = "cuda"))]
            Backend::Cuda => return Err(no_cuda()),
        })
    }

    /// See [`PixArtEngine::sample`].
    pub fn sample(&mut self, req: &PixArtRequest, out: &mut [f32], progress: &mut dyn FnMut(Step)) -> Result<()> {
        each!(self, e => e.sample(req, out, progress))
    }

    /// See [`PixArtEngine::set_interrupt`].
    pub fn set_interrupt(&mut self, flag: Option<Arc<AtomicBool>>) {
        each!(self, e => e.set_interrupt(flag))
    }

    /// Where it runs, for reports: "cpu (avx2), 4 threads", "emu: …".
    pub fn describe(&self) -> String {
        match self {
            AnyPixArtEngine::Cpu(e) => format!("cpu ({}), {} threads", e.isa(), e.threads()),
            AnyPixArtEngine::Emu(e) => format!("emu: {}", e.runner().device().name()),
            #[cfg(feature = "cuda")]
            AnyPixArtEngine::Cuda(e) => format!("cuda: {}", e.runner().device().name()),
        }
    }
}

/// One plain forward pass (the `icdit forward` command) of `t.len()` rows on `backend`:
/// latents x (rows, C, S, S), timesteps, captions (rows, len, D) and masks (rows, len) into
/// `out` (rows, Cout, S, S); `size`: the micro-conditions (resolution (rows, 2) in pixels,
/// aspect ratio (rows)) of a model with `use_additional_conditions`. Returns where it ran, for
/// reports.
#[allow(clippy::too_many_arguments)]
pub fn forward_on(
    backend: Backend,
    model: Arc<PixArtModel>,
    x: &[f32],
    t: &[f32],
    text: &[f32],
    mask: &[i64],
    len: usize,
    threads: usize,
    size: Option<(&[f32], &[f32])>,
    out: &mut [f32],
) -> Result<String> {
    let rows = t.len();
    let gpu_opts = PixArtGpuOptions { max_rows: rows, max_text_len: len, ..Default::default() };
    match backend {
        Backend::Cpu => {
            let mut cpu = PixArtCpu::new(
                model,
                &PixArtCpuOptions { max_rows: rows, max_text_len: len, threads, ..Default::default() },
            )?;
            cpu.forward(x, t, text, mask, len, size, out)?;
            Ok(format!("cpu ({}), {} threads", cpu.isa(), cpu.threads()))
        }
        Backend::Emu => {
            let mut g = PixArtGpu::new(model, &gpu_opts, EmuDevice::new)?;
            g.forward(x, t, text, mask, len, size, out)?;
            Ok(format!("emu: {}", g.device().name()))
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            let mut g = PixArtGpu::new(model, &gpu_opts, open_cuda)?;
            g.forward(x, t, text, mask, len, size, out)?;
            Ok(format!("cuda: {}", g.device().name()))
        }
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => Err(no_cuda()),
    }
}
