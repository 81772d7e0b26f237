//! Atomic file writes: write a hidden temporary file beside the target, flush it, rename it over
//! the target and flush the folder, so readers only ever see a complete file or none (the same
//! rule as Python's `masktrain.atomic`).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Suffix of temporary files; a later run may delete leftovers of a killed one by this suffix.
pub const TEMP_SUFFIX: &str = ".masktrain-tmp";

pub fn temp_path_for(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let unique = format!(".{name}.{}.{:?}{TEMP_SUFFIX}", std::process::id(), std::thread::current().id());
    let unique: String = unique.chars().filter(|c| !matches!(c, '(' | ')')).collect();
    target.with_file_name(unique)
}

/// Write `bytes` to `target` atomically.
pub fn write_atomic(target: &Path, bytes: &[u8]) -> Result<()> {
    let temp = temp_path_for(target);
    let result = (|| {
        let mut file = std::fs::File::create(&temp).map_err(|e| Error::io(&temp, e))?;
        file.write_all(bytes).map_err(|e| Error::io(&temp, e))?;
        // Data first, then the name: without the sync a power cut after the rename can leave
        // the target naming blocks that were never written (an empty or garbage file).
        file.sync_all().map_err(|e| Error::io(&temp, e))?;
        std::fs::rename(&temp, target).map_err(|e| Error::io(target, e))?;
        // And the folder, so the rename itself survives a power cut.
        let folder = match target.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        std::fs::File::open(folder).and_then(|dir| dir.sync_all()).map_err(|e| Error::io(folder, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Copy `source` to `target` atomically.
pub fn copy_atomic(source: &Path, target: &Path) -> Result<()> {
    let bytes = std::fs::read(source).map_err(|e| Error::io(source, e))?;
    write_atomic(target, &bytes)
}
