//! The device abstraction the GPU pipeline is written against, and its two implementations:
//! [`EmuDevice`] runs the kernels of `kernels/*.cu` compiled as C++ on a CPU emulation of the
//! CUDA execution model (every build; docs/gpu-emulation.md), `CudaDevice` runs the same
//! kernels on a GPU through the CUDA driver (feature `cuda`).
//!
//! A device owns one arena allocation sized by a [`Plan`](crate::plan::Plan), copies between
//! host and arena, launches kernels in order on one stream, and records events. Kernels are
//! launched only through the typed launchers of [`launch`], one per kernel, so pipeline code
//! is the same for both devices: it is generic over `D: Device`.

pub mod kernels;
pub mod launch;
pub mod pipeline;
pub mod pixart;
pub use pipeline::{GpuBackend, GpuEngine, OpTime, StepLaunches};

mod emu;
pub use emu::{EmuDevice, EmuGraph};
#[cfg(test)]
mod emu_selftest;
#[cfg(test)]
mod emu_sm90_selftest;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub use cuda::{CudaDevice, CudaGraph, PTXAS_REPORT};

use std::ffi::c_void;
use std::marker::PhantomData;

use crate::error::{Error, Result};
use crate::plan::{Buffer, Dt};

pub use half::f16;

/// Element types that live in device memory, tied to the plan's dtypes.
pub trait DevType: bytemuck::Pod {
    const DT: Dt;
}
impl DevType for f32 {
    const DT: Dt = Dt::F32;
}
impl DevType for f16 {
    const DT: Dt = Dt::F16;
}
impl DevType for i32 {
    const DT: Dt = Dt::I32;
}
impl DevType for u8 {
    const DT: Dt = Dt::U8;
}

/// A device address of `T` elements, passed to kernels as the C pointer `T*`: 8 bytes, the
/// CUDA device pointer (or the host address, in the emulation).
#[repr(transparent)]
pub struct DevPtr<T> {
    addr: u64,
    _t: PhantomData<fn() -> T>,
}
impl<T> Clone for DevPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DevPtr<T> {}
impl<T> DevPtr<T> {
    pub fn addr(self) -> u64 {
        self.addr
    }
    /// The null pointer, for a kernel's optional operands.
    pub fn null() -> Self {
        DevPtr { addr: 0, _t: PhantomData }
    }

    pub fn is_null(self) -> bool {
        self.addr == 0
    }
}

/// `len` elements of `T` inside a device's arena.
pub struct DevSlice<T> {
    addr: u64,
    len: usize,
    _t: PhantomData<fn() -> T>,
}
impl<T> Clone for DevSlice<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DevSlice<T> {}
impl<T> std::fmt::Debug for DevSlice<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevSlice({:#x}, {} × {})", self.addr, self.len, std::any::type_name::<T>())
    }
}

impl<T> DevSlice<T> {
    pub fn len(self) -> usize {
        self.len
    }
    pub fn is_empty(self) -> bool {
        self.len == 0
    }
    pub fn ptr(self) -> DevPtr<T> {
        DevPtr { addr: self.addr, _t: PhantomData }
    }
    /// Elements `start .. start + len` (e.g. one chunk of a modulation vector).
    pub fn sub(self, start: usize, len: usize) -> Result<Self> {
        if start.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::invalid("device slice", format!("{start}..{start}+{len} is outside {self:?}")));
        }
        Ok(DevSlice { addr: self.addr + (start * size_of::<T>()) as u64, len, _t: PhantomData })
    }
    fn bytes(self) -> usize {
        self.len * size_of::<T>()
    }
}

/// Grid, block and dynamic shared memory of one launch, as `cuLaunchKernel` takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dyn_smem: u32,
}

/// Dynamic shared memory a kernel may use without opting in (cuFuncSetAttribute): 48 KiB.
pub const MAX_DYN_SMEM: u32 = 48 * 1024;
/// Dynamic shared memory a block may have once opted in on sm_90 (H100, H200): 227 KiB. The
/// CUDA device opts every kernel in to what its GPU allows at load and refuses more there.
pub const MAX_DYN_SMEM_OPT_IN: u32 = 227 * 1024;

