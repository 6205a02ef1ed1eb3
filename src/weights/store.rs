//! Where weight tensors live: zero-copy views into the mapped files when a tensor is f32
//! and aligned, otherwise one f32 buffer filled once at load (conversions from f16/bf16,
//! the diffusers q/k/v concatenation, and the recomputed position embedding).

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::tensorfile::{FloatType, TensorFile};

/// A handle to one f32 weight tensor inside a [`WeightStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TRef {
    src: Src,
    len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    /// Byte offset into mapped file `file`; the bytes are aligned f32.
    Mapped { file: usize, start: usize },
    /// Element offset into the owned conversion buffer.
    Owned { offset: usize },
}

impl TRef {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn is_mapped(&self) -> bool {
        matches!(self.src, Src::Mapped { .. })
    }
}

/// The mapped files plus the single owned conversion buffer.
pub struct WeightStore {
    files: Vec<TensorFile>,
    owned: Vec<f32>,
}

impl WeightStore {
    /// The tensor as an f32 slice.
    #[inline]
    pub fn get(&self, r: TRef) -> &[f32] {
        match r.src {
            Src::Mapped { file, start } => {
                let bytes = &self.files[file].bytes_range(start, start + 4 * r.len);
                bytemuck::cast_slice(bytes)
            }
            Src::Owned { offset } => &self.owned[offset..offset + r.len],
        }
    }
    pub fn files(&self) -> &[TensorFile] {
        &self.files
    }
    /// Bytes of f32 data held in memory by icdit itself (not the page cache).
    pub fn owned_bytes(&self) -> usize {
        self.owned.len() * 4
    }
}

/// How an owned tensor gets its values once the buffer exists.
/// Writes a generated tensor's values into its buffer.
type Generator = Box<dyn FnOnce(&mut [f32])>;

enum Fill {
    Convert {
        file: usize,
        name: String,
    },
    /// Concatenation along dim 0 (rows) of whole tensors, in order.
    Concat(Vec<(usize, String)>),
    Generated(Generator),
}

/// Collects tensor references while a layout is validated, then allocates the owned buffer
/// exactly once and fills it.
pub struct StoreBuilder {
    files: Vec<TensorFile>,
    /// Which file holds each tensor name (several files for sharded checkpoints).
    index: HashMap<String, usize>,
    fills: Vec<(usize, usize, Fill)>,
    owned_len: usize,
    missing: Vec<String>,
    used: Vec<String>,
    dtypes: HashMap<&'static str, usize>,
}

impl StoreBuilder {
    pub fn new(files: Vec<TensorFile>) -> Self {
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for n in f.names() {
                index.insert(n.to_string(), i);
            }
        }
        StoreBuilder {
            files,
            index,
            fills: Vec::new(),
            owned_len: 0,
            missing: Vec::new(),
            used: Vec::new(),
            dtypes: HashMap::new(),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Names present in the files, for layout detection and depth counting.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        let f = *self.index.get(name)?;
        self.files[f].get(name).map(|e| e.shape.as_slice())
    }

    /// The file a tensor lives in (or the first file), for error messages.
    pub fn path_of(&self, name: &str) -> std::path::PathBuf {
        let f = self.index.get(name).copied().unwrap_or(0);
        self.files.get(f).map_or_else(|| "(in memory)".into(), |f| f.path().to_path_buf())
    }

    pub fn file(&self, i: usize) -> &TensorFile {
        &self.files[i]
    }

    /// Raw bytes of a tensor (for equality checks between copies).
    pub fn raw(&self, name: &str) -> Option<&[u8]> {
        let f = *self.index.get(name)?;
        let e = self.files[f].get(name)?;
        Some(self.files[f].bytes(e))
    }

