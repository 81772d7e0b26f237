"""Human-parsing label sets -> mask tiers: which region each class of a segmentation model's label
set is (``face``, ``hair``, ``body``, ``background``), and which classes are *details* (eyes,
lips, teeth, glasses, hands: ``masks tiers --details`` moves them all to one region). Torch-free.

Built in, by the class names the checkpoints' ``config.json`` carries (matched ignoring case and
punctuation, so ``Upper-clothes`` and ``UpperClothes`` are one name):

- ``atr``: the 18 ATR classes of SegFormer clothes / human-parsing checkpoints
  (``mattmdjaga/segformer_b2_clothes``);
- ``lip``: the 20 classes of the LIP dataset (Look Into Person);
- ``sapiens``: the 28 body-part classes of Meta's Sapiens segmentation models (Goliath).

Hats count as hair (they sit where hair is and move with it); bags and scarves as body. A table of
your own is a TOML file: ``[labels]`` mapping class names (or ids) to regions, and optionally
``details = ["name", ...]``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from masktrain.errors import FlagError

REGION_NAMES = ("face", "hair", "body", "background")


@dataclass(frozen=True)
class LabelTable:
    name: str
    regions: Mapping[str, str]
    """Class name (as the model names it) -> region."""
    details: frozenset[str] = frozenset()
    """Classes ``--details`` moves (their region here is the default)."""

    def region(self, label: str) -> str | None:
        return self.regions.get(label) if label in self.regions else self._by_key().get(normalize(label))

    def _by_key(self) -> dict[str, str]:
        return {normalize(name): region for name, region in self.regions.items()}

    def is_detail(self, label: str) -> bool:
        return normalize(label) in {normalize(name) for name in self.details}

    def covers(self, labels: list[str]) -> bool:
        """Whether every one of a model's class names has a region here."""
        keys = self._by_key()
        return all(normalize(label) in keys for label in labels)


def normalize(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _table(name: str, rows: str, details: tuple[str, ...]) -> LabelTable:
    regions = {}
    for row in rows.strip().splitlines():
        label, region = row.split(":")
        regions[label.strip()] = region.strip()
    return LabelTable(name, MappingProxyType(regions), frozenset(details))


ATR = _table(
    "atr",
    """
    Background: background
    Hat: hair
    Hair: hair
    Sunglasses: face
    Upper-clothes: body
    Skirt: body
    Pants: body
    Dress: body
    Belt: body
    Left-shoe: body
    Right-shoe: body
    Face: face
    Left-leg: body
    Right-leg: body
    Left-arm: body
    Right-arm: body
    Bag: body
    Scarf: body
    """,
    details=("Sunglasses",),
)
LIP = _table(
    "lip",
    """
    Background: background
    Hat: hair
    Hair: hair
    Glove: body
    Sunglasses: face
    Upper-clothes: body
    Dress: body
    Coat: body
    Socks: body
    Pants: body
    Jumpsuits: body
    Scarf: body
    Skirt: body
    Face: face
    Left-arm: body
    Right-arm: body
    Left-leg: body
    Right-leg: body
    Left-shoe: body
    Right-shoe: body
    """,
    details=("Glove", "Sunglasses"),
)
SAPIENS = _table(
    "sapiens",
    """
    Background: background
    Apparel: body
    Face_Neck: face
    Hair: hair
    Left_Foot: body
    Left_Hand: body
    Left_Lower_Arm: body
    Left_Lower_Leg: body
    Left_Shoe: body
    Left_Sock: body
    Left_Upper_Arm: body
    Left_Upper_Leg: body
    Lower_Clothing: body
    Right_Foot: body
    Right_Hand: body
    Right_Lower_Arm: body
    Right_Lower_Leg: body
    Right_Shoe: body
    Right_Sock: body
    Right_Upper_Arm: body
    Right_Upper_Leg: body
    Torso: body
    Upper_Clothing: body
    Lower_Lip: face
    Upper_Lip: face
    Lower_Teeth: face
    Upper_Teeth: face
    Tongue: face
    """,
    details=("Left_Hand", "Right_Hand", "Lower_Lip", "Upper_Lip", "Lower_Teeth", "Upper_Teeth", "Tongue"),
)
BUILT_IN: Mapping[str, LabelTable] = MappingProxyType({t.name: t for t in (ATR, LIP, SAPIENS)})
"""The built-in tables, by ``--labels`` name."""
#: Sapiens' class order (its TorchScript files carry no names): the 28 Goliath classes above.
SAPIENS_CLASSES = tuple(SAPIENS.regions)


def load_table(path: Path) -> LabelTable:
    """A table of your own (see the module docstring); errors name the file and the key."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise FlagError(f"--labels {path}: cannot read it as TOML ({error})") from None
    labels = document.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise FlagError(f"--labels {path}: expected a [labels] table of class name = region")
    for label, region in labels.items():
        if region not in REGION_NAMES:
            regions = ", ".join(REGION_NAMES)
            raise FlagError(f"--labels {path}: [labels] {label} = {region!r}; a region is one of {regions}")
    details = document.get("details", [])
    if not isinstance(details, list) or not all(isinstance(d, str) for d in details):
        raise FlagError(f"--labels {path}: details must be a list of class names")
    unknown = [d for d in details if d not in labels]
    if unknown:
        raise FlagError(f"--labels {path}: details {unknown} are not in [labels]")
    return LabelTable(path.stem, MappingProxyType(dict(labels)), frozenset(details))
