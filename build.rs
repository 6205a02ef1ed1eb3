//! Compiles kernels/*.cu two ways (docs/gpu-emulation.md):
//!
//! - always: as C++ against the CPU emulation in kernels/emu (the `cc` crate and the system
//!   C++ compiler), linked as the static library `icdit_emu` that `gpu::EmuDevice` calls;
//! - with the feature `cuda`: by nvcc into one fatbin per file (SASS for the target
//!   architecture plus its PTX), embedded in the library by `gpu::cuda`; the ptxas resource
//!   report of every kernel is kept beside it for `tests/gpu_ptxas.rs`.
//!
//! Environment: `ICDIT_CUDA_ARCH` (default `90`: H100/H200; at least 80, for cp.async),
//! `ICDIT_NVCC` (the nvcc to run), else `CUDA_PATH/bin/nvcc`, else `nvcc` on PATH.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCH: &str = "90";

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernels = root.join("kernels");

    let mut sources = Vec::new();
    watch_dir(&kernels, &mut sources);
    sources.sort();

    build_emulation(&kernels, &out, &sources);
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_cuda(&kernels, &out, &sources);
    }
}

/// Declares every file under `dir` as an input and collects the `.cu` kernel sources.
fn watch_dir(dir: &Path, cu: &mut Vec<PathBuf>) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let entries = fs::read_dir(dir).unwrap_or_else(|e| fail(&format!("{}: {e}", dir.display())));
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            watch_dir(&path, cu);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
            if dir.file_name().is_some_and(|n| n == "kernels") && path.extension().is_some_and(|e| e == "cu") {
                cu.push(path);
            }
        }
    }
}

fn stem(path: &Path) -> String {
    path.file_stem().expect("kernel files have names").to_string_lossy().into_owned()
}

/// The kernels as C++ on the emulation. Each .cu is compiled through a one-line .cpp that
/// includes it, so any C++ compiler accepts it without a language flag.
fn build_emulation(kernels: &Path, out: &Path, sources: &[PathBuf]) {
    let wrap_dir = out.join("emu");
    fs::create_dir_all(&wrap_dir).unwrap_or_else(|e| fail(&format!("{}: {e}", wrap_dir.display())));
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .include(kernels)
        // Emulated kernels run in every test: always optimise them, even in debug builds.
        .opt_level(2)
        // CUDA code reinterprets half* as half2* / uint4*, which strict aliasing forbids in C++.
        .flag("-fno-strict-aliasing")
        // Keep f32 arithmetic as written (no fused multiply-add contraction): deterministic
        // results whatever -march the host compiler is given.
        .flag("-ffp-contract=off")
        // __shared__ and threadIdx are thread-locals read in inner loops: linked into an
        // executable, the cheapest TLS model applies. Feature `dlopen` (the C ABI and the
        // Python module, loaded at run time) needs the general model: dlopen cannot place an
        // initial-exec library's thread-locals once the process has started.
        .flag(if std::env::var_os("CARGO_FEATURE_DLOPEN").is_some() {
            "-ftls-model=global-dynamic"
        } else {
            "-ftls-model=initial-exec"
        })
        .warnings(true)
        .extra_warnings(true)
        // The tensor map is a 64-byte aligned kernel parameter passed by value: GCC notes that
        // its ABI changed in GCC 4.6, which concerns no compiler in use.
        .flag_if_supported("-Wno-psabi")
        .file(kernels.join("emu/runtime.cpp"));
    // The emulator's own tests (src/gpu/emu_selftest.rs): emulation only, wrong on purpose.
    let selftests = [kernels.join("emu/selftest.cu"), kernels.join("emu/sm90_selftest.cu")];
    for cu in sources.iter().chain(&selftests) {
        let wrapper = wrap_dir.join(format!("{}.cpp", stem(cu)));
        let text = format!("#include \"{}\"\n", cu.display());
        if fs::read_to_string(&wrapper).ok().as_deref() != Some(text.as_str()) {
            fs::write(&wrapper, text).unwrap_or_else(|e| fail(&format!("{}: {e}", wrapper.display())));
        }
        build.file(wrapper);
    }
    build.compile("icdit_emu");
}

