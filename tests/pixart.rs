//! PixArt-α on the CPU backend against diffusers 0.42.1 (fixtures by
//! `tools/make_pixart_fixtures.py`): the transformer forward (f32, f16, bf16 weights, a
//! partial caption mask), DPM-Solver++ 2M and DDIM trajectories with and without guidance,
//! the caching policies' basic properties, errors, and the `forward` / `sample` commands.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{assert_close, fixture, rel_l2, TempDir};
use icdit::forward::StepKind;
use icdit::pixart::{
    Embeddings, PixArtCache, PixArtCpu, PixArtCpuOptions, PixArtEngine, PixArtFactors, PixArtModel, PixArtOptions,
    PixArtRequest, PixArtSampler, PixArtSchedule,
};
use icdit::policy::FullSteps;
use icdit::tensorfile::{write_safetensors, TensorFile};

fn tiny() -> PathBuf {
    fixture("pixart/tiny")
}

fn load(dir: &Path) -> Arc<PixArtModel> {
    Arc::new(PixArtModel::load(dir).unwrap_or_else(|e| panic!("{e}")))
}

struct ForwardIn {
    x: Vec<f32>,
    t: Vec<f32>,
    text: Vec<f32>,
    mask: Vec<i64>,
    len: usize,
}

fn forward_in() -> ForwardIn {
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

fn reference(name: &str) -> Vec<f32> {
    TensorFile::open(&fixture("pixart/forward_out.safetensors")).unwrap().read_f32(name).unwrap().1
}

fn run_forward(model: Arc<PixArtModel>, threads: usize) -> Vec<f32> {
    let inp = forward_in();
    let rows = inp.t.len();
    let mut cpu = PixArtCpu::new(
        Arc::clone(&model),
        &PixArtCpuOptions { max_rows: rows, max_text_len: inp.len, threads, ..Default::default() },
    )
    .unwrap();
    let mut out = vec![0.0; rows * model.config.out_elems()];
    cpu.forward(&inp.x, &inp.t, &inp.text, &inp.mask, inp.len, &mut out).unwrap();
    out
}

/// f32 weights: the forward matches diffusers within 1e-5 relative L2 (measured ~3e-7),
/// on one thread and on two.
#[test]
fn forward_matches_diffusers() {
    let model = load(&tiny());
    let want = reference("out");
    for threads in [1, 2] {
        assert_close(&format!("forward, f32 weights, {threads} threads"), &run_forward(Arc::clone(&model), threads), &want, 1e-5);
    }
}

/// f16 and bf16 weights are converted to f32 at load: the output matches diffusers run with
/// the same rounded weights in f32 within 1e-5.
#[test]
fn forward_f16_bf16_weights() {
    for (dir, name) in [("pixart/tiny_f16", "out_f16"), ("pixart/tiny_bf16", "out_bf16")] {
        let model = load(&fixture(dir));
        assert_eq!(model.dtypes.keys().copied().collect::<Vec<_>>(), vec![if name == "out_f16" { "f16" } else { "bf16" }]);
        assert_close(&format!("forward, {name}"), &run_forward(model, 2), &reference(name), 1e-5);
    }
}
