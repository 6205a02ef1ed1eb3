//! `CudaDevice`: the kernels on a CUDA GPU through the driver API (cust 0.3.2). The fatbins
//! build.rs made from kernels/*.cu are embedded in the library; `open` loads every module
//! once and resolves every kernel of [`kernels::ALL`] into a table indexed by `Kernel::id`,
//! so a launch is one `cuLaunchKernel` with no lookup. All work goes to one non-blocking
//! stream; copies wait for it. Use a device from the thread that opened it (the CUDA
//! context is current there), which its raw handles enforce by making it neither Send nor
//! Sync.

use std::ffi::c_void;
use std::ptr;

use cust::context::Context;
use cust::device::{Device as CuDevice, DeviceAttribute};
use cust::error::CudaError;
use cust::event::{Event, EventFlags};
use cust::memory::DeviceBuffer;
use cust::module::Module;
use cust::stream::{Stream, StreamFlags};
use cust::sys as cu;
use cust::CudaFlags;

use super::{check_range, kernels, ArenaRange, Device, Kernel, LaunchCfg, TensorMap, TensorMapSpec};
use crate::error::{Error, Result};
use crate::plan::Plan;

/// A byte image with the alignment the driver expects of a fatbin.
#[repr(C, align(16))]
pub(crate) struct Aligned<T: ?Sized>(pub T);

// ARCH and MODULES, written by build.rs.
include!(concat!(env!("OUT_DIR"), "/cuda_modules.rs"));

/// What ptxas reported (`-Xptxas -v`) for every embedded kernel: registers, shared memory,
/// stack frame and spills. tests/gpu_ptxas.rs fails on any spill or local memory.
pub const PTXAS_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/ptxas-report.txt"));

extern "C" {
    // The driver's tensor map encoder (CUDA 12.0+; cust 0.3.2 predates it), from the libcuda
    // cust links. Enumerations as plain integers: data type, interleave, swizzle, L2
    // promotion and out-of-bounds fill.
    fn cuTensorMapEncodeTiled(
        tensor_map: *mut TensorMap,
        data_type: u32,
        rank: u32,
        global_address: *mut c_void,
        global_dim: *const u64,
        global_strides: *const u64,
        box_dim: *const u32,
        element_strides: *const u32,
        interleave: u32,
        swizzle: u32,
        l2_promotion: u32,
        oob_fill: u32,
    ) -> u32;
}
const CU_TENSOR_MAP_DATA_TYPE_FLOAT16: u32 = 6;
const CU_TENSOR_MAP_INTERLEAVE_NONE: u32 = 0;
const CU_TENSOR_MAP_SWIZZLE_128B: u32 = 3;
const CU_TENSOR_MAP_L2_PROMOTION_L2_256B: u32 = 3;
/// Out-of-bounds elements read as zero.
const CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: u32 = 0;

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::gpu("CUDA call", format!("{what}: {e:?}"))
}

fn check(what: &str, r: cu::CUresult) -> Result<()> {
    if r == cu::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(cuda_err(what, r))
    }
}

/// A CUDA GPU holding one arena; see the module documentation.
pub struct CudaDevice {
    // Declaration order is drop order: the context goes last.
    functions: Vec<cu::CUfunction>,
    /// Per kernel (table order): the dynamic shared memory it was opted in to.
    max_dyn_smem: Vec<u32>,
    stream: Stream,
    _arena: DeviceBuffer<u8>,
    base: u64,
    bytes: usize,
    _modules: Vec<Module>,
    name: String,
    /// Launches issued or recorded so far ([`Device::launches`]).
    launches: std::sync::atomic::AtomicU64,
    multiprocessors: u32,
    /// [`Device::gemm_sm90`].
    sm90: std::cell::Cell<bool>,
    _context: Context,
}

impl CudaDevice {
    /// The first GPU with `plan`'s arena allocated on it, or `None` when the driver reports
    /// no device (for example the driver library of a machine without a GPU).
    pub fn open(plan: &Plan) -> Result<Option<Self>> {
        Self::open_ordinal(plan, 0)
    }

