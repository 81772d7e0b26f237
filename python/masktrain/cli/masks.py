"""``masktrain masks``: making the masks the loss reads (the guide's "Weighted Mask Pipeline")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from masktrain import tiers
from masktrain.cli.options import F, directory, flag, option
from masktrain.cli.outcome import run_job
from masktrain.config.masks import MISSING_POLICIES


@click.group("masks")
def masks() -> None:
    """Make masks: tiers from a human-parsing model, the subject's instance, both combined."""


@masks.command("tiers")
@option("input", type=directory(True), required=True, help="The images (PNG, JPEG, WebP, BMP).")
@option("output", type=directory(False), required=True, help="Where {stem}.png tiered masks go.")
@option(
    "model",
    type=click.Path(path_type=Path),
    required=True,
    help="A transformers segmentation folder (safetensors), a Sapiens TorchScript file, or 'tiny'.",
)
@option(
    "labels", default=None, help="Label table: atr, lip, sapiens or a TOML file [default: by class names]."
)
@option(
    "details",
    type=click.Choice(("face", "hair", "body", "background")),
    default=None,
    help="Region of glasses, lips, teeth, hands and gloves [default: the table's].",
)
@option("face", type=int, default=tiers.FACE, show_default=True, help="Grey value of the face.")
@option("hair", type=int, default=tiers.HAIR, show_default=True, help="Grey value of the hair.")
@option("body", type=int, default=tiers.BODY, show_default=True, help="Grey value of body, clothes, skin.")
@option("background", type=int, default=tiers.BACKGROUND, show_default=True, help="Grey value elsewhere.")
@option("batch_size", type=click.IntRange(min=1), default=4, show_default=True)
@option("device", default=None, help="Device [default: cuda when available, else cpu].")
@flag("skip_existing", "Leave masks that exist alone.")
@flag("trust_torchscript", "Allow a TorchScript --model (loading one runs code from the file).")
def tiers_command(**flags: Any) -> None:
    """Tiered masks (face, hair, body, background) from a human-parsing segmentation model."""
    from masktrain.config.masks import TiersConfig
    from masktrain.masks.tiers import run

    def job() -> bool:
        summary = run(TiersConfig(**flags))
        click.echo(summary.line())
        return bool(summary.failed)

    raise SystemExit(1 if run_job(job) else 0)


#: The reference tool's backend flags (create_instance_masks.py), refused in one line each.
_REFERENCE_ONLY = {
    "id_det_size": "InsightFace's detector size; dlib's detector needs none",
    "yolo_model": "--backend yolo is refused; pass --model (a Mask2Former / OneFormer folder)",
    "yolo_conf": "--backend yolo is refused; --person_threshold sets the person score",
    "yolo_device": "--backend yolo is refused; use --device",
    "sam3_device": "--backend sam3 is refused; use --device",
    "sam3_prompt": "--backend sam3 is refused; the person class comes from --model's labels",
    "sam3_confidence": "--backend sam3 is refused; --person_threshold sets the person score",
}


def _reference_only_flags(command: F) -> F:
    for name in reversed(_REFERENCE_ONLY):
        command = option(name, default=None, hidden=True)(command)
    return command


@masks.command("instance")
@option("input", type=directory(True), required=True, help="The (group) photos.")
@option("output", type=directory(False), required=True, help="Where {stem}.png subject masks (0/255) go.")
@option(
    "reference",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="A photo of the subject's face.",
)
@option(
    "model",
    type=click.Path(path_type=Path),
    required=True,
    help="Person instances: a transformers Mask2Former / MaskFormer / OneFormer folder (COCO), or 'tiny'.",
)
@option(
    "id_threshold",
    type=float,
    default=0.6,
    show_default=True,
    help="dlib face distance at or below which a face is the subject's.",
)
@option("person_threshold", type=float, default=0.5, show_default=True, help="Minimum person score.")
@flag("fallback_largest", "No matching face: take the largest person.")
@flag("write_empty_on_fail", "Write an all-zero mask for a photo without a result.")
@flag("skip_existing", "Leave masks that exist alone.")
@option("device", default=None, help="Device [default: cuda when available, else cpu].")
@option("backend", default=None, help="The reference tool's yolo / sam3: refused (see the error).")
@option("files", default=None, help="Only these photos: comma-separated basenames without extension.")
@_reference_only_flags
def instance_command(**flags: Any) -> None:
    """Binary masks of the subject in group photos: the person whose face matches --reference."""
    from masktrain.config.masks import InstanceConfig
    from masktrain.masks.instance import run

    for name, why in _REFERENCE_ONLY.items():
        if flags.pop(name) is not None:
            raise click.UsageError(
                f"--{name.replace('_', '-')} is the reference tool's, not masktrain's: {why}"
            )
    files = flags.pop("files")
    stems = None if files is None else tuple(s.strip() for s in files.split(",") if s.strip())

    def job() -> bool:
        summary = run(InstanceConfig(**flags, files=stems))
        click.echo(summary.line())
        return bool(summary.failed)

    raise SystemExit(1 if run_job(job) else 0)


@masks.command("apply-instance")
@option("weighted_masks", type=directory(True), required=True, help="Tiered masks (PNG, JPEG, WebP, BMP).")
@option("instance_masks", type=directory(True), required=True, help="Binary subject masks, {stem}.png.")
@option("output", type=directory(False), required=True, help="Where the subject-only masks go.")
@option(
    "dilate", type=click.IntRange(min=0), default=0, show_default=True, help="Grow the subject by N pixels."
)
@option(
    "missing",
    type=click.Choice(MISSING_POLICIES),
    default="copy",
    show_default=True,
    help="A weighted mask without an instance mask: copy it, zero it, skip it, or stop.",
)
def apply_instance(
    weighted_masks: Path, instance_masks: Path, output: Path, dilate: int, missing: str
) -> None:
    """Zero every tiered mask outside its subject's instance mask (bystanders get weight 0)."""
    from masktrain.config.masks import ApplyInstanceConfig
    from masktrain.masks.apply_instance import run

    def job() -> bool:
        config = ApplyInstanceConfig(weighted_masks, instance_masks, output, dilate=dilate, missing=missing)
        summary = run(config)
        click.echo(summary.line())
        return bool(summary.failed)

    raise SystemExit(1 if run_job(job) else 0)
