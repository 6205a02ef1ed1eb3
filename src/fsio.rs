//! Writing files so that a reader never sees half of one: every file goes through a
//! temporary name in the same folder (`.NAME.tmp-PID`) and a rename. A leaf module: it
//! depends on nothing in the crate but [`crate::error`].

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// reader never sees a partially written file under the final name.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp =
        temp_path(path).ok_or_else(|| Error::invalid("output path", format!("{} has no file name", path.display())))?;
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// The temporary name `path` is written under before the rename: `.NAME.tmp-PID` in the
/// same folder (so the rename stays on one file system). `None` when `path` has no file name.
pub fn temp_path(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Some(dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id())))
}

/// The final name of a temporary file a killed writer left behind (`.NAME.tmp-PID` → NAME,
/// any PID); `None` for other names.
pub fn temp_target(file_name: &str) -> Option<&str> {
    let (name, pid) = file_name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    pid.bytes().all(|b| b.is_ascii_digit()).then_some(name)
}

/// Creates `dir` if needed and proves a file can be created in it, before any long work.
pub fn check_writable_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let probe = dir.join(format!(".icdit-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| Error::io(dir, e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_round_trip() {
        let tmp = temp_path(Path::new("run/part-000000-000004.npz")).unwrap();
        assert_eq!(tmp.parent(), Some(Path::new("run")));
        let name = tmp.file_name().unwrap().to_str().unwrap();
        assert_eq!(temp_target(name), Some("part-000000-000004.npz"));
        assert_eq!(temp_path(Path::new("x.png")).unwrap().parent(), Some(Path::new(".")));
        assert_eq!(temp_path(Path::new("..")), None);
        assert_eq!(temp_target(".part-000000-000004.npz.tmp-123"), Some("part-000000-000004.npz"));
        assert_eq!(temp_target("part-000000-000004.npz"), None);
        assert_eq!(temp_target(".x.tmp-12a"), None);
    }
}
