"""Optimizer and LR schedule: LR values by hand, errors naming the flag, and resume from state dicts."""

from __future__ import annotations

import io
import logging
import math
import sys

import pytest
import torch

from masktrain import MaskTrainError
from masktrain.errors import OptimConfigError, TrainConfigError
from masktrain.train.optim import build_optimizer, build_scheduler, lr_lambda

LR = 1e-3


def make(
    name: str = "constant", **kwargs: object
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([param], learning_rate=LR)
    return optimizer, build_scheduler(optimizer, name=name, **kwargs)  # type: ignore[arg-type]


def lrs(name: str, steps: int, **kwargs: object) -> list[float]:
    """The LR used at optimizer steps 0 .. steps-1, stepping the optimizer like the loop does."""
    optimizer, scheduler = make(name, **kwargs)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def approx(values: list[float]) -> object:
    return pytest.approx(values, rel=1e-9, abs=1e-15)


# --- optimizer --------------------------------------------------------------------------------


def test_adamw_is_torch_adamw_with_the_given_settings() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([param], optimizer_type="AdamW", learning_rate=2e-4, weight_decay=0.1)
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (
        2e-4,
        0.1,
        (0.9, 0.999),
        1e-8,
    )


def test_adamw8bit_without_bitsandbytes_names_the_flag_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, installed or not
    with pytest.raises(OptimConfigError) as raised:
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], optimizer_type="adamw8bit", learning_rate=LR)
    message = str(raised.value)
    assert "--optimizer_type adamw8bit" in message
    assert "pip install bitsandbytes" in message
    assert isinstance(raised.value, MaskTrainError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"optimizer_type": "sgd"},
            "--optimizer_type must be one of adamw, adamw8bit, adafactor, prodigy; got 'sgd'",
        ),
        ({"learning_rate": 0.0}, "--learning_rate must be > 0, got 0.0"),
        ({"learning_rate": math.nan}, "--learning_rate must be > 0, got nan"),
        ({"weight_decay": -0.1}, "--weight_decay must be >= 0, got -0.1"),
        ({"betas": (0.9, 1.0)}, r"optimizer betas must be in range \[0, 1\), got \(0.9, 1.0\)"),
        ({"eps": 0.0}, "optimizer eps must be > 0, got 0.0"),
    ],
)
def test_optimizer_errors(kwargs: dict, message: str) -> None:
    options = {"learning_rate": LR, **kwargs}
    with pytest.raises(OptimConfigError, match=f"^{message}$"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], **options)


# --- schedules --------------------------------------------------------------------------------


def test_constant() -> None:
    assert lrs("constant", 3, total_steps=10) == approx([LR, LR, LR])


def test_constant_with_warmup() -> None:
    # Warm-up over 4 steps: s / 4 for s < 4, then 1.
    assert lrs("constant_with_warmup", 6, warmup_steps=4, total_steps=10) == approx(
        [0.0, LR / 4, LR / 2, 3 * LR / 4, LR, LR]
    )


def test_linear() -> None:
    # Warm-up 2 of 10 steps: 0, 1/2; then (10 - s) / 8 for s = 2 .. 10 and 0 after.
    expected = [0.0, 0.5, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0, 0.0]
    assert lrs("linear", 12, warmup_steps=2, total_steps=10) == approx([LR * f for f in expected])


def test_cosine() -> None:
    # No warm-up, 4 steps: 0.5 (1 + cos(pi s / 4)) = 1, (1 + 1/sqrt2) / 2, 1/2, (1 - 1/sqrt2) / 2, 0.
    r = 1 / math.sqrt(2)
    expected = [1.0, (1 + r) / 2, 0.5, (1 - r) / 2, 0.0, 0.0]
    assert lrs("cosine", 6, total_steps=4) == approx([LR * f for f in expected])


def test_min_lr_ratio_floors_the_decay() -> None:
    # cosine with floor 0.1: 0.1 + 0.9 * decay; at s = 2 of 4: 0.1 + 0.45 = 0.55; after the end 0.1.
    got = lrs("cosine", 6, total_steps=4, min_lr_ratio=0.1)
    assert got[2] == pytest.approx(0.55 * LR)
    assert got[4:] == approx([0.1 * LR, 0.1 * LR])
    # linear with floor 0.2 at s = 2 of 4: 0.2 + 0.8 * 0.5 = 0.6.
    assert lrs("linear", 3, total_steps=4, min_lr_ratio=0.2)[2] == pytest.approx(0.6 * LR)


