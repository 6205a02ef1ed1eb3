//! Shared test helpers: fixture paths, temporary folders, running the `icdit` binary and the
//! one tolerance policy; [`pixart`]: the PixArt-α tests' fixtures, engines and command lines.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use icdit::cpu::Isa;
use icdit::tensorfile::TensorFile;

pub mod pixart;

/// Every CPU instruction-set path this machine runs, portable first; printed, so a test log
/// shows which paths a check covered.
pub fn isas(what: &str) -> Vec<Isa> {
    let all: Vec<Isa> = Isa::available().collect();
    println!("{what}: CPU paths on this machine: {}", all.iter().map(|i| i.name()).collect::<Vec<_>>().join(", "));
    all
}

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// Runs the `icdit` binary with `args`: (success, stderr).
pub fn icdit(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_icdit")).args(args).output().expect("run icdit");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A path as a command-line argument.
pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A fresh, empty folder under the system's temporary directory for one test, removed with
/// everything in it when dropped; kept (and its path printed) when the test is failing, to
/// look at. Named `icdit-<test binary>-<tag>-<process>-<n>`: unique across test binaries,
/// processes and calls, so tests running in parallel never share one. It derefs to its
/// [`Path`]: `dir.join("weights.safetensors")`.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let name = format!("icdit-{}-{tag}-{}-{n}", env!("CARGO_CRATE_NAME"), std::process::id());
        let dir = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir); // left by an earlier process with the same id
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} (the test failed)", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A copy of the hd72 diffusers transformer folder (config.json and weights) at
/// `tmp/transformer`, to edit.
pub fn diffusers_copy(tmp: &TempDir) -> PathBuf {
    let src = fixture("hd72/diffusers/transformer");
    let dst = tmp.join("transformer");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    dst
}

/// All tensors of a safetensors file as (name, dtype, shape, bytes), sorted by name: for tests
/// that write a damaged or edited copy of a weights file.
pub type Tensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// The tensors of `path` and its metadata.
pub fn read_all(path: &Path) -> (Tensors, HashMap<String, String>) {
    let f = TensorFile::open(path).unwrap();
    let mut names: Vec<String> = f.names().map(String::from).collect();
    names.sort();
    let t = names
        .into_iter()
        .map(|n| {
            let e = f.get(&n).unwrap().clone();
            let bytes = f.bytes(&e).to_vec();
            (n, e.dtype, e.shape, bytes)
        })
        .collect();
    (t, f.metadata().clone())
}

/// Writes `t` with `meta` as a safetensors file at `path`.
pub fn write_all(path: &Path, t: &Tensors, meta: &HashMap<String, String>) {
    use safetensors::tensor::TensorView;
    let views: Vec<(String, TensorView)> =
        t.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, Some(meta.clone())).unwrap()).unwrap();
}

/// A forward reference: inputs and the official output.
pub struct Reference {
    pub x: Vec<f32>,
    pub t: Vec<i64>,
    pub y: Vec<i64>,
    pub out: Vec<f32>,
    pub out_f64: Option<Vec<f32>>,
}

pub fn reference(rel: &str) -> Reference {
    let f = TensorFile::open(&fixture(rel)).unwrap_or_else(|e| panic!("{e}"));
    Reference {
        x: f.read_f32("x").unwrap().1,
        t: f.read_i64("t").unwrap().1,
        y: f.read_i64("y").unwrap().1,
        out: f.read_f32("out").unwrap().1,
        out_f64: f.get("out_f64").map(|_| f.read_f32("out_f64").unwrap().1),
    }
}

/// Relative L2 error ‖a − e‖ / ‖e‖, computed in f64.
pub fn rel_l2(a: &[f32], e: &[f32]) -> f64 {
    assert_eq!(a.len(), e.len(), "length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &e) in a.iter().zip(e) {
        num += (a as f64 - e as f64).powi(2);
        den += (e as f64).powi(2);
    }
    (num / den).sqrt()
}

/// Asserts `a` matches `e` within relative L2 `tol`, after checking the reference is not
/// trivial; prints the measured error and, on failure, the worst elements.
pub fn assert_close(what: &str, a: &[f32], e: &[f32], tol: f64) -> f64 {
    let rms = (e.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / e.len() as f64).sqrt();
    assert!(rms > 1e-3, "{what}: reference is trivial (rms {rms})");
    assert!(a.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let err = rel_l2(a, e);
    println!("{what}: relative L2 error {err:.3e} (tolerance {tol:.1e}, reference rms {rms:.3})");
    #[allow(clippy::neg_cmp_op_on_partial_ord)] // also true for a NaN error
    if !(err <= tol) {
        let mut idx: Vec<usize> = (0..a.len()).collect();
        idx.sort_by(|&i, &j| (a[j] - e[j]).abs().total_cmp(&(a[i] - e[i]).abs()));
        for &i in idx.iter().take(8) {
            eprintln!("  [{i}] got {} expected {} (diff {:.3e})", a[i], e[i], a[i] - e[i]);
        }
        panic!("{what}: relative L2 error {err:.3e} exceeds {tol:.1e}");
    }
    err
}
