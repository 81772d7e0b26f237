"""`masktrain demo`: a short run shows what the design promises (every LoRA learns the subject;
masked prior preservation keeps the background near the base model, the mask loss alone does
not; in the bleed scenario it paints less of the training room into other photos), writes the
output tree, and prints commands that reproduce each run exactly."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image

from masktrain.cli.train import config_from_args as train_config
from masktrain.config import DemoConfig
from masktrain.demo import bleed
from masktrain.demo import run as run_demo
from masktrain.demo.dataset import FACE, HAIR, SKIN, make_item
from masktrain.demo.runs import RUNS
from masktrain.models import get_family

pytestmark = pytest.mark.slow  # the demo trains 3 + 12 LoRAs

NAMES = [spec.name for spec in RUNS]
BLEED_NAMES = [spec.name for spec in bleed.REPORTED_RUNS]
SEEDS = ["42", "43", "44"]


def check_picture(path: Path, aspect: tuple[float, float]) -> None:
    """A PNG of a readable size, its width / height within `aspect`, with a picture in it: many
    colours, and ink across most of its rows and columns."""
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.width > 800 and picture.height > 400
        assert aspect[0] < picture.width / picture.height < aspect[1], picture.size
        pixels = np.asarray(picture.convert("RGB")).astype(np.int16)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500
    ink = (pixels < 200).any(axis=-1)
    assert ink.any(axis=1).mean() > 0.6 and ink.any(axis=0).mean() > 0.6


def check_promises(report: dict) -> None:
    runs = report["runs"]
    assert list(runs) == NAMES
    for name in NAMES:
        assert runs[name]["subject_improvement"] > 0.03, (name, runs[name])
    drift = {name: runs[name]["background_drift"] for name in NAMES}
    # A mask weight is a loss weight, not a crop: the mask loss alone leaves the background free
    # to change (about as much as no mask at all); the prior term holds it near the base model.
    assert drift["masked"] > 0.5 * drift["unmasked"], drift
    assert drift["masked_prior"] < 0.5 * drift["masked"], drift
    assert drift["masked_prior"] < 0.5 * drift["unmasked"], drift


def check_bleed(report: dict) -> None:
    section = report["bleed"]
    assert section["seeds"] == [int(seed) for seed in SEEDS] and list(section["runs"]) == BLEED_NAMES
    assert section["fourth_run"]["name"] == BLEED_NAMES[-1] == "masked_prior_ema"
    runs = section["runs"]
    for name in BLEED_NAMES:
        assert list(runs[name]["seeds"]) == SEEDS
        bleeds = [runs[name]["seeds"][seed]["bleed"] for seed in SEEDS]
        assert runs[name]["mean"]["bleed"] == pytest.approx(np.mean(bleeds))
        assert runs[name]["spread"]["bleed"] == pytest.approx(np.std(bleeds, ddof=1))
        assert len(runs[name]["seeds"]["42"]["bleed_by_noise"]) == 5
    for seed in SEEDS:
        # Every seed: trained in one room, the unmasked LoRA paints it into other photos; masked
        # prior preservation paints less of it and drifts less.
        score = {name: runs[name]["seeds"][seed] for name in BLEED_NAMES}
        assert score["unmasked"]["bleed"] > 0.03, score
        assert score["masked_prior"]["bleed"] < 0.8 * score["unmasked"]["bleed"], score
        assert score["masked_prior"]["background_drift"] < 0.5 * score["masked"]["background_drift"], score
    assert section["ratios"]["masked_prior_bleed_over_unmasked"] == pytest.approx(
        runs["masked_prior"]["mean"]["bleed"] / runs["unmasked"]["mean"]["bleed"]
    )


@pytest.fixture(scope="module")
def wan_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo") / "out"
    result = subprocess.run(
        [sys.executable, "-m", "masktrain.cli", "demo", "--output-dir", str(out), "--steps", "60"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_demo_shows_the_effect(wan_demo: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, result = wan_demo
    report = json.loads((out / "report.json").read_text())
    check_promises(report)
    check_bleed(report)
    assert report["arch"] == "wan" and report["steps"] == 60
    # The tables are printed, one row per run: the random-background one first, as before.
    lines = result.stdout.splitlines()
    header = lines.index(f"{'run':<14}{'subject_improvement':>21}{'background_drift':>18}")
    for offset, name in enumerate(NAMES, start=1):
        assert lines[header + offset].startswith(name + " "), result.stdout
    bleed_header = next(i for i, line in enumerate(lines) if line.startswith("bleed scenario"))
    assert bleed_header > header + len(NAMES)
    assert "bleed_unseen_room" in lines[bleed_header + 1]
    for offset, name in enumerate(BLEED_NAMES, start=2):
        assert lines[bleed_header + offset].split()[0] == name, result.stdout


def test_demo_writes_the_output_tree(wan_demo: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = wan_demo
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    check_picture(out / "report.png", aspect=(1.5, 2.0))  # three curve panels over four masks
    check_picture(out / "bleed.png", aspect=(1.5, 2.0))  # four photos over three panels
    assert (
        "## Bleed: every training photo in one room" in markdown
        and "![bleed scenario](bleed.png)" in markdown
    )
    for name in BLEED_NAMES:
        assert f"| `{name}` |" in markdown
        for seed in SEEDS:
            run = report["bleed"]["runs"][name]["seeds"][seed]
            assert Path(run["lora"]) == out / "bleed" / f"seed_{seed}" / "runs" / name / f"{name}.safetensors"
            assert len(Path(run["metrics"]).read_text().splitlines()) == 60
    for split in ("train", "heldout", "twin", "control"):
        assert (out / "bleed" / "seed_43" / "data" / f"{split}.toml").is_file()
    for name in NAMES:
        run = report["runs"][name]
        assert not any(key.startswith("bleed") for key in run)  # the random scenario's runs: as before
        lora = Path(run["lora"])
        assert lora == out / "runs" / name / f"{name}.safetensors" and lora.is_file()
        with safetensors.safe_open(lora, "pt") as handle:
            assert handle.metadata()["masktrain.arch"] == "wan"
        records = [json.loads(line) for line in Path(run["metrics"]).read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, 61))
        assert {"loss_face", "loss_body", "loss_background", "prior_loss"} <= set(records[-1])
        assert run["command"] in markdown and f"| `{name}` |" in markdown
    assert (out / "data" / "train.toml").is_file() and (out / "data" / "heldout.toml").is_file()
    assert len(list((out / "data" / "heldout" / "cache").glob("*_0128x0128_wan.safetensors"))) == 8
    metrics = (out / "runs" / "masked_prior" / "metrics.jsonl").read_text().splitlines()
    prior = [json.loads(line)["prior_loss"] for line in metrics]
    assert max(prior) > 0  # the prior term was live


def test_demo_commands_reproduce_the_runs(wan_demo: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = wan_demo
    report = json.loads((out / "report.json").read_text())
    expected_mask_flags = {
        "unmasked": [],
        "masked": ["--use_mask_loss", "--mask_gamma", "0.7", "--mask_min_weight", "0.05"],
        "masked_prior": (
            "--use_mask_loss --mask_gamma 0.7 --mask_min_weight 0 --prior_preservation_weight 1.0 "
            "--prior_mask_threshold 0.1 --normalize_per_sample"
        ).split(),
    }
    for name in NAMES:
        words = shlex.split(report["runs"][name]["command"])
        assert words[:2] == ["masktrain", "train"]
        flags = words[2:]
        mask_flags = expected_mask_flags[name]
        assert flags[len(flags) - len(mask_flags) :] == mask_flags
        common = [flag for flag in flags[: len(flags) - len(mask_flags)] if flag.startswith("--")]
        assert not any("mask" in flag or "prior" in flag or "normalize" in flag for flag in common)
        # What the command parses to is exactly what the run saved as its resolved config.
        saved = (out / "runs" / name / "config.json").read_text()
        assert train_config(tuple(flags)).to_json() == saved
    for name, run in report["bleed"]["runs"].items():
        for seed, scores in run["seeds"].items():
            flags = shlex.split(scores["command"])[2:]
            assert flags[flags.index("--seed") + 1] == seed
            assert flags[len(flags) - len(run["flags"]) :] == run["flags"]
            saved = (out / "bleed" / f"seed_{seed}" / "runs" / name / "config.json").read_text()
            assert train_config(tuple(flags)).to_json() == saved


def test_a_printed_command_trains_the_same_lora(
    wan_demo: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    out, _ = wan_demo
    command = json.loads((out / "report.json").read_text())["runs"]["masked"]["command"]
    flags = shlex.split(command)[2:]
    flags[flags.index("--output_dir") + 1] = str(tmp_path / "again")
    result = subprocess.run(
        [sys.executable, "-m", "masktrain.cli", "train", *flags], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = safetensors.torch.load_file(out / "runs" / "masked" / "masked.safetensors")
    got = safetensors.torch.load_file(tmp_path / "again" / "masked.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)


def test_demo_on_qwen_image(tmp_path: Path) -> None:
    report = run_demo(DemoConfig(output_dir=tmp_path / "out", arch="qwen_image", steps=100), train_config)
    check_promises(json.loads(report.json_path.read_text()))
    assert "masked_prior" in report.table()


@pytest.mark.parametrize("scenario", ["random", "bleed"])
def test_one_scenario(tmp_path: Path, scenario: str) -> None:
    """`--scenario` runs one scenario and writes only its parts of the report."""
    config = DemoConfig(
        output_dir=tmp_path / "out", steps=3, train_items=4, heldout_items=2, eval_draws=2, scenario=scenario
    )
    # A picture of the other scenario from an earlier demo in the same folder does not linger.
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / ("bleed.png" if scenario == "random" else "report.png")
    stale.write_bytes(b"an earlier demo's picture")
    report = run_demo(config, train_config)

    def not_json(constant: str) -> None:
        raise AssertionError(f"report.json holds {constant}, which is not JSON")

    document = json.loads(report.json_path.read_text(), parse_constant=not_json)
    assert not stale.exists()
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert markdown.startswith("# masktrain demo")
    assert ("bleed" in document) == (scenario == "bleed") == (tmp_path / "out" / "bleed.png").is_file()
    assert ("runs" in document) == (scenario == "random") == (tmp_path / "out" / "report.png").is_file()
    assert ("## Bleed" in markdown) == (scenario == "bleed")
    assert ("bleed scenario" in report.table()) == (scenario == "bleed")


@pytest.mark.parametrize("arch", ["wan", "qwen_image"])
def test_tiny_vae_latents_are_unit_scale(arch: str) -> None:
    """The tiny VAEs' normalisation constants fit their random weights, so the image content is
    the bulk of the cached latents (with a released VAE's constants it was ~1%)."""
    family = get_family(arch)
    vae = family.load_vae("tiny", torch.device("cpu"), torch.float32)
    rng = np.random.default_rng(0)
    size = 128 if arch == "wan" else 64
    pixels = torch.stack([torch.from_numpy(make_item(size, rng).image) for _ in range(8)])
    latents = family.encode_pixels(vae, pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1).unsqueeze(2))
    assert latents.shape[-2:] == (16, 16)
    mean, std = latents.mean(dim=(0, 2, 3, 4)), latents.std(dim=(0, 2, 3, 4))
    assert mean.abs().max() < 0.5 and 0.6 < std.min() and std.max() < 1.6, (mean, std)


def test_dataset_draws_the_tiered_subject() -> None:
    item = make_item(128, np.random.default_rng(0))
    assert set(np.unique(item.mask)) == {0, HAIR, 128, FACE}
    assert item.image.shape == (128, 128, 3) and item.caption.startswith("a photo of sks person")
    # The subject looks the same in every item; the background does not.
    other = make_item(128, np.random.default_rng(1))
    for one in (item, other):
        assert (one.image[one.mask == FACE] == SKIN).all(axis=-1).mean() > 0.8
    assert item.caption != other.caption
