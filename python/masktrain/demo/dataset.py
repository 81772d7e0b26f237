"""The demo's synthetic dataset: one subject with tiered masks (face 255, body 128, hair 80,
background 0) over a background, with captions and a dataset TOML. The random-background
scenario draws a different background for every image (:func:`random_items`); the bleed
scenario shoots every training image in one room (:func:`bleed_items`).

The subject looks the same in every item (skin-coloured face with eyes and mouth, dark red hair,
a blue and yellow striped body) and stands near the centre with a small jitter, so a LoRA has
something consistent to learn there. Backgrounds are drawn at random per item (stripes, checks,
gradients or blobs in random colours), so a LoRA trained without the mask also learns, and
drifts, on them. Training and held-out items come from separate random streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from masktrain import tiers

FACE, BODY, HAIR = tiers.FACE, tiers.BODY, tiers.HAIR
SKIN = (236, 188, 150)
EYES = (25, 25, 45)
MOUTH = (190, 40, 60)
HAIR_RGB = (120, 30, 20)
STRIPES = ((30, 60, 200), (250, 215, 40))

COLOURS = {
    "red": (200, 50, 45),
    "green": (60, 160, 70),
    "teal": (40, 150, 150),
    "orange": (240, 140, 40),
    "purple": (130, 60, 170),
    "grey": (128, 128, 128),
    "pink": (240, 150, 190),
    "olive": (120, 120, 40),
    "navy": (30, 40, 110),
    "white": (235, 235, 230),
    "black": (25, 25, 25),
    "brown": (120, 80, 45),
}
TEXTURES = ("striped", "checked", "gradient", "blotchy")

TOML = """\
[general]
resolution = [{size}, {size}]
batch_size = {batch_size}
caption_extension = ".txt"

[[datasets]]
image_directory = "{split}/images"
mask_directory = "{split}/masks"
cache_directory = "{split}/cache"
"""


@dataclass(frozen=True)
class Item:
    image: np.ndarray
    """(H, W, 3) uint8."""
    mask: np.ndarray
    """(H, W) uint8 tiered mask."""
    caption: str


def subject_mask(size: int, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """The tiered mask and the face centre (pixels) of one item."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx = size * (0.5 + rng.uniform(-0.05, 0.05))
    cy = size * (0.36 + rng.uniform(-0.04, 0.04))
    mask = np.zeros((size, size), np.uint8)
    shoulders = (np.abs(x - cx) < size * 0.24) & (y > cy + size * 0.15)
    mask[shoulders] = BODY
    mask[((x - cx) / (size * 0.19)) ** 2 + ((y - cy + size * 0.05) / (size * 0.19)) ** 2 < 1] = HAIR
    mask[((x - cx) / (size * 0.13)) ** 2 + ((y - cy) / (size * 0.15)) ** 2 < 1] = FACE
    return mask, cx, cy


