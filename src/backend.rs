//! Choosing where a sampler runs: the CPU reference backend (the default), the GPU pipeline
//! on a CUDA GPU (feature `cuda`), or the same GPU pipeline under the CPU emulation of CUDA
//! (slow; for verifying small models without a GPU). [`AnyEngine`] gives the three one
//! interface.

use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::cpu::Engine;
use crate::engine::{EngineOptions, Request, Step};
use crate::error::{Error, Result};
use crate::forward::StepKind;
use crate::gpu::{EmuDevice, GpuEngine};
use crate::weights::DitModel;

/// Where sampling runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// The f32 CPU reference backend.
    #[default]
    Cpu,
    /// The GPU pipeline on a CUDA GPU (the first, or the one [`AnyEngine::new_on`] names).
    Cuda,
    /// The GPU pipeline under the CPU emulation of CUDA.
    Emu,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::Emu => "emu",
        }
    }
}

impl FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Backend::Cpu),
            "cuda" => Ok(Backend::Cuda),
            "emu" => Ok(Backend::Emu),
            other => Err(Error::invalid("backend", format!("`{other}`: expected cpu, cuda or emu"))),
        }
    }
}

/// A sampler on any backend.
pub enum AnyEngine {
    Cpu(Box<Engine>),
    Emu(Box<GpuEngine<EmuDevice>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<GpuEngine<crate::gpu::CudaDevice>>),
}

impl AnyEngine {
    pub fn new(model: Arc<DitModel>, opts: &EngineOptions, backend: Backend) -> Result<Self> {
        Self::new_on(model, opts, backend, 0)
    }

    /// As [`AnyEngine::new`] on GPU `device` (the CUDA ordinal). The CPU backend ignores
    /// `device`; under the emulation every ordinal is accepted and each engine is a separate
    /// emulated device. A CUDA engine must be used from the thread that made it (its device
    /// is neither Send nor Sync): for several GPUs, make one engine inside each worker thread
    /// and share the `Arc<DitModel>` (the mapped weights).
    pub fn new_on(model: Arc<DitModel>, opts: &EngineOptions, backend: Backend, device: usize) -> Result<Self> {
        match backend {
            Backend::Cpu => Ok(AnyEngine::Cpu(Box::new(Engine::new(model, opts)?))),
            Backend::Emu => Ok(AnyEngine::Emu(Box::new(GpuEngine::new(model, opts, EmuDevice::new)?))),
            Backend::Cuda => cuda(model, opts, device),
        }
    }

    pub fn sample(&mut self, req: &Request, out: &mut [f32], progress: &mut dyn FnMut(Step)) -> Result<()> {
        match self {
            AnyEngine::Cpu(e) => e.sample(req, out, progress),
            AnyEngine::Emu(e) => e.sample(req, out, progress),
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(e) => e.sample(req, out, progress),
        }
    }

    /// See [`SamplingEngine::sample_previewed`](crate::SamplingEngine::sample_previewed).
    pub fn sample_previewed(
        &mut self,
        req: &Request,
        out: &mut [f32],
        preview: &mut [f32],
        on_step: &mut dyn FnMut(Step, &[f32]),
    ) -> Result<()> {
        match self {
            AnyEngine::Cpu(e) => e.sample_previewed(req, out, preview, on_step),
            AnyEngine::Emu(e) => e.sample_previewed(req, out, preview, on_step),
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(e) => e.sample_previewed(req, out, preview, on_step),
        }
    }

    /// Whether the backend gives per-step previews (the CPU backend does; the GPU pipeline
    /// does not yet).
    pub fn previews(&self) -> bool {
        match self {
            AnyEngine::Cpu(e) => e.previews(),
            AnyEngine::Emu(e) => e.previews(),
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(e) => e.previews(),
        }
    }

    /// See [`Engine::set_interrupt`].
    pub fn set_interrupt(&mut self, flag: Option<Arc<AtomicBool>>) {
        match self {
            AnyEngine::Cpu(e) => e.set_interrupt(flag),
            AnyEngine::Emu(e) => e.set_interrupt(flag),
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(e) => e.set_interrupt(flag),
        }
    }

    /// CPU threads of the CPU backend (0 for the GPU backends).
    pub fn threads(&self) -> usize {
        match self {
            AnyEngine::Cpu(e) => e.threads(),
            _ => 0,
        }
    }

