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
    /// FORA-style block reuse: cached steps reuse each block's attention and MLP branch
    /// outputs from the last full step under the current gates (attention skipped too).
    Fora,
    /// TaylorSeer-style forecasting: cached steps predict each block's branch outputs by a
    /// Taylor expansion over finite differences of the full steps' outputs.
    Taylor,
}

impl CachePolicy {
    /// The name the command line takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            CachePolicy::None => "none",
            CachePolicy::Reuse => "reuse",
            CachePolicy::Icc => "icc",
            CachePolicy::Fora => "fora",
            CachePolicy::Taylor => "taylor",
        }
    }

    /// The kinds of forward pass a sampler under this policy runs.
    pub fn step_kinds(self) -> &'static [StepKind] {
        match self {
            CachePolicy::None => &[StepKind::Plain],
            CachePolicy::Reuse => &[StepKind::Full, StepKind::Reuse],
            CachePolicy::Icc => &[StepKind::Full, StepKind::Calibrated],
            CachePolicy::Fora => &[StepKind::BranchFull, StepKind::Reuse],
            CachePolicy::Taylor => &[StepKind::TaylorFull, StepKind::Forecast],
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
    /// Each block's two branch outputs (the `proj_y` and `fc2_y` slots only) for branch-full
    /// and reuse steps (FORA-style block reuse).
    Fora,
    /// Each block's two branch outputs and their finite differences, for Taylor-full and
    /// forecast steps (TaylorSeer-style).
    Taylor(Forecast),
}

/// Largest Taylor order `--taylor-order` takes.
pub const MAX_TAYLOR_ORDER: usize = 2;

/// The settings of Taylor forecasting: the expansion's order and the warm-up full steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Forecast {
    /// Highest finite difference kept and used (0 ..= [`MAX_TAYLOR_ORDER`]; 0 is block reuse).
    pub order: usize,
    /// The first `warmup` sampling steps are all full (besides the schedule's full steps).
    pub warmup: usize,
}

impl Forecast {
    /// What `--cache taylor` uses unless told otherwise: order 2 (TaylorSeer's second-order
    /// expansion) after 2 warm-up full steps (so the first cached steps already have D₁).
    pub const CLI_DEFAULT: Forecast = Forecast { order: 2, warmup: 2 };

    /// Checks the order.
    pub fn validate(&self) -> Result<()> {
        if self.order > MAX_TAYLOR_ORDER {
            return Err(Error::invalid("taylor order", format!("{}: must be 0 to {MAX_TAYLOR_ORDER}", self.order)));
        }
        Ok(())
    }
}

/// The numbers one step of Taylor forecasting uses ([`forecast_step`]); every backend takes
/// them as they are, so both compute the same expansion.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ForecastStep {
    /// Full step: how many finite differences it forms from the new branch outputs (the order,
    /// or fewer while fewer earlier full steps exist; 0 on the first); higher ones are zeroed.
    pub orders: usize,
    /// Full step: Δ, the step distance from the previous full step (1 on the first).
    pub delta: f32,
    /// Cached step: the weight k^i/i! of the i-th difference, k the step distance from the
    /// last full step; 0 past the differences available.
    pub weights: [f32; MAX_TAYLOR_ORDER + 1],
}

impl ForecastStep {
    /// Order 0: a full step keeps only D₀, a cached step predicts D₀ (block reuse). What a
    /// forward pass outside a sampling loop uses.
    pub const REUSE: ForecastStep = ForecastStep { orders: 0, delta: 1.0, weights: [1.0, 0.0, 0.0] };
}

/// Taylor forecasting's numbers at sampling step `index` (TaylorSeer): a full step at distance
/// Δ from the previous one updates D₀ = y, D_{i+1} = (D_i(new) − D_i(old))/Δ up to the order
/// (as many as the full steps so far allow); a cached step k steps after the last full step
/// predicts y ≈ Σ_i D_i·k^i/i! over the differences available.
pub fn forecast_step(full_steps: &FullSteps, forecast: Forecast, index: usize) -> ForecastStep {
    let full = |j: usize| j < forecast.warmup || full_steps.is_full(j);
    let (mut count, mut last, mut prev) = (0usize, 0usize, None);
    for j in 0..=index {
        if full(j) {
            count += 1;
            prev = Some(last);
            last = j;
        }
    }
    let order = forecast.order.min(MAX_TAYLOR_ORDER);
    let mut step = ForecastStep::REUSE;
    if count == 0 {
        return step;
    }
    step.weights = [0.0; MAX_TAYLOR_ORDER + 1];
    if full(index) {
        step.orders = order.min(count - 1);
        if let Some(p) = prev.filter(|_| count > 1) {
            step.delta = (index - p) as f32;
        }
    } else {
        let k = (index - last) as f32;
        let (mut w, available) = (1.0f32, order.min(count - 1));
        for (i, weight) in step.weights.iter_mut().enumerate().take(available + 1) {
            if i > 0 {
                w = w * k / i as f32;
            }
            *weight = w;
        }
    }
    step
}

impl CacheMode {
    /// The policy's name, without its factors.
    pub fn policy(&self) -> CachePolicy {
        match self {
            CacheMode::None => CachePolicy::None,
            CacheMode::Reuse => CachePolicy::Reuse,
            CacheMode::Icc(_) => CachePolicy::Icc,
            CacheMode::Fora => CachePolicy::Fora,
            CacheMode::Taylor(_) => CachePolicy::Taylor,
        }
    }

