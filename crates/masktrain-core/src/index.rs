//! Basename index of a directory: O(1) lookup by stem, extensions matched case-insensitively,
//! and two files with one stem reported with both paths instead of one kept at random.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// File extensions (lower case) the decoders read.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];

pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|known| e.eq_ignore_ascii_case(known)))
}

/// macOS's AppleDouble files (`._photo.png`, resource forks copied onto non-Mac disks) carry an
/// image extension but no image: every listing skips them.
pub fn is_apple_double(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("._"))
}

/// The stem used to pair an image with its mask: the file name without its last extension.
pub fn stem_of(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Image files directly inside `dir` (not recursive, AppleDouble files left out), sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if is_image_path(&path) && !is_apple_double(&path) && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

#[derive(Clone, Debug, Default)]
pub struct MaskIndex {
    by_stem: HashMap<String, PathBuf>,
    duplicates: HashMap<String, (PathBuf, PathBuf)>,
}

impl MaskIndex {
    pub fn build(dir: &Path) -> Result<Self> {
        Ok(Self::from_paths(list_images(dir)?))
    }

    pub fn from_paths(paths: Vec<PathBuf>) -> Self {
        let mut index = MaskIndex::default();
        for path in paths {
            let stem = stem_of(&path);
            if let Some(first) = index.by_stem.get(&stem) {
                index.duplicates.entry(stem).or_insert_with(|| (first.clone(), path));
            } else {
                index.by_stem.insert(stem, path);
            }
        }
        index
    }

    /// The mask for `stem`; an error naming both files when two share the stem.
    pub fn get(&self, stem: &str) -> Result<Option<&Path>> {
        if let Some((first, second)) = self.duplicates.get(stem) {
            return Err(Error::DuplicateMask {
                stem: stem.to_string(),
                first: first.clone(),
                second: second.clone(),
            });
        }
        Ok(self.by_stem.get(stem).map(PathBuf::as_path))
    }

    pub fn len(&self) -> usize {
        self.by_stem.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_stem.is_empty()
    }

    /// Stems held by more than one file, sorted, each with two of its paths.
    pub fn duplicates(&self) -> Vec<(String, PathBuf, PathBuf)> {
        let mut out: Vec<_> =
            self.duplicates.iter().map(|(s, (a, b))| (s.clone(), a.clone(), b.clone())).collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_by_stem_case_insensitive_extensions_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.png", "b.JPG", "c.Jpeg", "c.png", "notes.txt", "d.tiff", "é.webp"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let index = MaskIndex::build(dir.path()).unwrap();
        assert_eq!(index.get("a").unwrap().unwrap(), dir.path().join("a.png"));
        assert_eq!(index.get("b").unwrap().unwrap(), dir.path().join("b.JPG"));
        assert_eq!(index.get("é").unwrap().unwrap(), dir.path().join("é.webp"));
        assert!(index.get("notes").unwrap().is_none());
        assert!(index.get("d").unwrap().is_none());
        let err = index.get("c").unwrap_err().to_string();
        assert!(err.contains("c.Jpeg") && err.contains("c.png"), "{err}");
        assert_eq!(index.duplicates().len(), 1);
    }

    #[test]
    fn apple_double_files_are_not_images() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.png", "._a.png", "._b.jpg"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(list_images(dir.path()).unwrap(), vec![dir.path().join("a.png")]);
        let index = MaskIndex::build(dir.path()).unwrap();
        assert_eq!(index.len(), 1);
        assert!(index.get("._a").unwrap().is_none());
    }

    #[test]
    fn missing_directory_is_not_found() {
        let err = MaskIndex::build(Path::new("/nonexistent/masks")).unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }));
    }
}
