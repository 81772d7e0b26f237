"""Every error masktrain raises on purpose, in one tree, and the exit code of each.

``MaskTrainError`` (a ``ValueError``, so ``except ValueError`` still catches it) is the root.
Below it sit two families, and the CLI's exit code follows the family:

- :class:`SettingError` (exit 2): a flag, a TOML key or a weights path that cannot work. The run
  stops before anything heavy happens; the message names the flag, the key or the file.
- :class:`DataError` (exit 1): an item or a file that cannot be used (a corrupt image, a mask of
  another aspect ratio, a damaged cache file, a dataset not cached yet). The message names the
  file and what to do.

Interruption is not an error of the input: :class:`Interrupted` (Ctrl-C, after the checkpoint
is saved) has its own base, not a ``ValueError``, and exits with 130.

The classes the native core raises (``ImageDecodeError`` and its siblings) are defined here
too; the compiled extension imports them (``pyo3::import_exception!``), so importing this module
(or :mod:`masktrain.config`) needs neither the extension nor torch. I/O failures are the
built-in ``FileNotFoundError`` / ``PermissionError`` / ``OSError``.
"""

from __future__ import annotations

from pathlib import Path


class MaskTrainError(ValueError):
    """Base class of every masktrain error; the message is one line naming its source."""


class SettingError(MaskTrainError):
    """A flag, a config key or a weights path that cannot work (exit code 2)."""


class DataError(MaskTrainError):
    """An input item or file that cannot be used (exit code 1)."""


# --- settings -------------------------------------------------------------------------------------


class ConfigError(SettingError):
    """The dataset TOML is invalid; the message names the file, the table and the key."""


class FlagError(SettingError):
    """A command-line flag whose value (or combination with another flag) cannot work."""


class TrainConfigError(FlagError):
    """A ``masktrain train`` flag that cannot work; the message names the flag."""


class CacheConfigError(FlagError):
    """A ``masktrain cache`` flag that cannot work; the message names the flag."""


class MaskOptionError(FlagError):
    """A mask flag has a value that cannot work; the message names the flag."""


class MissingMaskWeightsError(MaskOptionError):
    """``--use_mask_loss`` is on but a batch arrived without mask weights (the guide's FATAL):
    the flag asks for masks the cache does not have."""


class TimestepOptionError(FlagError):
    """A timestep flag has a value that cannot work; the message names the flag."""


class OptimConfigError(FlagError):
    """An optimizer or schedule flag that cannot work; the message names the flag."""


class LoraTargetError(FlagError):
    """The LoRA target patterns are invalid or select no Linear layer."""


class CacheModeMismatch(FlagError):
    """A cache made for another conditioned mode (``--task`` / ``--one_frame``) than the run's."""


class SamplePromptError(SettingError):
    """A ``--sample_prompts`` file that cannot be used; the message names the file and the line."""


class ModelLoadError(SettingError):
    """A weights flag points at something we cannot load; the message names the flag and path."""


class ShapeRuleError(ModelLoadError):
    """A weights file's tensor shapes do not determine the model's config; the message says what
    to pass. Raised by a family's config rule, which does not know the file: reading a file
    (``models.weights_file``) re-raises it as a ``ModelLoadError`` naming the flag and path."""


class MissingTensor(ShapeRuleError):
    """A tensor a config rule needs is absent (its name is the first argument): the file is not a
    complete model."""


class LoraFileError(SettingError):
    """A LoRA file that masktrain cannot load back (not one of its files, or another model's)."""


# --- data -----------------------------------------------------------------------------------------


class ImageDecodeError(DataError):
    """An image file is empty, truncated or corrupt."""


class UnsupportedFormatError(DataError):
    """A file is not a PNG, JPEG, WebP or BMP image."""


class ImageTooLargeError(DataError):
    """An image has more pixels than the limit (decompression bomb guard)."""


class AspectMismatchError(DataError):
    """A mask's aspect ratio differs from its image's (or video's) by more than 1%."""


class DuplicateMaskError(DataError):
    """Two mask files share one basename."""


class MissingMaskError(DataError):
    """``require_mask`` is set and an item has no mask."""


class VideoDecodeError(DataError):
    """A video that cannot be used: empty, unreadable, corrupt, without a video stream, or too
    short for any clip; the message names the file."""


class CacheFileError(DataError):
    """A cache file that exists but cannot be used: unreadable, or without masktrain's metadata."""


class CacheArchMismatch(CacheFileError):
    """A cache file made for another architecture than the run's."""


class CacheSourceCollision(CacheFileError):
    """A cache file made for another item that still exists: two datasets share a cache folder."""


class CachedDataError(DataError):
    """The cache cannot be trained on as it is; the message says which file and what to run."""


class TrainingDivergedError(MaskTrainError):
    """The loss or the gradients became non-finite: the run stops before anything is saved."""


# --- interruption ---------------------------------------------------------------------------------


class Interrupted(Exception):
    """The user stopped the run (Ctrl-C); what was done is saved. Not a ``ValueError``: nothing
    was wrong with the input."""


class TrainingInterrupted(Interrupted):
    """Raised after the checkpoint of an interrupted training run is saved."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"interrupted; resume with --resume {checkpoint}")
        self.checkpoint = checkpoint


#: Exit code by class; the most specific class in an error's MRO decides.
EXIT_CODES: dict[type[BaseException], int] = {
    SettingError: 2,
    DataError: 1,
    MaskTrainError: 1,
    Interrupted: 130,
}


def exit_code(error: BaseException) -> int:
    """The CLI exit code of `error` (1 for anything the table does not name)."""
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1
