"""musubi-tuner's sample prompt file (``--sample_prompts``), read as musubi reads it
(``musubi_tuner/training/sampling_prompts.py`` @ 30c658c), with errors where musubi logs and
carries on:

- ``.txt``: one prompt per line, ``#`` starts a comment line, options inline after the prompt:
  ``--w`` width, ``--h`` height, ``--f`` frames, ``--d`` seed, ``--s`` steps, ``--l`` CFG scale,
  ``--fs`` flow shift, ``--n`` negative prompt, ``--g`` embedded guidance (none of masktrain's
  models has it: accepted and ignored, as musubi ignores it for WAN);
- ``.toml``: a ``[prompt]`` table of defaults with ``[[prompt.subset]]`` entries;
- ``.json``: a list of prompt lines or of tables.

Tables use musubi's keys: ``prompt``, ``width``, ``height``, ``frame_count``, ``seed``,
``sample_steps``, ``cfg_scale``, ``discrete_flow_shift``, ``negative_prompt``, ``guidance_scale``.
Conditioning options, for the conditioned modes (``docs/conditioning.md``): ``--i`` the start
image (WAN I2V / FLF2V), ``--ei`` the end image (FLF2V), ``--ci`` a control image (one-frame,
Qwen-Image-Edit; repeated for several), ``--of`` one-frame inference's settings (musubi's
``target_index=1,control_index=0``); keys ``image_path``, ``end_image_path``,
``control_image_path`` (a path or a list), ``one_frame``. Each image must exist (a path relative
to the working directory, as musubi reads it). ``--cn`` (a Fun-Control video) is for a variant
masktrain does not train: a one-line error. Torch-free: the file is checked with the other flags,
before any model loads.

Bounds, so that a typo is an error naming its line, not gigabytes allocated or a long run ended
at its first sampling: sizes as in the dataset TOML, ``--w`` / ``--h`` in [1, 4096] and ``--f`` in
[1, 1025] (well inside the models' position tables: WAN's RoPE holds 1024 positions per
axis, 16384 pixels or 4093 frames; Qwen-Image's 4096); ``--s`` in [1, 1000] (musubi clamps to
1000). Every number must be finite, ``--l`` in (0, 100] and ``--fs`` in [0.01, 100]: real values
are 1 to 10 and 1 to 20; at ``--fs 1e-30`` or ``1e30``, or ``--l inf``, the schedulers' sigmas or
the guided prediction overflow and the sample comes out black.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from masktrain.config.dataset import MAX_FRAMES, MAX_SIDE
from masktrain.errors import SamplePromptError

DEFAULT_SIZE = 256
"""musubi's default width and height."""
DEFAULT_STEPS = 20
"""musubi's default number of denoising steps."""
MAX_STEPS = 1000
"""musubi clamps ``--s`` to 1000."""
MAX_CFG_SCALE = 100.0
"""``--l``: real values are 1 to 10; far above, the guided prediction overflows."""
FLOW_SHIFT_RANGE = (0.01, 100.0)
"""``--fs``: real values are 1 to 20; far outside, the schedulers' sigmas collapse to 0 or 1."""

# line option -> table key (musubi's names); values are parsed by the key's type below.
_LINE_OPTIONS = {
    "w": "width",
    "h": "height",
    "f": "frame_count",
    "d": "seed",
    "s": "sample_steps",
    "g": "guidance_scale",
    "fs": "discrete_flow_shift",
    "l": "cfg_scale",
    "n": "negative_prompt",
}
_CONDITIONING_OPTIONS = {
    "i": "image_path",
    "ei": "end_image_path",
    "ci": "control_image_path",
    "of": "one_frame",
}
_REFUSED = {"cn": "a Fun-Control video, for a model variant masktrain does not train"}
_INTEGERS = ("width", "height", "frame_count", "seed", "sample_steps")
_NUMBERS = ("guidance_scale", "discrete_flow_shift", "cfg_scale")
_TEXTS = ("prompt", "negative_prompt")
_TABLE_KEYS = (*_INTEGERS, *_NUMBERS, *_TEXTS)
_IMAGE_KEYS = ("image_path", "end_image_path")
_REFUSED_KEYS = {"control_video_path": "cn"}


@dataclass(frozen=True)
class SamplePrompt:
    """One sample: what to generate and how. Unset values take the family's defaults."""

    index: int
    """Position in the file (the ``{index:02d}`` of the output name)."""
    prompt: str
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    frames: int = 1
    """1: an image (PNG); more: a video (MP4)."""
    seed: int | None = None
    """None: ``--seed`` plus the index, so every sampling of a run uses the same noise."""
    steps: int = DEFAULT_STEPS
    cfg_scale: float | None = None
    """Classifier-free guidance (musubi's ``--l``); None: the family's default."""
    flow_shift: float | None = None
    """musubi's ``--fs``; None: the family's default."""
    negative_prompt: str | None = None
    """None: the family's default negative prompt."""
    guidance_scale: float | None = None
    """musubi's ``--g`` (embedded guidance): no masktrain model has it, so it is ignored (logged)."""
    image_path: Path | None = None
    """``--i``: the start image (WAN I2V / FLF2V)."""
    end_image_path: Path | None = None
    """``--ei``: the end image (WAN FLF2V)."""
    control_image_paths: tuple[Path, ...] = ()
    """``--ci``: control images (WAN one-frame, Qwen-Image-Edit)."""
    one_frame: str | None = None
    """``--of``: one-frame inference's settings, as musubi writes them."""
    where: str = ""
    """``FILE:LINE`` (or ``FILE entry N``), for messages."""

    @property
    def is_video(self) -> bool:
        return self.frames > 1


