"""masktrain: LoRA training for diffusion transformers with a weighted mask loss.

The pixel work (decode, alpha, masks, bucket resize, latent-grid masks) is done by the Rust core,
exposed as :mod:`masktrain._native`. Importing this package never imports torch.
"""

from masktrain._native import (
    AspectMismatchError,
    DuplicateMaskError,
    ImageDecodeError,
    ImageTooLargeError,
    MaskTrainError,
    MissingMaskError,
    UnsupportedFormatError,
)

__version__ = "0.1.0"

__all__ = [
    "AspectMismatchError",
    "DuplicateMaskError",
    "ImageDecodeError",
    "ImageTooLargeError",
    "MaskTrainError",
    "MissingMaskError",
    "UnsupportedFormatError",
    "__version__",
]
