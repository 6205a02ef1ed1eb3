//! The T5 v1.1 encoder's config and weights in a diffusers pipeline folder's `text_encoder/`:
//! `config.json` plus `model.safetensors`, or the shards a `model.safetensors.index.json`
//! lists (the published XXL encoder is sharded), or diffusers' fp16 variants of either
//! (`model.fp16.safetensors`, `model.safetensors.index.fp16.json`). Files are memory-mapped and every tensor's
//! name, shape and dtype is checked at open; values are read (f32 in place, f16/bf16
//! converted) one matrix at a time while encoding, so the model is never held as f32 whole.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::tensorfile::{read_json_text, FloatType, TensorEntry, TensorFile};

/// The T5 encoder's shapes and settings (transformers' `T5Config` field names).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct T5Config {
    /// Rows of the token embedding (32128 for T5 v1.1).
    pub vocab_size: usize,
    /// Width of the residual stream D (4096 for XXL).
    pub d_model: usize,
    /// Width of one attention head (64).
    pub d_kv: usize,
    /// Width of the gated feed-forward (10240).
    pub d_ff: usize,
    /// Encoder blocks (24).
    pub num_layers: usize,
    /// Attention heads (64).
    pub num_heads: usize,
    /// Relative-position buckets, both directions together (32).
    pub num_buckets: usize,
    /// Relative distance from which all positions share the last bucket (128).
    pub max_distance: usize,
    /// RMS-norm epsilon (1e-6).
    pub eps: f32,
}

impl T5Config {
    /// T5 v1.1 XXL's encoder, the one PixArt-α uses (google/t5-v1_1-xxl).
    pub const XXL: T5Config = T5Config {
        vocab_size: 32128,
        d_model: 4096,
        d_kv: 64,
        d_ff: 10240,
        num_layers: 24,
        num_heads: 64,
        num_buckets: 32,
        max_distance: 128,
        eps: 1e-6,
    };

    /// Width of the attention projections, heads × d_kv.
    pub fn inner(&self) -> usize {
        self.num_heads * self.d_kv
    }

    /// Parameters of the encoder (embedding, blocks, position bias, final norm).
    pub fn parameters(&self) -> u64 {
        let (d, i, f) = (self.d_model as u64, self.inner() as u64, self.d_ff as u64);
        let block = 4 * d * i + 3 * d * f + 2 * d;
        self.vocab_size as u64 * d + self.num_layers as u64 * block + (self.num_buckets * self.num_heads) as u64 + d
    }

    /// Multiply-adds of one encode of `rows` tokens (batch × sequence length), `len` per
    /// sequence: the linear layers plus attention's two products.
    pub fn macs(&self, rows: usize, len: usize) -> u64 {
        let (d, i, f) = (self.d_model as u64, self.inner() as u64, self.d_ff as u64);
        let per_token = 4 * d * i + 3 * d * f + 2 * len as u64 * i;
        self.num_layers as u64 * rows as u64 * per_token
    }

