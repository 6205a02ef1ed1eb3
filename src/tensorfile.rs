//! Memory-mapped safetensors files: the header is validated once, then tensors are looked
//! up by name and either viewed in place (f32, aligned) or converted once to f32.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// Element types icdit accepts for floating-point weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
    BF16,
    F64,
}

impl FloatType {
    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 | FloatType::BF16 => 2,
            FloatType::F64 => 8,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            FloatType::F32 => "f32",
            FloatType::F16 => "f16",
            FloatType::BF16 => "bf16",
            FloatType::F64 => "f64",
        }
    }
}

/// One tensor's place in its file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range within the whole file (header included).
    pub start: usize,
    pub end: usize,
}

impl TensorEntry {
    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A validated, memory-mapped safetensors file.
pub struct TensorFile {
    path: PathBuf,
    map: Mmap,
    tensors: HashMap<String, TensorEntry>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for TensorFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorFile").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

impl TensorFile {
    /// Maps `path` and validates its header against the file size (the safetensors crate
    /// checks that offsets are contiguous, in bounds and consistent with dtype × shape).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; like every mmap-based loader we rely on the file
        // not being truncated underneath us while it is mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::BadSafetensors { path: path.to_path_buf(), reason };
        let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| bad(describe(&e, map.len())))?;
        let data_start = 8 + header_len;
        let mut tensors = HashMap::new();
        for (name, info) in meta.tensors() {
            let (a, b) = info.data_offsets;
            tensors.insert(
                name,
                TensorEntry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + a,
                    end: data_start + b,
                },
            );
        }
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(TensorFile { path: path.to_path_buf(), map, tensors, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }
    pub fn bytes(&self, entry: &TensorEntry) -> &[u8] {
        &self.map[entry.start..entry.end]
    }
    pub(crate) fn bytes_range(&self, start: usize, end: usize) -> &[u8] {
        &self.map[start..end]
    }
    pub fn len_bytes(&self) -> usize {
        self.map.len()
    }

    /// The tensor's floating-point type, or a dtype error naming it.
    pub fn float_type(&self, name: &str, entry: &TensorEntry) -> Result<FloatType> {
        match entry.dtype {
            Dtype::F32 => Ok(FloatType::F32),
            Dtype::F16 => Ok(FloatType::F16),
            Dtype::BF16 => Ok(FloatType::BF16),
            Dtype::F64 => Ok(FloatType::F64),
            other => Err(Error::Dtype {
                path: self.path.clone(),
                tensor: name.to_string(),
                found: format!("{other:?}"),
                expected: "f32, f16, bf16 or f64",
            }),
        }
    }

    /// The tensor as f32 in place, when it is stored as f32 at a 4-byte-aligned address.
    pub fn f32_view(&self, entry: &TensorEntry) -> Option<&[f32]> {
        if entry.dtype != Dtype::F32 {
            return None;
        }
        bytemuck::try_cast_slice(self.bytes(entry)).ok()
    }

    /// Converts the tensor to f32 into `out` (whose length must equal the element count).
    pub fn read_f32_into(&self, name: &str, entry: &TensorEntry, out: &mut [f32]) -> Result<()> {
        let bytes = self.bytes(entry);
        debug_assert_eq!(out.len(), entry.elems());
        match self.float_type(name, entry)? {
            FloatType::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            FloatType::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            FloatType::BF16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            FloatType::F64 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    *o = f64::from_le_bytes(a) as f32;
                }
            }
        }
        Ok(())
    }

    /// Reads an integer tensor (i64 or i32) whole, for small request files.
    pub fn read_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let entry = self.require(name)?;
        let bytes = self.bytes(entry);
        let values = match entry.dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect(),
            Dtype::I32 => bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64).collect(),
            other => {
                return Err(Error::Dtype {
                    path: self.path.clone(),
                    tensor: name.to_string(),
                    found: format!("{other:?}"),
                    expected: "i64 or i32",
                })
            }
        };
        Ok((entry.shape.clone(), values))
    }

    /// Reads a floating-point tensor whole as f32, for small request files.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let entry = self.require(name)?;
        let mut out = vec![0.0; entry.elems()];
        self.read_f32_into(name, entry, &mut out)?;
        Ok((entry.shape.clone(), out))
    }

    pub fn require(&self, name: &str) -> Result<&TensorEntry> {
        self.get(name).ok_or_else(|| Error::MissingTensors { path: self.path.clone(), names: vec![name.to_string()] })
    }
}

/// Largest config.json or index file icdit reads (real ones are a few KB).
pub const MAX_JSON_BYTES: u64 = 16 << 20;

/// Reads a small text file (config.json, a shard index) whole, refusing files larger than
/// [`MAX_JSON_BYTES`] instead of reading them into memory.
pub fn read_json_text(path: &Path) -> Result<String> {
    use std::io::Read;
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut text = String::new();
    let n = f.take(MAX_JSON_BYTES + 1).read_to_string(&mut text).map_err(|e| Error::io(path, e))?;
    if n as u64 > MAX_JSON_BYTES {
        return Err(Error::Config {
            origin: path.display().to_string(),
            reason: format!("larger than {} MiB; not a config file", MAX_JSON_BYTES >> 20),
        });
    }
    Ok(text)
}