    /// GPU `ordinal` (as the driver numbers them, after `CUDA_VISIBLE_DEVICES`) with `plan`'s
    /// arena allocated on it; `None` when the driver reports no device at all, an error
    /// naming the ordinal and the count when there are devices but not that one. The device's
    /// primary context becomes current on the calling thread, which is the thread that must
    /// use the device: one thread per device for several GPUs in one process.
    pub fn open_ordinal(plan: &Plan, ordinal: usize) -> Result<Option<Self>> {
        match cust::init(CudaFlags::empty()) {
            Ok(()) => {}
            Err(CudaError::NoDevice) => return Ok(None),
            Err(e) => return Err(cuda_err("cuInit", e)),
        }
        let count = CuDevice::num_devices().map_err(|e| cuda_err("cuDeviceGetCount", e))?;
        if count == 0 {
            return Ok(None);
        }
        if ordinal >= count as usize {
            return Err(Error::gpu(
                "device",
                format!(
                    "there is no CUDA device {ordinal}: the driver reports {count} device{}{}",
                    if count == 1 { " (ordinal 0)".to_string() } else { format!("s (ordinals 0 to {})", count - 1) },
                    match std::env::var("CUDA_VISIBLE_DEVICES") {
                        Ok(v) => format!(", numbered after CUDA_VISIBLE_DEVICES={v}"),
                        Err(_) => String::new(),
                    }
                ),
            ));
        }
        let device = CuDevice::get_device(ordinal as u32).map_err(|e| cuda_err("cuDeviceGet", e))?;
        let attr = |a| device.get_attribute(a).map_err(|e| cuda_err("cuDeviceGetAttribute", e));
        let (major, minor) =
            (attr(DeviceAttribute::ComputeCapabilityMajor)?, attr(DeviceAttribute::ComputeCapabilityMinor)?);
        let multiprocessors = attr(DeviceAttribute::MultiprocessorCount)?.max(1) as u32;
        // The Hopper GEMM's module holds wgmma code only when built for sm_90a (build.rs), and
        // runs only on an sm_90 GPU.
        let sm90 = major == 9 && ARCH == "90" && !super::emu::gemm_forced_wmma();
        let gpu = device.name().map_err(|e| cuda_err("cuDeviceGetName", e))?;
        let context = Context::new(device).map_err(|e| cuda_err("cuDevicePrimaryCtxRetain", e))?;
        let stream = Stream::new(StreamFlags::NON_BLOCKING, None).map_err(|e| cuda_err("cuStreamCreate", e))?;

        let mut modules = Vec::with_capacity(MODULES.len());
        for (name, image) in MODULES {
            let m = Module::from_fatbin(&image.0, &[]).map_err(|e| {
                cuda_err(
                    &format!("loading kernels/{name}.cu (built for sm_{ARCH}, set ICDIT_CUDA_ARCH) on {gpu} (sm_{major}{minor})"),
                    e,
                )
            })?;
            modules.push(m);
        }
        let mut functions = Vec::with_capacity(kernels::ALL.len());
        for k in kernels::ALL {
            let index = MODULES.iter().position(|(name, _)| *name == k.module).ok_or_else(|| {
                Error::gpu("CUDA kernels", format!("{}: no module kernels/{}.cu was built", k.name, k.module))
            })?;
            let f = modules[index]
                .get_function(k.name)
                .map_err(|e| cuda_err(&format!("resolving {} in kernels/{}.cu", k.name, k.module), e))?;
            functions.push(f.to_raw());
        }
        // Opt every kernel in to all the dynamic shared memory this GPU gives a block beside
        // the kernel's static shared memory (above 48 KiB needs it: the GEMM's pipeline).
        let mut optin = 0i32;
        // SAFETY: plain attribute queries and settings on a valid device and loaded functions.
        check("cuDeviceGetAttribute(MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)", unsafe {
            cu::cuDeviceGetAttribute(
                &mut optin,
                cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                device.as_raw(),
            )
        })?;
        let mut max_dyn_smem = Vec::with_capacity(functions.len());
        for (k, &f) in kernels::ALL.iter().zip(&functions) {
            let mut fixed = 0i32;
            check(&format!("cuFuncGetAttribute(SHARED_SIZE_BYTES) of {}", k.name), unsafe {
                cu::cuFuncGetAttribute(&mut fixed, cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, f)
            })?;
            let dynamic = (optin - fixed).max(0);
            check(&format!("cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES = {dynamic}) of {}", k.name), unsafe {
                cu::cuFuncSetAttribute(
                    f,
                    cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    dynamic,
                )
            })?;
            max_dyn_smem.push(dynamic as u32);
        }

        let bytes = plan.total_bytes().max(256);
        let (free, total) = cust::memory::mem_get_info().map_err(|e| cuda_err("cuMemGetInfo", e))?;
        if bytes > free {
            let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
            return Err(Error::gpu(
                "device memory",
                format!(
                    "{gpu} has {:.1} MiB free of {:.1} MiB; the arena needs {:.1} MiB:\n{plan}",
                    mib(free),
                    mib(total),
                    mib(bytes)
                ),
            ));
        }
        // SAFETY: device memory of u8 has no invalid bit patterns; it is written before read.
        let arena = unsafe { DeviceBuffer::<u8>::uninitialized(bytes) }
            .map_err(|e| cuda_err(&format!("allocating the {bytes}-byte arena on {gpu}"), e))?;
        let base = arena.as_device_ptr().as_raw();
        Ok(Some(CudaDevice {
            functions,
            max_dyn_smem,
            stream,
            _arena: arena,
            base,
            bytes,
            _modules: modules,
            name: format!("{gpu} (sm_{major}{minor}, kernels for sm_{ARCH})"),
            launches: std::sync::atomic::AtomicU64::new(0),
            multiprocessors,
            sm90: std::cell::Cell::new(sm90),
            _context: context,
        }))
    }
}

