//! A fixed pool of worker threads that runs one closure on every thread and waits for all
//! of them, without allocating per dispatch (the closure is borrowed, never boxed).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = dyn Fn(usize) + Sync;

/// A borrowed job pointer with its lifetime erased; valid while `run` waits for it.
#[derive(Clone, Copy)]
struct JobPtr(*const Job);
// SAFETY: the pointee is `Sync`, and `run` keeps it alive until every worker is done.
unsafe impl Send for JobPtr {}

struct State {
    generation: u64,
    job: Option<JobPtr>,
    remaining: usize,
    panicked: bool,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    done: Condvar,
}

/// `threads` workers counting the caller: `run(f)` calls `f(0)` on the caller and
/// `f(1..threads)` on the workers.
pub struct ThreadPool {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    threads: usize,
}

impl ThreadPool {
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State { generation: 0, job: None, remaining: 0, panicked: false, shutdown: false }),
            work: Condvar::new(),
            done: Condvar::new(),
        });
        let mut pool = ThreadPool { shared, handles: Vec::with_capacity(threads - 1), threads };
        for tid in 1..threads {
            let shared = Arc::clone(&pool.shared);
            let handle =
                std::thread::Builder::new().name(format!("icdit-cpu-{tid}")).spawn(move || worker(&shared, tid))?;
            pool.handles.push(handle);
        }
        Ok(pool)
    }

    /// Threads that take part in each `run`, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Splits `0..total` into one contiguous range per thread and runs `f` on each (on the
    /// caller alone when the work is too small to be worth waking the workers).
    pub fn par(&self, total: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
        let threads = self.threads;
        if total < 64 || threads == 1 {
            f(0..total);
        } else {
            self.run(&|tid| f(split(total, threads, tid, 1)));
        }
    }

    /// Runs `f(tid)` for every `tid` in `0..threads()` and returns when all have finished.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 {
            f(0);
            return;
        }
        // SAFETY: only the lifetime is erased; we do not return before `remaining` is 0,
        // i.e. before every worker has stopped using the pointer.
        let ptr =
            JobPtr(unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const Job>(f as *const _) });
        {
            let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            s.job = Some(ptr);
            s.generation = s.generation.wrapping_add(1);
            s.remaining = self.threads - 1;
            self.shared.work.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.remaining > 0 {
            s = self.shared.done.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.job = None;
        let worker_panicked = std::mem::replace(&mut s.panicked, false);
        drop(s);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        assert!(!worker_panicked, "a CPU worker thread panicked");
    }
}

fn worker(shared: &Shared, tid: usize) {
    let mut seen = 0u64;
    loop {
        let job = {
            let mut s = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            while s.generation == seen && !s.shutdown {
                s = shared.work.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            if s.shutdown {
                return;
            }
            seen = s.generation;
            s.job
        };
        let ok = match job {
            // SAFETY: `run` keeps the closure alive until `remaining` reaches 0 below.
            Some(JobPtr(f)) => catch_unwind(AssertUnwindSafe(|| unsafe { (*f)(tid) })).is_ok(),
            None => true,
        };
        let mut s = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        s.panicked |= !ok;
        s.remaining -= 1;
        if s.remaining == 0 {
            shared.done.notify_one();
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        {
            let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            s.shutdown = true;
            self.shared.work.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The `part`-th of `parts` nearly equal pieces of `0..total`, each a multiple of `align`
/// (except possibly the last).
pub fn split(total: usize, parts: usize, part: usize, align: usize) -> std::ops::Range<usize> {
    let units = total.div_ceil(align);
    let (lo, hi) = (units * part / parts, units * (part + 1) / parts);
    (lo * align).min(total)..(hi * align).min(total)
}

/// A raw pointer that may cross threads; each thread writes a disjoint region through it.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut f32);

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `SendPtr`, which is `Sync`).
    #[inline(always)]
    pub fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: users only write disjoint ranges from different threads (checked by construction
// at each call site), and the pointee outlives the `run` call.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
