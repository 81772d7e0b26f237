"""The model families masktrain trains, as torch-free facts: one record per ``--arch``.

This is the only place an architecture name is spelled. The CLI takes its ``--arch`` choices from
here, the video reader its frame rate, the train config its two-expert rule, the demo its tiny
models' latent factor, the model registry the module that implements each family (imported
only when a family is used, so reading the catalog never imports torch), and ``masktrain plan``
the released transformers' configs (``--dit wan2.1-14b``).

Adding a family is its module under ``masktrain/models/`` (a class that satisfies
``models.base.ModelFamily``) plus one record below; ``ARCHITECTURE.md`` lists the steps.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from masktrain import released_configs as configs
from masktrain.errors import SettingError

ModeKind = Literal["image_to_video", "edit", "layered"]
"""How a mode conditions: WAN image-to-video (given frames as input channels, the CLIP
embedding), Qwen-Image-Edit (control images as tokens after the target's, and in the text
encoder's prompt), Qwen-Image-Layered (the layers as targets, the base image as control)."""


@dataclass(frozen=True)
class Mode:
    """A conditioned mode: what the cache stores beside an item's latents and what its denoiser
    takes beside the noisy latents and the text."""

    kind: ModeKind = "image_to_video"
    given_frames: int = 1
    """WAN image-to-video: the clip's pixel frames given as the condition, 1 (the first: I2V) or
    2 (the first and the last: FLF2V)."""
    clip: bool = False
    """WAN 2.1: the denoiser also takes the CLIP image embedding of the given frames (``--clip``
    at cache time)."""
    conditioning_channels: int = 0
    """Input channels beside the latents (WAN image-to-video: 4 mask channels + 16 of the given
    frames' latents)."""
    tiny: str = "tiny"
    """The built-in tiny denoiser ``--dit tiny`` builds for this mode."""
    timestep_boundary: float | None = None
    """The two experts' switch when ``--timestep_boundary`` is not given (None: the family's)."""
    alpha_is_content: bool = False
    """The images' alpha channel is part of what the model learns (Qwen-Image-Layered's RGBA
    layers), so it cannot be the mask: ``alpha_mask = true`` is an error (masks come from
    ``mask_directory``)."""


@dataclass(frozen=True)
class Task:
    """A musubi-tuner ``--task`` (WAN) or ``--model_version`` (Qwen-Image) value: the transformer it
    names, or why masktrain does not train it."""

    width: int | None = None
    """Hidden width (heads x head dim) of its transformer; None: not checked."""
    blocks: int | None = None
    """Its transformer's block count."""
    refused: str | None = None
    """Why masktrain does not train it (None: it does)."""
    mode: Mode | None = None
    """The conditioned mode it trains (None: text-to-video / text-to-image)."""
    distilled_base: str | None = None
    """A step-distilled model (Z-Image Turbo, FLUX.2 klein): training it works but warns, pointing
    to this base version, and the masked prior's teacher is the distilled model as loaded. Its
    weights cannot tell it from the base, so the version says it."""


def _image_to_video(
    given_frames: int, *, tiny: str, clip: bool = False, boundary: float | None = None
) -> Mode:
    """A WAN image-to-video mode: 20 channels beside the 16 latent ones."""
    return Mode("image_to_video", given_frames, clip, 20, tiny, boundary)


def _edit(tiny: str = "tiny") -> Mode:
    """A Qwen-Image-Edit mode: control images as tokens after the target's and in the prompt."""
    return Mode("edit", given_frames=0, tiny=tiny)


#: The cache's ``condition`` value of an item made without conditioning.
NO_CONDITION = "none"

_FUN = "Fun-Control training (control videos as conditioning) is not supported yet"

WAN_TASKS: Mapping[str, Task] = MappingProxyType(
    {
        "t2v-1.3B": Task(1536, 30),
        "t2v-14B": Task(5120, 40),
        "t2i-14B": Task(5120, 40),
        "t2v-A14B": Task(5120, 40),
        "i2v-14B": Task(5120, 40, mode=_image_to_video(1, clip=True, tiny="tiny-i2v")),
        "flf2v-14B": Task(5120, 40, mode=_image_to_video(2, clip=True, tiny="tiny-flf2v")),
        "i2v-A14B": Task(5120, 40, mode=_image_to_video(1, tiny="tiny-i2v-a14b", boundary=0.9)),
        "t2v-1.3B-FC": Task(refused=_FUN),
        "t2v-14B-FC": Task(refused=_FUN),
        "i2v-14B-FC": Task(refused=_FUN),
    }
)
"""musubi-tuner's ``WAN_CONFIGS`` keys (``wan/configs/__init__.py`` @ 30c658c)."""

QWEN_MODEL_VERSIONS: Mapping[str, Task] = MappingProxyType(
    {
        "original": Task(),
        "edit": Task(mode=_edit()),
        "edit-2509": Task(mode=_edit()),
        "edit-2511": Task(mode=_edit(tiny="tiny-edit-2511")),
        "layered": Task(mode=Mode("layered", given_frames=0, tiny="tiny-layered", alpha_is_content=True)),
    }
)
"""musubi-tuner's ``--model_version`` values for Qwen-Image. The Edit models' transformers have
Qwen-Image's architecture; Edit-2511's also runs the control tokens at timestep 0 (``zero_cond_t``,
``models.qwen_image.edit_version_mismatch``), so ``--dit tiny`` builds its own tiny model.
Layered's transformer has its own RoPE and timestep embedding (``tiny-layered``) and its VAE reads
RGBA (``--vae tiny-layered`` for the tiny one; ``models.qwen_layered``)."""


@dataclass(frozen=True)
class Released:
    """A released transformer, by the name ``masktrain plan --dit`` takes: its diffusers config."""

    title: str
    """The model's name, for messages (``masktrain plan``'s first line)."""
    config: Mapping[str, Any]
    """The diffusers constructor arguments of its transformer (its ``transformer/config.json``)."""
    experts: int = 1
    """Transformers of this config it runs (2 for WAN 2.2 A14B: a high- and a low-noise expert)."""
    task: str | None = None
    """musubi-tuner's ``--task`` / ``--model_version`` naming the same transformer (None: it has
    none)."""


@dataclass(frozen=True)
class ResolutionShift:
    """The resolution-dependent shift of ``--timestep_sampling qwen_shift`` / ``flux2_shift``:
    ``s = exp(mu)``, ``mu`` linear in the image's token count, through (low_tokens, low_mu) and
    (high_tokens, high_mu), as the family's pipeline computes ``mu``."""

    cells_per_token: int = 2
    """Latent cells per token along each side: 2 where the transformer packs 2x2 cells of the cached
    grid (Qwen-Image, Z-Image), 1 where the cached grid is the token grid (FLUX.2, Qwen-Image 2.1)."""
    low_tokens: int = 256
    low_mu: float = 0.5
    high_tokens: int = 8192
    high_mu: float = 0.9

    def mu(self, latent_hw: tuple[int, int]) -> float:
        height, width = latent_hw
        tokens = (height // self.cells_per_token) * (width // self.cells_per_token)
        slope = (self.high_mu - self.low_mu) / (self.high_tokens - self.low_tokens)
        return self.low_mu + slope * (tokens - self.low_tokens)


#: Qwen-Image's line (musubi-tuner's ``qwen_shift``): 2x2-patch tokens, 256 -> 0.5, 8192 -> 0.9.
QWEN_IMAGE_SHIFT = ResolutionShift()


def diffusers_shift(cells_per_token: int) -> ResolutionShift:
    """diffusers' ``calculate_shift`` defaults (256 -> 0.5, 4096 -> 1.15), as the FLUX.2 klein, Z-Image
    and Qwen-Image 2.1 pipelines call it (musubi's ``flux2_shift`` for FLUX.2)."""
    return ResolutionShift(cells_per_token, low_tokens=256, low_mu=0.5, high_tokens=4096, high_mu=1.15)


@dataclass(frozen=True)
class ArchSpec:
    """What the rest of masktrain needs to know about one family without loading it."""

    name: str
    """The ``--arch`` value; also the suffix of its cache file names."""
    title: str
    """The models it covers, for messages and help."""
    family: str
    """``module:Class`` of its ``models.base.ModelFamily`` implementation."""
    text_flag: str
    """The flag that names its text encoder."""
    text_encoder: str
    """What that text encoder is."""
    fp8_text_flag: str
    """The ``cache`` flag that loads its text encoder with fp8 weights (musubi-tuner's spelling)."""
    tokenizer_flag: str
    """The ``cache`` flag naming a tokenizer folder for a single-file text encoder."""
    tokenizer_hub_id: str
    """The Hugging Face repository whose tokenizer that is (said in errors; never downloaded)."""
    spatial_factor: int
    """Pixels per latent cell along each side with the released VAE (a VAE file may differ: the
    WAN 2.2 TI2V-5B VAE is 16x; the cache reads the factor off the loaded VAE)."""
    temporal_factor: int
    """Frames per latent frame after the first (4 for video VAEs, 1 for image-only families)."""
    video_fps: float | None
    """The frame rate its video models train at; None for an image-only family."""
    two_experts: bool
    """Whether ``--dit_high_noise`` (a second, high-noise expert sharing the LoRA) applies."""
    tiny_vaes: Mapping[str, int] = field(default_factory=dict)
    """The built-in tiny VAEs (``--vae`` value -> pixels per latent cell); ``tiny`` is also the
    tiny transformer and text encoder."""
    task_flag: str = "--task"
    """musubi-tuner's flag naming the model variant (``--task`` or ``--model_version``)."""
    tasks: Mapping[str, Task] = field(default_factory=dict)
    """Its values."""
    lora_layer_hints: tuple[str, ...] = ()
    """Words in a LoRA file's layer names that only this family's transformer has: a file without
    masktrain's metadata or musubi's module name is this family's when its names hold one of them
    and no other family's."""
    musubi_network_module: str | None = None
    """musubi-tuner's ``ss_network_module`` for this family's LoRA files (``networks.lora_wan``)."""
    released: Mapping[str, Released] = field(default_factory=dict)
    """Its released transformers, by the name ``masktrain plan --dit`` takes (configs from the
    models' ``config.json``)."""
    bucket_step: int = 16
    """Pixels every bucket side and sample size is a multiple of: the VAE's factor times the
    transformer's patch (16 for WAN, Qwen-Image, Z-Image and FLUX.2; 32 for Qwen-Image 2.1)."""
    default_task: str | None = None
    """The ``--task`` / ``--model_version`` when none is given (the base model, which ``--dit tiny``
    builds); None: the family trains without one."""
    resolution_shift: ResolutionShift = QWEN_IMAGE_SHIFT
    """``--timestep_sampling qwen_shift`` / ``flux2_shift``'s line (Qwen-Image's: 256 -> 0.5, 8192 ->
    0.9 over 2x2-patch tokens)."""
    text_tokens: int = 512
    """Text tokens a batch holds when the cache does not say (``masktrain plan``): the padded
    length of a family that pads every caption, else a long caption's."""
    text_padded: bool = False
    """Every caption is padded to :attr:`text_tokens` (WAN's T5, FLUX.2's encoders), so the
    cache's caption lengths do not change a batch's."""
    unplanned: str | None = None
    """Why ``masktrain plan`` cannot trace its transformer on the meta device (None: it can); the
    plan is then a one-line error and ``train`` goes on without a fit check."""
    alpha_is_content: bool = False
    """Its VAE reads RGBA (Qwen-Image 2.1), so an image's alpha is content, never the mask:
    ``alpha_mask = true`` is an error (as ``Mode.alpha_is_content`` for one mode)."""

    @property
    def takes_video(self) -> bool:
        return self.video_fps is not None


WAN = ArchSpec(
    name="wan",
    title="WAN 2.1 / 2.2",
    family="masktrain.models.wan:WanFamily",
    text_flag="--t5",
    text_encoder="UMT5-XXL",
    fp8_text_flag="--fp8_t5",
    tokenizer_flag="--t5_tokenizer",
    tokenizer_hub_id="google/umt5-xxl",
    spatial_factor=8,
    temporal_factor=4,
    video_fps=16.0,
    two_experts=True,
    tiny_vaes=MappingProxyType({"tiny": 8, "tiny-ti2v": 16}),
    text_padded=True,  # T5: every caption padded to 512 tokens
    task_flag="--task",
    tasks=WAN_TASKS,
    lora_layer_hints=("self_attn", "cross_attn", "attn1", "attn2"),  # original and diffusers names
    musubi_network_module="networks.lora_wan",
    released=MappingProxyType(
        {
            "wan2.1-1.3b": Released("WAN 2.1 T2V 1.3B", configs.WAN_1_3B, task="t2v-1.3B"),
            "wan2.1-14b": Released("WAN 2.1 T2V 14B", configs.WAN_14B, task="t2v-14B"),
            "wan2.2-a14b": Released(
                "WAN 2.2 T2V A14B (two 14B experts)", configs.WAN_14B, experts=2, task="t2v-A14B"
            ),
            "wan2.2-ti2v-5b": Released("WAN 2.2 TI2V 5B", configs.WAN_TI2V_5B),
            "wan2.1-i2v-14b": Released("WAN 2.1 I2V 14B", configs.WAN_I2V_14B, task="i2v-14B"),
            "wan2.1-flf2v-14b": Released("WAN 2.1 FLF2V 14B", configs.WAN_FLF2V_14B, task="flf2v-14B"),
            "wan2.2-i2v-a14b": Released(
                "WAN 2.2 I2V A14B (two 14B experts)", configs.WAN_22_I2V_14B, experts=2, task="i2v-A14B"
            ),
        }
    ),
)

QWEN_IMAGE = ArchSpec(
    name="qwen_image",
    title="Qwen-Image",
    family="masktrain.models.qwen_image:QwenImageFamily",
    text_flag="--text_encoder",
    text_encoder="Qwen2.5-VL",
    fp8_text_flag="--fp8_vl",
    tokenizer_flag="--text_encoder_tokenizer",
    tokenizer_hub_id="Qwen/Qwen2.5-VL-7B-Instruct",
    spatial_factor=8,
    temporal_factor=1,
    video_fps=None,
    two_experts=False,
    tiny_vaes=MappingProxyType({"tiny": 4, "tiny-layered": 4}),  # tiny-layered: Layered's RGBA VAE
    task_flag="--model_version",
    tasks=QWEN_MODEL_VERSIONS,
    lora_layer_hints=("img_mlp.net", "txt_mlp.net"),  # FLUX.2 and Qwen-Image 2.1 have transformer_blocks too
    musubi_network_module="networks.lora_qwen_image",
    released=MappingProxyType(
        {"qwen-image-20b": Released("Qwen-Image 20B", configs.QWEN_IMAGE_20B, task="original")}
    ),
)


FLUX2_MODEL_VERSIONS: Mapping[str, Task] = MappingProxyType(
    {
        "dev": Task(6144, 8),
        "klein-4b": Task(3072, 5, distilled_base="klein-base-4b"),
        "klein-9b": Task(4096, 8, distilled_base="klein-base-9b"),
        "klein-base-4b": Task(3072, 5),
        "klein-base-9b": Task(4096, 8),
    }
)
"""musubi-tuner's ``--model_version`` values for FLUX.2 (``flux_2/flux2_utils.py``); blocks are the
double-stream ones (``num_layers``, what ``train`` checks a file against; 20 / 24 / 48 single-stream
blocks follow them). klein 4B / 9B are step-distilled (4 steps) and have their base version's
architecture: musubi recommends training the base versions."""

FLUX2 = ArchSpec(
    name="flux2",
    title="FLUX.2",
    family="masktrain.models.flux2:Flux2Family",
    text_flag="--text_encoder",
    text_encoder="Qwen3 (klein) / Mistral-Small-3.1 (dev)",
    fp8_text_flag="--fp8_text_encoder",
    tokenizer_flag="--text_encoder_tokenizer",
    tokenizer_hub_id="Qwen/Qwen3-4B",
    spatial_factor=16,  # the 8x VAE's latents in 2x2 patches: one token per 16 px
    temporal_factor=1,
    video_fps=None,
    two_experts=False,
    tiny_vaes=MappingProxyType({"tiny": 2}),  # diffusers' test VAE is 1x, 2x once patchified
    task_flag="--model_version",
    tasks=FLUX2_MODEL_VERSIONS,
    lora_layer_hints=("single_transformer_blocks", "to_qkv_mlp_proj", "double_blocks", "single_blocks"),
    musubi_network_module="networks.lora_flux_2",
    released=MappingProxyType(
        {
            "flux2-dev": Released("FLUX.2 dev 32B", configs.FLUX2_DEV, task="dev"),
            "flux2-klein-4b": Released("FLUX.2 klein 4B", configs.FLUX2_KLEIN_4B, task="klein-base-4b"),
            "flux2-klein-9b": Released("FLUX.2 klein 9B", configs.FLUX2_KLEIN_9B, task="klein-base-9b"),
        }
    ),
    default_task="klein-base-4b",
    # musubi's flux2_shift: diffusers' line over the h * w tokens of the cached (already patched) grid
    resolution_shift=diffusers_shift(cells_per_token=1),
)


QWEN_IMAGE_2_1 = ArchSpec(
    name="qwen_image_2_1",
    title="Qwen-Image 2.1",
    family="masktrain.models.qwen_image_2_1:QwenImage21Family",
    text_flag="--text_encoder",
    text_encoder="Qwen3-VL",
    fp8_text_flag="--fp8_text_encoder",
    tokenizer_flag="--text_encoder_tokenizer",
    tokenizer_hub_id="Qwen/Qwen-Image-2.1",  # its processor/ folder
    spatial_factor=16,  # the 16x RGBA VAE; the transformer takes the latents unpatched
    temporal_factor=1,
    video_fps=None,
    two_experts=False,
    tiny_vaes=MappingProxyType({"tiny": 16}),
    lora_layer_hints=("img_mlp.out", "gate_layer"),
    released=MappingProxyType(
        {"qwen-image-2.1-7b": Released("Qwen-Image 2.1 7B", configs.QWEN_IMAGE_2_1_7B)}
    ),
    bucket_step=32,  # one text-sequence image slot per 2x2 latents: sides are multiples of 2 x 16 px
    alpha_is_content=True,  # its VAE reads RGBA
    resolution_shift=diffusers_shift(cells_per_token=1),  # h * w tokens
    unplanned="its transformer's forward reads the values of its image mask (repeat_interleave, "
    "nonzero), which a meta-device trace cannot; set --blocks_to_swap by hand",
)


Z_IMAGE_MODEL_VERSIONS: Mapping[str, Task] = MappingProxyType(
    {
        "turbo": Task(distilled_base="base"),
        "base": Task(),
    }
)
"""Z-Image's versions (musubi-tuner's ``docs/zimage.md``): Turbo is step-distilled (8 steps, no
guidance) from base, with the same architecture (so no width or depth tells them apart, and none
is checked); musubi recommends training base."""

Z_IMAGE = ArchSpec(
    name="z_image",
    title="Z-Image",
    family="masktrain.models.z_image:ZImageFamily",
    text_flag="--text_encoder",
    text_encoder="Qwen3-4B",
    fp8_text_flag="--fp8_text_encoder",
    tokenizer_flag="--text_encoder_tokenizer",
    tokenizer_hub_id="Qwen/Qwen3-4B",
    spatial_factor=8,
    temporal_factor=1,
    video_fps=None,
    two_experts=False,
    tiny_vaes=MappingProxyType({"tiny": 2}),  # diffusers' pipeline-test VAE: 2 blocks, 2x
    task_flag="--model_version",
    tasks=Z_IMAGE_MODEL_VERSIONS,
    lora_layer_hints=("feed_forward", "noise_refiner", "context_refiner"),
    musubi_network_module="networks.lora_zimage",
    released=MappingProxyType({"z-image-6b": Released("Z-Image 6B", configs.Z_IMAGE_6B, task="base")}),
    default_task="base",
    # ZImagePipeline's calculate_shift over the 2x2-patch tokens of the 8x latent grid
    resolution_shift=diffusers_shift(cells_per_token=2),
)

ARCHES: Mapping[str, ArchSpec] = MappingProxyType(
    {spec.name: spec for spec in (WAN, QWEN_IMAGE, QWEN_IMAGE_2_1, FLUX2, Z_IMAGE)}
)
"""Every family, by ``--arch`` value."""

ARCH_NAMES: tuple[str, ...] = tuple(ARCHES)


def arch(name: str) -> ArchSpec:
    """The record of ``--arch name``; a :class:`SettingError` naming the choices otherwise."""
    try:
        return ARCHES[name]
    except KeyError:
        close = difflib.get_close_matches(name, ARCH_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SettingError(
            f"--arch {name!r} is not supported; choose one of {', '.join(ARCH_NAMES)}{hint}"
        ) from None


def released(name: str) -> tuple[ArchSpec, Released]:
    """The family and record of the released model `name` (``masktrain plan --dit NAME``); a
    one-line :class:`SettingError` naming every released model otherwise."""
    for spec in ARCHES.values():
        if name in spec.released:
            return spec, spec.released[name]
    names = released_names()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SettingError(f"{name!r} is not a released model; choose one of {', '.join(names)}{hint}")


def released_names() -> tuple[str, ...]:
    """Every released model's name, family by family."""
    return tuple(name for spec in ARCHES.values() for name in spec.released)


def check_task(spec: ArchSpec, flag: str, value: str | None) -> None:
    """`value` of `flag` (``--task`` / ``--model_version``) must be one of `spec`'s that masktrain
    trains; a one-line :class:`SettingError` otherwise."""
    if value is None:
        return
    if flag != spec.task_flag:
        raise SettingError(f"{flag} is not used with --arch {spec.name}; use {spec.task_flag}")
    task = spec.tasks.get(value)
    if task is None:
        raise SettingError(
            f"{flag} {value!r} is not a {spec.title} {flag[2:]}; one of {', '.join(spec.tasks)}"
        )
    if task.refused is not None:
        raise SettingError(f"{flag} {value}: {task.refused}")


def task_of(spec: ArchSpec, value: str | None) -> Task | None:
    """The record of `spec`'s ``--task`` / ``--model_version`` `value` (None when not given)."""
    return None if value is None else spec.tasks.get(value)


def mode_of(spec: ArchSpec, value: str | None) -> Mode | None:
    """The conditioned mode `value` (a ``--task`` / ``--model_version``) trains; None for none."""
    task = task_of(spec, value)
    return None if task is None else task.mode


def condition_name(spec: ArchSpec, value: str | None, one_frame: bool = False) -> str:
    """What a cache made for `value` records as its ``condition`` (``train`` refuses a cache made
    for another): the task for a conditioned mode, ``one-frame <task>`` for WAN one-frame, and
    :data:`NO_CONDITION` for none."""
    if mode_of(spec, value) is None:
        return NO_CONDITION
    return f"one-frame {value}" if one_frame else str(value)


def tiny_denoiser(spec: ArchSpec, dit: str, value: str | None) -> str:
    """The built-in tiny denoiser ``--dit tiny`` names under the task `value` (a conditioned mode
    builds its own: ``tiny-i2v`` for ``--task i2v-14B``); any other `dit` as it is."""
    mode = mode_of(spec, value)
    return mode.tiny if dit == "tiny" and mode is not None else dit


def tiny_denoisers(
    arch_name: str, value: str | None, dit: str, dit_high_noise: str | None
) -> tuple[str, str | None]:
    """``--dit`` and ``--dit_high_noise`` as they load under the task `value`
    (:func:`tiny_denoiser`)."""
    spec = arch(arch_name)
    high = None if dit_high_noise is None else tiny_denoiser(spec, dit_high_noise, value)
    return tiny_denoiser(spec, dit, value), high


#: WAN 2.2 A14B text-to-video's expert switch (musubi-tuner's and WAN 2.2's default).
DEFAULT_TIMESTEP_BOUNDARY = 0.875


def timestep_boundary(arch_name: str, value: str | None, given: float | None) -> float:
    """The two experts' switch: `given` (``--timestep_boundary``), else the task `value`'s mode's
    default (0.9 for ``--task i2v-A14B``), else :data:`DEFAULT_TIMESTEP_BOUNDARY`."""
    if given is not None:
        return given
    spec = ARCHES.get(arch_name)
    mode = None if spec is None else mode_of(spec, value)
    if mode is not None and mode.timestep_boundary is not None:
        return mode.timestep_boundary
    return DEFAULT_TIMESTEP_BOUNDARY


def described() -> str:
    """The ``--arch`` choices with what each covers, for help texts."""
    return ", ".join(f"{spec.name} ({spec.title})" for spec in ARCHES.values())


def video_arches() -> tuple[str, ...]:
    """The families that take video datasets."""
    return tuple(spec.name for spec in ARCHES.values() if spec.takes_video)