/// A readable sentence for each way the safetensors crate rejects a buffer.
fn describe(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => format!("file is {file_len} bytes, too short for the 8-byte header length"),
        E::HeaderTooLarge => "header length field is larger than the 100 MB the format allows".into(),
        E::InvalidHeaderLength => format!("header length field points past the end of the {file_len}-byte file"),
        E::InvalidHeader(_) => "header is not UTF-8 text".into(),
        E::InvalidHeaderDeserialization(e) => format!("header is not valid safetensors JSON ({e})"),
        E::MetadataIncompleteBuffer => {
            format!("tensor data does not match the file size of {file_len} bytes (truncated or padded file)")
        }
        E::InvalidOffset(name) => format!("tensor `{name}` has offsets that are not contiguous or out of order"),
        E::TensorInvalidInfo => "a tensor's byte length does not match its dtype and shape".into(),
        E::ValidationOverflow => "a tensor's size overflows".into(),
        other => other.to_string(),
    }
}

/// Writes named f32/i64 tensors to `path` atomically (temporary name, then rename), so an
/// interrupted write never leaves a partial file under the final name.
pub fn write_safetensors(
    path: &Path,
    f32s: &[(&str, &[usize], &[f32])],
    i64s: &[(&str, &[usize], &[i64])],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    use safetensors::tensor::TensorView;
    let mut views = Vec::new();
    for (name, shape, data) in f32s {
        let view = TensorView::new(Dtype::F32, shape.to_vec(), bytemuck::cast_slice(data))
            .map_err(|e| Error::invalid("tensor to write", format!("{name}: {e}")))?;
        views.push((name.to_string(), view));
    }
    for (name, shape, data) in i64s {
        let view = TensorView::new(Dtype::I64, shape.to_vec(), bytemuck::cast_slice(data))
            .map_err(|e| Error::invalid("tensor to write", format!("{name}: {e}")))?;
        views.push((name.to_string(), view));
    }
    let bytes = safetensors::serialize(views, None).map_err(|e| Error::invalid("tensors to write", e.to_string()))?;
    crate::fsio::atomic_write(path, &with_sorted_metadata(bytes, metadata)?)
}

/// Adds `metadata` to a serialized safetensors file with its keys sorted, so that the same
/// tensors and metadata always give the same bytes (the safetensors crate writes metadata in
/// hash-map order). The header is the crate's: `__metadata__` first, then the tensors, padded
/// with spaces to a multiple of 8 bytes.
fn with_sorted_metadata(bytes: Vec<u8>, metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
    let Some(metadata) = metadata else { return Ok(bytes) };
    let bad = |what: &str| Error::invalid("tensors to write", format!("serialised header: {what}"));
    let n = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default())).ok_or_else(|| bad("short"))?;
    let json = bytes.get(8..8 + n as usize).ok_or_else(|| bad("length past the end"))?;
    let tensors = std::str::from_utf8(json).map_err(|_| bad("not UTF-8"))?.trim_end();
    if !tensors.starts_with('{') {
        return Err(bad("not a JSON object"));
    }
    let sorted: std::collections::BTreeMap<String, String> = metadata.into_iter().collect();
    let meta = serde_json::to_string(&sorted).map_err(|e| bad(&e.to_string()))?;
    let mut header = format!("{{\"__metadata__\":{meta}");
    if tensors != "{}" {
        header.push(',');
    }
    header.push_str(&tensors[1..]);
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let data = &bytes[8 + json.len()..];
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend((header.len() as u64).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_is_written_sorted_and_the_rest_as_the_crate_writes_it() {
        let dir = std::env::temp_dir().join(format!("icdit-tensorfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = ([1.5f32, -2.0, 3.25], [7i64, 8]);
        let write = |name: &str, meta: &[(&str, &str)]| {
            let path = dir.join(name);
            let meta = (!meta.is_empty()).then(|| meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
            write_safetensors(&path, &[("z", &[3], &a)], &[("labels", &[2], &b)], meta).unwrap();
            std::fs::read(&path).unwrap()
        };
        let keys = [("b", "1"), ("a", "2"), ("c", "{\"x\": 3}")];
        let first = write("first.safetensors", &keys);
        for _ in 0..4 {
            assert_eq!(write("again.safetensors", &keys), first, "same tensors and metadata, same bytes");
        }
        let n = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header = std::str::from_utf8(&first[8..8 + n]).unwrap();
        assert!(header.starts_with(r#"{"__metadata__":{"a":"2","b":"1","c":"{\"x\": 3}"},"#), "{header}");
        let f = TensorFile::open(&dir.join("first.safetensors")).unwrap();
        assert_eq!(f.metadata().get("c").map(String::as_str), Some("{\"x\": 3}"));
        assert_eq!(f.read_f32("z").unwrap(), (vec![3], a.to_vec()));
        assert_eq!(f.read_i64("labels").unwrap(), (vec![2], b.to_vec()));
        // No metadata, or one key: exactly the safetensors crate's bytes.
        use safetensors::tensor::TensorView;
        for meta in [&[][..], &[("format", "pt")][..]] {
            let views = vec![
                ("z", TensorView::new(Dtype::F32, vec![3], bytemuck::cast_slice(&a)).unwrap()),
                ("labels", TensorView::new(Dtype::I64, vec![2], bytemuck::cast_slice(&b)).unwrap()),
            ];
            let m = (!meta.is_empty()).then(|| meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
            assert_eq!(write("one.safetensors", meta), safetensors::serialize(views, m).unwrap());
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
