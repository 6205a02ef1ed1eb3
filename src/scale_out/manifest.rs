//! A shard's manifest, `shard-IIIII-of-SSSSS.json` in the run folder: the settings that
//! determine the pixels, the shard's image range and its finished parts. Runs resume and
//! shards merge only when the settings are equal, so the field names and the spelling of
//! every value here must not change.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::engine::{EngineOptions, GuidedChannels};
use crate::error::Error;
use crate::image::Rounding;
use crate::policy::{CacheMode, FullSteps};
use crate::vae::VaeDecoder;
use crate::weights::DitModel;

/// Manifest format tag; merge refuses manifests of another format.
pub const FORMAT: &str = "icdit-shard-manifest/1";

/// One finished part file: images `first..first + count`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Part {
    pub file: String,
    pub first: u64,
    pub count: u64,
    pub bytes: u64,
}

/// A shard's manifest (`shard-IIIII-of-SSSSS.json` in the run folder).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Manifest {
    pub format: String,
    /// Everything that determines the pixels; shards merge only when these are equal.
    pub settings: Map<String, Value>,
    pub shard: u64,
    pub num_shards: u64,
    /// Global image range of this shard, [first, end).
    pub range: [u64; 2],
    pub png: bool,
    /// Finished parts, by first image.
    pub parts: Vec<Part>,
    pub images_done: u64,
    pub done: bool,
    /// Where the inputs were read from (informational: paths differ between machines).
    pub sources: Value,
    pub icdit_version: String,
}

impl Manifest {
    /// Reads a manifest, refusing other JSON and other manifest formats.
    pub fn read(path: &Path) -> Result<Manifest, Error> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Config {
            origin: path.display().to_string(),
            reason: format!("not an icdit shard manifest: {e}"),
        })?;
        if m.format != FORMAT {
            return Err(Error::Config {
                origin: path.display().to_string(),
                reason: format!("manifest format `{}`, expected `{FORMAT}`", m.format),
            });
        }
        Ok(m)
    }

    /// Writes the manifest through a temporary name and a rename.
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let text = serde_json::to_string_pretty(self).expect("manifest serialises") + "\n";
        crate::fsio::atomic_write(path, text.as_bytes())
    }
}

/// `shard-00001-of-00003.json`.
pub fn manifest_name(shard: u64, num_shards: u64) -> String {
    format!("shard-{shard:05}-of-{num_shards:05}.json")
}

/// Whether a file name is a shard manifest's.
pub fn is_manifest_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("shard-").and_then(|r| r.strip_suffix(".json")) else { return false };
    let Some((i, s)) = rest.split_once("-of-") else { return false };
    !i.is_empty() && !s.is_empty() && i.bytes().chain(s.bytes()).all(|b| b.is_ascii_digit())
}

/// The manifests in `dir`, sorted by name.
pub fn manifests_in(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.file_name().to_str().is_some_and(is_manifest_name) {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

/// The settings that differ between two manifests, as "key: a vs b".
pub fn differences(a: &Map<String, Value>, b: &Map<String, Value>) -> Vec<String> {
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&Value>| v.map_or("(absent)".to_string(), Value::to_string);
            format!("{k}: {} vs {}", show(a.get(k)), show(b.get(k)))
        })
        .collect()
}

/// What besides the model and engine options determines a run's pixels.
pub(super) struct PixelSettings<'a> {
    pub vae: Option<&'a VaeDecoder>,
    pub seed: u64,
    pub num_images: u64,
    pub rounding: Rounding,
    /// (H, W, C) of the written images.
    pub image_hwc: [usize; 3],
    /// Shards of different backends differ at f16 rounding level, so they are not merged.
    pub backend: crate::backend::Backend,
}

