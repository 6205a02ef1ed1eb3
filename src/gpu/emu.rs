//! [`EmuDevice`]: the kernels compiled as C++ against kernels/emu, run on the CPU. Device
//! memory is one host allocation; launches run to completion before `launch` returns (the
//! stream is trivially in order), and an emulation error (a barrier not every thread reaches,
//! a warp collective with mismatched masks, a deadlock, a misaligned wmma or cp.async
//! address) comes back from `launch` as an error naming the kernel, block and thread.

use std::alloc::Layout;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::ptr::NonNull;
use std::time::Instant;

use super::{check_range, ArenaRange, Device, EmuEntry, Kernel, LaunchCfg, TensorMap, TensorMapSpec};
use crate::error::{Error, Result};
use crate::plan::Plan;

extern "C" {
    // kernels/emu/runtime.cpp
    fn icdit_emu_launch(
        entry: EmuEntry,
        args: *const *mut c_void,
        grid: *const u32,
        block: *const u32,
        dyn_smem_bytes: u32,
        workers: u32,
        err: *mut c_char,
        err_cap: usize,
    ) -> i32;
}

/// Alignment of the arena, as cudaMalloc's.
const ARENA_ALIGN: usize = 256;

/// Multiprocessors the emulation reports: few, so that persistent kernels walk several tiles
/// per block (and their pipelines wrap around their stages) even on small test shapes.
pub const EMU_MULTIPROCESSORS: u32 = 3;

/// kernels/emu/sm90.h's `kTensorMapMagic`.
const TENSOR_MAP_MAGIC: u64 = 0x414d_5454_4944_434f;

/// Whether `ICDIT_GEMM=wmma` forces the Hopper GEMM off (to compare it with the fallback).
pub(crate) fn gemm_forced_wmma() -> bool {
    std::env::var("ICDIT_GEMM").is_ok_and(|v| v == "wmma")
}

/// The CUDA execution model emulated on the CPU; see the module documentation.
pub struct EmuDevice {
    base: NonNull<u8>,
    layout: Layout,
    workers: u32,
    name: String,
    /// Launches recorded since `begin_capture`, when capturing.
    capture: RefCell<Option<Vec<Recorded>>>,
    /// Launches issued or recorded so far ([`Device::launches`]).
    launches: std::cell::Cell<u64>,
    /// [`Device::gemm_sm90`]: the emulation models an sm_90 GPU.
    sm90: std::cell::Cell<bool>,
}

/// One recorded launch: the kernel, its geometry, and its arguments copied into 8-byte
/// slots (each argument starting on a slot, so it is aligned for any parameter type).
struct Recorded {
    kernel: &'static Kernel,
    cfg: LaunchCfg,
    args: Vec<u64>,
    /// Slot index of each argument.
    starts: Vec<usize>,
}

/// A recorded launch list, replayed in order on the device that recorded it.
pub struct EmuGraph {
    arena_base: u64,
    launches: Vec<Recorded>,
    /// Per launch, pointers to its arguments inside `launches[i].args` (built once, so a
    /// replay allocates nothing).
    ptrs: Vec<Vec<*mut c_void>>,
}

// SAFETY: the arena is plain memory owned by the device; nothing else refers to it.
unsafe impl Send for EmuDevice {}

impl EmuDevice {
    /// An emulated device holding `plan`'s arena, running blocks on `ICDIT_EMU_THREADS` OS
    /// threads (default: the available parallelism).
    pub fn new(plan: &Plan) -> Result<Self> {
        let workers = std::env::var("ICDIT_EMU_THREADS")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
        Self::with_threads(plan, workers)
    }

    /// As [`EmuDevice::new`] with an explicit number of OS threads (at least 1).
    pub fn with_threads(plan: &Plan, workers: u32) -> Result<Self> {
        let bytes = plan.total_bytes().max(ARENA_ALIGN);
        let layout = Layout::from_size_align(bytes, ARENA_ALIGN)
            .map_err(|_| Error::invalid("arena size", format!("{bytes} bytes is not allocatable")))?;
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        let base = NonNull::new(ptr).ok_or_else(|| {
            Error::invalid("memory", format!("cannot allocate the emulated device's {bytes}-byte arena"))
        })?;
        // Device memory starts as garbage on a GPU; here as all ones, which is NaN in f16 and
        // f32, so a kernel reading memory nothing wrote produces NaN rather than plausible zeros.
        // SAFETY: `bytes` bytes were just allocated at `base`.
        unsafe { std::ptr::write_bytes(base.as_ptr(), 0xff, bytes) };
        let workers = workers.max(1);
        Ok(EmuDevice {
            base,
            layout,
            workers,
            name: format!("emulated GPU ({workers} thread{})", if workers == 1 { "" } else { "s" }),
            capture: RefCell::new(None),
            launches: std::cell::Cell::new(0),
            sm90: std::cell::Cell::new(!gemm_forced_wmma()),
        })
    }

    fn not_capturing(&self, what: &str) -> Result<()> {
        if self.capture.borrow().is_some() {
            return Err(Error::gpu("graph capture", format!("{what} while recording a graph")));
        }
        Ok(())
    }

