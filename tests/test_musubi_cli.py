"""A musubi-tuner user's command line works as copied: musubi's documented WAN and Qwen-Image LoRA
commands train through ``masktrain train`` with only the launcher and the paths changed; several
values after ``--network_args`` / ``--optimizer_args``; ``--task`` checked against ``--dit``;
epoch checkpoints and their pruning; each musubi flag masktrain does not implement is a one-line
error naming what to use instead."""

import json
import math
import re
from pathlib import Path

import av
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from PIL import Image

from helpers import cached, words
from masktrain.cli import main
from masktrain.cli.musubi import ACCEPTED, NOT_IMPLEMENTED
from masktrain.cli.train import config_from_args
from masktrain.errors import TrainConfigError
from masktrain.models import wan
from masktrain.train.loop import run as run_train
from masktrain.train.optim import lr_lambda

# kohya-ss/musubi-tuner @ 30c658c (v0.3.4), docs/wan.md, "Training": the WAN 2.1 T2V LoRA command,
# after `accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16
# src/musubi_tuner/wan_train_network.py`. Paths are replaced by the tiny model and a sample dataset;
# `adamw8bit` by `adamw` (bitsandbytes is not installed here).
MUSUBI_WAN = """
    --task t2v-1.3B
    --dit {dit}
    --dataset_config {toml} --sdpa --mixed_precision bf16 --fp8_base
    --optimizer_type adamw --learning_rate 2e-4 --gradient_checkpointing
    --max_data_loader_n_workers 2 --persistent_data_loader_workers
    --network_module networks.lora_wan --network_dim 32
    --timestep_sampling shift --discrete_flow_shift 3.0
    --max_train_epochs 16 --save_every_n_epochs 1 --seed 42
    --output_dir {out} --output_name name-of-lora
"""
# The same repository and commit, docs/qwen_image.md, "Training" (qwen_image_train_network.py).
MUSUBI_QWEN = """
    --dit {dit}
    --vae {vae}
    --text_encoder {te}
    --model_version original
    --dataset_config {toml}
    --sdpa --mixed_precision bf16
    --timestep_sampling shift
    --weighting_scheme none --discrete_flow_shift 2.2
    --optimizer_type adamw --learning_rate 5e-5 --gradient_checkpointing
    --max_data_loader_n_workers 2 --persistent_data_loader_workers
    --network_module networks.lora_qwen_image
    --network_dim 16
    --max_train_epochs 16 --save_every_n_epochs 1 --seed 42
    --output_dir {out} --output_name name-of-lora
"""


# The same repository and commit, docs/sampling_during_training.md, "Command line options for
# training with sampling" (its HunyuanVideo --text_encoder1/2 and VAE tiling flags become the
# family's own text-encoder flag), and its example prompt file (sizes, frames and steps made small
# for the tiny models on the CPU).
MUSUBI_SAMPLING = """
    --vae {vae} {text_flag} {te}
    --sample_prompts {prompts}
    --sample_every_n_epochs 1 --sample_every_n_steps 1000 --sample_at_first
"""
PROMPT_FILE = """\
# prompt 1: for generating a cat video
A cat walks on the grass, realistic style. --w 64 --h 48 --f 5 --d 1 --s 3

# prompt 2: for generating a dog image
A dog runs on the beach, realistic style. --w 48 --h 32 --f 1 --d 2 --s 3
"""
# masktrain's own: validation by region, and keeping only the last epochs' checkpoints.
MASKTRAIN_EXTRAS = "--validation_dataset_config {toml} --validate_every_n_steps 8 --save_last_n_epochs 3"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {arch: cached(tmp_path_factory.mktemp(arch), arch) for arch in ("wan", "qwen_image")}


def _toml(tmp_path: Path) -> Path:
    """A dataset TOML path that exists (flag checks run before it is read)."""
    path = tmp_path / "dataset.toml"
    path.write_text("")
    return path


def _train(line: str, arch: str, **paths: object) -> list[str]:
    return ["train", "--arch", arch, *words(line, **paths)]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "line"), [("wan", MUSUBI_WAN), ("qwen_image", MUSUBI_QWEN)])