    /// The CPU instruction-set path (`None` for the GPU backends).
    pub fn cpu_isa(&self) -> Option<crate::cpu::Isa> {
        match self {
            AnyEngine::Cpu(e) => Some(e.isa()),
            _ => None,
        }
    }

    pub fn options(&self) -> &EngineOptions {
        match self {
            AnyEngine::Cpu(e) => e.options(),
            AnyEngine::Emu(e) => e.options(),
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(e) => e.options(),
        }
    }

    pub fn steps(&self) -> usize {
        match self {
            AnyEngine::Cpu(e) => e.steps(),
            AnyEngine::Emu(e) => e.steps(),
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(e) => e.steps(),
        }
    }

    pub fn step_kind(&self, index: usize) -> StepKind {
        self.options().step_kind(index)
    }

    /// Bytes of planned memory (host arenas for the CPU backend, the device arena otherwise).
    pub fn arena_bytes(&self) -> usize {
        match self {
            AnyEngine::Cpu(e) => e.arena_bytes(),
            AnyEngine::Emu(e) => e.arena_bytes(),
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(e) => e.arena_bytes(),
        }
    }

    /// Device-timed milliseconds per step of `kind` (replays of its recorded graph, see
    /// [`GpuEngine::time_step`]); `None` on the CPU backend, whose steps the host times as they
    /// run. Overwrites the device's request state: call between requests.
    pub fn device_step_ms(&mut self, kind: StepKind, iters: usize) -> Result<Option<f32>> {
        match self {
            AnyEngine::Cpu(_) => Ok(None),
            AnyEngine::Emu(e) => e.time_step(kind, iters).map(Some),
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(e) => e.time_step(kind, iters).map(Some),
        }
    }

    /// Kernel launches of a step of `kind` and of one of its blocks (GPU backends).
    pub fn step_launches(&self, kind: StepKind) -> Option<crate::gpu::StepLaunches> {
        match self {
            AnyEngine::Cpu(_) => None,
            AnyEngine::Emu(e) => e.step_launches(kind),
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(e) => e.step_launches(kind),
        }
    }

