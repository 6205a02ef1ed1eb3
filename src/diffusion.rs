//! Gaussian diffusion exactly as DiT samples with it (reference doc part D): linear betas in
//! f64, respacing ("N" with round-half-to-even on an accumulated f64 stride, "ddimN"), the
//! respaced arrays, and the DDPM (learned-range or fixed-large variance) and DDIM steps.
//! Arrays are f64 and cast to f32 per step, and the step arithmetic is f32 in the official
//! order of operations.

use crate::error::{Error, Result};

/// Training steps of every DiT model.
pub const TRAIN_STEPS: usize = 1000;

/// Which reverse process to run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampler {
    /// Ancestral sampling (`p_sample`), DiT's default.
    Ddpm,
    /// DDIM (`ddim_sample`); η = 0 is deterministic.
    Ddim { eta: f32 },
}

impl Sampler {
    /// The sampler as logs, reports and shard manifests name it: `ddpm`, `ddim(eta=0)`
    /// (manifests compare this text, so its spelling must not change).
    pub fn name(&self) -> String {
        match self {
            Sampler::Ddpm => "ddpm".into(),
            Sampler::Ddim { eta } => format!("ddim(eta={eta})"),
        }
    }
}

/// The kept original timesteps for a respacing spec, ascending (`space_timesteps`).
pub fn space_timesteps(spec: &str) -> Result<Vec<usize>> {
    let bad = |reason: String| Error::invalid("respacing", format!("`{spec}`: {reason}"));
    if spec.is_empty() {
        return Ok((0..TRAIN_STEPS).collect());
    }
    if let Some(n) = spec.strip_prefix("ddim") {
        let n: usize = n.parse().map_err(|_| bad("expected ddimN with N a positive integer".into()))?;
        // The smallest integer stride whose range(0, 1000, stride) has exactly N elements.
        for stride in 1..TRAIN_STEPS {
            if TRAIN_STEPS.div_ceil(stride) == n {
                return Ok((0..TRAIN_STEPS).step_by(stride).collect());
            }
        }
        return Err(bad(format!("no integer stride gives exactly {n} steps out of {TRAIN_STEPS}")));
    }
    let mut out = Vec::new();
    let sections: Vec<&str> = spec.split(',').collect();
    let counts: Vec<usize> = sections
        .iter()
        .map(|s| s.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad("expected a step count like 50 or 250, a comma list of counts, or ddimN".into()))?;
    // Sections split the 1000 steps as evenly as possible (extra steps go to the first ones).
    let (size, extra) = (TRAIN_STEPS / counts.len(), TRAIN_STEPS % counts.len());
    let mut start = 0;
    for (i, &count) in counts.iter().enumerate() {
        let len = size + usize::from(i < extra);
        if count == 0 || count > len {
            return Err(bad(format!("cannot take {count} steps from a section of {len}")));
        }
        let stride = if count > 1 { (len - 1) as f64 / (count - 1) as f64 } else { 1.0 };
        let mut cur = 0.0f64;
        for _ in 0..count {
            out.push(start + round_half_even(cur));
            cur += stride;
        }
        start += len;
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Python's `round` on a non-negative float: halves go to the even neighbour.
fn round_half_even(x: f64) -> usize {
    let f = x.floor();
    let diff = x - f;
    let r = if diff > 0.5 || (diff == 0.5 && f % 2.0 != 0.0) { f + 1.0 } else { f };
    r as usize
}

/// The respaced diffusion: every array of `GaussianDiffusion.__init__` rebuilt from the
/// respaced betas, in f64.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Original timestep of each spaced index k (what the model is given).
    pub timestep_map: Vec<usize>,
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    pub alphas_cumprod_prev: Vec<f64>,
    pub sqrt_recip_alphas_cumprod: Vec<f64>,
    pub sqrt_recipm1_alphas_cumprod: Vec<f64>,
    pub posterior_variance: Vec<f64>,
    pub posterior_log_variance_clipped: Vec<f64>,
    pub posterior_mean_coef1: Vec<f64>,
    pub posterior_mean_coef2: Vec<f64>,
    pub log_betas: Vec<f64>,
    /// log of the fixed-large variance [post_var₁, β₁, β₂, …] (models without learn_sigma).
    pub fixed_large_log_variance: Vec<f64>,
}

/// DiT's linear schedule: β from 1e-4 to 0.02 over 1000 steps (numpy linspace, f64).
pub fn linear_betas() -> Vec<f64> {
    let (start, end) = (1e-4f64, 0.02f64);
    let step = (end - start) / (TRAIN_STEPS - 1) as f64;
    let mut b: Vec<f64> = (0..TRAIN_STEPS).map(|i| start + i as f64 * step).collect();
    b[TRAIN_STEPS - 1] = end;
    b
}

impl Schedule {
    /// The schedule for a respacing spec ("250", "50", "ddim50", "" for all 1000).
    pub fn new(spec: &str) -> Result<Self> {
        let kept = space_timesteps(spec)?;
        let base = linear_betas();
        let mut abar = 1.0f64;
        let base_cum: Vec<f64> = base
            .iter()
            .map(|b| {
                abar *= 1.0 - b;
                abar
            })
            .collect();
        // β'_k = 1 − ᾱ[t_k] / ᾱ[t_{k−1}], with ᾱ[t_{−1}] = 1.
        let mut last = 1.0f64;
        let betas: Vec<f64> = kept
            .iter()
            .map(|&t| {
                let b = 1.0 - base_cum[t] / last;
                last = base_cum[t];
                b
            })
            .collect();
        Ok(Self::from_betas(kept, betas))
    }

    fn from_betas(timestep_map: Vec<usize>, betas: Vec<f64>) -> Self {
        let n = betas.len();
        let mut acc = 1.0f64;
        let ac: Vec<f64> = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        let acp: Vec<f64> = std::iter::once(1.0).chain(ac[..n - 1].iter().copied()).collect();
        let post_var: Vec<f64> = (0..n).map(|i| betas[i] * (1.0 - acp[i]) / (1.0 - ac[i])).collect();
        // Index 0 borrows index 1 because the posterior variance is 0 there.
        let clip = |i: usize| if i == 0 && n > 1 { post_var[1] } else { post_var[i] };
        let post_log_clipped = (0..n).map(|i| clip(i).ln()).collect();
        let fixed_large = (0..n).map(|i| if i == 0 { clip(0) } else { betas[i] }.ln()).collect();
        Schedule {
            sqrt_recip_alphas_cumprod: ac.iter().map(|a| (1.0 / a).sqrt()).collect(),
            sqrt_recipm1_alphas_cumprod: ac.iter().map(|a| (1.0 / a - 1.0).sqrt()).collect(),
            posterior_mean_coef1: (0..n).map(|i| betas[i] * acp[i].sqrt() / (1.0 - ac[i])).collect(),
            posterior_mean_coef2: (0..n).map(|i| (1.0 - acp[i]) * (1.0 - betas[i]).sqrt() / (1.0 - ac[i])).collect(),
            posterior_variance: post_var,
            posterior_log_variance_clipped: post_log_clipped,
            log_betas: betas.iter().map(|b| b.ln()).collect(),
            fixed_large_log_variance: fixed_large,
            alphas_cumprod: ac,
            alphas_cumprod_prev: acp,
            timestep_map,
            betas,
        }
    }

    /// Number of sampling steps.
    pub fn len(&self) -> usize {
        self.betas.len()
    }
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// The f32 coefficients of spaced step k, as `_extract_into_tensor` casts them.
    pub fn coeffs(&self, k: usize) -> StepCoeffs {
        let f = |v: &[f64]| v[k] as f32;
        StepCoeffs {
            nonzero: k != 0,
            sqrt_recip: f(&self.sqrt_recip_alphas_cumprod),
            sqrt_recipm1: f(&self.sqrt_recipm1_alphas_cumprod),
            coef1: f(&self.posterior_mean_coef1),
            coef2: f(&self.posterior_mean_coef2),
            min_log: f(&self.posterior_log_variance_clipped),
            max_log: f(&self.log_betas),
            fixed_log: f(&self.fixed_large_log_variance),
            alpha_bar: f(&self.alphas_cumprod),
            alpha_bar_prev: f(&self.alphas_cumprod_prev),
        }
    }
}

/// Per-step f32 scalars.
#[derive(Clone, Copy, Debug)]
pub struct StepCoeffs {
    pub nonzero: bool,
    pub sqrt_recip: f32,
    pub sqrt_recipm1: f32,
    pub coef1: f32,
    pub coef2: f32,
    pub min_log: f32,
    pub max_log: f32,
    pub fixed_log: f32,
    pub alpha_bar: f32,
    pub alpha_bar_prev: f32,
}

/// The variance channels of the model output, when it has them.
#[derive(Clone, Copy)]
pub enum Variance<'a> {
    /// learn_sigma: v ∈ ℝ interpolates log-variance between the clipped posterior (v = −1)
    /// and log β (v = +1) (reference doc D.5).
    Learned(&'a [f32]),
    /// Fixed-large variance of models without learn_sigma.
    FixedLarge,
}

/// One DDPM step on one image: `x` becomes x_{k−1}. `eps` and `var` are the (guided)
/// model outputs for this image; `noise` is used only when k ≠ 0.
pub fn ddpm_step(c: &StepCoeffs, x: &mut [f32], eps: &[f32], var: Variance, noise: &[f32]) {
    for i in 0..x.len() {
        let (mean, log_var) = ddpm_mean_logvar(c, x[i], eps[i], var, i);
        let add = if c.nonzero { (0.5 * log_var).exp() * noise[i] } else { 0.0 };
        x[i] = mean + add;
    }
}

/// p_mean_variance then q_posterior_mean for one element: (mean, log-variance).
#[inline]
pub fn ddpm_mean_logvar(c: &StepCoeffs, x: f32, eps: f32, var: Variance, i: usize) -> (f32, f32) {
    let log_var = match var {
        Variance::Learned(v) => {
            let frac = (v[i] + 1.0) / 2.0;
            frac * c.max_log + (1.0 - frac) * c.min_log
        }
        Variance::FixedLarge => c.fixed_log,
    };
    let x0 = c.sqrt_recip * x - c.sqrt_recipm1 * eps;
    let mean = c.coef1 * x0 + c.coef2 * x;
    (mean, log_var)
}

/// The sampler's estimate of the clean sample, x̂₀ = √(1/ᾱ)·x − √(1/ᾱ − 1)·ε, computed as
/// both updates compute it (no clipping, as DiT samples); for per-step previews.
pub fn predict_x0(c: &StepCoeffs, x: &[f32], eps: &[f32], out: &mut [f32]) {
    for ((o, &x), &e) in out.iter_mut().zip(x).zip(eps) {
        *o = c.sqrt_recip * x - c.sqrt_recipm1 * e;
    }
}

/// One DDIM step on one image (reference doc D.6): ε is re-derived from x₀ as the official
/// code does, then x_{k−1} = x₀·√ᾱ_prev + √(1 − ᾱ_prev − σ²)·ε' + σ·noise.
pub fn ddim_step(c: &StepCoeffs, eta: f32, x: &mut [f32], eps: &[f32], noise: &[f32]) {
    let (ab, abp) = (c.alpha_bar, c.alpha_bar_prev);
    let sigma = eta * ((1.0 - abp) / (1.0 - ab)).sqrt() * (1.0 - ab / abp).sqrt();
    let (sqrt_abp, dir) = (abp.sqrt(), (1.0 - abp - sigma * sigma).sqrt());
    for i in 0..x.len() {
        let x0 = c.sqrt_recip * x[i] - c.sqrt_recipm1 * eps[i];
        let e = (c.sqrt_recip * x[i] - x0) / c.sqrt_recipm1;
        let mean = x0 * sqrt_abp + dir * e;
        x[i] = if c.nonzero { mean + sigma * noise[i] } else { mean };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn respacing_matches_reference_doc() {
        let s50 = space_timesteps("50").unwrap();
        assert_eq!(&s50[..8], &[0, 20, 41, 61, 82, 102, 122, 143]);
        assert_eq!(*s50.last().unwrap(), 999);
        let s250 = space_timesteps("250").unwrap();
        assert_eq!((s250.len(), s250[1], s250[249]), (250, 4, 999));
        let d50 = space_timesteps("ddim50").unwrap();
        assert_eq!((d50.len(), d50[1], *d50.last().unwrap()), (50, 20, 980));
        // "25" has an exact tie (166.5 → 166, half to even).
        assert!(space_timesteps("25").unwrap().contains(&166));
        assert!(space_timesteps("ddim300").is_err());
        assert!(space_timesteps("0").is_err());
        assert!(space_timesteps("1001").is_err());
        assert!(space_timesteps("abc").is_err());
    }

    #[test]
    fn schedule_endpoints() {
        let s = Schedule::new("").unwrap();
        assert!((s.alphas_cumprod[0] - 0.9999).abs() < 1e-15);
        assert!((s.alphas_cumprod[999] - 4.0358e-5).abs() < 1e-8);
        let r = Schedule::new("50").unwrap();
        assert!((r.betas[0] - 1e-4).abs() < 1e-15);
        assert!(((r.alphas_cumprod[49] - s.alphas_cumprod[999]) / s.alphas_cumprod[999]).abs() < 1e-12);
    }
}
