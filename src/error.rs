//! The one error type of the library: every failure names the file, tensor or setting
//! involved and what was expected, so a caller can show it to a person as is.

use std::path::PathBuf;

/// Result alias used throughout icdit.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when loading weights, planning memory or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The bytes are not a safetensors file at all, or its header contradicts the file
    /// (truncated data, offsets outside the buffer, overlapping tensors, bad JSON).
    #[error("{path}: not a valid safetensors file: {reason}")]
    BadSafetensors { path: PathBuf, reason: String },

    /// Some tensors the layout requires are absent.
    #[error("{path}: missing tensors ({}): {}", names.len(), list(names))]
    MissingTensors { path: PathBuf, names: Vec<String> },

    /// The file holds tensors the layout does not know.
    #[error("{path}: unexpected tensors ({}): {}", names.len(), list(names))]
    UnexpectedTensors { path: PathBuf, names: Vec<String> },

    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    Shape { path: PathBuf, tensor: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("{path}: tensor `{tensor}` has dtype {found}, expected {expected}")]
    Dtype { path: PathBuf, tensor: String, found: String, expected: &'static str },

    /// Neither published DiT layout was recognised.
    #[error("{path}: unrecognised checkpoint layout: {reason}")]
    Layout { path: PathBuf, reason: String },

    /// A config (metadata, config.json or a command-line setting) contradicts the tensors
    /// or another part of the config.
    #[error("{origin}: inconsistent config: {reason}")]
    Config { origin: String, reason: String },

    /// The number of attention heads cannot be read from any tensor shape.
    #[error(
        "{path}: cannot tell the number of attention heads for hidden size {hidden_size} \
         (depth {depth}): it is not in the file's metadata or config.json and this is not \
         a known DiT family; pass --num-heads N"
    )]
    UnknownHeads { path: PathBuf, hidden_size: usize, depth: usize },

    /// The device failed: a CUDA call, a module load, or a kernel that the emulation
    /// caught misbehaving (a barrier not reached by every thread, a bad shuffle mask, …).
    #[error("GPU {what}: {reason}")]
    Gpu { what: &'static str, reason: String },

    /// A request that cannot be served as given (wrong batch size, unknown class, ...).
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },

    /// A request or input file holds NaN or ±Inf where numbers are expected.
    #[error("{path}: tensor `{tensor}` element {index} is {value}; expected finite numbers")]
    NonFiniteInput { path: PathBuf, tensor: String, index: usize, value: f32 },

    /// The model produced NaN or ±Inf during sampling (see [`crate::engine::EngineOptions::check_finite`]):
    /// `step` counts model calls from 0, `location` names the block and operation where the
    /// values first stopped being finite, and `cause` what was found there (a weight tensor).
    #[error(
        "non-finite values (NaN or Inf) at sampling step {step} of {steps} (timestep {timestep}), first in {location}{cause}"
    )]
    NonFinite { step: usize, steps: usize, timestep: usize, location: String, cause: String },

    /// The planned memory exceeds the caller's limit or what the machine has available.
    #[error("{what} needs {} but {limit_from} is {}:\n{breakdown}", crate::units::human(*need), crate::units::human(*limit))]
    Memory { what: String, need: u64, limit: u64, limit_from: String, breakdown: String },

    /// The run was interrupted (Ctrl-C, or the caller's interrupt flag) between steps.
    #[error("interrupted: {done}")]
    Interrupted { done: String },
}

fn list(names: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut s = names.iter().take(SHOWN).map(String::as_str).collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", … and {} more", names.len() - SHOWN));
    }
    s
}

impl Error {
    /// Process exit status for the command line: 2 for invalid settings or requests,
    /// 3 for weights or input files that are malformed or do not fit (and non-finite values),
    /// 4 for I/O failures, 5 for device failures, 130 for an interrupted run (as a shell
    /// reports SIGINT).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Invalid { .. } | Error::Memory { .. } => 2,
            Error::Io { .. } => 4,
            Error::Interrupted { .. } => 130,
            Error::Gpu { .. } => 5,
            _ => 3,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub fn gpu(what: &'static str, reason: impl Into<String>) -> Self {
        Error::Gpu { what, reason: reason.into() }
    }

    pub fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid { what, reason: reason.into() }
    }
}
