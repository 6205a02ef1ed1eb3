//! Seeded random DiT weights of any config, generated in memory or written as an
//! official-layout safetensors file: benchmarks and tests of DiT-XL/2 shapes need no
//! download. Values follow the fixture recipe (tools/make_fixtures.py): weights uniform
//! with std 1/√fan_in (adaLN 0.5/√fan_in), biases std 0.1, label rows std 1, and the
//! official sin-cos `pos_embed`, so activations stay O(1) through every block.

use std::collections::HashMap;
use std::path::Path;

use super::*;
use crate::config::FREQ_DIM;
use crate::tensorfile::FloatType;

/// How a tensor is drawn.
#[derive(Clone, Copy)]
enum Init {
    Weight { fan_in: usize, gain: f32 },
    Std(f32),
    PosEmbed,
}

/// Every official tensor name with its shape and init, in state-dict order.
fn official_spec(cfg: &DitConfig) -> Vec<(String, Vec<usize>, Init)> {
    let (c, m, n) = (cfg.hidden_size, cfg.mlp_hidden(), cfg.tokens());
    let p = cfg.patch_size;
    let fin = p * p * cfg.out_channels();
    let w = |fan_in| Init::Weight { fan_in, gain: 1.0 };
    let bias = Init::Std(0.1);
    let mut s: Vec<(String, Vec<usize>, Init)> = vec![
        ("pos_embed".into(), vec![1, n, c], Init::PosEmbed),
        ("x_embedder.proj.weight".into(), vec![c, cfg.in_channels, p, p], w(cfg.patch_dim())),
        ("x_embedder.proj.bias".into(), vec![c], bias),
        ("t_embedder.mlp.0.weight".into(), vec![c, FREQ_DIM], w(FREQ_DIM)),
        ("t_embedder.mlp.0.bias".into(), vec![c], bias),
        ("t_embedder.mlp.2.weight".into(), vec![c, c], w(c)),
        ("t_embedder.mlp.2.bias".into(), vec![c], bias),
        ("y_embedder.embedding_table.weight".into(), vec![cfg.label_rows(), c], Init::Std(1.0)),
    ];
    for i in 0..cfg.depth {
        let b = |x: &str| format!("blocks.{i}.{x}");
        s.extend([
            (b("attn.qkv.weight"), vec![3 * c, c], w(c)),
            (b("attn.qkv.bias"), vec![3 * c], bias),
            (b("attn.proj.weight"), vec![c, c], w(c)),
            (b("attn.proj.bias"), vec![c], bias),
            (b("mlp.fc1.weight"), vec![m, c], w(c)),
            (b("mlp.fc1.bias"), vec![m], bias),
            (b("mlp.fc2.weight"), vec![c, m], w(m)),
            (b("mlp.fc2.bias"), vec![c], bias),
            (b("adaLN_modulation.1.weight"), vec![6 * c, c], Init::Weight { fan_in: c, gain: 0.5 }),
            (b("adaLN_modulation.1.bias"), vec![6 * c], bias),
        ]);
    }
    s.extend([
        ("final_layer.linear.weight".into(), vec![fin, c], w(c)),
        ("final_layer.linear.bias".into(), vec![fin], bias),
        ("final_layer.adaLN_modulation.1.weight".into(), vec![2 * c, c], Init::Weight { fan_in: c, gain: 0.5 }),
        ("final_layer.adaLN_modulation.1.bias".into(), vec![2 * c], bias),
    ]);
    s
}

/// Fills `out` for tensor number `index` of the spec: uniform values of the given std from
/// a SplitMix64 stream keyed by (seed, index), so each tensor is independent of the others.
fn fill(init: Init, cfg: &DitConfig, seed: u64, index: usize, out: &mut [f32]) {
    let std = match init {
        Init::PosEmbed => return crate::embed::pos_embed_2d(cfg.hidden_size, cfg.grid(), out),
        Init::Weight { fan_in, gain } => gain / (fan_in as f32).sqrt(),
        Init::Std(s) => s,
    };
    fill_uniform(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15), 0.0, std, out);
}

/// Uniform values of the given mean and std from a SplitMix64 stream started at `key`.
pub(crate) fn fill_uniform(key: u64, mean: f32, std: f32, out: &mut [f32]) {
    let half_width = std * 3f32.sqrt();
    let mut state = key;
    for v in out {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let u = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        *v = mean + (2.0 * u - 1.0) * half_width;
    }
}