def test_musubis_documented_command_trains_as_copied(arch: str, line: str, datasets, tmp_path) -> None:
    """musubi's command, with its sampling flags, through ``masktrain train``: the LoRA, samples at
    the first step and after every epoch, the contact sheet, validation by region, and only the
    last epochs' checkpoints on disk."""
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT_FILE if arch == "wan" else PROMPT_FILE.replace("--f 5", "--f 1"))
    text_flag = "--t5" if arch == "wan" else "--text_encoder"
    command = " ".join(
        (line, MUSUBI_SAMPLING if arch == "wan" else MUSUBI_SAMPLING.replace("--vae {vae} ", ""))
    )
    paths = dict(dit="tiny", vae="tiny", te="tiny", toml=datasets[arch], out=out, prompts=prompts)
    args = _train(f"{command} {MASKTRAIN_EXTRAS}", arch, text_flag=text_flag, **paths)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lora = safetensors.torch.load_file(out / "name-of-lora.safetensors")
    assert lora and all(bool(torch.isfinite(t).all()) for t in lora.values())
    # One checkpoint per epoch (--save_every_n_epochs 1): 16 epochs of 2 batches (4 items, batch 2),
    # the last 3 epochs' kept (--save_last_n_epochs 3).
    steps = sorted(int(p.name.removeprefix("step-")) for p in out.glob("step-*"))
    assert steps == [28, 30, 32]
    state = json.loads((out / "step-000032" / "state.json").read_text())
    assert state == {"step": 32, "epoch": 16, "batches_done": 0}
    config = json.loads((out / "config.json").read_text())
    assert config["memory"]["fp8_base"] == (arch == "wan") and config["mixed_precision"] == "bf16"
    # samples: at the first step (the base model) and at every epoch's end
    sampled = list(range(0, 33, 2))
    video = arch == "wan"
    expected = {f"name-of-lora_{step:06d}_01_2.png" for step in sampled}
    expected |= {f"name-of-lora_{step:06d}_00_1.{'mp4' if video else 'png'}" for step in sampled}
    if video:
        expected |= {f"name-of-lora_{step:06d}_00_1_middle.png" for step in sampled}
    assert {p.name for p in (out / "sample").iterdir()} == expected | {"name-of-lora_contact_sheet.html"}
    for step in (0, 32):
        with Image.open(out / "sample" / f"name-of-lora_{step:06d}_01_2.png") as image:
            assert image.size == (48, 32) and image.mode == "RGB"
    if video:
        with av.open(str(out / "sample" / "name-of-lora_000032_00_1.mp4")) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        assert len(frames) == 5 and frames[0].shape == (48, 64, 3)
    sheet = (out / "sample" / "name-of-lora_contact_sheet.html").read_text()
    assert re.findall(r"<tr><th>([^<]+)</th>", sheet) == ["base model (step 0)"] + [
        f"step {s}" for s in sampled[1:]
    ]
    # validation by region every 8 steps (and at the end)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if "val_loss_face" in r]
    assert [r["step"] for r in validations] == [8, 16, 24, 32]
    assert all(math.isfinite(v) for r in validations for v in r.values())


def test_several_values_after_network_args_and_optimizer_args(tmp_path: Path) -> None:
    config = config_from_args(
        [
            *words(
                "--dataset_config {t} --arch wan --dit tiny --output_dir {o}", t=_toml(tmp_path), o=tmp_path
            ),
            "--network_args",
            "exclude_patterns=[r'.*ffn.*']",
            "verbose=True",
            "--optimizer_args",
            "weight_decay=0.05",
            "betas=(0.9,0.99)",
            "eps=1e-6",
            *words("--network_dropout 0.1 --lr_scheduler cosine_with_min_lr --lr_scheduler_min_lr_ratio 0.1"),
        ]
    )
    assert config.network.exclude_patterns == (".*ffn.*",) and config.network.verbose
    assert config.network.network_dropout == 0.1
    assert (config.optim.weight_decay, config.optim.betas, config.optim.eps) == (0.05, (0.9, 0.99), 1e-6)
    multiplier = lr_lambda("cosine_with_min_lr", total_steps=10, min_lr_ratio=0.1)
    assert (
        multiplier(0) == 1.0 and multiplier(10) == pytest.approx(0.1) and multiplier(5) == pytest.approx(0.55)
    )


@pytest.mark.parametrize(
    "flag", ["--log_tracker_config t.toml", "--compile", "--flash3", "--guidance_scale 1.0"]
)
def test_an_unimplemented_musubi_flag_is_one_line_naming_what_to_do(flag: str, tmp_path: Path) -> None:
    args = _train("--dataset_config {t} --dit tiny --output_dir {o}", "wan", t=_toml(tmp_path), o=tmp_path)
    result = CliRunner().invoke(main, [*args, *flag.split()])
    assert result.exit_code == 2
    name = flag.split()[0][2:]
    message = f"Error: --{name} is not implemented by masktrain: {NOT_IMPLEMENTED[name]}"
    assert message in result.output


