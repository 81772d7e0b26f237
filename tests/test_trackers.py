"""musubi's logging flags: ``--log_with tensorboard|wandb|all``, ``--logging_dir``,
``--log_prefix``, ``--log_tracker_name``, ``--wandb_run_name``. What the trackers received is read
back with their own readers: TensorBoard's event accumulator, and the files of an offline wandb
run (``WANDB_MODE=offline``)."""

import json
import re
import struct
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import cached, words
from masktrain.cli.train import config_from_args
from masktrain.train.loop import run as run_train

RUN = (
    "--dataset_config {toml} --arch wan --dit tiny --device cpu --output_dir {out} --max_train_steps 3 "
    "--network_dim 4 --use_mask_loss --validation_dataset_config {toml} --validate_every_n_steps 2 "
    "--vae tiny --t5 tiny --sample_prompts {prompts} --sample_every_n_steps 2"
)


@pytest.fixture(scope="module")
def toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached(tmp_path_factory.mktemp("wan"), "wan")


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a cat --w 32 --h 32 --s 2 --d 1\na clip --w 32 --h 32 --f 5 --s 2 --d 2\n")
    return path


def test_tensorboard_in_logging_dir_with_prefix(toml: Path, tmp_path: Path) -> None:
    logs, out = tmp_path / "logs", tmp_path / "out"
    line = RUN + " --log_with tensorboard --logging_dir {logs} --log_prefix run-"
    run_train(config_from_args(words(line, toml=toml, out=out, prompts=_prompts(tmp_path), logs=logs)))
    (folder,) = logs.iterdir()  # musubi's layout: LOGGING_DIR/PREFIX + timestamp
    assert re.fullmatch(r"run-\d{14}", folder.name)
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss", "lr", "loss/face", "loss/background", "val/loss_face", "val/background_drift"} <= set(
        tags["scalars"]
    )
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("val/loss_face")] == [2, 3]
    assert sorted(tags["images"]) == ["sample/00", "sample/01"]  # the image, the video's middle frame
    image = events.Images("sample/01")[-1]
    assert (image.step, image.width, image.height) == (3, 32, 32)
    assert not (out / "tensorboard").exists()


def wandb_records(path: Path) -> list:
    """The records of an offline run's ``run-*.wandb`` file, parsed with wandb's own protobuf
    (``wandb.proto.wandb_internal_pb2.Record``). The file is LevelDB's log format
    (github.com/google/leveldb doc/log_format.md: 32 KiB blocks of records with a 7-byte header:
    crc32c, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) after wandb's own 7-byte header
    (``:W&B``, magic, version); wandb 0.31 ships no Python reader for it."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, chunks, pending = 32768, 7, [], b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:  # zero padding to the block's end
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_and_samples(
    toml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    line = RUN + " --log_with all --log_tracker_name masktrain-test --wandb_run_name tiny-run"
    run_train(config_from_args(words(line, toml=toml, out=out, prompts=_prompts(tmp_path))))
    (run,) = (out / "wandb").glob("offline-run-*")
    (log_file,) = run.glob("run-*.wandb")
    records = wandb_records(log_file)
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (info.display_name, info.project) == ("tiny-run", "masktrain-test")
    config = {item.key: json.loads(item.value_json) for item in info.config.update}
    assert config["output_name"] == "lora" and config["trackers"]["log_with"] == "all"
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            rows[row["_step"]] = row
    assert sorted(rows) == [1, 2, 3]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {m["step"]: m for m in metrics if "loss" in m}
    for step, row in rows.items():
        assert row["loss"] == pytest.approx(steps[step]["loss"]) and row["lr"] == pytest.approx(1e-4)
        assert row["loss/face"] == pytest.approx(steps[step]["loss_face"])
    assert "val/loss_face" in rows[2] and "val/loss_face" not in rows[1]
    assert rows[2]["sample/00/_type"] == "image-file" and rows[2]["sample/01/_type"] == "video-file"
    media = {p.suffix for p in (run / "files" / "media").rglob("*") if p.is_file()}
    assert media == {".png", ".mp4"}
    assert (out / "tensorboard").is_dir()  # --log_with all: TensorBoard too, in OUTPUT_DIR
