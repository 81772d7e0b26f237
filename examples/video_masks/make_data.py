"""Write the data the three example TOMLs in this folder train on: one 34-frame video of a square
that moves across the frame, with its mask in the three forms masktrain reads for a video.

    python examples/video_masks/make_data.py examples/video_masks/data

- ``videos/square.mkv`` (+ ``square.txt``, its caption): the clip, 64x64 at 16 fps (FFV1);
- ``mask_videos/square.mkv``: the mask as a lossless gray FFV1 video (255 on the square, 0 off it);
- ``mask_frames/square/00000.png ...``: the mask as a folder of PNG frames;
- ``clips.jsonl``: the clip with its own ``mask_path`` (the frame folder).

Every frame is made from the square's position alone, so a test can compute each latent frame's
mask weights by hand (:func:`square_box`).
"""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

SIZE = 64
FRAMES = 34
FPS = 16
SIDE = 16
CAPTION = "a red square slides across a blue wall"


def square_box(frame: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the square in `frame`: it moves one pixel right per frame."""
    left, top = 4 + frame, 24
    return left, top, left + SIDE, top + SIDE


def mask_frame(frame: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    left, top, right, bottom = square_box(frame)
    mask[top:bottom, left:right] = 255
    return mask


def picture_frame(frame: int) -> np.ndarray:
    rgb = np.empty((SIZE, SIZE, 3), np.uint8)
    rgb[:] = (40, 60, 170)
    rgb[mask_frame(frame) > 0] = (200, 30, 30)
    return rgb


def write_video(path: Path, frames: list[np.ndarray], pixel_format: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, pixel_format
        stream.time_base = Fraction(1, FPS)
        source_format = "gray" if frames[0].ndim == 2 else "rgb24"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format=source_format)))
        container.mux(stream.encode())


def main(root: Path) -> None:
    write_video(root / "videos" / "square.mkv", [picture_frame(i) for i in range(FRAMES)], "yuv444p")
    (root / "videos" / "square.txt").write_text(CAPTION + "\n")
    write_video(root / "mask_videos" / "square.mkv", [mask_frame(i) for i in range(FRAMES)], "gray")
    folder = root / "mask_frames" / "square"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(FRAMES):
        Image.fromarray(mask_frame(i)).save(folder / f"{i:05d}.png")
    record = {"video_path": "videos/square.mkv", "caption": CAPTION, "mask_path": "mask_frames/square"}
    (root / "clips.jsonl").write_text(json.dumps(record) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "data"))