impl LaunchCfg {
    /// Checks the limits every CUDA GPU since sm_30 shares, so both devices refuse the same
    /// launches.
    pub fn check(&self, kernel: &Kernel) -> Result<()> {
        let [gx, gy, gz] = self.grid;
        let [bx, by, bz] = self.block;
        let threads = bx as u64 * by as u64 * bz as u64;
        let bad = if gx == 0 || gy == 0 || gz == 0 || gx > i32::MAX as u32 || gy > 65535 || gz > 65535 {
            "grid"
        } else if threads == 0 || threads > 1024 || bz > 64 {
            "block"
        } else if self.dyn_smem > MAX_DYN_SMEM_OPT_IN {
            "dynamic shared memory"
        } else {
            return Ok(());
        };
        Err(Error::invalid("kernel launch", format!("{}: {bad} out of range in {self:?}", kernel.name)))
    }
}

/// The emulation's entry for one kernel: reads the argument array and calls the C++ kernel.
pub type EmuEntry = unsafe extern "C" fn(args: *const *mut c_void);

/// One exported kernel: its C name, the kernels/*.cu file (module) it lives in, its index in
/// the table every device resolves at initialisation, and its emulation entry.
pub struct Kernel {
    pub name: &'static str,
    pub module: &'static str,
    pub id: usize,
    pub(crate) emu: EmuEntry,
    /// Bytes of each parameter, in order (for recording launches into a graph).
    pub arg_sizes: &'static [usize],
}

/// A 2-D tensor map for the Hopper bulk tensor copy (`cp.async.bulk.tensor`): 128 opaque
/// bytes, 64-byte aligned, passed to a kernel by value. A CUDA device fills it with the
/// driver's `cuTensorMapEncodeTiled`; the emulation with its own fields (kernels/emu/sm90.h).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct TensorMap(pub(crate) [u64; 16]);

impl std::fmt::Debug for TensorMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TensorMap(..)")
    }
}

/// What a [`TensorMap`] describes: an f16 row-major matrix of `rows` × `cols` elements with
/// `stride` elements between rows, copied in boxes of `box_rows` × `box_cols` elements with
/// the 128-byte swizzle (`box_cols` = 64), elements outside the matrix read as zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMapSpec {
    pub addr: u64,
    pub rows: u64,
    pub cols: u64,
    pub stride: u64,
    pub box_rows: u32,
    pub box_cols: u32,
}

impl TensorMapSpec {
    /// The rules `cuTensorMapEncodeTiled` enforces, checked the same way on every device: a
    /// 16-byte aligned start, a row stride that is a multiple of 16 bytes (and at least a row),
    /// boxes of 1–256 elements a side whose rows fit the 128-byte swizzle.
    pub fn check(&self) -> Result<()> {
        let bad = if self.addr % 16 != 0 {
            "the start is not 16-byte aligned"
        } else if self.rows == 0 || self.cols == 0 || self.rows > u32::MAX as u64 || self.cols > u32::MAX as u64 {
            "a dimension is 0 or above 2^32"
        } else if (self.stride * 2) % 16 != 0 || self.stride < self.cols || self.stride * 2 >= 1 << 40 {
            "the row stride is not a multiple of 16 bytes at least a row wide"
        } else if !(1..=256).contains(&self.box_rows) || !(1..=256).contains(&self.box_cols) || self.box_cols * 2 > 128
        {
            "the box is not 1–256 elements a side with rows of at most 128 bytes"
        } else {
            return Ok(());
        };
        Err(Error::invalid("tensor map", format!("{self:?}: {bad}")))
    }
}

/// Where the arena lies in device memory.
#[derive(Clone, Copy, Debug)]
pub struct ArenaRange {
    pub base: u64,
    pub bytes: usize,
}

/// A place to run the GPU pipeline: the emulation or a CUDA GPU.
pub trait Device {
    /// A point in the device's stream, for timing.
    type Event;

