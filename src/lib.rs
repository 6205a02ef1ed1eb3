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
pub mod fsio;
pub mod gpu;
pub mod image;
pub mod inputs;
pub mod inspect;
pub mod isa;
pub mod limits;
pub mod noise;
pub mod pixart;
pub mod plan;
pub mod policy;
pub mod quality;
pub mod scale_out;
pub mod session;
pub mod tensorfile;
pub mod text;
pub mod units;
pub mod vae;
pub mod weights;

pub use config::{DitConfig, Numerics, SampleSpace};
pub use cpu::{BenchOp, CpuEngine, CpuOptions, Engine};
pub use diffusion::Sampler;
pub use engine::{EngineOptions, GuidedChannels, Request, SamplingBackend, SamplingEngine};
pub use error::{Error, Result};
pub use factors::Factors;
pub use fsio::atomic_write;
pub use policy::{CacheMode, CachePolicy, Forecast, FullSteps, IccForm};
pub use session::{Session, SessionOptions, SessionRequest};
pub use weights::{DitModel, Layout, LoadOptions};
