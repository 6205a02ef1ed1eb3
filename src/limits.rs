//! Memory limits: what a piece of work will hold, itemised before anything is allocated,
//! checked against the caller's limit and against the memory the machine has available,
//! so an impossible batch fails at once with the breakdown instead of minutes later (or
//! with the process killed by the kernel).

use std::fmt::Write as _;

use crate::error::{Error, Result};
pub use crate::units::human;

/// Itemised memory of one piece of work, in bytes.
#[derive(Clone, Debug, Default)]
pub struct MemoryNeed {
    /// (what, bytes, whether it is a new allocation rather than memory already held).
    pub items: Vec<(String, u64, bool)>,
}

impl MemoryNeed {
    /// An item that will be allocated.
    pub fn alloc(&mut self, what: impl Into<String>, bytes: u64) {
        self.items.push((what.into(), bytes, true));
    }
    /// An item already held (loaded or mapped weights): counted against the caller's limit,
    /// not against the memory still available.
    pub fn held(&mut self, what: impl Into<String>, bytes: u64) {
        self.items.push((what.into(), bytes, false));
    }
    pub fn total(&self) -> u64 {
        self.items.iter().fold(0u64, |a, i| a.saturating_add(i.1))
    }
    /// Bytes still to be allocated.
    pub fn new_bytes(&self) -> u64 {
        self.items.iter().filter(|i| i.2).fold(0u64, |a, i| a.saturating_add(i.1))
    }
    pub fn extend(&mut self, other: MemoryNeed) {
        self.items.extend(other.items);
    }

    /// One line per item.
    pub fn breakdown(&self) -> String {
        let mut s = String::new();
        for (what, bytes, new) in &self.items {
            let _ = writeln!(s, "  {:>12}  {what}{}", human(*bytes), if *new { "" } else { " (already loaded)" });
        }
        let _ = write!(s, "  {:>12}  total", human(self.total()));
        s
    }

    /// Refuses when the total exceeds `limit`, or when the new allocations exceed the
    /// memory the operating system reports as available. `what` names the work.
    pub fn check(&self, what: &str, limit: Option<u64>) -> Result<()> {
        if let Some(limit) = limit {
            if self.total() > limit {
                return Err(Error::Memory {
                    what: what.to_string(),
                    need: self.total(),
                    limit,
                    limit_from: "the memory limit (--max-memory)".into(),
                    breakdown: self.breakdown(),
                });
            }
        }
        if let Some(avail) = available_memory() {
            if self.new_bytes() > avail {
                return Err(Error::Memory {
                    what: what.to_string(),
                    need: self.new_bytes(),
                    limit: avail,
                    limit_from: "the memory available on this machine (MemAvailable)".into(),
                    breakdown: self.breakdown(),
                });
            }
        }
        Ok(())
    }
}

/// `a × b × …` in bytes, saturating instead of overflowing (a saturated size is refused).
pub fn bytes_of(dims: &[usize], elem_size: usize) -> u64 {
    dims.iter().fold(elem_size as u64, |a, &d| a.saturating_mul(d as u64))
}

/// Bytes the operating system says can still be allocated without swapping (Linux
/// `MemAvailable`); `None` where that is not known.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// A size like `8G`, `512M`, `1.5GiB`, `2000000000` (bytes; K/M/G/T are powers of 1024).
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || Error::invalid("memory size", format!("`{s}`: expected a size like 8G, 512M or 1.5GiB"));
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = v * mult as f64;
    if !(1.0..1.8e19).contains(&bytes) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        for bad in ["", "G", "-1G", "1X", "0", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(human(3 << 29), "1.50 GiB");
        assert_eq!(bytes_of(&[usize::MAX, 4], 4), u64::MAX);
    }
}