    /// Looks a tensor up, checks dtype and shape, and returns a handle. A missing tensor
    /// is recorded (all are reported together by [`finish`](Self::finish)) and a dummy
    /// handle returned so validation can continue.
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<TRef> {
        let Some(&file) = self.index.get(name) else {
            self.missing.push(name.to_string());
            return Ok(TRef { src: Src::Owned { offset: 0 }, len: 0 });
        };
        let f = &self.files[file];
        let entry = f.require(name)?;
        let ty = f.float_type(name, entry)?;
        if entry.shape != shape {
            return Err(Error::Shape {
                path: f.path().to_path_buf(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        *self.dtypes.entry(ty.name()).or_default() += 1;
        self.used.push(name.to_string());
        let len = entry.elems();
        if ty == FloatType::F32 && f.f32_view(entry).is_some() {
            return Ok(TRef { src: Src::Mapped { file, start: entry.start }, len });
        }
        Ok(self.owned(len, Fill::Convert { file, name: name.to_string() }))
    }

    /// Several tensors concatenated along their first dimension into one owned tensor.
    /// `parts` are (name, shape) pairs; every part is validated like [`tensor`](Self::tensor).
    pub fn concat(&mut self, parts: &[(String, Vec<usize>)]) -> Result<TRef> {
        let mut sources = Vec::new();
        let mut len = 0;
        for (name, shape) in parts {
            let r = self.tensor(name, shape)?;
            if let Some(&file) = self.index.get(name.as_str()) {
                sources.push((file, name.clone()));
            }
            len += r.len();
        }
        if sources.len() != parts.len() {
            // Some part is missing; it is already recorded.
            return Ok(TRef { src: Src::Owned { offset: 0 }, len: 0 });
        }
        Ok(self.owned(len, Fill::Concat(sources)))
    }

    /// An owned tensor computed by `fill` once the buffer exists.
    pub fn generated(&mut self, len: usize, fill: impl FnOnce(&mut [f32]) + 'static) -> TRef {
        self.owned(len, Fill::Generated(Box::new(fill)))
    }

    fn owned(&mut self, len: usize, fill: Fill) -> TRef {
        let offset = self.owned_len;
        self.owned_len += len;
        self.fills.push((offset, len, fill));
        TRef { src: Src::Owned { offset }, len }
    }

    /// Tensors in the files that no one asked for.
    pub fn unused(&self, allowed_extra: impl Fn(&str) -> bool) -> Vec<String> {
        let used: std::collections::HashSet<&str> = self.used.iter().map(String::as_str).collect();
        let mut extra: Vec<String> =
            self.index.keys().filter(|n| !used.contains(n.as_str()) && !allowed_extra(n)).cloned().collect();
        extra.sort();
        extra
    }

    /// Reports missing and unexpected tensors (each as one error listing all names), then
    /// allocates the owned buffer once and fills it.
    pub fn finish(self, allowed_extra: impl Fn(&str) -> bool) -> Result<(WeightStore, HashMap<&'static str, usize>)> {
        if !self.missing.is_empty() {
            let mut names = self.missing.clone();
            names.sort();
            return Err(Error::MissingTensors { path: self.path_of(""), names });
        }
        let extra = self.unused(allowed_extra);
        if !extra.is_empty() {
            return Err(Error::UnexpectedTensors { path: self.path_of(""), names: extra });
        }
        let mut owned = vec![0.0f32; self.owned_len];
        for (offset, len, fill) in self.fills {
            let dst = &mut owned[offset..offset + len];
            match fill {
                Fill::Convert { file, name } => {
                    let f = &self.files[file];
                    f.read_f32_into(&name, f.require(&name)?, dst)?;
                }
                Fill::Concat(parts) => {
                    let mut at = 0;
                    for (file, name) in parts {
                        let f = &self.files[file];
                        let e = f.require(&name)?;
                        let n = e.elems();
                        f.read_f32_into(&name, e, &mut dst[at..at + n])?;
                        at += n;
                    }
                }
                Fill::Generated(g) => g(dst),
            }
        }
        Ok((WeightStore { files: self.files, owned }, self.dtypes))
    }
}