def test_accepted_musubi_flags_are_logged_as_ignored(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO")
    config_from_args(
        words(
            "--dataset_config {t} --arch wan --dit tiny --output_dir {o} --max_data_loader_n_workers 2 "
            "--persistent_data_loader_workers --save_state",
            t=_toml(tmp_path),
            o=tmp_path,
        )
    )
    logged = caplog.text
    for name in ("max_data_loader_n_workers", "persistent_data_loader_workers", "save_state"):
        assert f"--{name} is accepted and ignored: {ACCEPTED[name][1]}" in logged


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--task i2v-14B-FC", "--task i2v-14B-FC: Fun-Control training"),
        ("--task t2v-7B", "--task 't2v-7B' is not a WAN 2.1 / 2.2 task; one of t2v-1.3B, t2v-14B"),
        ("--model_version original", "--model_version is not used with --arch wan; use --task"),
        ("--network_args loraplus_lr_ratio=0", "--network_args loraplus_lr_ratio must be > 0, got 0.0"),
        ("--optimizer_args momentum=0.9", "--optimizer_args 'momentum=0.9': expected weight_decay="),
        ("--network_dropout 1.5", "--network_dropout must be in range [0, 1)"),
    ],
)
def test_musubi_flag_values_that_cannot_work_are_named(flags: str, message: str, tmp_path: Path) -> None:
    base = words("--dataset_config {t} --arch wan --dit tiny --output_dir {o}", t=_toml(tmp_path), o=tmp_path)
    with pytest.raises(TrainConfigError, match=re.escape(message)):
        config_from_args([*base, *flags.split()])


def test_task_is_checked_against_the_transformer_dit_loads(datasets, tmp_path: Path) -> None:
    folder = tmp_path / "wan-tiny"
    wan.tiny_transformer().save_pretrained(folder)  # 24 wide, 2 blocks: no released task
    base = words(
        "--dataset_config {t} --arch wan --dit {d} --output_dir {o}", t=datasets["wan"], d=folder, o=tmp_path
    )
    with pytest.raises(
        TrainConfigError, match=r"--task t2v-14B is a 5120-wide, 40-block transformer, but --dit"
    ):
        run_train(config_from_args([*base, "--task", "t2v-14B", "--max_train_steps", "1"]))
    # --dit tiny stands for every task of its arch
    tiny = words(
        "--dataset_config {t} --arch wan --dit tiny --output_dir {o}", t=datasets["wan"], o=tmp_path / "t"
    )
    run_train(config_from_args([*tiny, *words("--task t2v-14B --max_train_steps 1 --device cpu")]))


def test_old_checkpoints_are_pruned(datasets, tmp_path: Path) -> None:
    by_steps, by_epochs = tmp_path / "steps", tmp_path / "epochs"
    common = "--dataset_config {t} --arch wan --dit tiny --device cpu --network_dim 4"
    run_train(
        config_from_args(
            words(
                common + " --output_dir {o} --max_train_steps 5 --save_every_n_steps 1 --save_last_n_steps 2",
                t=datasets["wan"],
                o=by_steps,
            )
        )
    )
    assert sorted(p.name for p in by_steps.glob("step-*")) == ["step-000004", "step-000005"]
    run_train(
        config_from_args(
            words(
                common
                + " --output_dir {o} --max_train_epochs 4 --save_every_n_epochs 1 --save_last_n_epochs 2",
                t=datasets["wan"],
                o=by_epochs,
            )
        )
    )
    assert sorted(p.name for p in by_epochs.glob("step-*")) == ["step-000006", "step-000008"]


def test_the_docs_list_every_musubi_flag_of_the_table() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "musubi.md").read_text()
    table = doc.split("## Every other musubi flag", 1)[1].split("\n## ", 1)[0]
    for name in [*ACCEPTED, *NOT_IMPLEMENTED]:
        assert f"`--{name}`" in table, name


# --- validation loss by region ---------------------------------------------------------------------


def test_validation_by_region_is_logged_at_its_steps(datasets, tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO")
    out = tmp_path / "out"
    toml = datasets["wan"]
    line = "--dataset_config {t} --arch wan --dit tiny --device cpu --output_dir {o} --max_train_steps 5"
    line += " --validation_dataset_config {t} --validate_every_n_steps 2 --learning_rate 1e-2 --network_dim 4"
    run_train(config_from_args(words(line, t=toml, o=out)))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if "val_loss_face" in r]
    assert [r["step"] for r in validations] == [2, 4, 5]  # every 2 steps and at the end
    for record in validations:
        assert set(record) == {
            "step",
            "val_loss_face",
            "val_loss_body",
            "val_loss_background",
            "val_subject_improvement",
            "val_background_drift",
        }
        assert all(math.isfinite(v) for v in record.values())
    assert validations[-1]["val_background_drift"] > 0  # the LoRA moved away from the base
    assert "validation at step 4: face" in caplog.text and "subject vs base" in caplog.text


