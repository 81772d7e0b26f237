"""The numbers of ``masktrain inspect``: per item, its mask source, the fraction of latent cells in
each region (``masktrain.tiers``: face, hair and body, background), the mean loss weight after
``--mask_gamma`` / ``--mask_min_weight``, the prior region (raw < ``--prior_mask_threshold``)
and whether its subject (raw >= 0.05) covers under 1% of the cells; per dataset, the totals, the
items without masks or with a tiny subject, and how fresh the cache is.

Where an item's cache is fresh its mask is the cached one (exactly what training reads); otherwise
it is computed from the image and mask files by the same code ``cache`` runs (``prepare_batch``;
for a video ``cache.videos.decode_with_mask``), at the latent factor of ``--vae``. A video's
numbers are its first clip's (the clip of its first cache file: the first start, the shortest
length), counted over every latent frame of the clip, since a mask may move from one to the next;
its picture is that clip's strip of latent frames (``page.strip``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from masktrain import _native, catalog
from masktrain.config.cache import MaskPoolingMode
from masktrain.config.dataset import ImageDatasetConfig, VideoDatasetConfig, load_dataset_config
from masktrain.config.inspect import InspectConfig
from masktrain.data import cache_format as fmt
from masktrain.data import freshness, video
from masktrain.data.cached_items import ItemState, item_states
from masktrain.data.dataset_paths import check_readable
from masktrain.data.discovery import bucket_list
from masktrain.data.mask_sources import MaskSources
from masktrain.errors import DataError, FlagError, MaskTrainError, VideoDecodeError
from masktrain.tiers import regions

SMALL_SUBJECT = 0.01
"""An item whose subject (raw >= 0.05) covers less than this fraction of the cells is flagged."""


@dataclass
class ItemReport:
    name: str
    source: str
    """Where the mask came from: alpha, file or none."""
    read_from: str
    """cache (fresh) or sources."""
    cache: str
    """fresh, stale, damaged (a cache file whose header reads fresh but whose tensors cannot be
    trained on: NaN or infinity, unreadable) or not cached."""
    bucket: tuple[int, int]
    grid: tuple[int, int]
    """Latent cells (width, height)."""
    latent_frames: int = 1
    """Latent frames the numbers count: a video's first clip's (1 for an image)."""
    face: float = 0.0
    body: float = 0.0
    background: float = 1.0
    mean_weight: float = 1.0
    """Mean loss weight after gamma and floor (1 without a mask)."""
    prior_region: float | None = None
    small_subject: bool = False
    baked: str = ""
    """The cache-time transform the cache file records (``gamma 0.7, floor 0.2``; ``none``), or ""
    when the mask came from the sources."""
    overlay: str = ""
    """The overlay image's path, relative to the output folder."""


@dataclass
class DatasetReport:
    index: int
    directory: str
    items: list[ItemReport] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    not_cached: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def without_mask(self) -> list[str]:
        return [item.name for item in self.items if item.source == "none"]

    @property
    def small_subject(self) -> list[str]:
        return [item.name for item in self.items if item.small_subject]

    def totals(self) -> dict[str, float]:
        masked = [item for item in self.items if item.source != "none"]
        if not masked:
            return {}
        return {
            region: float(np.mean([getattr(item, region) for item in masked]))
            for region in ("face", "body", "background", "mean_weight")
        }

    @property
    def cache(self) -> str:
        if not self.items:
            return "empty"
        if not self.stale and not self.not_cached and not self.damaged:
            return "fresh"
        return "not cached" if len(self.not_cached) == len(self.items) else "partly fresh"


def coverage(raw: np.ndarray) -> dict[str, float]:
    """Fractions of cells per region (``tiers.regions``) of a raw (h, w) or (F, h, w) mask (every
    latent frame's cells)."""
    return {name: float(cells.sum() / raw.size) for name, cells in regions(raw).items()}


def loss_weights(raw: np.ndarray, gamma: float, min_weight: float, blur: int = 0) -> np.ndarray:
    """The weights the loss applies to a raw (h, w) or (F, h, w) mask: ``loss.blur_mask``
    (``--mask_blur_kernel_size``, each frame alone), then ``loss.transform_weights`` (gamma, floor)."""
    import torch

    from masktrain.loss import blur_mask, transform_weights

    tensor = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32)).clamp(0.0, 1.0)
    weights: np.ndarray = transform_weights(blur_mask(tensor, blur), gamma, min_weight).numpy()
    return weights


