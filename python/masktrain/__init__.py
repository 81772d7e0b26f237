"""masktrain: LoRA training for diffusion transformers with a weighted mask loss.

The pixel work (decode, alpha, masks, bucket resize, latent-grid masks) is done by the Rust core,
exposed as :mod:`masktrain._native` and imported by the modules that need it, never here.
Importing this package imports neither torch nor the extension.
"""

from masktrain.errors import (
    AspectMismatchError,
    DataError,
    DuplicateMaskError,
    ImageDecodeError,
    ImageTooLargeError,
    Interrupted,
    MaskTrainError,
    MissingMaskError,
    SettingError,
    UnsupportedFormatError,
)

__version__ = "0.1.0"

__all__ = [
    "AspectMismatchError",
    "DataError",
    "DuplicateMaskError",
    "ImageDecodeError",
    "ImageTooLargeError",
    "Interrupted",
    "MaskTrainError",
    "MissingMaskError",
    "SettingError",
    "UnsupportedFormatError",
    "__version__",
]
