"""The binding's contract: the GIL is released while the core works, the thread pool survives
fork() (PyTorch DataLoader workers), the stubs match the module, every function, class and
attribute says what it does (``__doc__``), and importing the CLI stays free of torch."""

import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import TickCounter
from masktrain import _native


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        rgba = rng.integers(0, 256, (512, 512, 4), dtype=np.uint8)
        path = root / f"{i}.png"
        Image.fromarray(rgba, "RGBA").save(path, compress_level=1)
        paths.append(path)
    return paths


def test_gil_is_released_during_native_work(images: list[Path]) -> None:
    """A pure-Python thread keeps counting while the main thread is inside native code. With
    the GIL held for the whole call it would be frozen (no ticks) until the call returned."""
    with TickCounter() as ticks:
        during = []
        for _ in range(3):
            before = ticks.count
            results = _native.prepare_batch(images * 4, [(256, 256)], alpha_mask=True)
            during.append(ticks.count - before)
        assert all(isinstance(r, _native.PreparedItem) for r in results)
    assert min(during) > 100, during


def test_threads_share_the_module_safely(images: list[Path]) -> None:
    expected = _native.prepare_batch(images, [(128, 128)], alpha_mask=True)
    outputs: list[list] = [[] for _ in range(4)]

    def work(slot: list) -> None:
        slot.extend(_native.prepare_batch(images, [(128, 128)], alpha_mask=True))

    threads = [threading.Thread(target=work, args=(slot,)) for slot in outputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out in outputs:
        for a, b in zip(out, expected, strict=True):
            np.testing.assert_array_equal(a.latent_mask, b.latent_mask)


def _child(paths: list[str], queue: multiprocessing.Queue) -> None:
    results = _native.prepare_batch(paths, [(128, 128)], alpha_mask=True)
    queue.put([float(r.latent_mask.sum()) for r in results])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
# Python >= 3.12 warns about fork() in a process with threads; forking is the point here.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pool_works_in_forked_children(images: list[Path]) -> None:
    """DataLoader workers fork after the parent used the pool; the child must not hang."""
    parent = [
        float(r.latent_mask.sum()) for r in _native.prepare_batch(images, [(128, 128)], alpha_mask=True)
    ]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    # Daemons, killed in `finally`: a hung child must fail the test, not hang the run.
    children = [
        context.Process(target=_child, args=([str(p) for p in images], queue), daemon=True) for _ in range(2)
    ]
    try:
        for child in children:
            child.start()
        results = [queue.get(timeout=60) for _ in children]
        for child in children:
            child.join(timeout=60)
            assert child.exitcode == 0
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
    assert results == [parent, parent]


def test_stubs_match_the_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "masktrain._native"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_everything_the_module_offers_has_a_docstring() -> None:
    """A doc comment placed above the wrong item leaves the function without one (it happened to
    ``decode_image``); ``help(_native)`` is the binding's reference."""
    offered = {name: getattr(_native, name) for name in dir(_native) if not name.startswith("_")}
    offered = {name: thing for name, thing in offered.items() if callable(thing)}
    for cls in [thing for thing in offered.values() if isinstance(thing, type)]:
        offered |= {f"{cls.__name__}.{name}": v for name, v in vars(cls).items() if not name.startswith("_")}
    assert {"decode_image", "load_mask", "same_aspect", "MaskIndex.get", "PreparedItem.path"} <= set(offered)
    assert [name for name, thing in offered.items() if not thing.__doc__] == []


def test_cli_import_leaves_torch_out() -> None:
    code = "import sys, masktrain.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    help_text = subprocess.run(
        [sys.executable, "-m", "masktrain.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "convert-alpha" in help_text


def test_thread_count_follows_the_environment() -> None:
    code = "from masktrain import _native; print(_native.thread_count())"
    env = {**os.environ, "MASKTRAIN_NUM_THREADS": "3"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "3"


def test_arrays_have_documented_shapes_and_dtypes(images: list[Path]) -> None:
    (item,) = _native.prepare_batch(images[:1], [(128, 64)], alpha_mask=True, latent_factor=16)
    assert item.image.shape == (64, 128, 3) and item.image.dtype == np.uint8
    assert item.mask.shape == (64, 128) and item.mask.dtype == np.uint8
    assert item.latent_mask.shape == (4, 8) and item.latent_mask.dtype == np.float32
    assert item.bucket == (128, 64) and item.original_size == (512, 512)
    with pytest.raises(ValueError, match="bucket"):
        _native.prepare_batch(images[:1], [(0, 64)])
    with pytest.raises(ValueError, match="empty"):
        _native.prepare_batch(images[:1], [])
