"""The memory warnings of a CUDA run (issue 22), with the CUDA queries faked: a step 3x slower
than the median of the last 20 while the card is 95% reserved is a spill (warned once per run),
and a card with less free memory than the plan needs is named before the model loads."""

from __future__ import annotations

import logging

import pytest

from masktrain.train import memory_fit
from masktrain.train.spill import FULL, WARMUP, SpillWatch

GIB = 2**30


def watch(reserved: float, fitting: int | None = 12) -> SpillWatch:
    return SpillWatch(24 * GIB, lambda: int(reserved * 24 * GIB), fitting_swap=fitting, swap=0)


def spills(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "spilling" in r.getMessage()]


def test_a_slow_step_on_a_full_card_warns_once_naming_the_plans_swap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spill = watch(reserved=0.97)
    for _ in range(WARMUP + 20):
        spill.observe(2.0)
    spill.observe(6.5)
    spill.observe(7.0)
    (message,) = spills(caplog)
    assert "step 26 took 6.5 s, 3.2x the median of the last steps (2.0 s)" in message
    assert "23.3 of the card's 24.0 GiB reserved" in message
    assert "the plan fits this card with --blocks_to_swap 12" in message


def test_slow_steps_with_room_on_the_card_or_fast_steps_on_a_full_one_do_not_warn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    roomy, full = watch(reserved=FULL - 0.01), watch(reserved=1.0)
    for _ in range(WARMUP + 20):
        roomy.observe(2.0)
        full.observe(2.0)
    roomy.observe(20.0)
    full.observe(5.9)  # under 3x
    assert spills(caplog) == []


def test_the_warm_up_steps_are_not_watched(caplog: pytest.LogCaptureFixture) -> None:
    spill = watch(reserved=1.0)
    for seconds in (30.0, 1.0, 1.0, 1.0, 40.0):  # compilation, the first sampling
        spill.observe(seconds)
    assert spills(caplog) == []
    spill.observe(1.0)
    spill.observe(3.5)
    assert len(spills(caplog)) == 1


def test_a_busy_card_is_named_before_the_model_loads(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Plan:
        device_peak = 10 * GIB

    monkeypatch.setattr(memory_fit.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory_fit.torch.cuda, "mem_get_info", lambda: (6 * GIB, 24 * GIB))
    with caplog.at_level(logging.WARNING):
        memory_fit.warn_if_card_busy(Plan())  # type: ignore[arg-type]
    assert (
        "the card has 6.00 GiB free but the plan needs 10.00 GiB: another process holds part of it"
        in caplog.text
    )
    monkeypatch.setattr(memory_fit.torch.cuda, "mem_get_info", lambda: (12 * GIB, 24 * GIB))
    caplog.clear()
    memory_fit.warn_if_card_busy(Plan())  # type: ignore[arg-type]
    assert caplog.text == ""
