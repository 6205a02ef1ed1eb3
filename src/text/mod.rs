//! PixArt-α's text side on the CPU: prompts → T5 tokens → T5 v1.1 encoder embeddings, as
//! diffusers' `PixArtAlphaPipeline.encode_prompt` computes them (the pipeline's `lower().strip()`,
//! `</s>`, padding to `max_sequence_length`, then `T5EncoderModel` in f32).
//!
//! ```no_run
//! # fn main() -> icdit::Result<()> {
//! use icdit::text::{TextEncoder, TextOptions};
//! let enc = TextEncoder::open(std::path::Path::new("PixArt-XL-2-512x512"), &TextOptions::default())?;
//! let e = enc.encode(&["", "a red fox in the snow"], 120)?; // [negative, positive]
//! assert_eq!((e.batch, e.len, e.dim), (2, 120, 4096));
//! // e.input_ids, e.mask: i64 [B, L]; e.embeds: f32 [B, L, D] — what the transformer reads.
//! e.save(std::path::Path::new("embeds.safetensors"))?;
//! # Ok(()) }
//! ```
//!
//! - [`tokenizer`]: `tokenizer/tokenizer.json` through the `tokenizers` crate (or, in a
//!   folder with only `spiece.model`, the same tokenizer built by [`spiece`]), plus the
//!   pipeline's preprocessing, truncation, padding and mask.
//! - [`weights`]: `text_encoder/config.json` and its (possibly sharded) f32/f16/bf16
//!   safetensors, memory-mapped and validated at open.
//! - [`t5`]: the encoder, on the CPU backend's GEMM and thread pool.
//!
//! Memory: the weights stay in the mapped files; an f16/bf16 matrix is converted to f32 just
//! before its product into one buffer the size of the largest matrix (T5-XXL's `wi_0`,
//! 10240 × 4096: 168 MB), so encoding the 4.7 B-parameter XXL encoder (9.5 GB of bf16) holds
//! that buffer, a few MB of activations, and whatever pages of the files the OS keeps cached.
//! Nothing here is opened unless a prompt has to be encoded: a caller that has embeddings
//! ([`Embeddings::load`]) never touches the encoder. See docs/text-encoder.md for the cost.

pub mod spiece;
pub mod t5;
pub mod tokenizer;
pub mod weights;

use std::path::Path;

use crate::error::{Error, Result};
use crate::tensorfile::{write_safetensors, TensorFile};
pub use t5::{relative_bucket, T5Encoder};
pub use tokenizer::T5Tokenizer;
pub use weights::{T5Config, T5Weights};

/// PixArt-α's `max_sequence_length`.
pub const DEFAULT_MAX_LEN: usize = 120;

/// The longest sequence [`TextEncoder::encode`] accepts: T5's pre-training length. The
/// position bias and scores grow with its square.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// How to run the encoder.
#[derive(Clone, Debug, Default)]
pub struct TextOptions {
    /// Worker threads including the caller; 0 means all available cores.
    pub threads: usize,
    /// The instruction-set path; `None`: `ICDIT_CPU_ISA`, or the best this CPU runs.
    pub isa: Option<crate::isa::Isa>,
}

/// Tokens and embeddings of a batch of prompts, in the tensor names of `icdit encode`'s
/// file (`input_ids`, `attention_mask`, `prompt_embeds`).
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    pub batch: usize,
    /// Sequence length L (every prompt padded or truncated to it).
    pub len: usize,
    /// Embedding width D (the encoder's d_model).
    pub dim: usize,
    /// (B, L) token ids.
    pub input_ids: Vec<i64>,
    /// (B, L): 1 on the prompt's pieces and `</s>`, 0 on padding.
    pub mask: Vec<i64>,
    /// (B, L, D) f32: the encoder's last hidden state, padded positions included.
    pub embeds: Vec<f32>,
}