impl Device for CudaDevice {
    type Event = Event;

    fn name(&self) -> &str {
        &self.name
    }

    fn arena(&self) -> ArenaRange {
        ArenaRange { base: self.base, bytes: self.bytes }
    }

    fn upload_bytes(&self, dst: u64, src: &[u8]) -> Result<()> {
        check_range(self.arena(), dst, src.len())?;
        // SAFETY: the range lies inside the arena; `src` outlives the copy (we wait for it).
        let r = unsafe { cu::cuMemcpyHtoDAsync_v2(dst, src.as_ptr().cast(), src.len(), self.stream.as_inner()) };
        check("cuMemcpyHtoDAsync", r)?;
        self.synchronize()
    }

    fn download_bytes(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        check_range(self.arena(), src, dst.len())?;
        // SAFETY: the range lies inside the arena; `dst` outlives the copy (we wait for it).
        let r = unsafe { cu::cuMemcpyDtoHAsync_v2(dst.as_mut_ptr().cast(), src, dst.len(), self.stream.as_inner()) };
        check("cuMemcpyDtoHAsync", r)?;
        self.synchronize()
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| cuda_err("cuStreamSynchronize (errors of earlier launches show here)", e))
    }

    fn record_event(&self) -> Result<Event> {
        let e = Event::new(EventFlags::DEFAULT).map_err(|e| cuda_err("cuEventCreate", e))?;
        e.record(&self.stream).map_err(|e| cuda_err("cuEventRecord", e))?;
        Ok(e)
    }

    fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f32> {
        end.synchronize().map_err(|e| cuda_err("cuEventSynchronize", e))?;
        end.elapsed_time_f32(start).map_err(|e| cuda_err("cuEventElapsedTime", e))
    }

    unsafe fn launch(&self, kernel: &'static Kernel, cfg: &LaunchCfg, args: &[*mut c_void]) -> Result<()> {
        cfg.check(kernel)?;
        self.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let f = *self
            .functions
            .get(kernel.id)
            .ok_or_else(|| Error::invalid("kernel launch", format!("{} is not in the kernel table", kernel.name)))?;
        if cfg.dyn_smem > self.max_dyn_smem[kernel.id] {
            return Err(Error::invalid(
                "kernel launch",
                format!(
                    "{}: {} bytes of dynamic shared memory, but {} gives it at most {}",
                    kernel.name, cfg.dyn_smem, self.name, self.max_dyn_smem[kernel.id]
                ),
            ));
        }
        let ([gx, gy, gz], [bx, by, bz]) = (cfg.grid, cfg.block);
        // SAFETY: `f` was resolved from a loaded module; `args` holds one pointer per kernel
        // parameter (the caller's contract), which the driver reads before returning.
        let r = unsafe {
            cu::cuLaunchKernel(
                f,
                gx,
                gy,
                gz,
                bx,
                by,
                bz,
                cfg.dyn_smem,
                self.stream.as_inner(),
                args.as_ptr() as *mut *mut c_void,
                ptr::null_mut(),
            )
        };
        check(kernel.name, r)
    }

    fn memory_info(&self) -> Option<(usize, usize)> {
        cust::memory::mem_get_info().ok()
    }

    fn multiprocessors(&self) -> u32 {
        self.multiprocessors
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
        let mut map = TensorMap([0; 16]);
        let dims = [spec.cols, spec.rows];
        let strides = [spec.stride * 2];
        let boxes = [spec.box_cols, spec.box_rows];
        let element_strides = [1u32, 1];
        // SAFETY: every pointer is to a live local array of the length the rank (2) implies.
        let r = unsafe {
            cuTensorMapEncodeTiled(
                &mut map,
                CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                2,
                spec.addr as *mut c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                element_strides.as_ptr(),
                CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if r != 0 {
            return Err(Error::gpu("CUDA call", format!("cuTensorMapEncodeTiled({spec:?}): CUresult {r}")));
        }
        Ok(map)
    }

    fn launches(&self) -> u64 {
        self.launches.load(std::sync::atomic::Ordering::Relaxed)
    }

    type Graph = CudaGraph;

    fn begin_capture(&self) -> Result<()> {
        // SAFETY: the stream is valid; thread-local mode keeps other threads' CUDA calls out.
        let r = unsafe {
            cu::cuStreamBeginCapture_v2(
                self.stream.as_inner(),
                cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        };
        check("cuStreamBeginCapture", r)
    }

    fn end_capture(&self) -> Result<CudaGraph> {
        let mut graph: cu::CUgraph = ptr::null_mut();
        // SAFETY: the stream is capturing (or the call reports that it is not).
        check("cuStreamEndCapture", unsafe { cu::cuStreamEndCapture(self.stream.as_inner(), &mut graph) })?;
        let mut exec: cu::CUgraphExec = ptr::null_mut();
        // SAFETY: `graph` was just captured.
        let r = unsafe { cu::cuGraphInstantiateWithFlags(&mut exec, graph, 0) };
        if let Err(e) = check("cuGraphInstantiateWithFlags", r) {
            // SAFETY: the graph is ours and not instantiated.
            unsafe { cu::cuGraphDestroy(graph) };
            return Err(e);
        }
        Ok(CudaGraph { graph, exec, stream: self.stream.as_inner() })
    }

    fn launch_graph(&self, graph: &CudaGraph) -> Result<()> {
        if graph.stream != self.stream.as_inner() {
            return Err(Error::gpu("graph launch", "the graph was recorded on another device"));
        }
        // SAFETY: `exec` is an instantiated graph of this device's context.
        check("cuGraphLaunch", unsafe { cu::cuGraphLaunch(graph.exec, self.stream.as_inner()) })
    }
}

/// An instantiated CUDA graph, destroyed with its template on drop.
pub struct CudaGraph {
    graph: cu::CUgraph,
    exec: cu::CUgraphExec,
    stream: cu::CUstream,
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: both handles were created by `end_capture` and are destroyed once.
        unsafe {
            cu::cuGraphExecDestroy(self.exec);
            cu::cuGraphDestroy(self.graph);
        }
    }
}
