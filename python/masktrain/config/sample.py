"""The sampling flags of ``masktrain train`` (musubi-tuner's spellings) and of ``masktrain sample``:
the prompt file, when to sample, and the VAE and text encoder that sampling loads (training itself
reads cached latents and embeddings, so without ``--sample_prompts`` those flags are accepted and
ignored, as musubi's commands always carry them).

When: at the first step with ``--sample_at_first`` (the base model on a fresh run), every
``--sample_every_n_steps`` steps, at the end of every ``--sample_every_n_epochs``-th epoch, and at
the last step. Torch-free; the prompt file is read and checked here, before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from masktrain import catalog
from masktrain.config.device import check_device
from masktrain.config.memory import MemorySettings
from masktrain.config.sample_prompts import SamplePrompt, load_prompts, one_frame_positions
from masktrain.errors import FlagError, SamplePromptError, SettingError, TrainConfigError


@dataclass(frozen=True)
class SampleSettings:
    sample_prompts: Path | None = None
    """musubi's prompt file (.txt with --w --h --f --d --s --l --fs --n after each prompt, .toml or
    .json); samples go to OUTPUT_DIR/sample. Unset: no sampling."""
    sample_every_n_steps: int | None = None
    """Sample every N optimizer steps."""
    sample_every_n_epochs: int | None = None
    """Sample at the end of every N-th epoch."""
    sample_at_first: bool = False
    """Sample before the first step (the base model, on a fresh run)."""
    vae: str | None = None
    """The VAE that decodes samples ('tiny', a folder or a single file), as for ``cache``."""
    text_encoder: str | None = None
    """The text encoder that encodes the prompts (the family's text flag: --t5 / --text_encoder)."""
    text_tokenizer: str | None = None
    """A tokenizer folder for a single-file text encoder."""
    fp8_text_encoder: bool = False
    """The text encoder's block Linear weights as float8 e4m3 (--fp8_t5 / --fp8_vl)."""
    clip: str | None = None
    """WAN 2.1 I2V / FLF2V: the CLIP vision model that embeds each prompt's --i / --ei image, as
    for cache."""

    @property
    def enabled(self) -> bool:
        return self.sample_prompts is not None

    def check(
        self, arch: str, error: type[FlagError], task: str | None = None, one_frame: bool = False
    ) -> None:
        """Raise `error` naming the flag of a setting that cannot work for `arch` under the
        conditioned mode `task` (``--task`` / ``--model_version``)."""
        spec = catalog.arch(arch)
        for value, flag in (
            (self.sample_every_n_steps, "--sample_every_n_steps"),
            (self.sample_every_n_epochs, "--sample_every_n_epochs"),
        ):
            if value is not None and value < 1:
                raise error(f"{flag} must be >= 1, got {value}")
            if value is not None and self.sample_prompts is None:
                raise error(f"{flag} needs --sample_prompts (the prompt file to sample)")
        if self.sample_at_first and self.sample_prompts is None:
            raise error("--sample_at_first needs --sample_prompts (the prompt file to sample)")
        if self.sample_prompts is None:
            return
        if not self.vae:
            raise error("--sample_prompts needs --vae (the VAE that decodes the samples, as for cache)")
        if not self.text_encoder:
            raise error(
                f"--sample_prompts needs {spec.text_flag} (the {spec.text_encoder} text encoder that "
                "encodes the prompts, as for cache)"
            )
        mode = catalog.mode_of(spec, task)
        if mode is not None and mode.clip and not self.clip:
            raise error(
                f"--sample_prompts with {spec.task_flag} {task} needs --clip (its CLIP image encoder)"
            )
        layered = mode is not None and mode.kind == "layered"
        for prompt in load_prompts(self.sample_prompts):
            if prompt.frames > 1 and not spec.takes_video and not layered:
                raise error(
                    f"{prompt.where}: --f {prompt.frames}: {spec.title} makes images; remove --f or set 1"
                )
            if layered:
                _check_layered_image(prompt, error)
            elif mode is not None and mode.kind == "edit":
                _check_edit_images(prompt, str(task), error)
            elif not one_frame:
                _check_images(prompt, mode, f"{spec.task_flag} {task}", error)
            else:
                try:
                    one_frame_positions(prompt)
                except SamplePromptError as bad:
                    raise error(str(bad)) from None


def _check_images(prompt: SamplePrompt, mode: catalog.Mode | None, task: str, error: type[FlagError]) -> None:
    """A WAN image-to-video prompt has its start image (and FLF2V its end image); a prompt of a
    model without image conditioning has none."""
    if mode is None or mode.kind != "image_to_video":
        for given, option in ((prompt.image_path, "--i"), (prompt.end_image_path, "--ei")):
            if given is not None:
                raise error(
                    f"{prompt.where}: {option} is for an image-to-video --task (i2v-14B, flf2v-14B, i2v-A14B)"
                )
        if prompt.control_image_paths and mode is None:
            raise error(
                f"{prompt.where}: --ci is for one-frame sampling (--one_frame) or Qwen-Image-Edit "
                "(--model_version edit, edit-2509, edit-2511)"
            )
        return
    if prompt.image_path is None:
        raise error(f"{prompt.where}: {task} samples from a start image: add --i IMAGE")
    if mode.given_frames == 2 and prompt.end_image_path is None:
        raise error(f"{prompt.where}: {task} samples between two images: add --ei END_IMAGE")
    if mode.given_frames == 1 and prompt.end_image_path is not None:
        raise error(f"{prompt.where}: --ei is for --task flf2v-14B; remove it")


def _check_edit_images(prompt: SamplePrompt, version: str, error: type[FlagError]) -> None:
    """A Qwen-Image-Edit prompt's control images are ``--ci`` (none: text-to-image); Edit reads one."""
    for given, option in ((prompt.image_path, "--i"), (prompt.end_image_path, "--ei")):
        if given is not None:
            raise error(
                f"{prompt.where}: {option} is for WAN image-to-video; Qwen-Image-Edit's images are --ci"
            )
    if version == "edit" and len(prompt.control_image_paths) > 1:
        raise error(
            f"{prompt.where}: {len(prompt.control_image_paths)} --ci images, but --model_version edit reads "
            "one; use edit-2509 or edit-2511 for several"
        )


def _check_layered_image(prompt: SamplePrompt, error: type[FlagError]) -> None:
    """A Qwen-Image-Layered prompt decomposes one image, its ``--ci`` (musubi's training samples);
    ``--f`` is the number of layers it makes beside the base."""
    for given, option in ((prompt.image_path, "--i"), (prompt.end_image_path, "--ei")):
        if given is not None:
            raise error(f"{prompt.where}: {option} is for WAN image-to-video; the image to decompose is --ci")
    if len(prompt.control_image_paths) != 1:
        raise error(
            f"{prompt.where}: --model_version layered decomposes one image: give it as --ci IMAGE (--f N: "
            f"N layers), not {len(prompt.control_image_paths)}"
        )


@dataclass(frozen=True)
class SampleConfig:
    """``masktrain sample``: a saved LoRA (or none: the base model) on the transformer, sampled once."""

    arch: str
    dit: str
    output_dir: Path
    """Samples go to OUTPUT_DIR/sample, as during training."""
    sample: SampleSettings
    lora: Path | None = None
    """A LoRA file masktrain wrote (any of its layouts); None: the base model."""
    lora_high_noise: Path | None = None
    """WAN 2.2 A14B: the high-noise expert's own LoRA (``--lora_per_expert``); --lora then goes on
    the low-noise expert only."""
    dit_high_noise: str | None = None
    timestep_boundary: float | None = None
    """Default 0.875, 0.9 with --task i2v-A14B (``config.train.boundary_of``)."""
    task: str | None = None
    """musubi-tuner's --task / --model_version: a conditioned mode samples from each prompt's images."""
    one_frame: bool = False
    """WAN one-frame inference (each prompt's --ci control images and --of positions)."""
    output_name: str | None = None
    """The samples' name prefix; default: the LoRA file's name (``base`` without one)."""
    seed: int = 42
    """The noise of prompts without ``--d`` (plus the prompt's index), as in training."""
    device: str | None = None
    mixed_precision: str = "auto"
    memory: MemorySettings = field(default_factory=MemorySettings)

    def __post_init__(self) -> None:
        spec = catalog.arch(self.arch)
        if self.sample.sample_prompts is None:
            raise TrainConfigError("masktrain sample needs --sample_prompts (the prompt file)")
        try:
            catalog.check_task(spec, spec.task_flag, self.task)
        except SettingError as error:
            raise TrainConfigError(str(error)) from None
        self.sample.check(self.arch, TrainConfigError, self.task, self.one_frame)
        check_device(self.device)
        if self.dit_high_noise is not None and not spec.two_experts:
            raise TrainConfigError(f"--dit_high_noise is not used with --arch {self.arch}")
        if self.lora_high_noise is not None and self.dit_high_noise is None:
            raise TrainConfigError("--lora_high_noise needs --dit_high_noise (the expert it goes on)")
        if not 0 < self.boundary < 1:
            raise TrainConfigError("--timestep_boundary must be in range (0, 1)")
        if self.output_name is not None and (not self.output_name or "/" in self.output_name):
            raise TrainConfigError("--output_name must be a plain file name")
        if not 0 <= self.seed < 2**63:
            raise TrainConfigError(f"--seed must be an integer in [0, 2**63), got {self.seed}")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise TrainConfigError(
                f"--mixed_precision must be auto, no or bf16, not {self.mixed_precision!r}"
            )

    @property
    def boundary(self) -> float:
        """The two experts' switch: ``--timestep_boundary``, else the task's default."""
        return catalog.timestep_boundary(self.arch, self.task, self.timestep_boundary)

    @property
    def denoisers(self) -> tuple[str, str | None]:
        """``--dit`` and ``--dit_high_noise`` as they load (``catalog.tiny_denoisers``)."""
        return catalog.tiny_denoisers(self.arch, self.task, self.dit, self.dit_high_noise)

    @property
    def name(self) -> str:
        if self.output_name is not None:
            return self.output_name
        return self.lora.stem if self.lora is not None else "base"
