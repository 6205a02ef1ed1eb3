//! Request files the command line reads besides weights: starting noise for `sample`,
//! latents for `decode`, and model inputs for `forward`. Each reader checks every tensor's
//! presence, dtype, shape and finiteness against what the model expects, and names the
//! file, the tensor and the expected shape when something does not fit.

use std::path::Path;

use crate::config::DitConfig;
use crate::error::{Error, Result};
use crate::tensorfile::TensorFile;

/// Starting noise read by [`read_noise`].
#[derive(Clone, Debug)]
pub struct Noise {
    /// Initial latents z, (B, C, I, I).
    pub z: Vec<f32>,
    /// Per-step noise, (steps, B, C, I, I), when the file has `step_noise`.
    pub step_noise: Option<Vec<f32>>,
    /// Steps `step_noise` covers (0 without it).
    pub steps: usize,
}

/// Latents read by [`read_latents`].
#[derive(Clone, Debug)]
pub struct Latents {
    /// (B, C, side, side).
    pub latents: Vec<f32>,
    pub count: usize,
    pub side: usize,
    /// One label per latent; −1 when the file has none.
    pub labels: Vec<i64>,
    /// The seed `sample --out-latents` recorded, if any.
    pub seed: Option<u64>,
}

/// Inputs of one model evaluation read by [`read_forward_input`].
#[derive(Clone, Debug)]
pub struct ForwardInput {
    pub x: Vec<f32>,
    pub t: Vec<i64>,
    pub y: Vec<i64>,
    pub batch: usize,
}

/// The first non-finite element of a tensor read from `path`, as an error naming both.
fn check_finite(path: &Path, tensor: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::NonFiniteInput {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            index: i,
            value: values[i],
        }),
    }
}

/// `z` f32 [images, C, I, I] and optionally `step_noise` f32 [steps, images, C, I, I] for a
/// request of `images` images on a model of config `cfg`.
pub fn read_noise(path: &Path, images: usize, cfg: &DitConfig) -> Result<Noise> {
    let f = TensorFile::open(path)?;
    let want = [images, cfg.in_channels, cfg.input_size, cfg.input_size];
    let entry = f.require("z")?;
    if entry.shape != want {
        return Err(Error::Shape {
            path: path.to_path_buf(),
            tensor: "z".into(),
            expected: want.to_vec(),
            found: entry.shape.clone(),
        });
    }
    let (_, z) = f.read_f32("z")?;
    check_finite(path, "z", &z)?;
    let (step_noise, steps) = match f.get("step_noise") {
        None => (None, 0),
        Some(e) => {
            if e.shape.len() != 5 || e.shape[1..] != want || e.shape[0] == 0 {
                return Err(Error::Shape {
                    path: path.to_path_buf(),
                    tensor: "step_noise".into(),
                    expected: [&[e.shape.first().copied().unwrap_or(1).max(1)][..], &want[..]].concat(),
                    found: e.shape.clone(),
                });
            }
            let steps = e.shape[0];
            let (_, s) = f.read_f32("step_noise")?;
            check_finite(path, "step_noise", &s)?;
            (Some(s), steps)
        }
    };
    Ok(Noise { z, step_noise, steps })
}

/// `latents` f32 [B, `channels`, h, h] (B ≥ 1) and optionally `labels` i64 [B] and the
/// `icdit_seed` metadata, as `sample --out-latents` writes them.
pub fn read_latents(path: &Path, channels: usize) -> Result<Latents> {
    let f = TensorFile::open(path)?;
    let shape = f.require("latents")?.shape.clone();
    if shape.len() != 4 || shape[0] == 0 || shape[1] != channels || shape[2] != shape[3] || shape[2] == 0 {
        return Err(Error::Shape {
            path: path.to_path_buf(),
            tensor: "latents".into(),
            expected: vec![
                shape.first().copied().unwrap_or(1).max(1),
                channels,
                shape.get(2).copied().unwrap_or(32).max(1),
                shape.get(2).copied().unwrap_or(32).max(1),
            ],
            found: shape,
        });
    }
    let (count, side) = (shape[0], shape[2]);
    let (_, latents) = f.read_f32("latents")?;
    check_finite(path, "latents", &latents)?;
    let labels = match f.get("labels") {
        None => vec![-1; count],
        Some(e) => {
            if e.shape != [count] {
                return Err(Error::Shape {
                    path: path.to_path_buf(),
                    tensor: "labels".into(),
                    expected: vec![count],
                    found: e.shape.clone(),
                });
            }
            f.read_i64("labels")?.1
        }
    };
    let seed = match f.metadata().get("icdit_seed") {
        None => None,
        Some(s) => Some(s.parse().map_err(|_| Error::Config {
            origin: format!("{} (metadata `icdit_seed`)", path.display()),
            reason: format!("`{s}` is not a seed (an unsigned integer)"),
        })?),
    };
    Ok(Latents { latents, count, side, labels, seed })
}

/// `x` f32 [B, C, I, I], `t` i64 [B] (original timesteps 0..=999) and `y` i64 [B] (labels,
/// the null class allowed) for one forward pass of a model of config `cfg`.
pub fn read_forward_input(path: &Path, cfg: &DitConfig) -> Result<ForwardInput> {
    let f = TensorFile::open(path)?;
    let b = f.require("t")?.shape.first().copied().unwrap_or(0);
    let want_x = [b, cfg.in_channels, cfg.input_size, cfg.input_size];
    for (name, expected) in [("x", &want_x[..]), ("t", &[b][..]), ("y", &[b][..])] {
        let found = &f.require(name)?.shape;
        if found.as_slice() != expected || b == 0 {
            return Err(Error::Shape {
                path: path.to_path_buf(),
                tensor: name.into(),
                expected: expected.iter().map(|&d| d.max(1)).collect(),
                found: found.clone(),
            });
        }
    }
    let (_, x) = f.read_f32("x")?;
    check_finite(path, "x", &x)?;
    let (_, t) = f.read_i64("t")?;
    let (_, y) = f.read_i64("y")?;
    if let Some(i) = t.iter().position(|t| !(0..1000).contains(t)) {
        return Err(Error::Config {
            origin: format!("{} (tensor `t`)", path.display()),
            reason: format!("t[{i}] = {} is not an original timestep 0..=999", t[i]),
        });
    }
    if let Some(i) = y.iter().position(|&y| y < 0 || y as usize >= cfg.label_rows()) {
        return Err(Error::Config {
            origin: format!("{} (tensor `y`)", path.display()),
            reason: format!("y[{i}] = {} is not a label 0..={} of this model", y[i], cfg.label_rows() - 1),
        });
    }
    Ok(ForwardInput { x, t, y, batch: b })
}
