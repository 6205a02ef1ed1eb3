//! PixArt-α's prompt tokenisation: the pipeline folder's T5 SentencePiece tokenizer
//! (`tokenizer/tokenizer.json`, read by the `tokenizers` crate) plus the pipeline's own steps
//! around it — `prompt.lower().strip()`, `</s>` appended, truncation to the first
//! `max_len − 1` pieces, padding with `<pad>` to `max_len`, and the mask that marks pieces
//! and `</s>` (../shared/docs/pixart-reference.md, "Text").

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The pipeline's tokenizer and the ids of the two tokens it adds.
pub struct T5Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// `</s>`, appended to every prompt (1 in T5's vocabulary).
    eos: u32,
    /// `<pad>`, filling up to the sequence length (0 in T5's vocabulary).
    pad: u32,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer").field("path", &self.path).field("eos", &self.eos).field("pad", &self.pad).finish()
    }
}

impl T5Tokenizer {
    /// Reads `dir/tokenizer.json`, or, when the folder has only SentencePiece's
    /// `spiece.model` (as the published PixArt-α folders do), builds the same tokenizer from it
    /// ([`super::spiece`]) with `tokenizer_config.json`'s `extra_ids` sentinels (100 if unset).
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let spiece = dir.join("spiece.model");
        if !path.is_file() && spiece.is_file() {
            let inner = super::spiece::tokenizer_from_spiece(&spiece, extra_ids(dir)?)?;
            return Self::wrap(inner, spiece);
        }
        if !path.is_file() {
            return Err(Error::Config {
                origin: path.display().to_string(),
                reason: "no tokenizer.json or spiece.model (the T5 tokenizer of a diffusers pipeline folder, under \
                         tokenizer/)"
                    .into(),
            });
        }
        let bad = |reason: String| Error::Config { origin: path.display().to_string(), reason };
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| bad(format!("not a tokenizer file the tokenizers crate reads: {e}")))?;
        Self::wrap(inner, path)
    }

    fn wrap(mut inner: tokenizers::Tokenizer, path: PathBuf) -> Result<Self> {
        let bad = |reason: String| Error::Config { origin: path.display().to_string(), reason };
        // The pipeline's truncation and padding are ours (below); whatever the file asks for
        // would otherwise apply to the pieces before `</s>` is added.
        inner.with_truncation(None).map_err(|e| bad(format!("cannot turn off its truncation: {e}")))?;
        inner.with_padding(None);
        let id = |token: &str| {
            inner.token_to_id(token).ok_or_else(|| bad(format!("has no `{token}` token (not a T5 tokenizer)")))
        };
        let (eos, pad) = (id("</s>")?, id("<pad>")?);
        Ok(T5Tokenizer { inner, path, eos, pad })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of ids the tokenizer can produce (its vocabulary with added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `(ids, mask)`, each `max_len` long, of one prompt as PixArt-α's pipeline tokenises it.
    pub fn tokenize(&self, prompt: &str, max_len: usize) -> Result<(Vec<i64>, Vec<i64>)> {
        if max_len == 0 {
            return Err(Error::invalid("max sequence length", "must be at least 1 (the `</s>` token)"));
        }
        let text = preprocess(prompt);
        let enc = self.inner.encode(text.as_str(), false).map_err(|e| Error::Config {
            origin: self.path.display().to_string(),
            reason: format!("cannot tokenise the prompt {prompt:?}: {e}"),
        })?;
        let pieces = enc.get_ids();
        let kept = pieces.len().min(max_len - 1);
        let mut ids = Vec::with_capacity(max_len);
        ids.extend(pieces[..kept].iter().map(|&i| i as i64));
        ids.push(self.eos as i64);
        let mut mask = vec![1i64; ids.len()];
        ids.resize(max_len, self.pad as i64);
        mask.resize(max_len, 0);
        Ok((ids, mask))
    }
}

/// `extra_ids` of `dir/tokenizer_config.json` (transformers' default 100 when the file or
/// the key is absent).
fn extra_ids(dir: &Path) -> Result<usize> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(100);
    }
    let bad = |reason: String| Error::Config { origin: path.display().to_string(), reason };
    let text = crate::tensorfile::read_json_text(&path)?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    match v.get("extra_ids") {
        None | Some(serde_json::Value::Null) => Ok(100),
        Some(n) => n
            .as_u64()
            .filter(|&n| n <= 10_000)
            .map(|n| n as usize)
            .ok_or_else(|| bad(format!("`extra_ids` is {n}; expected a count up to 10000"))),
    }
}

/// The pipeline's caption preprocessing when `bs4`/`ftfy` are not installed (what diffusers'
/// `clean_caption` falls back to): Python's `text.lower().strip()`. Rust's `to_lowercase`
/// follows the same Unicode case mapping (final sigma included); `str.strip()` also strips
/// the four separator controls U+001C–U+001F, which `trim` keeps.
pub fn preprocess(prompt: &str) -> String {
    prompt.to_lowercase().trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)).to_string()
}

#[cfg(test)]
mod tests {
    use super::preprocess;

    #[test]
    fn preprocessing_is_pythons_lower_strip() {
        assert_eq!(preprocess("  A Red FOX \n"), "a red fox");
        assert_eq!(preprocess("\u{1f}ΟΔΟΣ\u{a0}"), "οδος", "final sigma, U+001F and no-break space");
        assert_eq!(preprocess(""), "");
        assert_eq!(preprocess("ＦＵＬＬ"), "ｆｕｌｌ");
    }
}
