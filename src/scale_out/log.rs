//! Progress lines on stderr, each in a single write, so the lines of shards sharing a
//! terminal or log (torchrun, `srun` without `--output`) do not interleave mid-line.

use std::io::Write as _;

/// Writes `line` and a newline to stderr in one write.
pub(super) fn progress(mut line: String) {
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}
