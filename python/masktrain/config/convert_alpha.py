"""The settings of ``masktrain convert-alpha``, checked when built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from masktrain.config.dataset import normalize_caption_extension
from masktrain.errors import FlagError


@dataclass(frozen=True)
class ConvertAlphaConfig:
    image_directory: Path
    """Images to convert."""
    mask_directory: Path
    """Mask files, matched to images by basename without extension."""
    output_directory: Path
    """Destination of the ``{stem}.png`` RGBA files; created when missing (not in a dry run)."""
    caption_directory: Path | None = None
    """Where captions are read from; ``None`` means the image directory."""
    caption_extension: str = ".txt"
    """Extension of caption files, with its dot (``txt`` means ``.txt``)."""
    dry_run: bool = False
    """Report what would be merged and write nothing."""
    skip_existing: bool = False
    """Leave images whose output already exists alone."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "caption_extension", normalize_caption_extension(self.caption_extension))
        if self.mask_directory.resolve() == self.image_directory.resolve():
            raise FlagError(
                f"--mask_directory is the same as --image_directory ({self.image_directory}): every image "
                "would be its own mask; point it at the folder of masks"
            )
        output = self.output_directory.resolve()
        for flag, source in (
            ("--image_directory", self.image_directory),
            ("--mask_directory", self.mask_directory),
        ):
            if output == source.resolve():
                raise FlagError(
                    f"--output_directory {self.output_directory} is the same as {flag}: the RGBA files "
                    "would overwrite the originals; choose another output directory"
                )
