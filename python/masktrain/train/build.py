"""The transformer(s) of one training run: loaded from ``--dit`` (and ``--dit_high_noise``), checked
against ``--task``, with the LoRA added (seeded by ``--seed``) and shared by both experts, or one
LoRA each with ``--lora_per_expert`` (the high-noise expert's initialised after the low-noise
one's, from the same seeded generator), then placed as the memory flags say
(``denoiser.experts.place``).

What the cache feeds them (:func:`cache_feeds`: each cache folder's latent channels and text
width, from the headers) must be what they take: :func:`check_cache_fits` compares from their
headers before any model loads (the sampler's too), :func:`build_experts` again before and after
they load, with the sampler's VAE and text encoder among its feeds (``models.fit``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from masktrain import catalog
from masktrain.config.train import TrainConfig
from masktrain.data import cache_format as fmt
from masktrain.data.cached_items import CachedItem
from masktrain.denoiser import lora
from masktrain.denoiser.experts import Experts, check_backend, load_transformers, place, transformer_flags
from masktrain.device import indexed
from masktrain.errors import TrainConfigError
from masktrain.models import fit
from masktrain.models.base import ModelFamily
from masktrain.models.qwen_image import edit_version_mismatch

log = logging.getLogger(__name__)


def _share_lora(low: torch.nn.Module, high: torch.nn.Module) -> None:
    """Make `high`'s LoRA layers use `low`'s A and B modules: one LoRA across both experts."""
    low_modules = dict(low.named_modules())
    for name, module in high.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and name in low_modules:
            module.lora_A = low_modules[name].lora_A
            module.lora_B = low_modules[name].lora_B


def cache_feeds(family: ModelFamily, items: Sequence[CachedItem]) -> list[fit.Feed]:
    """What the cache feeds the transformer: per cache folder, its latents' channel counts (from
    the items' recorded shapes) and its text embeddings' width (one text file's header)."""
    folders: dict[Path, tuple[set[int], Path]] = {}
    for item in items:
        channels, _ = folders.setdefault(item.latent_path.parent, (set(), item.text_path))
        channels.add(item.latent_shape[0])
    first = {item.latent_path.parent: item.latent_path for item in reversed(items)}
    feeds = []
    for folder, (channels, text_path) in folders.items():
        _, shapes = fmt.read_header(text_path)
        width = next((shape[-1] for shape in shapes.values() if shape), None)
        conditioning, image_dim = _conditioning_of(first[folder])
        feeds += [
            fit.cache_feed(folder, count, width, family.text_flag, conditioning, image_dim)
            for count in sorted(channels)
        ]
    return feeds


def _conditioning_of(latent_path: Path) -> tuple[int, int | None]:
    """The image-conditioning channels and CLIP width a latent file holds (0 and None: none);
    every file of a folder was made for one mode (``train`` checked)."""
    _, shapes = fmt.read_header(latent_path)
    keys = fmt.item_tensor_keys(shapes, latent_path)
    channels = 0 if keys.image_latents is None else shapes[keys.image_latents][0]
    image_dim = None if keys.image_embeds is None else shapes[keys.image_embeds][-1]
    return channels, image_dim


def check_cache_fits(config: TrainConfig, family: ModelFamily, items: Sequence[CachedItem]) -> list[fit.Feed]:
    """The cache's feeds (the training and validation `items`), checked against ``--dit`` and
    ``--dit_high_noise`` from their headers: a mismatch is one line before any model loads. The
    feeds go to :func:`build_experts`."""
    feeds = cache_feeds(family, items)
    for flag, spec in transformer_flags(*config.denoisers):
        fit.check_before_loading(family, spec, flag, feeds)
    return feeds


def build_experts(
    config: TrainConfig,
    family: ModelFamily,
    device: torch.device,
    dtype: torch.dtype,
    feeds: Sequence[fit.Feed] = (),
) -> Experts:
    """Load the transformer(s), checked against `feeds` (the cache's, the sampler's), add the LoRA
    (seeded by ``--seed``), place the weights, set up checkpointing and the attention backend."""
    network, memory = config.network, config.memory
    device = indexed(device)
    check_backend(memory, device)
    load_device = torch.device("cpu") if memory.on_host else device
    low, *others = load_transformers(
        family, transformer_flags(*config.denoisers), load_device, dtype, memory, feeds
    )
    high = others[0] if others else None
    torch.manual_seed(config.seed)  # the LoRA initialisation

    def add(model: torch.nn.Module) -> list[str]:
        return lora.add_lora(
            model,
            family,
            rank=network.network_dim,
            alpha=network.network_alpha,
            include=list(network.include_patterns) if network.include_patterns else None,
            exclude=list(network.exclude_patterns) if network.exclude_patterns else None,
            dropout=network.network_dropout,
        )

    check_task(config, low)
    names = add(low)
    if network.verbose:
        for name in names:
            log.info("LoRA on %s", name)
    if high is not None:
        add(high)
        if not config.lora_per_expert:
            _share_lora(low, high)
    experts = Experts(low, high, config.boundary, config.lora_per_expert, device=device)  # LoRA in float32
    place(experts, family, memory, config.gradient_checkpointing)
    log.info(
        "LoRA rank %d alpha %g on %d modules%s",
        network.network_dim,
        network.network_alpha,
        len(names),
        ", one per expert (--lora_per_expert)" if experts.lora_per_expert else "",
    )
    return experts


def check_task(config: TrainConfig, transformer: torch.nn.Module) -> None:
    """musubi's ``--task`` names a transformer: `transformer` (what ``--dit`` loaded) must be it.
    The built-in tiny model stands for every task of its arch; a Qwen-Image transformer's config
    says whether it is Edit-2511's (``zero_cond_t``)."""
    spec = catalog.arch(config.arch)
    if spec is catalog.QWEN_IMAGE:
        why = edit_version_mismatch(getattr(transformer, "config", None) or {}, config.model_version)
        if why is not None:
            raise TrainConfigError(f"--dit {config.dit} {why}")
    task = spec.tasks.get(config.task or config.model_version or "")
    if task is None or task.width is None or config.dit == "tiny":
        return
    model_config = getattr(transformer, "config", None)
    heads = getattr(model_config, "num_attention_heads", 0)
    width = heads * getattr(model_config, "attention_head_dim", 0)
    blocks = getattr(model_config, "num_layers", 0)
    if (width, blocks) != (task.width, task.blocks):
        named = [name for name, t in spec.tasks.items() if (t.width, t.blocks) == (width, blocks)]
        what = f" ({' / '.join(named)})" if named else ""
        raise TrainConfigError(
            f"--task {config.task} is a {task.width}-wide, {task.blocks}-block transformer, but --dit "
            f"{config.dit} is {width} wide with {blocks} blocks{what}; pass the matching --task or --dit"
        )