    /// Reads `text_encoder/config.json`, refusing anything this encoder does not compute.
    pub fn load(path: &Path) -> Result<T5Config> {
        let origin = path.display().to_string();
        let bad = |reason: String| Error::Config { origin: origin.clone(), reason };
        let text = read_json_text(path)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let size = |key: &str, default: Option<usize>| -> Result<usize> {
            match v.get(key) {
                None | Some(Value::Null) => default.ok_or_else(|| bad(format!("`{key}` is missing"))),
                Some(x) => match x.as_u64() {
                    Some(n) if n > 0 && n <= 1 << 20 => Ok(n as usize),
                    _ => Err(bad(format!("`{key}` is {x}; expected a positive integer up to 2^20"))),
                },
            }
        };
        let ff = v.get("feed_forward_proj").and_then(Value::as_str).unwrap_or("(missing)");
        if ff != "gated-gelu" {
            return Err(bad(format!(
                "feed_forward_proj is {ff:?}; icdit computes T5 v1.1's \"gated-gelu\" feed-forward only"
            )));
        }
        if v.get("is_gated_act").is_some_and(|g| g != &Value::Bool(true)) {
            return Err(bad("is_gated_act is not true, but feed_forward_proj is \"gated-gelu\"".into()));
        }
        let eps = match v.get("layer_norm_epsilon") {
            None | Some(Value::Null) => 1e-6,
            Some(x) => match x.as_f64() {
                Some(e) if e > 0.0 && e < 1.0 => e as f32,
                _ => return Err(bad(format!("`layer_norm_epsilon` is {x}; expected a number in (0, 1)"))),
            },
        };
        let cfg = T5Config {
            vocab_size: size("vocab_size", None)?,
            d_model: size("d_model", None)?,
            d_kv: size("d_kv", None)?,
            d_ff: size("d_ff", None)?,
            num_layers: size("num_layers", None)?,
            num_heads: size("num_heads", None)?,
            num_buckets: size("relative_attention_num_buckets", Some(32))?,
            max_distance: size("relative_attention_max_distance", Some(128))?,
            eps,
        };
        // Bidirectional bucketing gives half the buckets to each sign and half of those to
        // exact distances: below 4 buckets, or a max distance inside the exact range, the
        // logarithmic part is empty and its formula divides by zero.
        if cfg.num_buckets < 4 || cfg.max_distance <= cfg.num_buckets / 4 {
            return Err(bad(format!(
                "relative_attention_num_buckets {} with relative_attention_max_distance {}: need at least 4 buckets \
                 and a max distance above a quarter of them",
                cfg.num_buckets, cfg.max_distance
            )));
        }
        Ok(cfg)
    }
}

/// Where one tensor is: shard index and entry.
#[derive(Clone, Debug)]
struct Loc {
    file: usize,
    entry: TensorEntry,
    float: FloatType,
}

/// The encoder's tensors, mapped from one file or several shards and validated against the
/// config. Tensors are named as in transformers' `T5EncoderModel`.
pub struct T5Weights {
    files: Vec<TensorFile>,
    tensors: HashMap<String, Loc>,
    /// The token embedding's name (`encoder.embed_tokens.weight`, or the tied `shared.weight`).
    embedding: String,
}

impl std::fmt::Debug for T5Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Weights").field("files", &self.files.len()).field("tensors", &self.tensors.len()).finish()
    }
}

/// Names (and shapes) every T5 encoder with `cfg` must have, the embedding aside.
pub fn expected_tensors(cfg: &T5Config) -> Vec<(String, Vec<usize>)> {
    let (d, i, f) = (cfg.d_model, cfg.inner(), cfg.d_ff);
    let mut names = Vec::new();
    for b in 0..cfg.num_layers {
        let at = format!("encoder.block.{b}.layer.0.");
        for (w, shape) in [("q", [i, d]), ("k", [i, d]), ("v", [i, d]), ("o", [d, i])] {
            names.push((format!("{at}SelfAttention.{w}.weight"), shape.to_vec()));
        }
        names.push((format!("{at}layer_norm.weight"), vec![d]));
        let ff = format!("encoder.block.{b}.layer.1.");
        for (w, shape) in [("wi_0", [f, d]), ("wi_1", [f, d]), ("wo", [d, f])] {
            names.push((format!("{ff}DenseReluDense.{w}.weight"), shape.to_vec()));
        }
        names.push((format!("{ff}layer_norm.weight"), vec![d]));
    }
    names.push((POSITION_BIAS.to_string(), vec![cfg.num_buckets, cfg.num_heads]));
    names.push(("encoder.final_layer_norm.weight".to_string(), vec![d]));
    names
}

/// Block 0's relative-position bias table (buckets, heads), which every block uses.
pub const POSITION_BIAS: &str = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";

/// Tensors a T5 checkpoint may hold that the encoder does not use: a whole
/// encoder-decoder's decoder and LM head.
fn ignorable(name: &str) -> bool {
    name.starts_with("decoder.") || name.starts_with("lm_head.")
}