/// The manifest's `settings` (what determines image k's pixels) and `sources` (where the
/// inputs were read from).
pub(super) fn settings(
    model: &DitModel,
    opts: &EngineOptions,
    run: &PixelSettings,
) -> Result<(Map<String, Value>, Value), Error> {
    // The manifest names the policy as `--cache` does (`none`, `reuse`, `icc`).
    let cache = opts.cache.policy().name();
    let (factors, factors_src, full_steps) = match &opts.cache {
        CacheMode::None => (Value::Null, Value::Null, Value::Null),
        CacheMode::Reuse | CacheMode::Fora => (Value::Null, Value::Null, full_steps_value(&opts.full_steps)),
        // The order and warm-up change the pixels: they go with the full steps.
        CacheMode::Taylor(f) => (
            Value::Null,
            Value::Null,
            json!({"full_steps": full_steps_value(&opts.full_steps), "taylor_order": f.order, "taylor_warmup": f.warmup}),
        ),
        CacheMode::Icc(f) => (
            json!(file_fingerprint(&f.source)?),
            json!(f.source.display().to_string()),
            full_steps_value(&opts.full_steps),
        ),
    };
    let (vae_fp, vae_src) = match run.vae {
        None => (Value::Null, Value::Null),
        Some(d) => {
            let m = d.model();
            let cfg_file = Path::new(&m.config_origin);
            let mut fp = file_fingerprint(&m.source)?;
            if cfg_file.is_file() {
                fp = format!("{fp} config {}", file_fingerprint(cfg_file)?);
            }
            (json!(fp), json!(m.source.display().to_string()))
        }
    };
    let mut s = Map::new();
    s.insert("model_fingerprint".into(), json!(crate::factors::fingerprint(model)));
    s.insert("numerics".into(), serde_json::to_value(model.numerics).expect("numerics serialise"));
    s.insert("vae".into(), vae_fp);
    s.insert("sampler".into(), json!(opts.sampler.name()));
    s.insert("respacing".into(), json!(opts.respacing));
    s.insert("cfg_scale".into(), json!(opts.cfg_scale));
    let guided = match opts.guided_channels {
        GuidedChannels::OfficialThree => "official-3",
        GuidedChannels::All => "all",
    };
    s.insert("guided_channels".into(), json!(guided));
    s.insert("cache".into(), json!(cache));
    s.insert("full_steps".into(), full_steps);
    s.insert("factors".into(), factors);
    s.insert("seed".into(), json!(run.seed));
    s.insert("num_images".into(), json!(run.num_images));
    s.insert("labels".into(), json!("class_labels(seed, index)"));
    s.insert("rounding".into(), json!(format!("{:?}", run.rounding).to_lowercase()));
    s.insert("image_hwc".into(), json!(run.image_hwc));
    s.insert("backend".into(), json!(run.backend.name()));
    let weights_bytes: u64 = model.store.files().iter().map(|f| f.len_bytes() as u64).sum();
    let sources = json!({
        "weights": model.source.display().to_string(),
        "weights_bytes": weights_bytes,
        "factors": factors_src,
        "vae": vae_src,
    });
    Ok((s, sources))
}

fn full_steps_value(f: &FullSteps) -> Value {
    match f {
        FullSteps::Period(p) => json!(format!("period {p}")),
        FullSteps::List(l) => json!(l),
    }
}

/// FNV-1a over a file's size, its first MiB (a safetensors header and more) and 256
/// evenly spaced 4 KiB windows: cheap for multi-GB files and enough to tell them apart.
fn file_fingerprint(path: &Path) -> Result<String, Error> {
    let bad = |e| Error::io(path, e);
    let mut f = std::fs::File::open(path).map_err(bad)?;
    let len = f.metadata().map_err(bad)?.len();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &x in bytes {
            h ^= x as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(&len.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    let n = f.read(&mut buf).map_err(bad)?;
    eat(&buf[..n]);
    for k in 0..256u64 {
        f.seek(SeekFrom::Start(k * len / 256)).map_err(bad)?;
        let mut window = [0u8; 4096];
        let n = (&mut f).take(4096).read(&mut window).map_err(bad)?;
        eat(&window[..n]);
    }
    Ok(format!("fnv1a64:{h:016x}:{len}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_manifest_name(&manifest_name(1, 3)));
        assert!(!is_manifest_name("shard-1-of-.json") && !is_manifest_name(".shard-00001-of-00003.json.tmp-5"));
    }

    #[test]
    fn differences_name_each_key_once() {
        let a: Map<String, Value> = serde_json::from_str(r#"{"seed": 3, "cache": "none", "x": 1}"#).unwrap();
        let b: Map<String, Value> = serde_json::from_str(r#"{"seed": 4, "cache": "none", "y": 2}"#).unwrap();
        assert_eq!(differences(&a, &b), ["seed: 3 vs 4", "x: 1 vs (absent)", "y: (absent) vs 2"]);
        assert!(differences(&a, &a).is_empty());
    }
}
