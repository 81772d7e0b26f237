"""The transformer(s) a run trains, with the LoRA on them: one denoiser, or WAN 2.2 A14B's two
experts (high-noise and low-noise) sharing one LoRA."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from masktrain.config.train import TrainConfig
from masktrain.models.base import ModelFamily, TextBatch, adapter_host
from masktrain.train import lora

log = logging.getLogger(__name__)


@dataclass
class Experts:
    """The transformer(s) being trained. WAN 2.2 A14B has two experts that share one LoRA: the
    high-noise one takes sigmas at or above the boundary."""

    low: torch.nn.Module
    high: torch.nn.Module | None
    boundary: float

    def modules(self) -> list[torch.nn.Module]:
        return [self.low] if self.high is None else [self.low, self.high]

    def predict(
        self, family: ModelFamily, noisy: torch.Tensor, sigmas: torch.Tensor, text: TextBatch
    ) -> torch.Tensor:
        if self.high is None:
            return family.predict(self.low, noisy, sigmas, text)
        high = sigmas >= self.boundary
        if bool(high.all()) or not bool(high.any()):
            return family.predict(self.high if bool(high.all()) else self.low, noisy, sigmas, text)
        out = torch.empty_like(noisy)
        for model, rows in ((self.high, high), (self.low, ~high)):
            out[rows] = family.predict(
                model,
                noisy[rows],
                sigmas[rows],
                TextBatch(text.hidden[rows], None if text.mask is None else text.mask[rows]),
            ).to(out.dtype)
        return out

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for model in self.modules():
                stack.enter_context(lora.adapters_disabled(model))
            yield

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The LoRA parameters, once each (the experts share them)."""
        seen: set[int] = set()
        params = []
        for name, param in self.low.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append((name, param))
        return params


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
    """Load the transformer(s), add the LoRA (seeded by ``--seed``), set up checkpointing."""
    network = config.network
    low = family.load_transformer(config.dit, "--dit", device, dtype)
    high = None
    if config.dit_high_noise is not None:
        high = family.load_transformer(config.dit_high_noise, "--dit_high_noise", device, dtype)
    torch.manual_seed(config.seed)  # the LoRA initialisation

    def add(model: torch.nn.Module) -> list[str]:
        return lora.add_lora(
            model,
            family,
            rank=network.network_dim,
            alpha=network.network_alpha,
            include=list(network.include_patterns) if network.include_patterns else None,
            exclude=list(network.exclude_patterns) if network.exclude_patterns else None,
        )

    names = add(low)
    if high is not None:
        add(high)
        _share_lora(low, high)
    experts = Experts(low, high, config.timestep_boundary)  # add_lora keeps LoRA weights in float32
    for model in experts.modules():
        if config.gradient_checkpointing:
            adapter_host(model).enable_gradient_checkpointing()
        model.train()
    log.info("LoRA rank %d alpha %g on %d modules", network.network_dim, network.network_alpha, len(names))
    return experts
