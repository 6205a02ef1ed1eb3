//! The caching policy, written once: which block caches an engine keeps ([`CacheMode`]),
//! which sampling steps are full ([`FullSteps`], reference doc E.2), which kind of forward
//! pass each step is ([`step_kind`]) and which kind may follow which ([`check_step`]), with
//! the names the command line takes and reports print ([`CachePolicy`], [`StepKind::name`]).
//! The CPU engine, the GPU pipeline, the CLI and the reports all use these.

use std::fmt;
use std::sync::Arc;

use clap::builder::PossibleValue;

use crate::error::{Error, Result};
use crate::factors::Factors;
use crate::forward::StepKind;

/// A caching policy by name: what `--cache` and `--compare` take, and what reports and run
/// manifests print (`none`, `reuse`, `icc`). [`CacheMode`] is the policy an engine is built
/// with, icc's factors included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum CachePolicy {
    /// No caching: every step is a plain forward pass.
    #[default]
    None,
    /// Naive caching: cached steps reuse each sublayer's cached output (icc's `forward_reuse`).
    Reuse,
    /// Increment-calibrated caching: cached steps correct the caches with rank-r factors.
    Icc,
}

impl CachePolicy {
    /// The name the command line takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            CachePolicy::None => "none",
            CachePolicy::Reuse => "reuse",
            CachePolicy::Icc => "icc",
        }
    }

    /// The kinds of forward pass a sampler under this policy runs.
    pub fn step_kinds(self) -> &'static [StepKind] {
        match self {
            CachePolicy::None => &[StepKind::Plain],
            CachePolicy::Reuse => &[StepKind::Full, StepKind::Reuse],
            CachePolicy::Icc => &[StepKind::Full, StepKind::Calibrated],
        }
    }
}

impl fmt::Display for CachePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// How a calibrated step computes icc's linears (reference doc E.4). Both are the same
/// algebra; they round differently in f16 (docs/performance.md, "The folded form").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum IccForm {
    /// The backend's own: direct on the CPU, projected in the GPU pipeline (direct where the
    /// fused low-rank kernel does not take the factors' ranks).
    #[default]
    Auto,
    /// y = y_s + up·(down·(x − x_s)), as the reference code computes it: a calibrated step
    /// reads each linear's cached input and output.
    Direct,
    /// y = b_s + up·(down·x), with b_s = y_s − up·(down·x_s) kept by every full step: a
    /// calibrated step reads one cached tensor per linear instead of two (GPU pipeline only).
    Folded,
    /// y = y_s + up·(down·x − t_s), with t_s = down·x_s (f32, rank-r wide) kept by every full
    /// step: a calibrated step reads y_s and the narrow t_s instead of y_s and x_s, and the full
    /// step adds only the down projection (GPU pipeline only).
    Projected,
}

impl IccForm {
    /// The name the command line takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            IccForm::Auto => "auto",
            IccForm::Direct => "direct",
            IccForm::Folded => "folded",
            IccForm::Projected => "projected",
        }
    }
}

impl fmt::Display for IccForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// Which block caches an engine keeps (reference doc E).
#[derive(Clone, Debug, Default)]
pub enum CacheMode {
    /// None: only plain forward passes.
    #[default]
    None,
    /// Caches for full and reuse steps (naive caching).
    Reuse,
    /// Caches plus rank-r factors for full, calibrated and reuse steps.
    Icc(Arc<Factors>),
}

impl CacheMode {
    /// The policy's name, without its factors.
    pub fn policy(&self) -> CachePolicy {
        match self {
            CacheMode::None => CachePolicy::None,
            CacheMode::Reuse => CachePolicy::Reuse,
            CacheMode::Icc(_) => CachePolicy::Icc,
        }
    }

    /// Whether an engine under this policy keeps block caches (every policy but `None`).
    pub fn keeps_caches(&self) -> bool {
        !matches!(self, CacheMode::None)
    }

    /// icc's factors; `None` under the other policies.
    pub fn factors(&self) -> Option<&Arc<Factors>> {
        match self {
            CacheMode::Icc(f) => Some(f),
            _ => None,
        }
    }

    /// Refuses icc factors made for a model of another depth (one set of factors per block).
    pub fn check_depth(&self, depth: usize) -> Result<()> {
        match self {
            CacheMode::Icc(f) if f.blocks.len() != depth => Err(Error::invalid(
                "factors",
                format!("{}: {} blocks of factors for a {depth}-block model", f.source.display(), f.blocks.len()),
            )),
            _ => Ok(()),
        }
    }
}

/// Which steps are full (refreshing the caches) under a caching policy, counted in model
/// calls in sampling order from 0, as icc counts them (reference doc E.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FullSteps {
    /// Full iff step index mod N == 0.
    Period(usize),
    /// An explicit list of full step indices (must include 0).
    List(Vec<usize>),
}

impl FullSteps {
    pub fn is_full(&self, step: usize) -> bool {
        match self {
            FullSteps::Period(n) => step.is_multiple_of(*n),
            FullSteps::List(l) => l.contains(&step),
        }
    }

