//! Helpers of the PixArt-α tests (tests/pixart*.rs, tests/gpu_pixart.rs) on the tiny pipeline
//! of tests/fixtures/pixart (by tools/make_pixart_fixtures.py: 2 blocks, C 32, 16 tokens, a
//! 6-token caption): its fixture files, the CPU forward on them, engines and guided requests,
//! exact icc factors, and `icdit sample` command lines.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use icdit::pixart::{
    Embeddings, PixArtCache, PixArtCpu, PixArtCpuOptions, PixArtEngine, PixArtModel, PixArtOptions, PixArtRequest,
    PixArtRunner, PixArtSampler,
};
use icdit::policy::FullSteps;
use icdit::tensorfile::{write_safetensors, TensorFile};

use super::{fixture, icdit, p};

/// The tiny pipeline folder.
pub fn tiny() -> PathBuf {
    fixture("pixart/tiny")
}

pub fn load(dir: &Path) -> Arc<PixArtModel> {
    Arc::new(PixArtModel::load(dir).unwrap_or_else(|e| panic!("{e}")))
}

/// The inputs of the forward fixture (pixart/forward_in.safetensors): two rows, image 0's
/// caption mask partial.
pub struct ForwardIn {
    pub x: Vec<f32>,
    pub t: Vec<f32>,
    pub text: Vec<f32>,
    pub mask: Vec<i64>,
    /// Caption tokens per row.
    pub len: usize,
}

pub fn forward_in() -> ForwardIn {
    let f = TensorFile::open(&fixture("pixart/forward_in.safetensors")).unwrap();
    let (shape, text) = f.read_f32("encoder_hidden_states").unwrap();
    ForwardIn {
        x: f.read_f32("x").unwrap().1,
        t: f.read_i64("t").unwrap().1.iter().map(|&t| t as f32).collect(),
        text,
        mask: f.read_i64("encoder_attention_mask").unwrap().1,
        len: shape[1],
    }
}

/// The f32 CPU backend's forward pass of `model` on [`forward_in`].
pub fn cpu_forward(model: &Arc<PixArtModel>, threads: usize) -> Vec<f32> {
    let inp = forward_in();
    let rows = inp.t.len();
    let mut cpu = PixArtCpu::new(
        Arc::clone(model),
        &PixArtCpuOptions { max_rows: rows, max_text_len: inp.len, threads, ..Default::default() },
    )
    .unwrap();
    let mut out = vec![0.0; rows * model.config.out_elems()];
    cpu.forward(&inp.x, &inp.t, &inp.text, &inp.mask, inp.len, None, &mut out).unwrap();
    out
}

/// `pixart/<name>.safetensors` (`prompt_embeds`, `negative_embeds`).
pub fn embeddings(name: &str) -> Embeddings {
    Embeddings::load(&fixture(&format!("pixart/{name}.safetensors"))).unwrap()
}

/// The fixture's initial latents for its two prompts.
pub fn noise() -> Vec<f32> {
    TensorFile::open(&fixture("pixart/noise.safetensors")).unwrap().read_f32("z").unwrap().1
}

/// Engine options for the fixture's two prompts (6 caption tokens, 2 threads).
pub fn options(sampler: PixArtSampler, steps: usize, cfg: f32, cache: PixArtCache, period: usize) -> PixArtOptions {
    PixArtOptions {
        max_batch: 2,
        max_text_len: 6,
        sampler,
        steps,
        cfg_scale: cfg,
        threads: 2,
        cache,
        full_steps: FullSteps::Period(period),
        ..Default::default()
    }
}

/// Samples the fixture's two prompts (guided: the fixture's negative prompt and noise) and
/// returns the final latents.
pub fn sample<M: PixArtRunner>(e: &mut PixArtEngine<M>) -> Vec<f32> {
    let (pos, neg, z) = (embeddings("prompt_embeds"), embeddings("negative_embeds"), noise());
    let req = PixArtRequest { prompt: &pos, negative: Some(&neg), noise: Some(&z), seed: 0, first_index: 0 };
    let mut out = vec![0.0; z.len()];
    e.sample(&req, &mut out, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    out
}

/// icc factors of the tiny model that are exact, written to `dir/exact.safetensors`:
/// up·down = W for every cached linear (rank min(out, in) = 32, which the GPU's fused low-rank
/// kernel takes), so a calibrated linear is y_s + W·(x − x_s) = W·x + b.
pub fn exact_factors(dir: &Path) -> PathBuf {
    let f = TensorFile::open(&tiny().join("transformer/diffusion_pytorch_model.safetensors")).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for i in 0..2 {
        for layer in icdit::pixart::Layer::cached(i) {
            let name = layer.name();
            let (shape, w) = f.read_f32(&format!("{name}.weight")).unwrap();
            let (out, inp) = (shape[0], shape[1]);
            let eye = |n: usize| (0..n * n).map(|j| if j / n == j % n { 1.0 } else { 0.0 }).collect::<Vec<f32>>();
            let (up, down) = if out >= inp {
                ((vec![out, inp], w), (vec![inp, inp], eye(inp)))
            } else {
                ((vec![out, out], eye(out)), (vec![out, inp], w))
            };
            tensors.push((format!("{name}.up"), up.0, up.1));
            tensors.push((format!("{name}.down"), down.0, down.1));
        }
    }
    let path = dir.join("exact.safetensors");
    let views: Vec<(&str, &[usize], &[f32])> =
        tensors.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())).collect();
    write_safetensors(&path, &views, &[], None).unwrap();
    path
}

/// Runs `icdit sample --weights <tiny> --prompt-embeds … --negative-embeds … --steps <steps>`
/// (the fixture's two prompts, guided) followed by `rest`: (success, stderr).
pub fn sample_tiny(steps: &str, rest: &[&str]) -> (bool, String) {
    let (weights, pe, ne) =
        (tiny(), fixture("pixart/prompt_embeds.safetensors"), fixture("pixart/negative_embeds.safetensors"));
    let base =
        ["sample", "--weights", p(&weights), "--prompt-embeds", p(&pe), "--negative-embeds", p(&ne), "--steps", steps];
    icdit(&[&base[..], rest].concat())
}
