//! PixArt-α, the text-to-image DiT (issue 23; reference: `pixart-reference.md`): a diffusers
//! pipeline folder's transformer on the CPU backend, fed prompt embeddings, sampled with
//! DPM-Solver++ (2M) or DDIM under classifier-free guidance, with none / reuse / icc caching.
//!
//! - [`config`]: `transformer/config.json` and the scheduler config, checked.
//! - [`weights`]: the transformer's tensors, memory-mapped (f32/f16/bf16).
//! - [`forward`]: the forward pass, written once against [`forward::PixArtOps`].
//! - [`cpu`]: the CPU implementation of those ops.
//! - `checks`: what every backend checks of the rows it stages and the passes it runs.
//! - [`micro`]: the 1024-MS model's resolution and aspect-ratio conditions.
//! - [`size`]: image sizes, resolution binning ([`bins`]) and the resize back.
//! - [`cost`]: MACs per step kind (cache-report's MAC ratio).
//! - [`factors`]: icc's rank-r factors, named after the layers; plain SVD.
//! - [`calibrate`]: CA-SVD factors calibrated on prompts the model samples itself.
//! - [`sampler`]: DPM-Solver++ 2M and DDIM as diffusers computes them.
//! - [`engine`]: the sampling backend the engine's loop drives, and the embeddings files.
//! - [`backend`]: the engine and the forward pass on the CPU, CUDA or emulated device.

pub mod backend;
pub mod bins;
pub mod calibrate;
pub(crate) mod checks;
pub mod config;
pub mod cost;
pub mod cpu;
pub mod engine;
pub mod factors;
pub mod forward;
pub mod micro;
pub mod sampler;
pub mod size;
pub mod weights;

pub use config::{is_pipeline, PixArtConfig};
pub use cpu::{PixArtCache, PixArtCpu, PixArtCpuOptions};
pub use engine::{Embeddings, PixArtEngine, PixArtOptions, PixArtRequest, PixArtRunner};
pub use factors::PixArtFactors;
pub use sampler::{PixArtSampler, PixArtSchedule};
pub use size::ImageSize;
pub use weights::{Layer, PixArtModel};