fn build_cuda(kernels: &Path, out: &Path, sources: &[PathBuf]) {
    for var in ["ICDIT_CUDA_ARCH", "ICDIT_NVCC", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let arch = env::var("ICDIT_CUDA_ARCH").unwrap_or_else(|_| DEFAULT_ARCH.to_string());
    let digits_end = arch.find(|c: char| !c.is_ascii_digit()).unwrap_or(arch.len());
    let (digits, suffix) = arch.split_at(digits_end);
    if !matches!(digits.parse::<u32>(), Ok(n) if n >= 80) || !matches!(suffix, "" | "a" | "f") {
        fail(&format!(
            "ICDIT_CUDA_ARCH={arch:?}: expected a compute capability such as 90 (H100/H200), \
             80 (A100) or 90a; at least 80, since the kernels use cp.async"
        ));
    }
    let nvcc = find_nvcc();

    let mut modules = String::new();
    writeln!(modules, "/// Target architecture of the embedded kernels (`ICDIT_CUDA_ARCH`).").unwrap();
    writeln!(modules, "pub(crate) const ARCH: &str = {arch:?};").unwrap();
    writeln!(modules, "/// One fatbin per kernels/*.cu: (file stem, image).").unwrap();
    writeln!(modules, "pub(crate) static MODULES: &[(&str, &Aligned<[u8]>)] = &[").unwrap();
    let mut report = String::new();
    for cu in sources {
        let name = stem(cu);
        let fatbin = out.join(format!("{name}.fatbin"));
        // One fatbin per file: SASS for sm_<arch> (loaded as is: no JIT at start-up, and it
        // is the code the ptxas report below describes) plus compute_<arch> PTX, which the
        // driver can JIT for a newer GPU. Measurements behind this choice: docs/gpu-emulation.md.
        // The Hopper kernels' (*_sm90.cu: the GEMM, the VAE convolution) wgmma and setmaxnreg
        // exist only for the arch-specific sm_90a target (written as -gencode: the -arch
        // shorthand has been seen to also run a plain sm_90 pass that rejects them); built for
        // another architecture, their kernels are stubs the launchers never pick
        // (Device::gemm_sm90).
        let gencode = if name.ends_with("_sm90") && digits == "90" {
            "-gencode=arch=compute_90a,code=sm_90a".to_string()
        } else {
            format!("-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]")
        };
        let output = Command::new(&nvcc)
            .args(["-fatbin", "-O3", "-std=c++17", "-lineinfo", "-Xptxas", "-v"])
            .arg(gencode)
            .arg("-I")
            .arg(kernels)
            .arg("-o")
            .arg(&fatbin)
            .arg(cu)
            .output()
            .unwrap_or_else(|e| fail(&format!("cannot run {}: {e}", nvcc.display())));
        let log = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            fail(&format!("nvcc failed on {}:\n{log}{}", cu.display(), String::from_utf8_lossy(&output.stdout)));
        }
        writeln!(report, "## {name}.cu (sm_{arch})\n{log}").unwrap();
        writeln!(modules, "    ({name:?}, &Aligned(*include_bytes!({:?}))),", fatbin.display().to_string()).unwrap();
    }
    writeln!(modules, "];").unwrap();
    let report_path = out.join("ptxas-report.txt");
    fs::write(&report_path, report).unwrap_or_else(|e| fail(&format!("{}: {e}", report_path.display())));
    fs::write(out.join("cuda_modules.rs"), modules).unwrap_or_else(|e| fail(&format!("cuda_modules.rs: {e}")));
    println!("cargo:rustc-env=ICDIT_PTXAS_REPORT={}", report_path.display());
}

/// `ICDIT_NVCC`, else `$CUDA_PATH/bin/nvcc`, else `nvcc` on PATH; checked by running it.
fn find_nvcc() -> PathBuf {
    let candidate = if let Some(p) = env::var_os("ICDIT_NVCC") {
        PathBuf::from(p)
    } else if let Some(root) = env::var_os("CUDA_PATH") {
        Path::new(&root).join("bin/nvcc")
    } else {
        PathBuf::from("nvcc")
    };
    match Command::new(&candidate).arg("--version").output() {
        Ok(o) if o.status.success() => candidate,
        _ => fail(&format!(
            "the `cuda` feature needs nvcc, and `{}` did not run. Set ICDIT_NVCC=/path/to/nvcc \
             or CUDA_PATH=<CUDA toolkit root> (with bin/nvcc); scripts/install-cuda-toolchain.sh \
             installs CUDA 13.0 without a GPU and prints both. Build without `--features cuda` \
             for the CPU backend and the emulated GPU pipeline.",
            candidate.display()
        )),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}
