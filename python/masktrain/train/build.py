"""The transformer(s) of one training run: loaded from ``--dit`` (and ``--dit_high_noise``), checked
against ``--task``, with the LoRA added (seeded by ``--seed``) and shared by both experts, then
placed as the memory flags say (``denoiser.experts.place``)."""

from __future__ import annotations

import logging

import torch

from masktrain import catalog
from masktrain.config.train import TrainConfig
from masktrain.denoiser import lora
from masktrain.denoiser.experts import Experts, check_backend, place
from masktrain.device import indexed
from masktrain.errors import TrainConfigError
from masktrain.models.base import ModelFamily

log = logging.getLogger(__name__)


def _share_lora(low: torch.nn.Module, high: torch.nn.Module) -> None:
    """Make `high`'s LoRA layers use `low`'s A and B modules: one LoRA across both experts."""
    low_modules = dict(low.named_modules())
    for name, module in high.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and name in low_modules:
            module.lora_A = low_modules[name].lora_A
            module.lora_B = low_modules[name].lora_B


def build_experts(
    config: TrainConfig, family: ModelFamily, device: torch.device, dtype: torch.dtype
) -> Experts:
    """Load the transformer(s), add the LoRA (seeded by ``--seed``), place the weights, set up
    checkpointing and the attention backend."""
    network, memory = config.network, config.memory
    device = indexed(device)
    check_backend(memory, device)
    load_device = torch.device("cpu") if memory.on_host else device
    low = family.load_transformer(config.dit, "--dit", load_device, dtype, fp8=memory.fp8_mode)
    high = None
    if config.dit_high_noise is not None:
        high = family.load_transformer(
            config.dit_high_noise, "--dit_high_noise", load_device, dtype, fp8=memory.fp8_mode
        )
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
        _share_lora(low, high)
    experts = Experts(low, high, config.timestep_boundary, device=device)  # LoRA weights in float32
    place(experts, family, memory, config.gradient_checkpointing)
    log.info("LoRA rank %d alpha %g on %d modules", network.network_dim, network.network_alpha, len(names))
    return experts


def check_task(config: TrainConfig, transformer: torch.nn.Module) -> None:
    """musubi's ``--task`` names a transformer: `transformer` (what ``--dit`` loaded) must be it.
    The built-in tiny model stands for every task of its arch."""
    spec = catalog.arch(config.arch)
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
