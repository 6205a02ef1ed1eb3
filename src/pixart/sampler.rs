//! PixArt-α's samplers as diffusers computes them (reference doc, "Schedulers"): the train
//! schedule (f32 linspace betas, ᾱ an f32 cumulative product), DPM-Solver++ (2M, midpoint,
//! lower order final, final σ zero, linspace spacing) and DDIM (η = 0, linspace spacing,
//! each step to t − 1000/n, ᾱ[0] below 0). Both read ε only and keep one extra buffer at most
//! (the previous x̂₀ for DPM-Solver++'s second order).

use crate::error::{Error, Result};

/// Train timesteps.
pub const TRAIN_STEPS: usize = 1000;

/// Which sampler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PixArtSampler {
    /// DPM-Solver++ (2M), PixArt-α's published scheduler.
    #[default]
    #[value(name = "dpm-solver")]
    DpmSolver,
    /// diffusers' DDIM (η = 0).
    Ddim,
}

impl PixArtSampler {
    pub fn name(self) -> &'static str {
        match self {
            PixArtSampler::DpmSolver => "dpm-solver",
            PixArtSampler::Ddim => "ddim",
        }
    }
}

/// A sampler's timesteps and coefficients for `n` steps.
#[derive(Clone, Debug)]
pub struct PixArtSchedule {
    pub sampler: PixArtSampler,
    /// Model timesteps in sampling order.
    pub timesteps: Vec<usize>,
    /// ᾱ of the train schedule (f32, as torch keeps it).
    pub alphas_cumprod: Vec<f32>,
    /// DPM-Solver++: σ = √((1 − ᾱ)/ᾱ) at each timestep, then 0 (n + 1 values).
    pub sigmas: Vec<f32>,
}

/// `round(linspace(0, 999, count))` reversed, numpy's linspace and round-half-to-even.
fn linspace_timesteps(count: usize) -> Vec<usize> {
    let last = (TRAIN_STEPS - 1) as f64;
    let step = if count > 1 { last / (count - 1) as f64 } else { 0.0 };
    let mut t: Vec<usize> = (0..count)
        .map(|i| if i + 1 == count && count > 1 { last } else { i as f64 * step }.round_ties_even() as usize)
        .collect();
    t.reverse();
    t
}

/// ᾱ: betas = linspace(1e-4, 0.02, 1000) in f32, ᾱ = cumprod(1 − β) accumulated in f64 and
/// stored in f32 (torch's CPU cumprod).
pub fn alphas_cumprod() -> Vec<f32> {
    let (start, end) = (1e-4f64, 0.02f64);
    let step = (end - start) / (TRAIN_STEPS - 1) as f64;
    let mut acc = 1.0f64;
    (0..TRAIN_STEPS)
        .map(|i| {
            let beta = if i + 1 == TRAIN_STEPS { end } else { start + i as f64 * step } as f32;
            acc *= (1.0f32 - beta) as f64;
            acc as f32
        })
        .collect()
}

impl PixArtSchedule {
    pub fn new(sampler: PixArtSampler, steps: usize) -> Result<Self> {
        if steps == 0 || steps > TRAIN_STEPS {
            return Err(Error::invalid("steps", format!("{steps}: must be 1 to {TRAIN_STEPS}")));
        }
        let alphas_cumprod = alphas_cumprod();
        let (timesteps, sigmas) = match sampler {
            PixArtSampler::DpmSolver => {
                // linspace(0, 999, n + 1) rounded, reversed, the last (0) dropped.
                let mut t = linspace_timesteps(steps + 1);
                t.pop();
                let mut s: Vec<f32> = t
                    .iter()
                    .map(|&t| {
                        let a = alphas_cumprod[t];
                        ((1.0 - a) / a).sqrt()
                    })
                    .collect();
                s.push(0.0);
                (t, s)
            }
            PixArtSampler::Ddim => (linspace_timesteps(steps), Vec::new()),
        };
        Ok(PixArtSchedule { sampler, timesteps, alphas_cumprod, sigmas })
    }

    pub fn len(&self) -> usize {
        self.timesteps.len()
    }
    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// (α_t, σ_t) of DPM-Solver's σ: α = 1/√(σ² + 1), σ_t = σ·α.
    fn alpha_sigma(sigma: f32) -> (f32, f32) {
        let a = 1.0 / (sigma * sigma + 1.0).sqrt();
        (a, sigma * a)
    }

    fn lambda(sigma: f32) -> f32 {
        let (a, s) = Self::alpha_sigma(sigma);
        a.ln() - s.ln()
    }