    /// Runs one launch now.
    ///
    /// # Safety
    /// As [`Device::launch`].
    unsafe fn run(&self, kernel: &Kernel, cfg: &LaunchCfg, args: &[*mut c_void]) -> Result<()> {
        let mut err = [0 as c_char; 1024];
        // SAFETY: `args` matches the kernel's parameters (the caller's contract), the entry
        // reads exactly those, and the arrays outlive the call, which runs the whole grid.
        let rc = unsafe {
            icdit_emu_launch(
                kernel.emu,
                args.as_ptr(),
                cfg.grid.as_ptr(),
                cfg.block.as_ptr(),
                cfg.dyn_smem,
                self.workers,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: the runtime writes a NUL-terminated message into `err` on failure.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
        Err(Error::gpu("kernel run", format!("{} on the emulated GPU: {msg}", kernel.name)))
    }

    fn host_ptr(&self, addr: u64) -> *mut u8 {
        addr as usize as *mut u8
    }
}

impl Drop for EmuDevice {
    fn drop(&mut self) {
        // SAFETY: allocated in `with_threads` with this layout.
        unsafe { std::alloc::dealloc(self.base.as_ptr(), self.layout) }
    }
}

impl Device for EmuDevice {
    type Event = Instant;

    fn name(&self) -> &str {
        &self.name
    }

    fn arena(&self) -> ArenaRange {
        ArenaRange { base: self.base.as_ptr() as usize as u64, bytes: self.layout.size() }
    }

    fn upload_bytes(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.not_capturing("a copy to the device")?;
        check_range(self.arena(), dst, src.len())?;
        // SAFETY: the destination range lies inside the arena, which no Rust reference aliases.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.host_ptr(dst), src.len()) };
        Ok(())
    }

    fn download_bytes(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.not_capturing("a copy from the device")?;
        check_range(self.arena(), src, dst.len())?;
        // SAFETY: the source range lies inside the arena.
        unsafe { std::ptr::copy_nonoverlapping(self.host_ptr(src), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn record_event(&self) -> Result<Instant> {
        Ok(Instant::now())
    }

    fn elapsed_ms(&self, start: &Instant, end: &Instant) -> Result<f32> {
        Ok(end.saturating_duration_since(*start).as_secs_f32() * 1e3)
    }

    unsafe fn launch(&self, kernel: &'static Kernel, cfg: &LaunchCfg, args: &[*mut c_void]) -> Result<()> {
        cfg.check(kernel)?;
        self.launches.set(self.launches.get() + 1);
        if let Some(list) = self.capture.borrow_mut().as_mut() {
            if args.len() != kernel.arg_sizes.len() {
                return Err(Error::invalid(
                    "kernel launch",
                    format!("{}: {} arguments for {} parameters", kernel.name, args.len(), kernel.arg_sizes.len()),
                ));
            }
            let mut rec = Recorded { kernel, cfg: *cfg, args: Vec::new(), starts: Vec::new() };
            for (&p, &size) in args.iter().zip(kernel.arg_sizes) {
                let start = rec.args.len();
                rec.starts.push(start);
                rec.args.resize(start + size.div_ceil(8).max(1), 0);
                // SAFETY: `p` points at a parameter value of `size` bytes (the caller's
                // contract); the slots hold at least `size` bytes.
                unsafe { std::ptr::copy_nonoverlapping(p as *const u8, rec.args[start..].as_mut_ptr().cast(), size) };
            }
            list.push(rec);
            return Ok(());
        }
        // SAFETY: forwarded to the caller.
        unsafe { self.run(kernel, cfg, args) }
    }

    fn launches(&self) -> u64 {
        self.launches.get()
    }

    fn multiprocessors(&self) -> u32 {
        EMU_MULTIPROCESSORS
    }

    fn gemm_sm90(&self) -> bool {
        self.sm90.get()
    }

    fn disable_gemm_sm90(&self) {
        self.sm90.set(false);
    }

    fn tensor_map_2d(&self, spec: &TensorMapSpec) -> Result<TensorMap> {
        spec.check()?;
        check_range(self.arena(), spec.addr, (((spec.rows - 1) * spec.stride + spec.cols) * 2) as usize)?;
        let mut m = [0u64; 16];
        m[0] = TENSOR_MAP_MAGIC;
        m[1] = spec.addr;
        m[2] = spec.cols;
        m[3] = spec.rows;
        m[4] = spec.stride * 2;
        m[5] = spec.box_cols as u64 | (spec.box_rows as u64) << 32;
        // Element bytes 2; swizzle 3 (CU_TENSOR_MAP_SWIZZLE_128B).
        m[6] = 2 | 3 << 32;
        Ok(TensorMap(m))
    }

    type Graph = EmuGraph;

    fn begin_capture(&self) -> Result<()> {
        let mut c = self.capture.borrow_mut();
        if c.is_some() {
            return Err(Error::gpu("graph capture", "already recording a graph"));
        }
        *c = Some(Vec::new());
        Ok(())
    }

    fn end_capture(&self) -> Result<EmuGraph> {
        let mut launches =
            self.capture.borrow_mut().take().ok_or_else(|| Error::gpu("graph capture", "not recording a graph"))?;
        let ptrs = launches
            .iter_mut()
            .map(|r| r.starts.iter().map(|&s| r.args[s..].as_mut_ptr().cast::<c_void>()).collect())
            .collect();
        Ok(EmuGraph { arena_base: self.arena().base, launches, ptrs })
    }

    fn launch_graph(&self, graph: &EmuGraph) -> Result<()> {
        self.not_capturing("launching a graph")?;
        if graph.arena_base != self.arena().base {
            return Err(Error::gpu("graph launch", "the graph was recorded on another device"));
        }
        for (r, p) in graph.launches.iter().zip(&graph.ptrs) {
            // SAFETY: recorded from a checked launch on this device (same arena), with the
            // argument values copied at the time; `p` points into `r.args`, which lives as
            // long as the graph and is only read.
            unsafe { self.run(r.kernel, &r.cfg, p)? };
        }
        Ok(())
    }
}
