"""``masktrain cache``: latents, mask weights and text embeddings for every item of a dataset
TOML, one self-describing safetensors file each (see ``data/cache_format.py``).

Image datasets go through ``images.ImageCacher``, video datasets (families with a video frame
rate in the catalog) through ``videos.VideoCacher``; both share one set-up per dataset
(``setup.CacheSetup``) and the same stages (``stages``), then ``text.TextCacher`` encodes the
captions of the items that were cached. Native preparation of the next chunk runs on a worker
thread (the core releases the GIL) while the current chunk is encoded.

An item whose file has the fingerprint this run would write is skipped; any change to the image,
its mask file, the mask or bucket settings or the VAE rebuilds exactly that item.
Under ``torchrun`` each process caches every ``WORLD_SIZE``-th item (disjoint files) and rank 0
reports the merged summary.
"""

from __future__ import annotations

import contextlib
import logging
import os

from tqdm import tqdm

from masktrain import atomic, catalog, distributed
from masktrain.cache.conditioning import ClipConditioning
from masktrain.cache.edit import EditPrompts
from masktrain.cache.images import ImageCacher
from masktrain.cache.layered import check_dataset as check_layered
from masktrain.cache.setup import CacheSetup
from masktrain.cache.summary import DatasetSummary
from masktrain.cache.text import TextCacher
from masktrain.cache.videos import VideoCacher
from masktrain.config.cache import CacheConfig
from masktrain.config.dataset import ImageDatasetConfig, VideoDatasetConfig, load_dataset_config
from masktrain.data.dataset_paths import check_readable, check_writable
from masktrain.data.discovery import Discovery, discover
from masktrain.device import precision, resolve_device
from masktrain.distributed import Shard
from masktrain.errors import ConfigError
from masktrain.models import get_family
from masktrain.models.base import ModelFamily

log = logging.getLogger(__name__)

Dataset = ImageDatasetConfig | VideoDatasetConfig


def preflight(config: CacheConfig) -> list[tuple[Dataset, Discovery]]:
    """Each dataset of the TOML with its items, before any model loads: the datasets fit the
    family, every folder they read can be read and every cache folder written, and every
    caption reads as UTF-8 (each problem one line, exit 2)."""
    dataset_config = load_dataset_config(config.dataset_config)
    spec = catalog.arch(config.arch)
    check_readable(dataset_config)
    for number, dataset in enumerate(dataset_config.datasets, start=1):
        if isinstance(dataset, VideoDatasetConfig) and not spec.takes_video:
            raise ConfigError(
                f"{config.dataset_config}: [[datasets]] #{number}: --arch {config.arch} is an image model "
                f"and cannot take a video dataset (video_directory / video_jsonl_file); video datasets "
                f"need --arch {' or '.join(catalog.video_arches())}"
            )
        video_mode = config.mode is not None and config.mode.kind == "image_to_video"
        if config.one_frame:
            _check_one_frame(config, dataset, number)
        elif isinstance(dataset, ImageDatasetConfig) and video_mode:
            raise ConfigError(
                f"{config.dataset_config}: [[datasets]] #{number}: {spec.task_flag} {config.task} trains "
                "video clips conditioned on their first frame; an image dataset needs --one_frame (control "
                "images) or a video dataset"
            )
        _check_alpha_content(config, dataset, number)
        check_layered(config, dataset, number)  # Qwen-Image-Layered: multiple_target
        where = f"{config.dataset_config}: [[datasets]] #{number}: 'cache_directory'"
        check_writable(dataset.cache_directory, where)
    return [(dataset, discover(dataset)) for dataset in dataset_config.datasets]


def run(config: CacheConfig) -> list[DatasetSummary]:
    """Cache every dataset of the TOML; returns one summary per dataset (also logged)."""
    datasets = preflight(config)
    if config.num_workers is not None:  # read by the native core when its thread pool starts
        os.environ["MASKTRAIN_NUM_THREADS"] = str(config.num_workers)
    family = get_family(config.arch)
    with distributed.process_group() as shard:
        return _run(config, datasets, family, shard)


