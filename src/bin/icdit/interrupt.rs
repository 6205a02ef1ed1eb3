//! Ctrl-C: the first SIGINT only sets a flag, which the sampling engine checks before each
//! step, so the command stops between steps, writes nothing partial, and says what it had
//! finished (exit status 130). A second Ctrl-C ends the process at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// The flag the first Ctrl-C sets.
pub fn flag() -> Arc<AtomicBool> {
    Arc::clone(FLAG.get_or_init(|| Arc::new(AtomicBool::new(false))))
}

/// Whether Ctrl-C was pressed.
pub fn requested() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

#[cfg(unix)]
extern "C" fn on_sigint(_: libc::c_int) {
    // Only async-signal-safe work here: an atomic store (the flag exists: it is created
    // before the handler is installed) and restoring the default action.
    if let Some(f) = FLAG.get() {
        f.store(true, Ordering::Relaxed);
    }
    // SAFETY: signal() is async-signal-safe; SIG_DFL makes a second Ctrl-C end the process.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
    }
}

/// Installs the handler (once, before any long work starts).
pub fn install() {
    let _ = flag();
    #[cfg(unix)]
    // SAFETY: the handler only stores to an atomic and calls signal(), both allowed in a
    // signal handler.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
}
