"""``masktrain cache --cache_mask_gamma / --cache_mask_min_weight``: the transform is applied in
the native core at pixel resolution before pooling (the reference's pinned 0.2221032, where pooling
first would give 0.2734411), recorded in every latent file's metadata and in the fingerprint (a
change re-caches), shown by ``inspect``, and read by ``train``: gamma or floor applied twice warn, a
baked floor at or above the prior threshold is an error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from helpers import cache_tiny, make_dataset, train_config
from masktrain import _native
from masktrain.config import MaskLossSettings
from masktrain.config.inspect import InspectConfig
from masktrain.data import cache_format as fmt
from masktrain.errors import TrainConfigError
from masktrain.inspect.page import run as inspect
from masktrain.train.loop import run as run_train


def test_the_transform_comes_before_pooling(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 120
    rgba[:4, :, 3] = 80  # alpha 80 on the top half, 0 below
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    (item,) = _native.prepare_batch([tmp_path / "a.png"], [(8, 8)], alpha_mask=True, cache_mask_gamma=0.7)
    assert float(item.latent_mask[0, 0]) == pytest.approx((80 / 255) ** 0.7 * 0.5, abs=1e-6)
    assert float(item.latent_mask[0, 0]) == pytest.approx(0.2221032, abs=1e-6)
    with pytest.raises(ValueError, match=r"cache_mask_min_weight must be in \[0, 1\), got 1"):
        _native.prepare_batch([tmp_path / "a.png"], [(8, 8)], alpha_mask=True, cache_mask_min_weight=1.0)


def _mask_weights(path: Path) -> np.ndarray:
    return next(v for k, v in load_file(str(path)).items() if k.startswith("mask_weights"))[0, 0]


def test_baked_caches_record_it_and_train_and_inspect_read_it(tmp_path: Path, caplog) -> None:
    toml = make_dataset(tmp_path, count=2)
    cache_tiny(tmp_path, cache_mask_gamma=0.7, cache_mask_min_weight=0.2)
    (path,) = (tmp_path / "cache").glob("item0_*_wan.safetensors")
    metadata = fmt.read_metadata(path)
    assert metadata is not None
    assert (metadata.extra["cache_mask_gamma"], metadata.extra["cache_mask_min_weight"]) == ("0.7", "0.2")
    with Image.open(tmp_path / "masks" / "item0.png") as mask:  # 64x64, the bucket: no resize
        pixels = np.asarray(mask.convert("L"), dtype=np.float32) / 255
    expected = ((pixels**0.7) * 0.8 + 0.2).reshape(8, 8, 8, 8).mean(axis=(1, 3))  # 8x8 area pooling
    np.testing.assert_allclose(_mask_weights(path), expected, atol=1e-6)

    (report,) = inspect(InspectConfig(toml, output_dir=tmp_path / "inspect"))
    assert report.items[0].baked == "gamma 0.7, floor 0.2"

    caplog.set_level("INFO")
    with pytest.raises(
        TrainConfigError, match=r"baked --cache_mask_min_weight 0\.2 >= --prior_mask_threshold 0\.1"
    ):
        run_train(train_config(toml, tmp_path / "out"))  # masked prior, threshold 0.1
    double = MaskLossSettings(use_mask_loss=True, mask_gamma=0.7, mask_min_weight=0.1)
    run_train(train_config(toml, tmp_path / "out", max_train_steps=1, mask=double))
    assert "This will apply gamma twice" in caplog.text and "This will apply a floor twice" in caplog.text

    cache_tiny(tmp_path)  # without the flags: the fingerprint changed, the items are re-cached
    (path,) = (tmp_path / "cache").glob("item0_*_wan.safetensors")
    metadata = fmt.read_metadata(path)
    assert metadata is not None and metadata.extra["cache_mask_gamma"] == "1"
    np.testing.assert_allclose(_mask_weights(path), pixels.reshape(8, 8, 8, 8).mean(axis=(1, 3)), atol=1e-6)