def test_min_lr_ratio_on_a_constant_schedule_only_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="masktrain.train.optim"):
        assert lrs("constant", 2, total_steps=4, min_lr_ratio=0.1) == approx([LR, LR])
    assert "--lr_scheduler_min_lr_ratio has no effect with --lr_scheduler constant" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"name": "cosine_with_restarts", "total_steps": 10},
            "--lr_scheduler must be one of constant, constant_with_warmup, linear, cosine, "
            "cosine_with_min_lr, polynomial; got 'cosine_with_restarts'",
        ),
        (
            {"name": "constant", "warmup_steps": 5, "total_steps": 10},
            "--lr_scheduler constant does not use --lr_warmup_steps; set it to 0 or use constant_with_warmup",
        ),
        (
            {"name": "linear", "warmup_steps": 11, "total_steps": 10},
            r"--lr_warmup_steps \(11\) must not exceed the total training steps \(10\)",
        ),
        ({"name": "linear", "warmup_steps": -1, "total_steps": 10}, "--lr_warmup_steps must be >= 0, got -1"),
        ({"name": "linear", "total_steps": 0}, "the total number of training steps must be >= 1, got 0"),
        (
            {"name": "cosine", "total_steps": 10, "min_lr_ratio": 1.5},
            r"--lr_scheduler_min_lr_ratio must be in range \[0, 1\], got 1.5",
        ),
    ],
)
def test_scheduler_errors(kwargs: dict, message: str) -> None:
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], learning_rate=LR)
    with pytest.raises(OptimConfigError, match=f"^{message}$"):
        build_scheduler(optimizer, **kwargs)


# --- resume -----------------------------------------------------------------------------------


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _train(
    steps: int, optimizer: torch.optim.Optimizer, scheduler: object, param: torch.nn.Parameter
) -> list[float]:
    seen = []
    for step in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.full_like(param, float(step + 1))
        optimizer.step()
        scheduler.step()  # type: ignore[attr-defined]
    return seen