    /// Step `index`'s update as six numbers [α, σ, A, B, C, D] of one formula, for samplers on
    /// a device: x̂₀ = (x − σ·ε)/α, then x ← A·x + B·x̂₀ + C·ε + D·x̂₀_prev (D = 0 when the
    /// previous x̂₀ is not read). The same update as [`step`](Self::step), its terms grouped
    /// (DPM-Solver++'s second order: B = −c₀·(1 + 1/(2r)), D = c₀/(2r)).
    pub fn update_coeffs(&self, index: usize) -> [f32; 6] {
        match self.sampler {
            PixArtSampler::DpmSolver => {
                let (sigma_s, sigma_t) = (self.sigmas[index], self.sigmas[index + 1]);
                let (alpha_s, sig_s) = Self::alpha_sigma(sigma_s);
                if sigma_t == 0.0 {
                    return [alpha_s, sig_s, 0.0, 1.0, 0.0, 0.0];
                }
                let (alpha_t, sig_t) = Self::alpha_sigma(sigma_t);
                let (lambda_t, lambda_s) = (Self::lambda(sigma_t), Self::lambda(sigma_s));
                let h = lambda_t - lambda_s;
                let ratio = sig_t / sig_s;
                let c0 = alpha_t * ((-h).exp() - 1.0);
                if index == 0 || index + 1 == self.len() {
                    [alpha_s, sig_s, ratio, -c0, 0.0, 0.0]
                } else {
                    let r0 = (lambda_s - Self::lambda(self.sigmas[index - 1])) / h;
                    let d = 0.5 * c0 * (1.0 / r0);
                    [alpha_s, sig_s, ratio, -c0 - d, 0.0, d]
                }
            }
            PixArtSampler::Ddim => {
                let t = self.timesteps[index];
                let prev = t as isize - (TRAIN_STEPS / self.len()) as isize;
                let a_t = self.alphas_cumprod[t];
                let a_prev = if prev >= 0 { self.alphas_cumprod[prev as usize] } else { self.alphas_cumprod[0] };
                [a_t.sqrt(), (1.0 - a_t).sqrt(), 0.0, a_prev.sqrt(), (1.0 - a_prev).sqrt(), 0.0]
            }
        }
    }

    /// Step `index` (0 first) of the latents `x` with the guided ε: the sampler's update in
    /// place. `x0` receives this step's x̂₀ (the model's estimate of the clean latents, what
    /// previews show); DPM-Solver++ reads the previous step's from it (same length as x).
    pub fn step(&self, index: usize, x: &mut [f32], eps: &[f32], x0: &mut [f32]) {
        match self.sampler {
            PixArtSampler::DpmSolver => self.dpm_step(index, x, eps, x0),
            PixArtSampler::Ddim => self.ddim_step(index, x, eps, x0),
        }
    }

    fn dpm_step(&self, index: usize, x: &mut [f32], eps: &[f32], x0_prev: &mut [f32]) {
        let (sigma_s, sigma_t) = (self.sigmas[index], self.sigmas[index + 1]);
        let (alpha_s, sig_s) = Self::alpha_sigma(sigma_s);
        let last = index + 1 == self.len();
        if sigma_t == 0.0 {
            // The final step, first order to σ = 0: the result is x̂₀.
            for ((xv, &e), p) in x.iter_mut().zip(eps).zip(x0_prev.iter_mut()) {
                *xv = (*xv - sig_s * e) / alpha_s;
                *p = *xv;
            }
            return;
        }
        let (alpha_t, sig_t) = Self::alpha_sigma(sigma_t);
        let (lambda_t, lambda_s) = (Self::lambda(sigma_t), Self::lambda(sigma_s));
        let h = lambda_t - lambda_s;
        let ratio = sig_t / sig_s;
        let c0 = alpha_t * ((-h).exp() - 1.0);
        if index == 0 || last {
            for ((xv, &e), p) in x.iter_mut().zip(eps).zip(x0_prev.iter_mut()) {
                let x0 = (*xv - sig_s * e) / alpha_s;
                *xv = ratio * *xv - c0 * x0;
                *p = x0;
            }
        } else {
            // Midpoint second order: D1 = (x̂₀ − x̂₀_prev)/r, r = h_prev / h.
            let h0 = lambda_s - Self::lambda(self.sigmas[index - 1]);
            let r0 = h0 / h;
            for ((xv, &e), p) in x.iter_mut().zip(eps).zip(x0_prev.iter_mut()) {
                let x0 = (*xv - sig_s * e) / alpha_s;
                let d1 = (1.0 / r0) * (x0 - *p);
                *xv = ratio * *xv - c0 * x0 - 0.5 * c0 * d1;
                *p = x0;
            }
        }
    }

    fn ddim_step(&self, index: usize, x: &mut [f32], eps: &[f32], x0_out: &mut [f32]) {
        let t = self.timesteps[index];
        let prev = t as isize - (TRAIN_STEPS / self.len()) as isize;
        let a_t = self.alphas_cumprod[t];
        let a_prev = if prev >= 0 { self.alphas_cumprod[prev as usize] } else { self.alphas_cumprod[0] };
        let (sa_t, sb_t) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let (sa_p, sb_p) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
        for ((xv, &e), p) in x.iter_mut().zip(eps).zip(x0_out.iter_mut()) {
            let x0 = (*xv - sb_t * e) / sa_t;
            *xv = sa_p * x0 + sb_p * e;
            *p = x0;
        }
    }
}
