//! A T5 tokenizer from SentencePiece's `spiece.model` alone (what the published PixArt-α
//! folders ship), built the way transformers' `T5Tokenizer` builds it: the model's pieces and
//! scores as a unigram vocabulary followed by the `extra_ids` sentinels `<extra_id_{n-1}>` …
//! `<extra_id_0>` (score 0), `<unk>` the model's unknown piece, the model's precompiled
//! normalisation table, whitespace splitting then `▁` prepended to every word, and `<pad>`,
//! `</s>`, `<unk>` and the sentinels as special tokens.
//!
//! The file is a protocol-buffers `ModelProto`; only the fields used here are read: pieces
//! (1: piece string, 2: score float, 3: type), the trainer's model type (2 → 3) and the
//! normaliser's precompiled charsmap (3 → 2).

use std::path::Path;

use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// SentencePiece's piece types (`SentencePiece.Type`).
const UNKNOWN: u64 = 2;
/// `TrainerSpec.ModelType.UNIGRAM`, the default when the field is absent.
const UNIGRAM: u64 = 1;
/// Larger is not a tokenizer model (T5's is 0.8 MB).
const MAX_BYTES: u64 = 64 << 20;

/// What `spiece.model` holds that the tokenizer needs.
struct SpModel {
    pieces: Vec<(String, f64)>,
    unk: Option<usize>,
    model_type: u64,
    charsmap: Vec<u8>,
}

/// Builds the tokenizer from `path` with `extra_ids` sentinels.
pub fn tokenizer_from_spiece(path: &Path, extra_ids: usize) -> Result<Tokenizer> {
    let origin = path.display().to_string();
    let bad = |reason: String| Error::Config { origin: origin.clone(), reason };
    let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    if len > MAX_BYTES {
        return Err(bad(format!("{len} bytes; larger than any SentencePiece model")));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let m = parse_model(&bytes).map_err(|e| bad(format!("not a SentencePiece model: {e}")))?;
    if m.model_type != UNIGRAM {
        return Err(bad(format!("model type {} is not unigram (1), which T5 uses", m.model_type)));
    }
    let unk = m.unk.ok_or_else(|| bad("has no unknown piece".into()))?;
    let mut vocab = m.pieces;
    let specials: Vec<String> = ["<pad>", "</s>", vocab[unk].0.as_str()]
        .into_iter()
        .filter(|s| vocab.iter().any(|(p, _)| p == s))
        .map(String::from)
        .collect();
    vocab.extend((0..extra_ids).rev().map(|i| (format!("<extra_id_{i}>"), 0.0)));
    let model = Unigram::from(vocab, Some(unk), false).map_err(|e| bad(format!("unusable vocabulary: {e}")))?;
    let mut tok = Tokenizer::new(model);
    if !m.charsmap.is_empty() {
        let norm = Precompiled::from(&m.charsmap).map_err(|e| bad(format!("unreadable normalisation table: {e}")))?;
        tok.with_normalizer(Some(norm)).map_err(|e| bad(e.to_string()))?;
    }
    let words = Sequence::new(vec![WhitespaceSplit.into(), Metaspace::new('▁', PrependScheme::Always, true).into()]);
    tok.with_pre_tokenizer(Some(words));
    // <pad>, </s>, the unknown piece and the sentinels match as whole special tokens.
    let special = specials.into_iter().chain((0..extra_ids).rev().map(|i| format!("<extra_id_{i}>")));
    tok.add_special_tokens(special.map(|s| AddedToken::from(s, true))).map_err(|e| bad(e.to_string()))?;
    Ok(tok)
}

/// A protocol-buffers reader over one message's bytes.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

/// One field's value: a varint, a fixed-width number, or length-delimited bytes.
enum Value<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
    Other,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, at: 0 }
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.at).ok_or("truncated varint")?;
            self.at += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or("field runs past the end")?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    /// The next (field number, value), or None at the end.
    fn field(&mut self) -> std::result::Result<Option<(u64, Value<'a>)>, String> {
        if self.at == self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Other
            }
            2 => {
                let n = self.varint()?;
                Value::Bytes(self.take(usize::try_from(n).map_err(|_| "length overflows")?)?)
            }
            5 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => return Err(format!("wire type {w} (groups or unknown)")),
        };
        Ok(Some((key >> 3, value)))
    }
}

fn parse_model(bytes: &[u8]) -> std::result::Result<SpModel, String> {
    let mut m = SpModel { pieces: Vec::new(), unk: None, model_type: UNIGRAM, charsmap: Vec::new() };
    let mut r = Reader::new(bytes);
    while let Some((field, value)) = r.field()? {
        match (field, value) {
            (1, Value::Bytes(piece)) => {
                let (mut text, mut score, mut kind) = (None, 0.0f32, 1u64);
                let mut p = Reader::new(piece);
                while let Some((f, v)) = p.field()? {
                    match (f, v) {
                        (1, Value::Bytes(s)) => {
                            text = Some(std::str::from_utf8(s).map_err(|_| "a piece is not UTF-8")?.to_string())
                        }
                        (2, Value::Fixed32(bits)) => score = f32::from_bits(bits),
                        (3, Value::Varint(t)) => kind = t,
                        _ => {}
                    }
                }
                if kind == UNKNOWN && m.unk.is_none() {
                    m.unk = Some(m.pieces.len());
                }
                m.pieces.push((text.ok_or("a piece without text")?, score as f64));
            }
            (2, Value::Bytes(trainer)) => {
                let mut t = Reader::new(trainer);
                while let Some((f, v)) = t.field()? {
                    if let (3, Value::Varint(kind)) = (f, v) {
                        m.model_type = kind;
                    }
                }
            }
            (3, Value::Bytes(normalizer)) => {
                let mut n = Reader::new(normalizer);
                while let Some((f, v)) = n.field()? {
                    if let (2, Value::Bytes(map)) = (f, v) {
                        m.charsmap = map.to_vec();
                    }
                }
            }
            _ => {}
        }
    }
    if m.pieces.is_empty() {
        return Err("no pieces".into());
    }
    Ok(m)
}
