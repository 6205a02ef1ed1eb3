//! Memory planning: every buffer a backend needs, named and sized from the config before
//! anything runs, laid out in one allocation (the arena) at 64-byte-aligned offsets.

use std::alloc::Layout;
use std::fmt;
use std::ptr::NonNull;

use crate::error::{Error, Result};

/// Element type of a planned buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dt {
    F32,
    F16,
    F64,
    /// 32-bit signed integers (labels and step state on the device).
    I32,
    /// Bytes (8-bit pixels on the device).
    U8,
}

impl Dt {
    pub fn size(self) -> usize {
        match self {
            Dt::F32 => 4,
            Dt::F16 => 2,
            Dt::F64 => 8,
            Dt::I32 => 4,
            Dt::U8 => 1,
        }
    }
}

/// Index of a buffer in its plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufId(usize);

/// One named buffer.
#[derive(Clone, Debug)]
pub struct Buffer {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: Dt,
    /// Byte offset in the arena.
    pub offset: usize,
}

impl Buffer {
    /// Elements; saturates instead of overflowing, so an impossible plan is refused by
    /// [`Arena::new`] rather than wrapping to a small size.
    pub fn elems(&self) -> usize {
        self.shape.iter().fold(1usize, |a, &d| a.saturating_mul(d))
    }
    pub fn bytes(&self) -> usize {
        self.elems().saturating_mul(self.dtype.size())
    }
}

const ALIGN: usize = 64;

/// The full list of buffers and the memory held outside the arena (e.g. mapped weights).
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub title: String,
    buffers: Vec<Buffer>,
    total: usize,
    outside: Vec<(String, usize)>,
}

impl Plan {
    pub fn new(title: impl Into<String>) -> Self {
        Plan { title: title.into(), ..Default::default() }
    }

    /// Adds a buffer of `shape` elements of `dtype`.
    pub fn add(&mut self, name: impl Into<String>, shape: &[usize], dtype: Dt) -> BufId {
        let offset = self.total.checked_next_multiple_of(ALIGN).unwrap_or(usize::MAX);
        let b = Buffer { name: name.into(), shape: shape.to_vec(), dtype, offset };
        self.total = offset.saturating_add(b.bytes());
        self.buffers.push(b);
        BufId(self.buffers.len() - 1)
    }

    /// Records memory the backend holds outside the arena, for the printed breakdown.
    pub fn outside(&mut self, what: impl Into<String>, bytes: usize) {
        self.outside.push((what.into(), bytes));
    }

    pub fn get(&self, id: BufId) -> &Buffer {
        &self.buffers[id.0]
    }
    pub fn buffers(&self) -> &[Buffer] {
        &self.buffers
    }
    /// Bytes of the one arena allocation.
    pub fn total_bytes(&self) -> usize {
        self.total.checked_next_multiple_of(ALIGN).unwrap_or(usize::MAX)
    }
    pub fn outside_bytes(&self) -> usize {
        self.outside.iter().fold(0usize, |a, (_, b)| a.saturating_add(*b))
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: arena {:.2} MiB in one allocation, {} buffers",
            self.title,
            mib(self.total_bytes()),
            self.buffers.len()
        )?;
        for b in &self.buffers {
            let shape = b.shape.iter().map(usize::to_string).collect::<Vec<_>>().join("×");
            let dt = match b.dtype {
                Dt::F32 => "f32",
                Dt::F16 => "f16",
                Dt::F64 => "f64",
                Dt::I32 => "i32",
                Dt::U8 => "u8",
            };
            writeln!(f, "  {:<18} {:>22} {:<3} {:>10.3} MiB", b.name, shape, dt, mib(b.bytes()))?;
        }
        for (what, bytes) in &self.outside {
            writeln!(f, "  outside the arena: {what}: {:.2} MiB", mib(*bytes))?;
        }
        Ok(())
    }
}

/// Asks Linux to back the whole 2 MiB extents of `size` bytes at `ptr` with 2 MiB pages
/// (transparent huge pages, which many systems give only on request). The CPU backend streams
/// its block caches and packed factors through every cached step: with 4 KiB pages each 64
/// cache lines cost a TLB miss and stop the hardware prefetcher at the page's end. Advice
/// only: where it is refused, nothing changes. The allocation is fresh and untouched (a
/// large zeroed allocation is mapped, not written), so the pages are huge from the start.
#[cfg(target_os = "linux")]
fn advise_huge_pages(ptr: *mut u8, size: usize) {
    const HUGE: usize = 2 << 20;
    let (start, end) = ((ptr as usize).next_multiple_of(HUGE), (ptr as usize + size) / HUGE * HUGE);
    if end > start {
        // SAFETY: the range lies inside this allocation; madvise changes only how it is backed.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

/// The one allocation a plan describes, zero-initialised.
pub struct Arena {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the arena is plain memory owned by this value.
unsafe impl Send for Arena {}

impl Arena {
    /// Allocates the plan's arena, or reports how much memory was asked for.
    pub fn new(plan: &Plan) -> Result<Self> {
        let size = plan.total_bytes().max(ALIGN);
        let layout = Layout::from_size_align(size, ALIGN)
            .map_err(|_| Error::invalid("arena size", format!("{size} bytes is not allocatable")))?;
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| {
            Error::invalid("memory", format!("not enough memory for the {:.1} MiB arena:\n{plan}", mib(size)))
        })?;
        #[cfg(target_os = "linux")]
        advise_huge_pages(ptr.as_ptr(), size);
        Ok(Arena { ptr, layout })
    }

    /// A raw pointer to an f32 buffer of the plan this arena was made from.
    pub fn f32_ptr(&self, buf: &Buffer) -> *mut f32 {
        debug_assert_eq!(buf.dtype, Dt::F32);
        debug_assert!(buf.offset + buf.bytes() <= self.layout.size());
        // SAFETY: offsets come from the plan this arena was sized for.
        unsafe { self.ptr.as_ptr().add(buf.offset).cast() }
    }

    /// A raw pointer to an f64 buffer of the plan this arena was made from.
    pub fn f64_ptr(&self, buf: &Buffer) -> *mut f64 {
        debug_assert_eq!(buf.dtype, Dt::F64);
        debug_assert!(buf.offset + buf.bytes() <= self.layout.size());
        // SAFETY: offsets come from the plan this arena was sized for (64-byte aligned).
        unsafe { self.ptr.as_ptr().add(buf.offset).cast() }
    }

    pub fn bytes(&self) -> usize {
        self.layout.size()
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}