    /// The step kind that refreshes this policy's caches (`Plain` without caching).
    pub fn full_kind(&self) -> StepKind {
        match self {
            CacheMode::None => StepKind::Plain,
            CacheMode::Reuse | CacheMode::Icc(_) => StepKind::Full,
            CacheMode::Fora => StepKind::BranchFull,
            CacheMode::Taylor(_) => StepKind::TaylorFull,
        }
    }

    /// Whether an engine built for this policy can run a forward pass of `kind` (it planned the
    /// buffers that kind reads and writes).
    pub fn runs(&self, kind: StepKind) -> bool {
        use StepKind::*;
        match self {
            CacheMode::None => kind == Plain,
            CacheMode::Reuse => matches!(kind, Plain | Full | Reuse),
            CacheMode::Icc(_) => matches!(kind, Plain | Full | Calibrated | Reuse),
            CacheMode::Fora => matches!(kind, Plain | BranchFull | Reuse),
            CacheMode::Taylor(_) => matches!(kind, Plain | TaylorFull | Forecast),
        }
    }

    /// Taylor forecasting's settings; `None` under the other policies.
    pub fn forecast(&self) -> Option<Forecast> {
        match self {
            CacheMode::Taylor(f) => Some(*f),
            _ => None,
        }
    }

    /// The full steps the policy adds to the schedule's (Taylor's warm-up).
    fn warmup(&self) -> usize {
        self.forecast().map_or(0, |f| f.warmup)
    }

    /// Whether sampling step `index` is full under this policy and `full_steps`.
    pub fn is_full(&self, full_steps: &FullSteps, index: usize) -> bool {
        index < self.warmup() || full_steps.is_full(index)
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
        _ if cache.is_full(full_steps, index) => cache.full_kind(),
        CacheMode::Reuse | CacheMode::Fora => StepKind::Reuse,
        CacheMode::Icc(_) => StepKind::Calibrated,
        CacheMode::Taylor(_) => StepKind::Forecast,
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
        _ if !cache.runs(kind) => Err(Error::invalid(
            "step kind",
            format!("{kind} steps are not part of cache policy {} (it runs {} steps)", cache.policy(), {
                let kinds: Vec<_> = cache.policy().step_kinds().iter().map(|k| k.name()).collect();
                kinds.join(" and ")
            }),
        )),
        (StepKind::Calibrated | StepKind::Reuse | StepKind::Forecast, _) if cached_rows != Some(rows) => {
            Err(Error::invalid(
                "step kind",
                format!("a {kind:?} step needs a full step with the same {rows} rows before it"),
            ))
        }
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
            StepKind::BranchFull => "branch-full",
            StepKind::TaylorFull => "taylor-full",
            StepKind::Forecast => "forecast",
        }
    }

    /// Whether a pass of this kind refreshes its policy's caches (the cached kinds that follow
    /// need one with the same rows before them).
    pub fn refreshes_caches(self) -> bool {
        matches!(self, StepKind::Full | StepKind::BranchFull | StepKind::TaylorFull)
    }
}

impl clap::ValueEnum for StepKind {
    fn value_variants<'a>() -> &'a [Self] {
        &[
            StepKind::Plain,
            StepKind::Full,
            StepKind::Calibrated,
            StepKind::Reuse,
            StepKind::BranchFull,
            StepKind::TaylorFull,
            StepKind::Forecast,
        ]
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
        assert_eq!(names, ["none", "reuse", "icc", "fora", "taylor"]);
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
    fn forecast_steps_follow_the_full_steps() {
        use StepKind::*;
        // Warm-up 2, period 3: full steps 0, 1, 3, 6.
        let (period, taylor) = (FullSteps::Period(3), super::Forecast { order: 2, warmup: 2 });
        let cache = CacheMode::Taylor(taylor);
        let kinds: Vec<_> = (0..8).map(|i| step_kind(&cache, &period, i)).collect();
        assert_eq!(kinds, [TaylorFull, TaylorFull, Forecast, TaylorFull, Forecast, Forecast, TaylorFull, Forecast]);
        let at = |i| forecast_step(&period, taylor, i);
        // The first full step forms no difference; the second one order 1 over Δ = 1.
        assert_eq!((at(0).orders, at(1).orders, at(1).delta), (0, 1, 1.0));
        // Step 2, one after the last full step, with D₀ and D₁ known: weights 1, 1, 0.
        assert_eq!(at(2).weights, [1.0, 1.0, 0.0]);
        // Step 3: full, Δ = 2, both orders; steps 4 and 5: k = 1, 2 with three terms.
        assert_eq!((at(3).orders, at(3).delta), (2, 2.0));
        assert_eq!(at(4).weights, [1.0, 1.0, 0.5]);
        assert_eq!(at(5).weights, [1.0, 2.0, 2.0]);
        // Order 1 never uses the second difference; order 0 is block reuse.
        let first = forecast_step(&period, super::Forecast { order: 1, warmup: 2 }, 5);
        assert_eq!(first.weights, [1.0, 2.0, 0.0]);
        let zero = forecast_step(&period, super::Forecast { order: 0, warmup: 0 }, 5);
        assert_eq!((zero.weights, forecast_step(&period, super::Forecast::default(), 3).orders), ([1.0, 0.0, 0.0], 0));
        assert!(super::Forecast { order: 3, warmup: 0 }.validate().unwrap_err().to_string().contains("must be 0 to 2"));
        // Kinds of another policy are refused by name.
        let err = check_step(Full, &cache, None, 2).unwrap_err().to_string();
        assert!(err.contains("full steps are not part of cache policy taylor"), "{err}");
        assert!(check_step(Forecast, &cache, None, 2).is_err());
        assert!(check_step(Reuse, &CacheMode::Fora, Some(2), 2).is_ok());
        assert!(check_step(Full, &CacheMode::Fora, None, 2).is_err());
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
