"""Control images (``control_directory``) matched to items as musubi-tuner matches them
(``dataset/datasources.py`` @ 30c658c), and the prompt file's ``--of`` positions."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from masktrain.config.sample_prompts import load_prompts, one_frame_positions
from masktrain.data.controls import ControlIndex
from masktrain.errors import DataError, SamplePromptError


def _images(folder: Path, *names: str) -> None:
    folder.mkdir(exist_ok=True)
    for name in names:
        Image.new("RGB", (4, 4)).save(folder / name)


def test_controls_are_matched_by_stem_longest_stems_first_and_ordered_by_number(tmp_path: Path) -> None:
    _images(
        tmp_path, "walk_1.png", "walk.png", "walk_0.png", "walk_fast_0.png", "run_0002.jpg", "run_0001.jpg"
    )
    index = ControlIndex(tmp_path, ["walk", "walk_fast", "run", "swim"])
    assert [p.name for p in index.get("walk")] == ["walk.png", "walk_0.png", "walk_1.png"]
    assert [p.name for p in index.get("walk_fast")] == ["walk_fast_0.png"]  # not walk's
    assert [p.name for p in index.get("run")] == ["run_0001.jpg", "run_0002.jpg"]
    assert index.get("swim") == [] and index.get("unknown") == []


def test_a_control_suffix_that_is_not_a_number_is_named(tmp_path: Path) -> None:
    _images(tmp_path, "walk_left.png")
    with pytest.raises(
        DataError, match=r"walk_left.png: a control image of 'walk' is named walk.EXT or walk_N.EXT"
    ):
        ControlIndex(tmp_path, ["walk"])


def test_one_frame_positions_are_read_as_musubi_writes_them(tmp_path: Path) -> None:
    _images(tmp_path, "a.png", "b.png")
    prompts = tmp_path / "prompts.txt"
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    prompts.write_text(
        f"x --ci {a} --ci {b} --of target_index=1,control_index=0;2,no_post\n"
        f"y --ci {a} --of target_index=1,control_index=0;2\n"
        f"z --ci {a} --of target=1\n",
        encoding="utf-8",
    )
    first, second, third = load_prompts(prompts)
    assert [p.name for p in first.control_image_paths] == ["a.png", "b.png"]
    assert one_frame_positions(first) == ((0, 2), 1)
    with pytest.raises(
        SamplePromptError, match=r"prompts.txt:2: --of .*: 2 control position\(s\) for 1 --ci image"
    ):
        one_frame_positions(second)
    with pytest.raises(SamplePromptError, match=r"prompts.txt:3: --of target=1: expected target_index=N"):
        one_frame_positions(third)
