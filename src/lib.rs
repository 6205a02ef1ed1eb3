//! icdit: a DiT-XL/2 inference engine built for increment-calibrated caching.
//!
//! Weights are memory-mapped from safetensors (official or diffusers layout), every buffer a
//! backend needs is planned up front and held in one arena, and the DiT forward pass is
//! written once ([`forward::forward`]) against the fused operations each backend provides, as
//! is the sampling loop ([`SamplingEngine::sample`]) against [`SamplingBackend`].
//! [`cpu::CpuEngine`] is the f32 reference backend; [`gpu`] holds the device abstraction the
//! CUDA pipeline runs on (a CPU emulation of CUDA in every build, a GPU with feature `cuda`).

pub mod backend;
pub mod calibrate;
pub mod config;
pub mod cost;
pub mod cpu;
pub mod diffusion;
pub mod embed;
pub mod engine;
pub mod error;
pub mod factors;
pub mod forward;
pub mod gpu;
pub mod image;
pub mod inputs;
pub mod inspect;
pub mod limits;
pub mod noise;
pub mod plan;
pub mod policy;
pub mod quality;
pub mod tensorfile;
pub mod vae;
pub mod weights;

pub use config::{DitConfig, Numerics, SampleSpace};
pub use cpu::{BenchOp, CpuEngine, CpuOptions};
pub use diffusion::Sampler;
pub use engine::{Engine, EngineOptions, GuidedChannels, Request, SamplingBackend, SamplingEngine};
pub use error::{Error, Result};
pub use factors::Factors;
pub use policy::{CacheMode, CachePolicy, FullSteps};
pub use weights::{DitModel, Layout, LoadOptions};

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// reader never sees a partially written file under the final name.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid("output path", format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}
