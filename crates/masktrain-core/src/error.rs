//! One error type for the core. Every variant names the file (or the stem) it is about,
//! so the binding can raise a one-line Python error that tells the user what to fix.

use std::path::{Path, PathBuf};

use crate::media::{Media, UnknownMedia};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: file not found")]
    NotFound { path: PathBuf },

    #[error("{path}: permission denied")]
    PermissionDenied { path: PathBuf },

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: file is empty (0 bytes)")]
    EmptyFile { path: PathBuf },

    #[error("{path}: not a supported image (PNG, JPEG, WebP or BMP expected)")]
    UnsupportedFormat { path: PathBuf },

    #[error("{path}: cannot decode image, the file is truncated or corrupt ({reason})")]
    Decode { path: PathBuf, reason: String },

    #[error(
        "{path}: image is {width}x{height} = {pixels} pixels, over the limit of {limit} \
         (possible decompression bomb; raise pixel_limit if the image is genuine)"
    )]
    TooLarge { path: PathBuf, width: u32, height: u32, pixels: u64, limit: u64 },

    #[error(
        "{mask}{}: aspect ratio mismatch: {} is {source_w}x{source_h} (aspect {source_aspect:.4}), \
         mask is {mask_w}x{mask_h} (aspect {mask_aspect:.4}); {}",
        if *.default_mask { " (the dataset's default_mask)" } else { "" },
        source_name(.media, .source_path),
        if *.default_mask {
            "the mask would be misaligned: give this item its own mask or use a default_mask of its aspect"
        } else {
            "the mask would be misaligned, fix its size"
        }
    )]
    AspectMismatch {
        /// What the mask belongs to, so a video's mask says "video" in the message.
        media: Media,
        /// The image or video file; `None` when the caller has only its size.
        source_path: Option<PathBuf>,
        mask: PathBuf,
        source_w: u32,
        source_h: u32,
        mask_w: u32,
        mask_h: u32,
        source_aspect: f64,
        mask_aspect: f64,
        /// The mask is the dataset's `default_mask`, not the item's own.
        default_mask: bool,
    },

    #[error("duplicate mask basename '{stem}': {first} and {second}; keep one of them")]
    DuplicateMask { stem: String, first: PathBuf, second: PathBuf },

    #[error(
        "{path}: require_mask=true but no mask found (no alpha channel, no mask_path, no matching file in \
         mask_directory, no default_mask)"
    )]
    MissingMask { path: PathBuf },

    #[error(
        "{frames} mask frames cannot be pooled onto latent frames: a VAE that groups \
         {temporal_factor} frames takes 1 + {temporal_factor}*m of them ({})",
        nearest_frame_counts(*.frames, *.temporal_factor)
    )]
    FrameCount { frames: usize, temporal_factor: u32 },

    #[error("{path}: cannot encode PNG ({reason})")]
    Encode { path: PathBuf, reason: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// "image a.png" / "video clip.mp4", or the media word alone when the file is not known.
fn source_name(media: &Media, path: &Option<PathBuf>) -> String {
    match path {
        Some(path) => format!("{media} {}", path.display()),
        None => media.to_string(),
    }
}

/// The valid clip lengths around `frames` for a `temporal_factor`-frame grouping.
fn nearest_frame_counts(frames: usize, temporal_factor: u32) -> String {
    let t = temporal_factor.max(1) as usize;
    let below = 1 + frames.saturating_sub(1) / t * t;
    format!("{below} or {} would do", below + t)
}

impl Error {
    /// Classify an I/O error on `path`, keeping "not found" and "permission denied"
    /// distinct because Python maps them to their own built-in exceptions.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        let path = path.to_path_buf();
        match source.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound { path },
            std::io::ErrorKind::PermissionDenied => Error::PermissionDenied { path },
            _ => Error::Io { path, source },
        }
    }
}

impl From<UnknownMedia> for Error {
    fn from(error: UnknownMedia) -> Self {
        Error::InvalidArgument(error.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