def test_validation_of_an_untrained_lora_equals_the_base_and_matches_a_hand_computation(datasets) -> None:
    from helpers import train_config
    from masktrain.data.cached_items import find_cached_items
    from masktrain.data.loader import load_batch
    from masktrain.models import get_family
    from masktrain.tiers import TIER_EDGES
    from masktrain.train.build import build_experts
    from masktrain.train.flow_matching import noised
    from masktrain.train.validation import SIGMAS, Validator

    toml = datasets["wan"]
    family = get_family("wan")
    experts = build_experts(train_config(toml, Path("unused")), family, torch.device("cpu"), torch.float32)
    items = find_cached_items(toml, "wan")[:1]
    metrics = Validator(items, family, 7, torch.device("cpu")).run(experts, torch.float32, None)
    # LoRA B is zero at init: the LoRA is the base exactly
    assert metrics["val_subject_improvement"] == 0 and metrics["val_background_drift"] == 0
    # the face loss by hand: item 0 at the four sigmas, noise seeded by (seed 7, index 0)
    batch = load_batch(0, items)
    latents = batch.latents.repeat_interleave(len(SIGMAS), dim=0)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7 * 1_000_003))
    noisy, target = noised(latents, noise, torch.tensor(SIGMAS))
    with torch.no_grad():
        prediction = family.predict(
            experts.low, noisy, torch.tensor(SIGMAS), family.collate_text(batch.text * 4)
        )
    face = (batch.mask_weights.repeat_interleave(4, dim=0) >= TIER_EDGES[1]).expand_as(prediction)
    expected = float(((prediction - target) ** 2)[face].mean())
    assert metrics["val_loss_face"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_loraplus_and_prodigy_train_from_musubis_flags(datasets, tmp_path: Path) -> None:
    """LoRA+ scales the up matrices' first AdamW step (sign(g) * lr, from zero) by the ratio; Prodigy
    by musubi's class path trains, checkpoints and resumes."""
    common = "--dataset_config {t} --arch wan --dit tiny --device cpu --network_dim 4"
    up = {}
    for ratio in (None, 4):
        out = tmp_path / f"plus{ratio}"
        args = words(
            common + " --max_train_steps 1 --output_dir {o} --learning_rate 1e-3", t=datasets["wan"], o=out
        )
        if ratio is not None:
            args += ["--network_args", f"loraplus_lr_ratio={ratio}"]
        run_train(config_from_args(args))
        adapter = safetensors.torch.load_file(out / "step-000001" / "adapter.safetensors")
        up[ratio] = {k: v for k, v in adapter.items() if "lora_B" in k}
        down = {k: v for k, v in adapter.items() if "lora_A" in k}
    for key, value in up[4].items():
        assert value.abs().max() > 0
        torch.testing.assert_close(value, 4 * up[None][key], rtol=1e-4, atol=1e-9)
    assert down  # A has no gradient while B is zero: both runs leave it at its initialisation
    # the ratio shapes the optimizer's groups and their rates: a resume must keep it
    plus = tmp_path / "plus4"
    resume = words(
        common + " --output_dir {o} --resume {r}", t=datasets["wan"], o=plus, r=plus / "step-000001"
    )
    with pytest.raises(TrainConfigError, match=r"loraplus_lr_ratio: 4\.0 in the checkpoint, None now"):
        run_train(config_from_args([*resume, "--max_train_steps", "2"]))
    out = tmp_path / "prodigy"
    prodigy = (
        common
        + " --max_train_steps 2"
        + (
            " --output_dir {o} --optimizer_type prodigyopt.Prodigy --learning_rate 1 --optimizer_args"
            " decouple=True weight_decay=0.01 use_bias_correction=True safeguard_warmup=True d_coef=2"
        )
    )
    run_train(config_from_args(words(prodigy, t=datasets["wan"], o=out)))
    state = torch.load(out / "step-000002" / "optimizer.pt", weights_only=True)
    group = state["param_groups"][0]
    assert (group["d_coef"], group["decouple"], group["safeguard_warmup"]) == (2.0, True, True)
    adapter = safetensors.torch.load_file(out / "step-000002" / "adapter.safetensors")
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 0
    resumed = prodigy.replace("--max_train_steps 2", "--max_train_steps 3") + " --resume {r}"
    run_train(config_from_args(words(resumed, t=datasets["wan"], o=out, r=out / "step-000002")))
    assert (out / "step-000003").is_dir()
