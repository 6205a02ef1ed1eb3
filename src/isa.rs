//! Which instruction-set path the CPU backend runs: the hand-vectorised GEMM micro-kernels
//! and packing routines, and the target features the elementwise loops are compiled for.
//!
//! Paths, from the portable reference up:
//! - `scalar`: plain Rust for the build's baseline target (the compiler may still use SSE2
//!   or NEON registers); no fused multiply-add, so its sums round differently from the rest.
//! - `avx2`: x86-64 with AVX2 and FMA (Haswell, Zen 1 and later): 6×16 register tiles.
//! - `avx512`: x86-64 with AVX-512 F/DQ/VL: 12×32 register tiles.
//! - `neon`: aarch64 Advanced SIMD (Graviton, Ampere, Apple silicon): 6×16 register tiles.
//!
//! Every SIMD path sums each output element over k in the same order with one fused
//! multiply-add per term, so `avx2`, `avx512` and `neon` give bit-identical results; the
//! tests check that. The path is chosen once per engine: the best the CPU has, or the one
//! named by `ICDIT_CPU_ISA` (asking for a path the CPU lacks is an error).

use crate::error::{Error, Result};

/// The environment variable that overrides the detected path.
pub const ISA_ENV: &str = "ICDIT_CPU_ISA";

/// An instruction-set path, by name. Whether this CPU can run it is [`IsaKind::supported`];
/// a value that proves it can is an [`Isa`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IsaKind {
    Scalar,
    Avx2,
    Avx512,
    Neon,
}

impl IsaKind {
    /// Every path, portable first.
    pub const ALL: [IsaKind; 4] = [IsaKind::Scalar, IsaKind::Avx2, IsaKind::Avx512, IsaKind::Neon];

    /// The name `ICDIT_CPU_ISA`, reports and benchmark ids use.
    pub fn name(self) -> &'static str {
        match self {
            IsaKind::Scalar => "scalar",
            IsaKind::Avx2 => "avx2",
            IsaKind::Avx512 => "avx512",
            IsaKind::Neon => "neon",
        }
    }

    pub fn parse(s: &str) -> Option<IsaKind> {
        IsaKind::ALL.into_iter().find(|k| k.name().eq_ignore_ascii_case(s.trim()))
    }

    /// The CPU features the path needs, as `is_x86_feature_detected!` and the docs name them.
    pub fn features(self) -> &'static str {
        match self {
            IsaKind::Scalar => "none",
            IsaKind::Avx2 => "x86-64 avx2 + fma",
            IsaKind::Avx512 => "x86-64 avx512f + avx512dq + avx512vl + fma",
            IsaKind::Neon => "aarch64 neon",
        }
    }

    /// Whether this build runs on a CPU that has the path's features.
    pub fn supported(self) -> bool {
        match self {
            IsaKind::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            IsaKind::Avx2 => std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            IsaKind::Avx512 => {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512dq")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "aarch64")]
            IsaKind::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

impl std::fmt::Display for IsaKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A path this CPU is known to run: the only way to reach the `unsafe` SIMD code, which is
/// sound because an `Isa` can only be made after the feature check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Isa(IsaKind);

impl Isa {
    /// The path, if this CPU runs it; otherwise an error naming what is missing.
    pub fn new(kind: IsaKind) -> Result<Isa> {
        Isa::checked(kind, "")
    }

    fn checked(kind: IsaKind, context: &str) -> Result<Isa> {
        if kind.supported() {
            return Ok(Isa(kind));
        }
        Err(Error::invalid(
            "CPU instruction set",
            format!(
                "{context}the {kind} path needs {}, which this CPU (or this {} build) lacks; available: {}",
                kind.features(),
                std::env::consts::ARCH,
                Isa::names_available()
            ),
        ))
    }

    /// The portable reference path (every CPU).
    pub fn scalar() -> Isa {
        Isa(IsaKind::Scalar)
    }

    /// The fastest path this CPU runs.
    pub fn best() -> Isa {
        Isa::available().last().unwrap_or(Isa::scalar())
    }

    /// Every path this CPU runs, portable first.
    pub fn available() -> impl Iterator<Item = Isa> {
        IsaKind::ALL.into_iter().filter(|k| k.supported()).map(Isa)
    }

    fn names_available() -> String {
        Isa::available().map(|i| i.name()).collect::<Vec<_>>().join(", ")
    }

    /// The path `ICDIT_CPU_ISA` names, or the best one when it is unset or empty.
    pub fn from_env() -> Result<Isa> {
        match std::env::var(ISA_ENV) {
            Ok(v) if !v.trim().is_empty() => {
                let kind = IsaKind::parse(&v).ok_or_else(|| {
                    Error::invalid(
                        "CPU instruction set",
                        format!("{ISA_ENV}={v}: not one of scalar, avx2, avx512, neon"),
                    )
                })?;
                Isa::checked(kind, &format!("{ISA_ENV}={v}: "))
            }
            _ => Ok(Isa::best()),
        }
    }

    /// `requested`, or the environment's choice when `None`.
    pub fn resolve(requested: Option<Isa>) -> Result<Isa> {
        requested.map_or_else(Isa::from_env, Ok)
    }

    pub fn kind(self) -> IsaKind {
        self.0
    }

    pub fn name(self) -> &'static str {
        self.0.name()
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_scalar_is_always_there() {
        for k in IsaKind::ALL {
            assert_eq!(IsaKind::parse(k.name()), Some(k));
            assert_eq!(IsaKind::parse(&k.name().to_uppercase()), Some(k));
        }
        assert_eq!(IsaKind::parse("sse9"), None);
        assert_eq!(Isa::available().next(), Some(Isa::scalar()));
        assert!(Isa::available().any(|i| i == Isa::best()));
    }

    #[test]
    fn a_path_the_cpu_lacks_is_refused_by_name() {
        // Neon on x86-64 and AVX2 on aarch64 can never run.
        let foreign = if cfg!(target_arch = "aarch64") { IsaKind::Avx2 } else { IsaKind::Neon };
        let err = Isa::new(foreign).unwrap_err().to_string();
        assert!(err.contains(foreign.name()) && err.contains("available: scalar"), "{err}");
    }
}