def latent_factor(config: InspectConfig) -> int:
    spec = catalog.arch(config.arch)
    if config.vae is None:
        return spec.spatial_factor
    if config.vae in spec.tiny_vaes:
        return spec.tiny_vaes[config.vae]
    try:
        folder = Path(config.vae).expanduser()
    except RuntimeError:  # ~user of a user this machine does not have, or no home folder
        raise FlagError(
            f"--vae {config.vae}: {config.vae.split('/')[0]} names no home folder on this machine; "
            "write the full path"
        ) from None
    settings = folder / "config.json" if folder.is_dir() else folder.with_suffix(".json")
    if (folder / "vae" / "config.json").is_file():
        settings = folder / "vae" / "config.json"
    if settings.is_file():
        values = json.loads(settings.read_text(encoding="utf-8"))
        if "scale_factor_spatial" in values:
            return int(values["scale_factor_spatial"])
        if "temperal_downsample" in values:
            return int(2 ** len(values["temperal_downsample"]))
    return spec.spatial_factor


def _baked(state: ItemState) -> str:
    """What the item's cache file records of the cache-time transform."""
    metadata = fmt.read_metadata(state.files[0][0])
    baked = None if metadata is None else freshness.baked_transform(metadata.extra)
    if baked is None:
        return "not recorded"
    return "none" if baked == (1.0, 0.0) else f"gamma {baked[0]:g}, floor {baked[1]:g}"


def _cached_raw(state: ItemState, video: bool) -> np.ndarray | None:
    """The raw mask weights of a fresh cache file (None without a mask): an image's (h, w) (a
    layered item's first frame), a video's first clip's (F, h, w), every latent frame; a
    :class:`DataError` naming the file, as train's loader words it, when its tensors hold NaN or
    infinity (its header still reads fresh) or cannot be read."""
    from masktrain.data.loader import check_finite

    path = state.files[0][0]
    tensors = check_finite(fmt.load_cache_file(path)[0], path)
    key = fmt.item_tensor_keys(tensors, path).mask_weights
    if key is None:
        return None
    weights: np.ndarray = tensors[key][0].float().numpy()
    return weights if video else weights[0]


class Picture(NamedTuple):
    """What an item's picture shows (``page.write``)."""

    image: np.ndarray
    """The bucketed image (H, W, 3), or a video's first clip (N, H, W, 3)."""
    raw: np.ndarray | None
    """The raw latent mask: an image's (h, w), a clip's (F, h, w); None without one."""
    temporal_factor: int = 1
    """Pixel frames per latent frame after the first (a video's strip)."""


Pictures = dict[str, Picture]
"""Per item (``{dataset}/{stem}``)."""


@dataclass(frozen=True)
class _FromSources:
    """An item as ``cache`` prepares it: the bucketed image (a video's first clip, (N, H, W, 3)),
    the raw latent mask (a clip's (F, h, w); None without one) and where that mask comes from."""

    image: np.ndarray
    raw: np.ndarray | None
    source: str
    bucket: tuple[int, int]


def _image_sources(
    dataset: ImageDatasetConfig,
    states: list[ItemState],
    factor: int,
    pooling: MaskPoolingMode,
    spec: catalog.ArchSpec,
) -> list[_FromSources | Exception]:
    masks = MaskSources(dataset, [state.item for state in states])
    prepared = _native.prepare_batch(
        [state.item.path for state in states],
        bucket_list(dataset.buckets, spec.bucket_step),
        mask_index=masks.index,
        mask_paths=[state.item.mask_path for state in states] if masks.any_own_path else None,
        default_mask=masks.default,
        mask_pooling=pooling,
        alpha_mask=dataset.alpha_mask,
        require_mask=False,
        latent_factor=factor,
    )
    return [
        _FromSources(r.image, r.latent_mask, r.mask_source, r.bucket)
        if isinstance(r, _native.PreparedItem)
        else r
        for r in prepared
    ]


def _video_sources(
    dataset: VideoDatasetConfig,
    states: list[ItemState],
    factor: int,
    spec: catalog.ArchSpec,
    mode: MaskPoolingMode,
) -> list[_FromSources | Exception]:
    """Each video's first clip and its mask, as ``cache.videos`` prepares them."""
    from masktrain.cache.video_masks import MaskPooling
    from masktrain.cache.videos import decode_with_mask

    if spec.video_fps is None:  # as cache refuses it
        refused = DataError(f"--arch {spec.name} is an image model and cannot take a video dataset")
        return [refused for _ in states]
    settings = video.ClipSettings.of(dataset, spec.video_fps, spec.temporal_factor)
    buckets, masks = bucket_list(dataset.buckets), MaskSources(dataset, [state.item for state in states])
    pooling = MaskPooling(factor, spec.temporal_factor, mode)
    # The first clip starts at frame 0 (every extraction's first start) and is at most this long.
    limit = settings.max_frames if settings.extraction == "full" else max(settings.target_frames)
    results: list[_FromSources | Exception] = []
    for state in states:
        try:
            mask_path, source = masks.resolve(state.item)
            decoded, clip_masks = decode_with_mask(
                state.item.path,
                dataset,
                buckets,
                pooling,
                mask_path,
                masking=mask_path is not None,
                limit=limit,
                source_fps=settings.source_fps,
                target_fps=settings.target_fps,
            )
            spans = settings.spans(len(decoded.frames))
            if not spans:
                raise VideoDecodeError(
                    f"{state.item.path}: {len(decoded.frames)} frames is shorter than every clip length "
                    f"of target_frames {list(settings.target_frames)}"
                )
            start, count = min(spans)  # the clip of the first cache file (names sort by start, length)
            raw = None if clip_masks is None else clip_masks.weights(start, count)
            results.append(_FromSources(decoded.frames[start : start + count], raw, source, decoded.bucket))
        except (MaskTrainError, OSError) as error:
            results.append(error)
    return results