    /// What runs the kernels, for logs and benchmark names.
    fn name(&self) -> &str;
    /// The one arena allocation, made at construction from a plan.
    fn arena(&self) -> ArenaRange;
    /// Copies host bytes to `dst` in the arena once earlier work on the stream is done;
    /// returns when the copy has completed. `dst .. dst + src.len()` is inside the arena.
    fn upload_bytes(&self, dst: u64, src: &[u8]) -> Result<()>;
    /// Waits for the stream, then copies arena bytes at `src` to the host.
    fn download_bytes(&self, src: u64, dst: &mut [u8]) -> Result<()>;
    /// Waits until all work issued so far is done; reports errors of earlier launches.
    fn synchronize(&self) -> Result<()>;
    fn record_event(&self) -> Result<Self::Event>;
    /// Milliseconds between two recorded events (waits for `end`).
    fn elapsed_ms(&self, start: &Self::Event, end: &Self::Event) -> Result<f32>;
    /// Launches `kernel` on the stream.
    ///
    /// # Safety
    /// `args` points at one value per kernel parameter, of the parameter's C type, and every
    /// pointer among them addresses enough arena memory for what the kernel reads and writes.
    /// Only the typed launchers in [`launch`] call this.
    unsafe fn launch(&self, kernel: &'static Kernel, cfg: &LaunchCfg, args: &[*mut c_void]) -> Result<()>;
    /// Kernel launches issued so far on this device, those recorded into a graph included (a
    /// graph's replays are not counted again): the pipeline counts a step's launches with it.
    fn launches(&self) -> u64;

    /// Multiprocessors: the persistent kernels run at most one block on each.
    fn multiprocessors(&self) -> u32;

    /// Whether the Hopper GEMM (kernels/gemm_sm90.cu) may run: an sm_90 GPU with kernels built
    /// for sm_90a (or the emulation, which models one), not forced off by `ICDIT_GEMM=wmma`,
    /// and not turned off by [`Device::disable_gemm_sm90`] after its first-use check failed.
    fn gemm_sm90(&self) -> bool;

    /// Turns the Hopper GEMM off for the rest of the device's life (the first-use check of
    /// [`launch::gemm::check_sm90`] found it disagreeing with the fallback kernels).
    fn disable_gemm_sm90(&self);

    /// A tensor map for the bulk tensor copy of the matrix `spec` describes (checked by
    /// [`TensorMapSpec::check`]).
    fn tensor_map_2d(&self, spec: &TensorMapSpec) -> Result<TensorMap>;

    /// (free, total) bytes of device memory, where the device can tell.
    fn memory_info(&self) -> Option<(usize, usize)> {
        None
    }

    /// A recorded sequence of launches ([`Device::end_capture`]), replayed by
    /// [`Device::launch_graph`]: a CUDA graph on a GPU, a launch list on the emulation.
    type Graph;

    /// Starts recording launches instead of running them, until [`Device::end_capture`].
    /// Copies and synchronisation are not allowed while recording.
    fn begin_capture(&self) -> Result<()>;
    /// Ends the recording started by [`Device::begin_capture`] and makes it launchable.
    fn end_capture(&self) -> Result<Self::Graph>;
    /// Runs a recorded graph on the stream, as its launches would have run.
    fn launch_graph(&self, graph: &Self::Graph) -> Result<()>;

    /// The arena buffer `buf` of a plan, as `T` elements.
    fn slice<T: DevType>(&self, buf: &Buffer) -> Result<DevSlice<T>> {
        if buf.dtype != T::DT {
            return Err(Error::invalid(
                "device slice",
                format!("buffer `{}` holds {:?}, not {:?}", buf.name, buf.dtype, T::DT),
            ));
        }
        let arena = self.arena();
        if buf.offset + buf.bytes() > arena.bytes {
            return Err(Error::invalid(
                "device slice",
                format!("buffer `{}` ends past the {}-byte arena", buf.name, arena.bytes),
            ));
        }
        Ok(DevSlice { addr: arena.base + buf.offset as u64, len: buf.elems(), _t: PhantomData })
    }

    /// Copies `src` into `dst`, which must have the same length.
    fn upload<T: DevType>(&self, dst: DevSlice<T>, src: &[T]) -> Result<()> {
        check_copy(self.arena(), dst, src.len())?;
        self.upload_bytes(dst.addr, bytemuck::cast_slice(src))
    }

    /// Copies `src` to `dst`, which must have the same length.
    fn download<T: DevType>(&self, src: DevSlice<T>, dst: &mut [T]) -> Result<()> {
        check_copy(self.arena(), src, dst.len())?;
        self.download_bytes(src.addr, bytemuck::cast_slice_mut(dst))
    }
}

fn check_copy<T>(arena: ArenaRange, dev: DevSlice<T>, host_len: usize) -> Result<()> {
    if dev.len != host_len {
        return Err(Error::invalid("device copy", format!("host slice of {host_len} elements against {dev:?}")));
    }
    check_range(arena, dev.addr, dev.bytes())
}

/// `len` bytes at device address `addr` lie inside the arena.
fn check_range(arena: ArenaRange, addr: u64, len: usize) -> Result<()> {
    if addr < arena.base || addr - arena.base + len as u64 > arena.bytes as u64 {
        return Err(Error::invalid("device copy", format!("{len} bytes at {addr:#x} are outside the arena")));
    }
    Ok(())
}