def _run(
    config: CacheConfig, datasets: list[tuple[Dataset, Discovery]], family: ModelFamily, shard: Shard
) -> list[DatasetSummary]:
    device = resolve_device(config.device, shard.local_rank)
    dtype, _ = precision("auto", device)  # bf16 weights on a GPU, float32 on the CPU
    vae = family.load_vae(config.vae, device, dtype)
    edit = EditPrompts.of(config)  # Qwen-Image-Edit reads the control images with its vision tower
    if edit is not None:
        encoder = edit.load_encoder(config, family, device, dtype)
    else:
        encoder = family.load_text_encoder(
            config.text_encoder, device, dtype, fp8=config.fp8_text_encoder, tokenizer=config.text_tokenizer
        )
    text = TextCacher(config, family, encoder)
    conditioning = ClipConditioning.of(config, device, dtype)
    if shard.is_main:
        log.info(
            "caching %d dataset(s) for %s on %s (%s), %d process(es)",
            len(datasets),
            family.name,
            device,
            dtype,
            shard.world,
        )

    summaries = []
    atomic.set_run_id(shard.gather(atomic.RUN_ID)[0])  # every process's temporaries carry rank 0's id
    with (
        contextlib.ExitStack() as locks,
        tqdm(total=0, unit="item", desc="cache", disable=not shard.is_main) as progress,
    ):
        for number, (dataset, discovery) in enumerate(datasets, start=1):
            if shard.is_main:  # before any process writes; another live run's temporaries stay
                locks.enter_context(atomic.run_lock(dataset.cache_directory))
                atomic.remove_stale_temporaries(dataset.cache_directory)
            shard.barrier()
            setup = CacheSetup(config, family, vae, dataset, discovery, conditioning)
            cacher = ImageCacher(setup) if isinstance(dataset, ImageDatasetConfig) else VideoCacher(setup)
            summary = DatasetSummary(name=f"dataset #{number} ({_source(dataset)})")
            cached = cacher.run(summary, progress, shard)
            text.run(dataset, cached, summary, setup.controls)
            summary = DatasetSummary.merged(shard.gather(summary))
            if shard.is_main:
                summary.report(cacher.missing_files_warning)
            summaries.append(summary)
    return summaries


def _check_alpha_content(config: CacheConfig, dataset: Dataset, number: int) -> None:
    """A family or mode whose alpha is content (its VAE reads RGBA: Qwen-Image 2.1, Qwen-Image-
    Layered) takes its masks from ``mask_directory`` only: ``alpha_mask = true`` is an error."""
    if not getattr(dataset, "alpha_mask", False):
        return
    where = f"{config.dataset_config}: [[datasets]] #{number}"
    spec, mode = catalog.arch(config.arch), config.mode
    if mode is not None and mode.alpha_is_content:
        raise ConfigError(
            f"{where}: 'alpha_mask = true' cannot be used with --model_version {config.task}: the "
            "images' alpha is content (RGBA layers), not a mask; give masks with mask_directory "
            "(NAME.png for every image of an item, or NAME/00000.png, ... one per image)"
        )
    if spec.alpha_is_content:
        raise ConfigError(
            f"{where}: 'alpha_mask = true' cannot be used with --arch {spec.name}: {spec.title}'s VAE "
            "reads RGBA, so the images' alpha is content, not a mask; give masks with mask_directory"
        )


def _check_one_frame(config: CacheConfig, dataset: Dataset, number: int) -> None:
    """``--one_frame`` trains image datasets with control images and their frame positions."""
    where = f"{config.dataset_config}: [[datasets]] #{number}"
    if not isinstance(dataset, ImageDatasetConfig):
        raise ConfigError(f"{where}: --one_frame trains image datasets (control images and one target image)")
    for key, value in (
        ("control_directory", dataset.control_directory),
        ("fp_1f_clean_indices", dataset.fp_1f_clean_indices or None),
        ("fp_1f_target_index", dataset.fp_1f_target_index),
    ):
        if value is None:
            raise ConfigError(
                f"{where}: --one_frame needs '{key}' (control_directory, fp_1f_clean_indices and "
                "fp_1f_target_index, as musubi-tuner's one-frame datasets set them)"
            )


def _source(dataset: Dataset) -> object:
    if isinstance(dataset, ImageDatasetConfig):
        return dataset.image_directory or dataset.image_jsonl_file
    return dataset.video_directory or dataset.video_jsonl_file
