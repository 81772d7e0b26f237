"""Guards against the reference's silent no-op (a bug made "adapters off" do nothing, so the prior
term was zero for 2,145 steps): for every adapter configuration the trainer builds (each family,
fp8 base weights, block swap, WAN 2.2's two experts sharing one LoRA), with non-zero LoRA B the
adapters change the output, and with them off the output is bit-identical to the same base model
without any adapter. And --loss_type huber against the reference's pinned values, with its
linear-share telemetry; the metrics say whether the teacher ran."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from helpers import cached, train_config
from masktrain.config import MemorySettings
from masktrain.errors import TrainConfigError
from masktrain.loss import MaskLossSettings, linear_fraction, mask_regions, unreduced_loss
from masktrain.models import get_family
from masktrain.models.base import TextBatch
from masktrain.train.build import build_experts
from masktrain.train.loop import run as run_train

CPU, F32 = torch.device("cpu"), torch.float32


def _inputs(arch: str, sigma: float) -> tuple[torch.Tensor, torch.Tensor, TextBatch]:
    family = get_family(arch)
    generator = torch.Generator().manual_seed(3)
    if arch == "wan":
        noisy, text = (
            torch.randn(2, 16, 1, 4, 4, generator=generator),
            [torch.randn(5, 32, generator=generator)] * 2,
        )
    else:
        noisy, text = (
            torch.randn(2, 4, 1, 4, 6, generator=generator),
            [torch.randn(3, 16, generator=generator)] * 2,
        )
    return noisy, torch.full((2,), sigma), family.collate_text(text)


CONFIGURATIONS = {
    "wan": dict(arch="wan"),
    "qwen_image": dict(arch="qwen_image"),
    "wan-fp8": dict(arch="wan", memory=MemorySettings(fp8_base=True, fp8_scaled=True)),
    "wan-block-swap": dict(arch="wan", gradient_checkpointing=True, memory=MemorySettings(blocks_to_swap=1)),
    "wan22-experts": dict(arch="wan", dit_high_noise="tiny"),
}


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_adapters_off_is_the_base_model_bit_for_bit(name: str, tmp_path: Path) -> None:
    settings = CONFIGURATIONS[name]
    config = train_config(tmp_path / "unused.toml", tmp_path, **settings)
    family = get_family(config.arch)
    experts = build_experts(config, family, CPU, F32)
    reference = build_experts(config, family, CPU, F32)  # the same seed: the same base and LoRA init
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a trained LoRA: B non-zero (zero-initialised B would hide the bug)
        for param_name, param in experts.low.named_parameters():
            if ".lora_B." in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    sigmas = (0.95, 0.3) if experts.high is not None else (0.5,)  # both experts of WAN 2.2
    for sigma in sigmas:
        noisy, sig, text = _inputs(config.arch, sigma)
        with torch.no_grad():
            with reference.adapters_disabled():  # the same base weights, its LoRA untouched (B = 0)
                base = reference.predict(family, noisy, sig, text)
            with experts.adapters_disabled():
                off = experts.predict(family, noisy, sig, text)
            on = experts.predict(family, noisy, sig, text)
            experts.restore_layout("test")
            reference.restore_layout("test")
        assert torch.equal(off, base), f"{name}: adapters off differ from the base at sigma {sigma}"
        assert (on - base).abs().max() > 1e-3, f"{name}: the LoRA changed nothing at sigma {sigma}"


def test_huber_against_the_references_values() -> None:
    difference = torch.tensor([0.0, 2.0, -3.0])  # pred [0, 2, -3], target 0
    assert unreduced_loss(difference, "mse", 1.0).tolist() == [0.0, 4.0, 9.0]
    assert unreduced_loss(difference, "huber", 1.0).tolist() == [0.0, 1.5, 2.5]
    with pytest.raises(ValueError, match="--loss_delta must be > 0"):
        unreduced_loss(difference, "huber", 0.0)


def test_huber_linear_share_is_weighted_by_region() -> None:
    # C = 2, mask 0.25 (continuous mode, prior 1): target weights 0.25, prior region 0.75;
    # channel 0 linear and channel 1 not for the target, both linear for the prior
    settings = MaskLossSettings(use_mask_loss=True, prior_preservation_weight=1.0)
    weights, prior = mask_regions(torch.full((1, 1, 2, 2), 0.25), settings)
    target_linear = torch.zeros(1, 2, 1, 2, 2, dtype=torch.bool)
    target_linear[:, 0] = True
    assert linear_fraction(target_linear, weights) == pytest.approx(0.5)
    assert linear_fraction(torch.ones(1, 2, 1, 2, 2, dtype=torch.bool), prior) == pytest.approx(1.0)


def test_the_metrics_say_whether_the_teacher_ran_and_huber_shares(tmp_path: Path) -> None:
    toml = cached(tmp_path / "data", "wan")
    out = tmp_path / "out"
    run_train(train_config(toml, out, max_train_steps=2, loss_type="huber", loss_delta=0.5))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["teacher_ran"] == 1.0 and 0 < record["prior_mass"] < 1
        assert 0 <= record["huber_target_linear"] <= 1 and 0 <= record["huber_prior_linear"] <= 1
    with pytest.raises(TrainConfigError, match="--loss_delta must be > 0 when --loss_type huber is used"):
        train_config(toml, out, loss_type="huber", loss_delta=0.0)


def test_a_step_prepares_the_mask_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blur, gamma, floor and threshold run once per step: the reducer hands the step its weights,
    prior region and region sums, which the metrics (Huber shares, prior mass, per-region losses)
    read instead of preparing the mask again."""
    import masktrain.loss
    from masktrain.data.cached_items import find_cached_items
    from masktrain.data.loader import load_batch
    from masktrain.train.step import compute_loss

    toml = cached(tmp_path / "data", "wan")
    config = train_config(toml, tmp_path / "out", loss_type="huber", loss_delta=0.5)
    config = dataclasses.replace(
        config, mask=dataclasses.replace(config.mask, mask_blur_kernel_size=3, mask_gamma=0.7)
    )
    family = get_family("wan")
    experts = build_experts(config, family, CPU, F32)
    calls: list[int] = []
    real = masktrain.loss.blur_mask

    def counted(mask: torch.Tensor, kernel_size: int) -> torch.Tensor:
        calls.append(kernel_size)
        return real(mask, kernel_size)

    monkeypatch.setattr(masktrain.loss, "blur_mask", counted)
    batch = load_batch(0, find_cached_items(toml, "wan")[:2])
    result = compute_loss(config, family, experts, batch, 0, CPU, F32, None)
    assert calls == [3]
    assert {"teacher_ran", "prior_mass", "huber_target_linear", "huber_prior_linear"} <= result.extras.keys()
    assert set(result.tiers) == {"background", "body", "face"}