def test_state_dict_round_trip_resumes_identically() -> None:
    def fresh() -> tuple[torch.nn.Parameter, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = build_optimizer([param], learning_rate=LR, weight_decay=0.01)
        return param, optimizer, build_scheduler(optimizer, name="cosine", warmup_steps=3, total_steps=10)

    param, optimizer, scheduler = fresh()
    straight = _train(10, optimizer, scheduler, param)
    final = param.detach().clone()

    param, optimizer, scheduler = fresh()
    first = _train(4, optimizer, scheduler, param)
    saved = (param.detach().clone(), _roundtrip(optimizer.state_dict()), _roundtrip(scheduler.state_dict()))

    param, optimizer, scheduler = fresh()
    with torch.no_grad():
        param.copy_(saved[0])
    optimizer.load_state_dict(saved[1])
    scheduler.load_state_dict(saved[2])
    # The grads of steps 5..10 are what the uninterrupted run used (step + 1 with step offset 4).
    rest = []
    for step in range(4, 10):
        rest.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.full_like(param, float(step + 1))
        optimizer.step()
        scheduler.step()
    assert first + rest == straight
    assert torch.equal(param.detach(), final)


def test_polynomial_decay_follows_transformers_formula_to_the_floor() -> None:
    # transformers' get_polynomial_decay_schedule_with_warmup: (1 - progress) ** power above the end
    multiplier = lr_lambda("polynomial", warmup_steps=2, total_steps=12, min_lr_ratio=0.1, power=2.0)
    assert multiplier(1) == 0.5  # warm-up
    for step in (2, 4, 7, 12, 20):
        progress = min(1.0, (step - 2) / 10)
        assert multiplier(step) == pytest.approx(0.1 + 0.9 * (1 - progress) ** 2)


def test_adafactor_steps_with_the_learning_rate_masktrain_sets() -> None:
    from transformers.optimization import Adafactor

    param = torch.nn.Parameter(torch.ones(4, 4))
    optimizer = build_optimizer([param], optimizer_type="adafactor", learning_rate=1e-2, weight_decay=0.0)
    assert isinstance(optimizer, Adafactor)
    assert optimizer.defaults["relative_step"] is False and optimizer.defaults["scale_parameter"] is False
    param.grad = torch.ones(4, 4)
    optimizer.step()
    # the first Adafactor update is the RMS-normalised gradient (all ones here) times the rate
    assert torch.allclose(param.detach(), torch.full((4, 4), 1 - 1e-2), atol=1e-6)


def test_adafactor_optimizer_args() -> None:
    from masktrain.config.train import OptimSettings, parse_optimizer_args

    args = parse_optimizer_args(
        ("scale_parameter=True", "warmup_init=False", "weight_decay=0.01", "beta1=None"), "adafactor"
    )
    settings = OptimSettings(optimizer_type="adafactor", **args)
    assert settings.adafactor_args == {"scale_parameter": True, "warmup_init": False, "beta1": None}
    assert settings.weight_decay == 0.01
    with pytest.raises(OptimConfigError, match="relative_step=True: masktrain's --learning_rate"):
        OptimSettings(
            optimizer_type="adafactor", **parse_optimizer_args(("relative_step=True",), "adafactor")
        )
    with pytest.raises(
        TrainConfigError, match="scale_parameter is Adafactor's, not adamw's; use --optimizer_type adafactor"
    ):
        parse_optimizer_args(("scale_parameter=False",))
    with pytest.raises(OptimConfigError, match="are Adafactor's; use --optimizer_type adafactor"):
        OptimSettings(adafactor_args={"scale_parameter": False})


def test_prodigy_is_prodigyopts_with_musubis_optimizer_args() -> None:
    from prodigyopt import Prodigy

    from masktrain.config.train import OptimSettings, parse_optimizer_args

    # musubi-tuner's documented Prodigy arguments (docs/advanced_config.md), by musubi's class path
    values = (
        "decouple=True",
        "weight_decay=0.01",
        "use_bias_correction=True",
        "safeguard_warmup=True",
        "d_coef=2",
    )
    settings = OptimSettings(
        optimizer_type="prodigyopt.Prodigy",
        learning_rate=1.0,
        **parse_optimizer_args(values, "prodigyopt.Prodigy"),
    )
    assert settings.prodigy_args == {
        "decouple": True,
        "use_bias_correction": True,
        "safeguard_warmup": True,
        "d_coef": 2.0,
    }
    start = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizer = build_optimizer(
        [ours],
        optimizer_type=settings.optimizer_type,
        learning_rate=1.0,
        weight_decay=settings.weight_decay,
        prodigy_args=settings.prodigy_args,
    )
    assert isinstance(optimizer, Prodigy) and optimizer.param_groups[0]["d_coef"] == 2.0
    reference = Prodigy([theirs], lr=1.0, weight_decay=0.01, **settings.prodigy_args)
    for step in range(3):
        gradient = torch.randn(4, 4, generator=torch.Generator().manual_seed(step))
        for param, opt in ((ours, optimizer), (theirs, reference)):
            param.grad = gradient.clone()
            opt.step()
    assert torch.equal(ours, theirs) and not torch.equal(
        ours, torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    )
    with pytest.raises(
        TrainConfigError, match="d_coef is Prodigy's, not adamw's; use --optimizer_type prodigy"
    ):
        parse_optimizer_args(("d_coef=2",))


def test_loraplus_puts_the_up_matrices_in_a_faster_group() -> None:
    from masktrain.train.optim import param_groups

    down, up, other = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    named = [
        ("blocks.0.attn1.to_q.lora_A.default.weight", down),
        ("blocks.0.attn1.to_q.lora_B.default.weight", up),
    ]
    groups = param_groups(named, 1e-4, 16.0)
    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(1.6e-3)]
    assert groups[0]["params"] == [down] and groups[1]["params"] == [up]
    assert param_groups([("x", other)], 1e-4, None) == [{"params": [other], "lr": 1e-4}]