impl DitModel {
    /// A model of `cfg` with seeded random weights, held in memory (no file).
    pub fn random(cfg: &DitConfig, seed: u64) -> Result<DitModel> {
        cfg.validate("random model config")?;
        let cfg = *cfg;
        let mut b = StoreBuilder::new(Vec::new());
        let mut refs = HashMap::new();
        for (index, (name, shape, init)) in official_spec(&cfg).into_iter().enumerate() {
            let len = shape.iter().product();
            let r = b.generated(len, move |out| fill(init, &cfg, seed, index, out));
            refs.insert(name, r);
        }
        let get = |n: &str| refs[n];
        let blocks = (0..cfg.depth)
            .map(|i| {
                let g = |x: &str| get(&format!("blocks.{i}.{x}"));
                BlockTensors {
                    qkv_w: g("attn.qkv.weight"),
                    qkv_b: g("attn.qkv.bias"),
                    proj_w: g("attn.proj.weight"),
                    proj_b: g("attn.proj.bias"),
                    fc1_w: g("mlp.fc1.weight"),
                    fc1_b: g("mlp.fc1.bias"),
                    fc2_w: g("mlp.fc2.weight"),
                    fc2_b: g("mlp.fc2.bias"),
                    ada_w: g("adaLN_modulation.1.weight"),
                    ada_b: g("adaLN_modulation.1.bias"),
                }
            })
            .collect();
        let tensors = DitTensors {
            pos_embed: get("pos_embed"),
            patch_w: get("x_embedder.proj.weight"),
            patch_b: get("x_embedder.proj.bias"),
            t_mlp0_w: get("t_embedder.mlp.0.weight"),
            t_mlp0_b: get("t_embedder.mlp.0.bias"),
            t_mlp2_w: get("t_embedder.mlp.2.weight"),
            t_mlp2_b: get("t_embedder.mlp.2.bias"),
            label_table: get("y_embedder.embedding_table.weight"),
            blocks,
            final_ada_w: get("final_layer.adaLN_modulation.1.weight"),
            final_ada_b: get("final_layer.adaLN_modulation.1.bias"),
            final_w: get("final_layer.linear.weight"),
            final_b: get("final_layer.linear.bias"),
        };
        let (store, _) = b.finish(|_| false)?;
        let mut dtypes = HashMap::new();
        dtypes.insert("f32", official_spec(&cfg).len());
        Ok(DitModel {
            config: cfg,
            layout: Layout::Official,
            numerics: Numerics::Official,
            mlp_norm_eps: 1e-6,
            space: SampleSpace::Latent,
            class_names: None,
            source: format!("random(seed {seed})").into(),
            dtypes,
            tensors,
            store,
        })
    }
}

/// Writes seeded random weights of `cfg` as an official-layout safetensors file with the
/// `dit_config` metadata, stored as `dtype` (f32, f16 or bf16). Tensors are produced one
/// at a time, so memory stays at one tensor plus the output.
pub fn write_random_official(path: &Path, cfg: &DitConfig, seed: u64, dtype: FloatType) -> Result<()> {
    use safetensors::{tensor::TensorView, Dtype};
    cfg.validate("random model config")?;
    let spec = official_spec(cfg);
    let mut data: Vec<Vec<u8>> = Vec::with_capacity(spec.len());
    for (index, (_, shape, init)) in spec.iter().enumerate() {
        let mut v = vec![0f32; shape.iter().product()];
        fill(*init, cfg, seed, index, &mut v);
        data.push(match dtype {
            FloatType::F32 | FloatType::F64 => bytemuck::cast_slice(&v).to_vec(),
            FloatType::F16 => v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
            FloatType::BF16 => v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        });
    }
    let dt = match dtype {
        FloatType::F32 | FloatType::F64 => Dtype::F32,
        FloatType::F16 => Dtype::F16,
        FloatType::BF16 => Dtype::BF16,
    };
    let views: Vec<(String, TensorView)> = spec
        .iter()
        .zip(&data)
        .map(|((name, shape, _), bytes)| {
            let view = TensorView::new(dt, shape.clone(), bytes).expect("sizes match by construction");
            (name.clone(), view)
        })
        .collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(meta::DIT_CONFIG.to_string(), serde_json::to_string(cfg).expect("config serialises"));
    let bytes =
        safetensors::serialize(views, Some(meta)).map_err(|e| Error::invalid("tensors to write", e.to_string()))?;
    crate::fsio::atomic_write(path, &bytes)
}