impl Embeddings {
    /// Writes the three tensors to `path` atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let (bl, bld) = ([self.batch, self.len], [self.batch, self.len, self.dim]);
        write_safetensors(
            path,
            &[("prompt_embeds", &bld, &self.embeds)],
            &[("input_ids", &bl, &self.input_ids), ("attention_mask", &bl, &self.mask)],
            None,
        )
    }

    /// Reads a file [`Embeddings::save`] (or `icdit encode`) wrote: `prompt_embeds` f32
    /// (B, L, D) and `attention_mask` (B, L) are required, `input_ids` (B, L) optional
    /// (zeros when absent); shapes must agree and the embeddings be finite.
    pub fn load(path: &Path) -> Result<Embeddings> {
        let f = TensorFile::open(path)?;
        let (shape, embeds) = f.read_f32("prompt_embeds")?;
        let [batch, len, dim] = shape[..] else {
            return Err(shape_error(path, "prompt_embeds", vec![0, 0, 0], shape));
        };
        let (mshape, mask) = f.read_i64("attention_mask")?;
        if mshape != [batch, len] {
            return Err(shape_error(path, "attention_mask", vec![batch, len], mshape));
        }
        let input_ids = if f.get("input_ids").is_some() {
            let (ishape, ids) = f.read_i64("input_ids")?;
            if ishape != [batch, len] {
                return Err(shape_error(path, "input_ids", vec![batch, len], ishape));
            }
            ids
        } else {
            vec![0; batch * len]
        };
        if let Some((index, &value)) = embeds.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFiniteInput { path: path.into(), tensor: "prompt_embeds".into(), index, value });
        }
        if let Some(v) = mask.iter().find(|&&v| v != 0 && v != 1) {
            return Err(Error::invalid("attention mask", format!("{}: holds {v}; expected 0 or 1", path.display())));
        }
        Ok(Embeddings { batch, len, dim, input_ids, mask, embeds })
    }
}

fn shape_error(path: &Path, tensor: &str, expected: Vec<usize>, found: Vec<usize>) -> Error {
    Error::Shape { path: path.into(), tensor: tensor.into(), expected, found }
}

/// A pipeline folder's tokenizer and T5 encoder, ready to encode prompts.
#[derive(Debug)]
pub struct TextEncoder {
    pub tokenizer: T5Tokenizer,
    pub encoder: T5Encoder,
}

impl TextEncoder {
    /// Opens `pipeline/tokenizer/tokenizer.json` and `pipeline/text_encoder/` (config.json
    /// and safetensors, mapped and validated; nothing converted yet).
    pub fn open(pipeline: &Path, opts: &TextOptions) -> Result<TextEncoder> {
        let tokenizer = T5Tokenizer::open(&pipeline.join("tokenizer"))?;
        let dir = pipeline.join("text_encoder");
        let cfg = T5Config::load(&dir.join("config.json"))?;
        if tokenizer.vocab_size() > cfg.vocab_size {
            return Err(Error::Config {
                origin: dir.join("config.json").display().to_string(),
                reason: format!(
                    "vocab_size {} is smaller than the tokenizer's {} ids ({})",
                    cfg.vocab_size,
                    tokenizer.vocab_size(),
                    tokenizer.path().display()
                ),
            });
        }
        let weights = T5Weights::open(&dir, &cfg)?;
        let encoder = T5Encoder::new(cfg, weights, opts.threads, opts.isa)?;
        Ok(TextEncoder { tokenizer, encoder })
    }

    /// Tokens only: (B, L) ids and mask of `prompts` at `max_len`.
    pub fn tokenize(&self, prompts: &[&str], max_len: usize) -> Result<(Vec<i64>, Vec<i64>)> {
        check_request(prompts, max_len)?;
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for p in prompts {
            let (i, m) = self.tokenizer.tokenize(p, max_len)?;
            ids.extend(i);
            mask.extend(m);
        }
        Ok((ids, mask))
    }

    /// Tokenises and encodes `prompts` (the negative prompt too, if guidance needs one),
    /// each padded or truncated to `max_len` tokens.
    pub fn encode(&self, prompts: &[&str], max_len: usize) -> Result<Embeddings> {
        let (input_ids, mask) = self.tokenize(prompts, max_len)?;
        let embeds = self.encoder.encode(&input_ids, &mask, prompts.len(), max_len)?;
        let dim = self.encoder.config().d_model;
        Ok(Embeddings { batch: prompts.len(), len: max_len, dim, input_ids, mask, embeds })
    }
}

fn check_request(prompts: &[&str], max_len: usize) -> Result<()> {
    if prompts.is_empty() {
        return Err(Error::invalid("prompts", "none given"));
    }
    if max_len == 0 || max_len > MAX_SEQUENCE_LENGTH {
        return Err(Error::invalid(
            "max sequence length",
            format!("{max_len}; expected 1 to {MAX_SEQUENCE_LENGTH} tokens (PixArt-α uses {DEFAULT_MAX_LEN})"),
        ));
    }
    Ok(())
}
