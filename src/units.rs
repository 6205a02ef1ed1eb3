//! Byte counts as people read them (`1.50 GiB`), for memory plans and the errors that
//! quote them. A leaf module: [`crate::error`] formats with it, so it depends on nothing.

/// Bytes as a short human-readable size.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}