    /// What runs the model: "cpu (N threads)" or the device's name.
    pub fn describe(&self) -> String {
        match self {
            AnyEngine::Cpu(e) => format!("cpu ({}), {} threads", e.isa(), e.threads()),
            AnyEngine::Emu(e) => format!("emu: {}", crate::gpu::Device::name(e.device())),
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(e) => format!("cuda: {}", crate::gpu::Device::name(e.device())),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda(model: Arc<DitModel>, opts: &EngineOptions, device: usize) -> Result<AnyEngine> {
    let engine = GpuEngine::new(model, opts, |plan| {
        crate::gpu::CudaDevice::open_ordinal(plan, device)?.ok_or_else(|| {
            Error::gpu("--backend cuda", "no CUDA GPU found (the driver reports no device); use --backend cpu")
        })
    })?;
    Ok(AnyEngine::Cuda(Box::new(engine)))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: Arc<DitModel>, _: &EngineOptions, _: usize) -> Result<AnyEngine> {
    Err(no_cuda())
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> Error {
    Error::gpu(
        "--backend cuda",
        "this icdit was built without CUDA support: rebuild with `cargo build --release --features cuda` \
         on a machine with a CUDA toolkit (README: CUDA), or use --backend cpu (the default) or emu",
    )
}

/// A VAE decoder on any backend: the CPU decoder, or the GPU decoder on the emulation or a
/// CUDA GPU (its own arena, sized for `max_images` latents per call).
pub enum AnyVae {
    Cpu(Box<crate::vae::VaeDecoder>),
    Emu(Box<crate::vae::GpuVaeDecoder<EmuDevice>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::vae::GpuVaeDecoder<crate::gpu::CudaDevice>>),
}

impl AnyVae {
    /// The CPU instruction-set path (`None` for the GPU backends).
    pub fn cpu_isa(&self) -> Option<crate::cpu::Isa> {
        match self {
            AnyVae::Cpu(d) => Some(d.isa()),
            _ => None,
        }
    }

    /// A decoder for latents of side `latent`; `threads` for the CPU, `max_images` per device
    /// call for the GPU backends.
    pub fn new(
        model: Arc<crate::vae::VaeModel>,
        latent: usize,
        threads: usize,
        max_images: usize,
        backend: Backend,
    ) -> Result<Self> {
        Self::new_on(model, latent, threads, max_images, backend, 0)
    }

    /// As [`AnyVae::new`] on CUDA device `device` (ignored on the CPU and the emulation).
    pub fn new_on(
        model: Arc<crate::vae::VaeModel>,
        latent: usize,
        threads: usize,
        max_images: usize,
        backend: Backend,
        device: usize,
    ) -> Result<Self> {
        use crate::vae::{GpuVaeDecoder, VaeDecoder};
        match backend {
            Backend::Cpu => Ok(AnyVae::Cpu(Box::new(VaeDecoder::new(model, latent, threads)?))),
            Backend::Emu => Ok(AnyVae::Emu(Box::new(GpuVaeDecoder::new(model, latent, max_images, EmuDevice::new)?))),
            Backend::Cuda => cuda_vae(model, latent, max_images, device),
        }
    }

    pub fn model(&self) -> &crate::vae::VaeModel {
        match self {
            AnyVae::Cpu(d) => d.model(),
            AnyVae::Emu(d) => d.model(),
            #[cfg(feature = "cuda")]
            AnyVae::Cuda(d) => d.model(),
        }
    }
    pub fn out_side(&self) -> usize {
        match self {
            AnyVae::Cpu(d) => d.out_side(),
            AnyVae::Emu(d) => d.out_side(),
            #[cfg(feature = "cuda")]
            AnyVae::Cuda(d) => d.out_side(),
        }
    }
    pub fn latent_len(&self) -> usize {
        match self {
            AnyVae::Cpu(d) => d.latent_len(),
            AnyVae::Emu(d) => d.latent_len(),
            #[cfg(feature = "cuda")]
            AnyVae::Cuda(d) => d.latent_len(),
        }
    }
    pub fn image_len(&self) -> usize {
        match self {
            AnyVae::Cpu(d) => d.image_len(),
            AnyVae::Emu(d) => d.image_len(),
            #[cfg(feature = "cuda")]
            AnyVae::Cuda(d) => d.image_len(),
        }
    }
    /// Latents per call: 1 on the CPU, the planned batch on a device.
    /// Whether the decoder runs the Hopper kernels (kernels/*_sm90.cu, after their first-use
    /// check); `None` on the CPU.
    pub fn hopper_kernels(&self) -> Option<bool> {
        use crate::gpu::Device;
        match self {
            AnyVae::Cpu(_) => None,
            AnyVae::Emu(d) => Some(d.device().gemm_sm90()),
            #[cfg(feature = "cuda")]
            AnyVae::Cuda(d) => Some(d.device().gemm_sm90()),
        }
    }

    pub fn batch(&self) -> usize {
        match self {
            AnyVae::Cpu(_) => 1,
            AnyVae::Emu(d) => d.max_images(),
            #[cfg(feature = "cuda")]
            AnyVae::Cuda(d) => d.max_images(),
        }
    }
    /// Decodes up to [`AnyVae::batch`] latents (C, h, w each) into images (C, H, W each).
    pub fn decode(&mut self, latents: &[f32], images: &mut [f32]) -> Result<()> {
        match self {
            AnyVae::Cpu(d) => d.decode(latents, images),
            AnyVae::Emu(d) => d.decode(latents, images),
            #[cfg(feature = "cuda")]
            AnyVae::Cuda(d) => d.decode(latents, images),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_vae(model: Arc<crate::vae::VaeModel>, latent: usize, max_images: usize, device: usize) -> Result<AnyVae> {
    let d = crate::vae::GpuVaeDecoder::new(model, latent, max_images, |plan| {
        crate::gpu::CudaDevice::open_ordinal(plan, device)?
            .ok_or_else(|| Error::gpu("--backend cuda", "no CUDA GPU found"))
    })?;
    Ok(AnyVae::Cuda(Box::new(d)))
}

#[cfg(not(feature = "cuda"))]
fn cuda_vae(_: Arc<crate::vae::VaeModel>, _: usize, _: usize, _: usize) -> Result<AnyVae> {
    Err(no_cuda())
}
