"""What sampling writes under ``OUTPUT_DIR/sample/``, each file atomically:

- ``{output_name}_{step:06d}_{index:02d}_{seed}.png`` for an image, ``.mp4`` for a video (H.264
  through PyAV, at the family's frame rate), with the video's middle frame beside it as
  ``..._middle.png`` for the contact sheet;
- Qwen-Image-Layered: ``..._{seed}_layer{i}.png``, each image the model made as RGBA (layer 0 its
  first: the base, for a model trained on it), and ``..._{seed}.png`` all of them side by side;
- ``{output_name}_contact_sheet.html``: one row per sampled step (step 0 is the base model), one
  column per prompt, each cell the image (or the video's middle frame) linked to its file. It is
  rebuilt from the files on disk after each sampling, so a resumed run's sheet holds every step.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import torch

from masktrain import atomic
from masktrain.config.sample_prompts import SamplePrompt

SAMPLE_DIR = "sample"
MIDDLE = "_middle"


def sample_dir(output_dir: Path) -> Path:
    return output_dir / SAMPLE_DIR


def sample_path(output_dir: Path, output_name: str, step: int, index: int, seed: int, video: bool) -> Path:
    suffix = "mp4" if video else "png"
    return sample_dir(output_dir) / f"{output_name}_{step:06d}_{index:02d}_{seed}.{suffix}"


def middle_frame_path(video: Path) -> Path:
    return video.with_name(f"{video.stem}{MIDDLE}.png")


def sample_drawn(output_dir: Path, output_name: str, step: int, index: int, seed: int) -> bool:
    """Whether prompt `index`'s sample of `step` is on disk: its PNG, or its MP4 and middle frame."""
    image, video = (sample_path(output_dir, output_name, step, index, seed, v) for v in (False, True))
    return image.is_file() or (video.is_file() and middle_frame_path(video).is_file())


def write_sample(path: Path, frames: torch.Tensor, fps: float | None) -> None:
    """(F, H, W, 3) uint8 frames: a PNG of the one frame, or an MP4 and its middle frame."""
    if path.suffix == ".png":
        atomic.write_bytes(path, _png(frames[0]))
        return
    atomic.write_bytes(path, _mp4(frames, fps or 16.0))
    atomic.write_bytes(middle_frame_path(path), _png(frames[frames.shape[0] // 2]))


def layer_path(path: Path, layer: int) -> Path:
    """Qwen-Image-Layered: image `layer` of the sample `path`."""
    return path.with_name(f"{path.stem}_layer{layer}.png")


def write_layers(path: Path, layers: torch.Tensor) -> None:
    """(L, H, W, 4) uint8 RGBA images: each as :func:`layer_path`, then all side by side at `path`
    (the contact sheet's cell; written last, as what says the sample is complete)."""
    for index, layer in enumerate(layers):
        atomic.write_bytes(layer_path(path, index), _png(layer))
    atomic.write_bytes(path, _png(torch.cat(list(layers), dim=1)))


def _png(frame: torch.Tensor) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _mp4(frames: torch.Tensor, fps: float) -> bytes:
    import av

    _, height, width, _ = frames.shape
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        # yuv420p, what every player reads, needs even sides: the pipelines make multiples of 16
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(frame.contiguous().numpy(), format="rgb24")
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def write_contact_sheet(output_dir: Path, output_name: str, prompts: Sequence[SamplePrompt]) -> Path:
    """Rebuild ``{output_name}_contact_sheet.html`` from the samples on disk; returns its path."""
    folder = sample_dir(output_dir)
    pattern = re.compile(rf"{re.escape(output_name)}_(\d{{6}})_(\d{{2}})_(\d+)\.(png|mp4)")
    cells: dict[int, dict[int, str]] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match is not None:
            cells.setdefault(int(match[1]), {})[int(match[2])] = path.name
    columns = max([len(prompts) - 1, *(i for row in cells.values() for i in row)], default=-1) + 1
    head = "".join(
        f"<th>{index:02d}<br>{html.escape(prompts[index].prompt if index < len(prompts) else '')}</th>"
        for index in range(columns)
    )
    rows = []
    for step in sorted(cells):
        label = "base model (step 0)" if step == 0 else f"step {step}"
        row = [f"<th>{label}</th>"]
        for index in range(columns):
            name = cells[step].get(index)
            if name is None:
                row.append("<td></td>")
                continue
            thumb = middle_frame_path(Path(name)).name if name.endswith(".mp4") else name
            kind = "video: middle frame" if name.endswith(".mp4") else "image"
            row.append(
                f'<td><a href="{html.escape(name)}"><img src="{html.escape(thumb)}" '
                f'title="{html.escape(name)} ({kind})"></a></td>'
            )
        rows.append("<tr>" + "".join(row) + "</tr>")
    page = _PAGE.format(
        title=html.escape(f"{output_name}: samples"), head=head, rows="\n".join(rows) or "<tr></tr>"
    )
    target = folder / f"{output_name}_contact_sheet.html"
    atomic.write_text(target, page)
    return target


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px; vertical-align: top; }}
thead th {{ max-width: 256px; font-weight: normal; text-align: left; }}
img {{ max-width: 256px; max-height: 256px; }}
</style></head>
<body><h1>{title}</h1>
<table><thead><tr><th></th>{head}</tr></thead>
<tbody>
{rows}
</tbody></table></body></html>
"""