def paint_subject(image: np.ndarray, mask: np.ndarray, cx: float, cy: float) -> None:
    """Draw the subject into `image` (in place) where the mask says it is."""
    size = mask.shape[0]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    image[mask == HAIR] = HAIR_RGB
    stripe = ((y - cy) // max(size // 16, 1)).astype(int) % 2
    body = mask == BODY
    for index, colour in enumerate(STRIPES):
        image[body & (stripe == index)] = colour
    face = mask == FACE
    image[face] = SKIN
    for side in (-1, 1):
        eye = ((x - cx - side * size * 0.05) ** 2 + (y - cy + size * 0.03) ** 2) < (size * 0.025) ** 2
        image[face & eye] = EYES
    mouth = (np.abs(x - cx) < size * 0.05) & (np.abs(y - cy - size * 0.07) < size * 0.012)
    image[face & mouth] = MOUTH


def texture(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A random background without pixel noise, (H, W, 3) float32 0..255, and its words."""
    names = rng.choice(list(COLOURS), size=2, replace=False)
    first, second = (np.array(COLOURS[name], np.float32) for name in names)
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "striped":
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.08, 0.3)
        t = (np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period) > 0).astype(np.float32)
    elif kind == "checked":
        cells = int(rng.integers(3, 9))
        t = ((np.floor(x * cells) + np.floor(y * cells)) % 2).astype(np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = x * np.cos(angle) + y * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:
        t = np.zeros((size, size), np.float32)
        for _ in range(6):
            bx, by, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.25)
            t = np.maximum(t, np.exp(-((x - bx) ** 2 + (y - by) ** 2) / radius**2))
    return first + t[..., None] * (second - first), f"a {names[0]} and {names[1]} {kind} background"


def with_noise(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`pixels` with the camera's per-image noise, as uint8."""
    return (pixels + rng.normal(0, 6, pixels.shape)).clip(0, 255).astype(np.uint8)


def background(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A random background and its words for the caption."""
    pixels, words = texture(size, rng)
    return with_noise(pixels, rng), words


def make_item(size: int, rng: np.random.Generator) -> Item:
    image, words = background(size, rng)
    mask, cx, cy = subject_mask(size, rng)
    paint_subject(image, mask, cx, cy)
    return Item(image, mask, f"a photo of sks person in front of {words}")


def random_items(split: str, count: int, size: int, seed: int) -> list[Item]:
    """The random-background scenario: a new background per item, train and held-out drawn from
    separate streams."""
    rng = np.random.default_rng([seed, {"train": 0, "heldout": 1}[split]])
    return [make_item(size, rng) for _ in range(count)]


def bleed_items(train: int, heldout: int, size: int, seed: int) -> dict[str, list[Item]]:
    """The bleed scenario, by split:

    - ``train``: every photo in the same room (one background drawn from `seed`, new camera noise
      per photo); the captions do not mention it, as users' captions rarely do.
    - ``heldout``: photos in other rooms (never the training room), captioned with them.
    - ``twin``: each held-out photo again, the same subject, pose and caption, in the training
      room: the "room painted everywhere" reference of the bleed score. Never trained on.
    - ``control``: each held-out photo again in a room neither split has seen (one per seed): the
      same score against it tells how much of the bleed is the training room and how much is a
      LoRA moving toward backgrounds in general.
    """
    room, room_words = texture(size, np.random.default_rng([seed, 2]))
    unseen, unseen_words = room, room_words
    attempt = 0
    while unseen_words == room_words:
        unseen, unseen_words = texture(size, np.random.default_rng([seed, 4, attempt]))
        attempt += 1
    rng = np.random.default_rng([seed, 3])
    items: dict[str, list[Item]] = {"train": [], "heldout": [], "twin": [], "control": []}
    for _ in range(train):
        image = with_noise(room, rng)
        mask, cx, cy = subject_mask(size, rng)
        paint_subject(image, mask, cx, cy)
        items["train"].append(Item(image, mask, "a photo of sks person"))
    while len(items["heldout"]) < heldout:
        other, words = texture(size, rng)
        if words in (room_words, unseen_words):  # held-out photos are in rooms of their own
            continue
        pictures = {
            "heldout": with_noise(other, rng),
            "twin": with_noise(room, rng),
            "control": with_noise(unseen, rng),
        }
        mask, cx, cy = subject_mask(size, rng)
        for split, picture in pictures.items():
            paint_subject(picture, mask, cx, cy)
            items[split].append(Item(picture, mask, f"a photo of sks person in front of {words}"))
    return items


def write_split(root: Path, split: str, items: list[Item], size: int, batch_size: int) -> Path:
    """Write the items (images, masks, captions) under ``root/split`` and the split's dataset
    TOML; returns it. Items are named ``{split}_{index:03d}``."""
    from PIL import Image

    images, masks = root / split / "images", root / split / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(items):
        name = f"{split}_{index:03d}"
        Image.fromarray(item.image).save(images / f"{name}.png")
        Image.fromarray(item.mask).save(masks / f"{name}.png")
        (images / f"{name}.txt").write_text(item.caption + "\n", encoding="utf-8")
    toml = root / f"{split}.toml"
    toml.write_text(TOML.format(size=size, batch_size=batch_size, split=split), encoding="utf-8")
    return toml