    /// Checks the schedule against a sampler of `steps` steps: step 0 must be full (it fills
    /// the caches) and every listed step must exist.
    pub(crate) fn validate(&self, steps: usize) -> Result<()> {
        match self {
            FullSteps::Period(0) => Err(Error::invalid("period", "must be at least 1")),
            FullSteps::Period(_) => Ok(()),
            FullSteps::List(l) => {
                if !l.contains(&0) {
                    return Err(Error::invalid(
                        "full steps",
                        "the list must include step 0: the first step fills the caches",
                    ));
                }
                if let Some(bad) = l.iter().find(|&&s| s >= steps) {
                    return Err(Error::invalid(
                        "full steps",
                        format!("step {bad} is past the last step {}", steps - 1),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// The kind of model call at sampling step `index` (0 first): plain without caching;
/// under caching, full on the schedule's full steps and reuse or calibrated (by policy)
/// in between.
pub fn step_kind(cache: &CacheMode, full_steps: &FullSteps, index: usize) -> StepKind {
    match cache {
        CacheMode::None => StepKind::Plain,
        _ if full_steps.is_full(index) => StepKind::Full,
        CacheMode::Reuse => StepKind::Reuse,
        CacheMode::Icc(_) => StepKind::Calibrated,
    }
}

/// Whether a forward pass of `kind` over `rows` rows may run on an engine built for `cache`
/// whose caches hold a full step over `cached_rows` rows (`None`: no full step yet). Plain
/// passes always may; cached kinds need caches, calibrated steps need factors, and reuse and
/// calibrated steps need a full step with the same rows before them (the caches hold its
/// activations, row for row).
pub fn check_step(kind: StepKind, cache: &CacheMode, cached_rows: Option<usize>, rows: usize) -> Result<()> {
    match (kind, cache) {
        (StepKind::Plain, _) => Ok(()),
        (_, CacheMode::None) => {
            Err(Error::invalid("step kind", format!("{kind:?} steps need an engine built with a cache mode")))
        }
        (StepKind::Calibrated, CacheMode::Reuse) => {
            Err(Error::invalid("step kind", "calibrated steps need factors (cache mode icc)"))
        }
        (StepKind::Calibrated | StepKind::Reuse, _) if cached_rows != Some(rows) => Err(Error::invalid(
            "step kind",
            format!("a {kind:?} step needs a full step with the same {rows} rows before it"),
        )),
        _ => Ok(()),
    }
}

// StepKind is the forward pass's vocabulary (src/forward.rs); its names live here with the
// policy's, so that `bench-forward --step` and the reports spell them one way.
impl StepKind {
    /// The name the command line takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            StepKind::Plain => "plain",
            StepKind::Full => "full",
            StepKind::Calibrated => "calibrated",
            StepKind::Reuse => "reuse",
        }
    }
}

impl clap::ValueEnum for StepKind {
    fn value_variants<'a>() -> &'a [Self] {
        &[StepKind::Plain, StepKind::Full, StepKind::Calibrated, StepKind::Reuse]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.name()))
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn names_are_the_command_line_values() {
        for p in CachePolicy::value_variants() {
            assert_eq!(p.to_possible_value().map(|v| v.get_name().to_string()).as_deref(), Some(p.name()));
            assert_eq!(CachePolicy::from_str(p.name(), false), Ok(*p));
        }
        let names: Vec<_> = CachePolicy::value_variants().iter().map(|p| p.name()).collect();
        assert_eq!(names, ["none", "reuse", "icc"]);
        for k in StepKind::value_variants() {
            assert_eq!(StepKind::from_str(k.name(), false), Ok(*k));
        }
    }

    #[test]
    fn step_kinds_follow_the_schedule_and_the_policy() {
        use StepKind::*;
        let period = FullSteps::Period(3);
        let kinds = |cache: &CacheMode| (0..7).map(|i| step_kind(cache, &period, i)).collect::<Vec<_>>();
        assert_eq!(kinds(&CacheMode::None), [Plain; 7]);
        assert_eq!(kinds(&CacheMode::Reuse), [Full, Reuse, Reuse, Full, Reuse, Reuse, Full]);
        let list = FullSteps::List(vec![0, 2]);
        let listed: Vec<_> = (0..4).map(|i| step_kind(&CacheMode::Reuse, &list, i)).collect();
        assert_eq!(listed, [Full, Reuse, Full, Reuse]);
        // The kinds a policy names are the kinds its schedule produces.
        for cache in [CacheMode::None, CacheMode::Reuse] {
            let mut seen = kinds(&cache);
            seen.sort_by_key(|k| k.name());
            seen.dedup();
            let mut named = cache.policy().step_kinds().to_vec();
            named.sort_by_key(|k| k.name());
            assert_eq!(seen, named, "{}", cache.policy());
        }
    }

    #[test]
    fn step_order_rules() {
        use StepKind::*;
        let err = |k, c: &CacheMode, cached, rows| check_step(k, c, cached, rows).unwrap_err().to_string();
        assert!(check_step(Plain, &CacheMode::None, None, 2).is_ok());
        assert!(err(Full, &CacheMode::None, None, 2).contains("Full steps need an engine built with a cache mode"));
        assert!(err(Calibrated, &CacheMode::Reuse, Some(2), 2).contains("calibrated steps need factors"));
        assert!(err(Reuse, &CacheMode::Reuse, None, 2).contains("a Reuse step needs a full step with the same 2 rows"));
        assert!(err(Reuse, &CacheMode::Reuse, Some(4), 2).contains("same 2 rows"));
        assert!(check_step(Reuse, &CacheMode::Reuse, Some(2), 2).is_ok());
        assert!(check_step(Full, &CacheMode::Reuse, None, 2).is_ok());
    }
}