impl T5Weights {
    /// Maps `dir/model.safetensors`, or the shards `dir/model.safetensors.index.json` names,
    /// and checks every tensor against `cfg`: all missing names in one error, then each
    /// shape and dtype (f32, f16 or bf16).
    pub fn open(dir: &Path, cfg: &T5Config) -> Result<T5Weights> {
        // The full-precision files first, then diffusers' fp16 variant names.
        let candidates = [
            ("model.safetensors.index.json", true),
            ("model.safetensors", false),
            ("model.safetensors.index.fp16.json", true),
            ("model.fp16.safetensors", false),
        ];
        let Some((name, sharded)) = candidates.into_iter().find(|(n, _)| dir.join(n).is_file()) else {
            return Err(Error::Config {
                origin: dir.display().to_string(),
                reason: "no model.safetensors or model.safetensors.index.json (nor their .fp16 variants): \
                         the T5 encoder's weights"
                    .into(),
            });
        };
        let (files, owner) =
            if sharded { open_shards(dir, &dir.join(name))? } else { (vec![TensorFile::open(&dir.join(name))?], None) };
        let mut tensors = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.names() {
                // A shard holds the tensors the index assigns to it; other copies are ignored.
                if owner.as_ref().is_some_and(|o: &HashMap<String, usize>| o.get(name) != Some(&i)) {
                    continue;
                }
                let Some(entry) = f.get(name).cloned() else { continue };
                let float = match entry.dtype {
                    safetensors::Dtype::F32 => FloatType::F32,
                    safetensors::Dtype::F16 => FloatType::F16,
                    safetensors::Dtype::BF16 => FloatType::BF16,
                    other => {
                        return Err(Error::Dtype {
                            path: f.path().to_path_buf(),
                            tensor: name.to_string(),
                            found: format!("{other:?}"),
                            expected: "f32, f16 or bf16",
                        })
                    }
                };
                tensors.insert(name.to_string(), Loc { file: i, entry, float });
            }
        }
        let first = files[0].path().to_path_buf();
        let embedding = ["encoder.embed_tokens.weight", "shared.weight"]
            .into_iter()
            .find(|n| tensors.contains_key(*n))
            .unwrap_or("encoder.embed_tokens.weight")
            .to_string();
        let mut expected = expected_tensors(cfg);
        expected.push((embedding.clone(), vec![cfg.vocab_size, cfg.d_model]));
        let missing: Vec<String> =
            expected.iter().filter(|(n, _)| !tensors.contains_key(n)).map(|(n, _)| n.clone()).collect();
        if !missing.is_empty() {
            return Err(Error::MissingTensors { path: first, names: missing });
        }
        let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let mut unexpected: Vec<String> = tensors
            .keys()
            .filter(|n| !known.contains(n.as_str()) && !ignorable(n) && !matches!(n.as_str(), "shared.weight"))
            .cloned()
            .collect();
        if !unexpected.is_empty() {
            unexpected.sort();
            return Err(Error::UnexpectedTensors { path: first, names: unexpected });
        }
        let weights = T5Weights { files, tensors, embedding };
        for (name, shape) in &expected {
            let loc = &weights.tensors[name];
            if &loc.entry.shape != shape {
                return Err(Error::Shape {
                    path: weights.files[loc.file].path().to_path_buf(),
                    tensor: name.clone(),
                    expected: shape.clone(),
                    found: loc.entry.shape.clone(),
                });
            }
        }
        Ok(weights)
    }

    /// Bytes of the mapped files.
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.len_bytes() as u64).sum()
    }

    /// The mapped files, in shard order.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| f.path().to_path_buf()).collect()
    }

    /// The storage type of the largest tensors (the first block's q projection).
    pub fn float_type(&self) -> FloatType {
        self.tensors.get("encoder.block.0.layer.0.SelfAttention.q.weight").map_or(FloatType::F32, |l| l.float)
    }

    pub fn embedding_name(&self) -> &str {
        &self.embedding
    }

    /// The tensor in place when it is stored as aligned f32.
    pub fn view(&self, name: &str) -> Option<&[f32]> {
        let loc = self.tensors.get(name)?;
        self.files[loc.file].f32_view(&loc.entry)
    }

    /// Elements `range` of the (row-major) tensor, converted to f32 into `out`.
    pub fn read_range(&self, name: &str, range: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        let loc = self.loc(name)?;
        assert!(range.end <= loc.entry.elems() && out.len() == range.len(), "{name}: range past the tensor");
        let size = loc.float.size();
        let bytes = &self.files[loc.file].bytes(&loc.entry)[range.start * size..range.end * size];
        decode(loc.float, bytes, out);
        Ok(())
    }

    fn loc(&self, name: &str) -> Result<&Loc> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensors {
            path: self.files[0].path().to_path_buf(),
            names: vec![name.to_string()],
        })
    }

    /// Element count of a tensor.
    pub fn elems(&self, name: &str) -> Result<usize> {
        Ok(self.loc(name)?.entry.elems())
    }
}

