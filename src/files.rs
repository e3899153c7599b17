//! File writing shared by every stage. Every result file is written atomically: into a temporary file beside
//! the target (same folder, so the rename is atomic), then renamed over it. A reader never sees a half-written
//! file, and a crash leaves the previous file intact.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The temporary path beside `target` that a final rename moves into place (for writers that stream).
pub fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
