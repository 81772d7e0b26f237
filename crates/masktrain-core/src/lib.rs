//! masktrain-core: the pixel work of masked LoRA training, in pure Rust.
//!
//! Decoding (PNG, JPEG, WebP, BMP; EXIF orientation; alpha from every mode that carries it),
//! mask files (PIL-exact Rec.601 luma, 16-bit kept), a basename index for pairing masks with
//! images, bucket geometry, resize kernels that reproduce OpenCV INTER_AREA, PIL LANCZOS and
//! pixel-centre nearest, the latent-grid area downsample of torch, mask frames pooled as the
//! video VAE groups frames, and parallel batch jobs.
//! It knows nothing of Python or torch.

pub mod atomic;
pub mod convert;
pub mod decode;
pub mod error;
pub mod geometry;
pub mod index;
mod jpeg_end;
pub mod latent;
pub mod luma;
pub mod media;
pub mod plane;
pub mod pool;
pub mod prepare;
pub mod resize;
pub mod temporal;

pub use error::{Error, Result};
pub use plane::{Mask, Plane};