/// Little-endian f32/f16/bf16 bytes to f32 (f16 and bf16 exactly; half's slice conversion
/// uses the CPU's conversion instructions where it has them).
fn decode(float: FloatType, bytes: &[u8], out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    match float {
        FloatType::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(src) => out.copy_from_slice(src),
            Err(_) => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        },
        FloatType::F16 => match bytemuck::try_cast_slice::<u8, half::f16>(bytes) {
            Ok(src) => src.convert_to_f32_slice(out),
            Err(_) => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        },
        FloatType::BF16 => match bytemuck::try_cast_slice::<u8, half::bf16>(bytes) {
            Ok(src) => src.convert_to_f32_slice(out),
            Err(_) => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        },
        FloatType::F64 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                *o = f64::from_le_bytes(a) as f32;
            }
        }
    }
}

/// Opens the shards an index names (each once, in sorted order) and returns which shard
/// owns each tensor.
fn open_shards(dir: &Path, index: &Path) -> Result<(Vec<TensorFile>, Option<HashMap<String, usize>>)> {
    let origin = index.display().to_string();
    let bad = |reason: String| Error::Config { origin: origin.clone(), reason };
    let v: Value = serde_json::from_str(&read_json_text(index)?).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut shard_of: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| bad(format!("`{name}` maps to {file}, not a file name")))?;
        // Shards live beside the index: refuse paths that would leave the folder.
        if file.is_empty() || file.contains('/') || file.contains('\\') || file == ".." {
            return Err(bad(format!("`{name}` maps to {file:?}, not a file name in {}", dir.display())));
        }
        shard_of.entry(file).or_default().push(name);
    }
    if shard_of.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    let mut files = Vec::new();
    let mut owner = HashMap::new();
    for (i, (file, names)) in shard_of.into_iter().enumerate() {
        let f = TensorFile::open(&dir.join(file))?;
        let absent: Vec<String> = names.iter().filter(|n| f.get(n).is_none()).map(|n| n.to_string()).collect();
        if !absent.is_empty() {
            return Err(Error::MissingTensors { path: f.path().to_path_buf(), names: absent });
        }
        owner.extend(names.into_iter().map(|n| (n.to_string(), i)));
        files.push(f);
    }
    Ok((files, Some(owner)))
}

#[cfg(test)]
mod tests {
    use super::T5Config;

    #[test]
    fn xxl_size_and_cost_from_its_shapes() {
        // google/t5-v1_1-xxl's encoder: 4.76 B parameters (9.5 GB as bf16).
        assert_eq!(T5Config::XXL.parameters(), 4_762_310_656);
        // [negative, positive] at 120 tokens: 1.117 T multiply-adds.
        assert_eq!(T5Config::XXL.macs(240, 120), 1_116_985_098_240);
    }
}
