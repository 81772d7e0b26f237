"""Write a small sample dataset for trying masktrain: photo-like images with tiered masks
(face 255, body 128, hair 80, background 0), captions, and a dataset TOML that reads the RGBA
images `convert-alpha` makes (alpha masks, the mask files as fallback).

    python scripts/make_sample.py sample
    masktrain convert-alpha --image_directory sample/images --mask_directory sample/masks \\
        --output_directory sample/rgba
    masktrain cache --dataset_config sample/dataset.toml --arch wan --vae tiny --t5 tiny
    masktrain train --dataset_config sample/dataset.toml --arch wan --dit tiny --use_mask_loss \
        --max_train_steps 20 --output_dir sample/out
    masktrain sample --arch wan --dit tiny --lora sample/out/lora.safetensors --vae tiny --t5 tiny \
        --sample_prompts sample/prompts.txt --output_dir sample/out

It also writes `prompts.txt`, a sample prompt file in musubi-tuner's format. With `--group_photos`
(needs scikit-image) it writes `group/`, photos of two people side by side, NASA's astronaut (a
public-domain photo shipped in scikit-image) and its cameraman, with their captions and a
dataset TOML reading masks from `masks_subject/`, and `reference.png`, the astronaut's face: the
inputs of the "Make your masks" section of docs/masks.md.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

DATASET_TOML = """\
[general]
resolution = [512, 512]
enable_bucket = true
caption_extension = ".txt"

[[datasets]]
image_directory = "rgba"
mask_directory = "masks"
cache_directory = "cache"
alpha_mask = true
"""

# musubi-tuner's prompt-file format: one prompt per line, options inline (size, frames, seed, steps).
PROMPTS = """\
# an image and a short clip of the subject, at the sample's size
a photo of sks person, sample --w 256 --h 256 --d 1 --s 20
a photo of sks person walking --w 256 --h 256 --f 9 --d 2 --s 20
"""


def tiered_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.3, 0.4)
    mask = np.zeros((h, w), np.uint8)
    mask[(np.abs(x - cx) < w * 0.22) & (y > cy + h * 0.1)] = 128  # body
    mask[((x - cx) / (w * 0.16)) ** 2 + ((y - cy + h * 0.05) / (h * 0.16)) ** 2 < 1] = 80  # hair
    mask[((x - cx) / (w * 0.11)) ** 2 + ((y - cy) / (h * 0.12)) ** 2 < 1] = 255  # face
    return mask


def photo(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    phase = rng.uniform(0, 6, 3)
    channels = [127 + 90 * np.sin(6 * x + 4 * y + p) for p in phase]
    noise = rng.normal(0, 6, (h, w, 3))
    return (np.stack(channels, -1) + noise).clip(0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="directory to create (images/, masks/)")
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--group_photos", action="store_true", help="also group/ and reference.png")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images, masks = args.root / "images", args.root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    sizes = [(768, 768), (1024, 640), (640, 1024)]
    for i in range(args.count):
        w, h = sizes[i % len(sizes)]
        name = f"subject_{i:02d}"
        Image.fromarray(photo(h, w, rng)).save(images / f"{name}.{'jpg' if i % 2 else 'png'}")
        Image.fromarray(tiered_mask(h, w, rng)).save(masks / f"{name}.png")
        (images / f"{name}.txt").write_text(f"a photo of sks person, sample {i}\n", encoding="utf-8")
    (args.root / "dataset.toml").write_text(DATASET_TOML, encoding="utf-8")
    (args.root / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    print(f"wrote {args.count} images, masks, captions, dataset.toml and prompts.txt under {args.root}")
    if args.group_photos:
        group_photos(args.root)


GROUP_TOML = """\
[general]
resolution = [512, 256]
caption_extension = ".txt"

[[datasets]]
image_directory = "group"
mask_directory = "masks_subject"
cache_directory = "group_cache"
require_mask = true
"""


def group_photos(root: Path) -> None:
    """Two people side by side (the subject left, then right), and the subject's face alone."""
    from skimage import data

    astronaut, camera = data.astronaut(), np.stack([data.camera()] * 3, -1)
    group = root / "group"
    group.mkdir(parents=True, exist_ok=True)
    for index, pair in enumerate([(astronaut, camera), (camera, astronaut)]):
        Image.fromarray(np.concatenate(pair, axis=1)).save(group / f"group_{index}.png")
        (group / f"group_{index}.txt").write_text("a photo of sks person beside a man\n", encoding="utf-8")
    Image.fromarray(astronaut[40:240, 120:320]).save(root / "reference.png")
    (root / "group.toml").write_text(GROUP_TOML, encoding="utf-8")
    print(f"wrote 2 group photos, group.toml and reference.png under {root}")


if __name__ == "__main__":
    main()