def load_prompts(path: Path, flag: str = "--sample_prompts") -> list[SamplePrompt]:
    """The prompts of `path`, checked; a :class:`SamplePromptError` names the file, the line and
    the option that cannot be used."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise SamplePromptError(f"{flag} {path}: cannot read it ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise SamplePromptError(f"{flag} {path}: not UTF-8 text; save it as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        entries = _toml_entries(path, text)
    elif suffix == ".json":
        entries = _json_entries(path, text)
    else:  # musubi reads .txt; any other name is read as text too
        entries = [
            (f"{path}:{number}", line.strip())
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.startswith("#")
        ]
    prompts: list[SamplePrompt] = []
    for where, entry in entries:
        table = _line_table(entry, where) if isinstance(entry, str) else _check_table(entry, where)
        prompts.append(_prompt(len(prompts), table, where))
    if not prompts:
        raise SamplePromptError(f"{flag} {path}: no prompts in it (lines starting with # are comments)")
    return prompts


def _line_table(line: str, where: str) -> dict[str, Any]:
    """One prompt line as a table: the text before the first `` --``, then the options."""
    parts = (f" {line}" if line.startswith("--") else line).split(" --")
    table: dict[str, Any] = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        name, _, value = part.strip().partition(" ")
        name, value = name.lower(), value.strip()
        if name in _REFUSED:
            raise SamplePromptError(f"{where}: --{name} gives {_REFUSED[name]}; remove it")
        if name in _CONDITIONING_OPTIONS:
            if not value:
                raise SamplePromptError(f"{where}: --{name} needs a value")
            key = _CONDITIONING_OPTIONS[name]
            if key == "control_image_path":  # repeated for several
                table.setdefault(key, []).append(value)
            else:
                table[key] = value
            continue
        if name not in _LINE_OPTIONS:
            known = " ".join(f"--{option}" for option in _LINE_OPTIONS)
            raise SamplePromptError(f"{where}: unknown option --{name}; the options are {known}")
        if not value:
            raise SamplePromptError(f"{where}: --{name} needs a value")
        table[_LINE_OPTIONS[name]] = _value(_LINE_OPTIONS[name], value, f"{where}: --{name}")
    return table


def _value(key: str, raw: Any, where: str) -> Any:
    try:
        if key in _INTEGERS:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if key in _NUMBERS:
            if isinstance(raw, bool):
                raise ValueError
            number = float(raw)
            if not math.isfinite(number):  # inf passes "> 0" and turns every sample black
                raise OverflowError
            return number
    except OverflowError:
        raise SamplePromptError(f"{where}: expected a finite number, got {raw!r}") from None
    except (TypeError, ValueError):
        kind = "an integer" if key in _INTEGERS else "a number"
        raise SamplePromptError(f"{where}: expected {kind}, got {raw!r}") from None
    if not isinstance(raw, str):
        raise SamplePromptError(f"{where}: expected text, got {raw!r}")
    return raw


def _check_table(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise SamplePromptError(f"{where}: expected a prompt line or a table, got {table!r}")
    checked: dict[str, Any] = {}
    for key, raw in table.items():
        if key in _REFUSED_KEYS:
            raise SamplePromptError(f"{where}: {key} gives {_REFUSED[_REFUSED_KEYS[key]]}; remove it")
        if key in (*_IMAGE_KEYS, "one_frame") and isinstance(raw, str) and raw:
            checked[key] = raw
            continue
        if key == "control_image_path" and (isinstance(raw, str) or _texts(raw)):
            checked[key] = [raw] if isinstance(raw, str) else list(raw)
            continue
        if key not in _TABLE_KEYS:
            raise SamplePromptError(f"{where}: unknown key {key!r}; the keys are {', '.join(_TABLE_KEYS)}")
        checked[key] = _value(key, raw, f"{where}: {key}")
    return checked


#: ``--of`` keys that are FramePack's and do nothing for WAN (musubi accepts them).
_FRAMEPACK_ONLY = ("no_post", "no_2x", "no_4x")


def one_frame_positions(prompt: SamplePrompt) -> tuple[tuple[int, ...], int]:
    """The control images' positions and the target's from the prompt's ``--of``, written as
    musubi writes it: ``target_index=1,control_index=0;2`` (FramePack's ``no_post`` / ``no_2x`` /
    ``no_4x`` are accepted and do nothing for WAN). A :class:`SamplePromptError` names the line."""
    where = f"{prompt.where}: --of {prompt.one_frame}"
    if not prompt.one_frame:
        raise SamplePromptError(
            f"{prompt.where}: one-frame sampling needs --of target_index=N,control_index=A;B"
        )
    settings: dict[str, str] = {}
    for part in prompt.one_frame.split(","):
        key, _, value = part.strip().partition("=")
        if key in _FRAMEPACK_ONLY and not value:
            continue
        if key not in ("target_index", "control_index") or not value:
            raise SamplePromptError(
                f"{where}: expected target_index=N,control_index=A;B, not {part.strip()!r}"
            )
        settings[key] = value
    try:
        target = int(settings["target_index"])
        controls = tuple(int(v) for v in settings["control_index"].split(";"))
    except (KeyError, ValueError):
        raise SamplePromptError(f"{where}: expected target_index=N,control_index=A;B (integers)") from None
    if len(controls) != len(prompt.control_image_paths):
        given = len(prompt.control_image_paths)
        raise SamplePromptError(f"{where}: {len(controls)} control position(s) for {given} --ci image(s)")
    return controls, target


def _texts(raw: Any) -> bool:
    return isinstance(raw, list) and bool(raw) and all(isinstance(item, str) and item for item in raw)


def _image(raw: str, where: str, key: str) -> Path:
    """An image path of the prompt: it must be a file."""
    path = Path(raw).expanduser()
    if not path.is_file():
        raise SamplePromptError(f"{where}: {key} {raw}: no such file")
    return path


def _toml_entries(path: Path, text: str) -> list[tuple[str, Any]]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SamplePromptError(f"{path}: not valid TOML ({error})") from None
    defaults = document.get("prompt")
    if not isinstance(defaults, dict) or not isinstance(defaults.get("subset"), list):
        raise SamplePromptError(
            f"{path}: expected a [prompt] table with [[prompt.subset]] entries (musubi's TOML form)"
        )
    base = {key: value for key, value in defaults.items() if key != "subset"}
    entries: list[tuple[str, Any]] = []
    for number, subset in enumerate(defaults["subset"], start=1):
        where = f"{path} [[prompt.subset]] {number}"
        if not isinstance(subset, dict):
            raise SamplePromptError(f"{where}: expected a table")
        entries.append((where, {**base, **subset}))
    return entries


def _json_entries(path: Path, text: str) -> list[tuple[str, Any]]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise SamplePromptError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, list):
        raise SamplePromptError(f"{path}: expected a JSON list of prompts (lines or objects)")
    return [(f"{path} entry {number}", entry) for number, entry in enumerate(document, start=1)]


def _prompt(index: int, table: dict[str, Any], where: str) -> SamplePrompt:
    prompt = table.get("prompt", "")
    if not prompt.strip():
        raise SamplePromptError(f"{where}: the prompt text is empty")
    for key in ("width", "height", "frame_count", "sample_steps"):
        if key in table and table[key] < 1:
            raise SamplePromptError(f"{where}: {key} must be >= 1, got {table[key]}")
    for key, most in (
        ("width", MAX_SIDE),
        ("height", MAX_SIDE),
        ("frame_count", MAX_FRAMES),
        ("sample_steps", MAX_STEPS),
    ):
        if table.get(key, 1) > most:
            raise SamplePromptError(f"{where}: {key} must be <= {most}, got {table[key]}")
    if not 0 <= table.get("seed", 0) < 2**63:
        raise SamplePromptError(f"{where}: seed must be in [0, 2**63), got {table['seed']}")
    for key in ("cfg_scale", "discrete_flow_shift"):
        if key in table and not table[key] > 0:
            raise SamplePromptError(f"{where}: {key} must be > 0, got {table[key]}")
    if table.get("cfg_scale", 1) > MAX_CFG_SCALE:
        raise SamplePromptError(f"{where}: cfg_scale must be <= {MAX_CFG_SCALE:g}, got {table['cfg_scale']}")
    low, high = FLOW_SHIFT_RANGE
    if not low <= table.get("discrete_flow_shift", 1) <= high:
        raise SamplePromptError(
            f"{where}: discrete_flow_shift must be in [{low:g}, {high:g}], got {table['discrete_flow_shift']}"
        )
    return SamplePrompt(
        index=index,
        prompt=prompt.strip(),
        width=table.get("width", DEFAULT_SIZE),
        height=table.get("height", DEFAULT_SIZE),
        frames=table.get("frame_count", 1),
        seed=table.get("seed"),
        steps=table.get("sample_steps", DEFAULT_STEPS),
        cfg_scale=table.get("cfg_scale"),
        flow_shift=table.get("discrete_flow_shift"),
        negative_prompt=table.get("negative_prompt"),
        guidance_scale=table.get("guidance_scale"),
        image_path=None if "image_path" not in table else _image(table["image_path"], where, "--i"),
        end_image_path=None
        if "end_image_path" not in table
        else _image(table["end_image_path"], where, "--ei"),
        control_image_paths=tuple(_image(raw, where, "--ci") for raw in table.get("control_image_path", [])),
        one_frame=table.get("one_frame"),
        where=where,
    )
