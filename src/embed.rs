//! The fixed embeddings of DiT: the 2-D sin-cos position table (reference doc A.2) and the
//! timestep frequency embedding (A.3), computed exactly as the official code does.

use crate::config::{Numerics, FREQ_DIM};

/// Fills `out` (N·C, N = g²) with the position embedding of a g×g grid, computed in f64 and
/// rounded to f32 as the official numpy code does. Token n = i·g + j (i row, j column):
/// `[sin(j·ω), cos(j·ω), sin(i·ω), cos(i·ω)]`, each C/4 wide, ω_k = 10000^(−k/(C/4)).
/// Note the first half encodes the column (numpy meshgrid puts w first).
pub fn pos_embed_2d(c: usize, g: usize, out: &mut [f32]) {
    let q = c / 4;
    let omega: Vec<f64> = (0..q).map(|k| 1.0 / 10000f64.powf(k as f64 / q as f64)).collect();
    for i in 0..g {
        for j in 0..g {
            let row = &mut out[(i * g + j) * c..][..c];
            for k in 0..q {
                let (pj, pi) = (j as f64 * omega[k], i as f64 * omega[k]);
                row[k] = pj.sin() as f32;
                row[q + k] = pj.cos() as f32;
                row[2 * q + k] = pi.sin() as f32;
                row[3 * q + k] = pi.cos() as f32;
            }
        }
    }
}

/// The 128 frequencies of the timestep embedding, in f32 as torch computes them:
/// `exp(−ln(10000)·k / div)` with the product, the division and the exp each rounded to
/// f32. `div` is 128 officially and 127 in diffusers (`downscale_freq_shift = 1`).
pub fn timestep_freqs(numerics: Numerics) -> [f32; FREQ_DIM / 2] {
    let half = FREQ_DIM / 2;
    let div = match numerics {
        Numerics::Official => half as f32,
        Numerics::Diffusers => (half - 1) as f32,
    };
    let neg_log = -(10000f64.ln()) as f32;
    let mut f = [0.0f32; FREQ_DIM / 2];
    for (k, v) in f.iter_mut().enumerate() {
        *v = ((neg_log * k as f32) / div).exp();
    }
    f
}

/// Writes the 256-wide embedding `[cos(t·f), sin(t·f)]` (cos first, as both codes order it).
pub fn timestep_embedding(t: f32, freqs: &[f32; FREQ_DIM / 2], out: &mut [f32]) {
    let half = FREQ_DIM / 2;
    for k in 0..half {
        let a = t * freqs[k];
        out[k] = a.cos();
        out[half + k] = a.sin();
    }
}
