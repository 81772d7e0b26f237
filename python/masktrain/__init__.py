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

ANNOUNCEMENT = {"masktrain_announcement": True}
"""The ``extra`` of a log record meant for the user's screen as it is, such as the mask-loss banner:
the command line prints it on stdout without a level (``cli._configure_logging``)."""

__all__ = [
    "ANNOUNCEMENT",
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