def inspect_datasets(config: InspectConfig) -> tuple[list[DatasetReport], Pictures]:
    """The reports, and per item name (``{dataset}/{stem}``) the bucketed image and its raw latent
    mask, for the overlays."""
    spec = catalog.arch(config.arch)
    datasets = load_dataset_config(config.dataset_config)
    check_readable(datasets)
    factor = latent_factor(config)
    reports, pictures = [], {}
    for index, dataset in enumerate(datasets.datasets):
        directory = str(getattr(dataset, "image_directory", None) or getattr(dataset, "video_directory", ""))
        report = DatasetReport(index, directory)
        reports.append(report)
        states, report.failed = item_states(dataset, spec)
        if isinstance(dataset, ImageDatasetConfig):
            sources = _image_sources(dataset, states, factor, config.mask_pooling, spec)
        else:
            sources = _video_sources(dataset, states, factor, spec, config.mask_pooling)
        for state, result in zip(states, sources, strict=True):
            if isinstance(result, Exception):
                report.failed.append(f"{state.item.path} ({result})")
                continue
            fresh, raw = state.problem is None, result.raw
            cache = "fresh" if fresh else "stale" if state.cached else "not cached"
            if fresh:
                try:
                    raw = _cached_raw(state, isinstance(dataset, VideoDatasetConfig))
                except DataError as error:  # read from the sources, as for a stale item
                    fresh, cache = False, "damaged"
                    report.damaged.append(f"{state.item.path.name} ({error})")
            if state.problem is not None:
                (report.stale if state.cached else report.not_cached).append(
                    f"{state.item.path.name}" + (f" ({state.problem})" if state.cached else "")
                )
            grid = (
                (raw.shape[-1], raw.shape[-2])
                if raw is not None
                else (result.bucket[0] // factor, result.bucket[1] // factor)
            )
            item = ItemReport(
                name=state.item.path.name,
                source=result.source,
                read_from="cache" if fresh else "sources",
                cache=cache,
                bucket=result.bucket,
                grid=grid,
                latent_frames=_latent_frames(result.image, spec.temporal_factor),
            )
            if fresh:
                item.baked = _baked(state)
            if raw is not None:
                _measure(item, raw, config)
            report.items.append(item)
            pictures[f"{index}/{state.item.stem}"] = Picture(result.image, raw, spec.temporal_factor)
    return reports, pictures


def _latent_frames(image: np.ndarray, temporal_factor: int) -> int:
    """The latent frames of a video's first clip (N, H, W, 3): 1 + (N - 1) / 4; 1 for an image."""
    return 1 if image.ndim == 3 else (len(image) - 1) // temporal_factor + 1


def _measure(item: ItemReport, raw: np.ndarray, config: InspectConfig) -> None:
    regions = coverage(raw)
    item.face, item.body, item.background = regions["face"], regions["body"], regions["background"]
    weights = loss_weights(raw, config.mask_gamma, config.mask_min_weight, config.mask_blur_kernel_size)
    item.mean_weight = float(weights.mean())
    if config.prior_mask_threshold is not None:
        item.prior_region = float((raw < config.prior_mask_threshold).mean())
    item.small_subject = item.face + item.body < SMALL_SUBJECT


def _json_ready(value: object) -> object:
    """`value` with every NaN or infinity as None: ``summary.json`` is JSON (null), not Python's NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    return value


def summary_json(reports: list[DatasetReport]) -> dict[str, object]:
    summary = {
        "datasets": [
            {
                "index": report.index,
                "directory": report.directory,
                "cache": report.cache,
                "note": report.note,
                "totals": report.totals(),
                "without_mask": report.without_mask,
                "small_subject": report.small_subject,
                "stale": report.stale,
                "not_cached": report.not_cached,
                "damaged": report.damaged,
                "failed": report.failed,
                "items": [asdict(item) for item in report.items],
            }
            for report in reports
        ]
    }
    return {"datasets": _json_ready(summary["datasets"])}
