"""``masktrain sample``: a saved LoRA's samples from musubi's prompt file, as training draws them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from masktrain import catalog
from masktrain.cli.options import existing_file, flag, option, text_encoder_options
from masktrain.cli.outcome import run_job


@click.command("sample")
@option(
    "arch", type=click.Choice(catalog.ARCH_NAMES), required=True, help=f"Model family: {catalog.described()}."
)
@option("dit", required=True, help="Transformer: 'tiny', a diffusers folder or a .safetensors file.")
@option("dit_high_noise", default=None, help="WAN 2.2 A14B high-noise expert.")
@option(
    "timestep_boundary",
    type=float,
    default=None,
    help="WAN 2.2 A14B: expert switch sigma [default: 0.875; 0.9 with --task i2v-A14B].",
)
@option(
    "task",
    default=None,
    help="musubi-tuner's --task (WAN): i2v-14B, flf2v-14B or i2v-A14B sample from each prompt's --i "
    "(and --ei) image.",
)
@option(
    "model_version",
    default=None,
    help="musubi-tuner's --model_version (Qwen-Image): edit, edit-2509 or edit-2511 sample from each "
    "prompt's --ci control images; layered decomposes its --ci image into --f layers.",
)
@option(
    "clip",
    default=None,
    help="WAN 2.1 I2V / FLF2V: the CLIP vision model that embeds each prompt's images, as for cache.",
)
@option("one_frame", is_flag=True, default=False, help="WAN one-frame inference (--ci and --of per prompt).")
@option(
    "lora",
    type=existing_file(),
    default=None,
    help="A LoRA file masktrain wrote [default: the base model]; one of --lora_per_expert's pair "
    "(NAME_low_noise / NAME_high_noise) with --dit_high_noise loads both, each on its expert.",
)
@option(
    "lora_high_noise",
    type=existing_file(),
    default=None,
    help="WAN 2.2 A14B: the high-noise expert's own LoRA (--lora then goes on the low-noise expert).",
)
@option(
    "sample_prompts",
    type=existing_file(),
    required=True,
    help="musubi's prompt file (.txt with --w --h --f --d --s --l --fs --n, .toml or .json).",
)
@option("vae", required=True, help="VAE: 'tiny', a local diffusers folder or a .safetensors file.")
@text_encoder_options
@option(
    "output_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Samples go to OUTPUT_DIR/sample (a training run's folder adds them to its contact sheet).",
)
@option("output_name", default=None, help="Name prefix of the samples [default: the LoRA file's name].")
@option(
    "seed", type=int, default=42, show_default=True, help="Noise of prompts without --d (plus their index)."
)
@option("device", default=None, help="Device [default: cuda when available, else cpu].")
@option("mixed_precision", type=click.Choice(("auto", "no", "bf16")), default="auto", show_default=True)
@flag("fp8_base", "Transformer block Linear weights in fp8 e4m3.")
@flag("fp8_scaled", "With --fp8_base: block-wise scales.")
@option(
    "blocks_to_swap",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Transformer blocks kept in host memory and streamed in.",
)
@flag("use_pinned_memory_for_block_swap", "Page-locked host memory for block swap.")
def sample(**flags: Any) -> None:
    """Generate a LoRA's samples from a prompt file (images as PNG, videos as MP4, a contact sheet)."""

    def job() -> list[Path]:
        from masktrain.config.memory import MemorySettings
        from masktrain.config.sample import SampleConfig, SampleSettings
        from masktrain.config.text_encoder import choose, split_flags
        from masktrain.config.text_encoder import option_names as text_encoder_names
        from masktrain.errors import TrainConfigError

        text, tokenizers, fp8 = split_flags({name: flags.pop(name) for name in text_encoder_names()})
        chosen = choose(flags["arch"], text, tokenizers, fp8, TrainConfigError)
        memory = MemorySettings(
            **{
                name: flags.pop(name)
                for name in ("fp8_base", "fp8_scaled", "blocks_to_swap", "use_pinned_memory_for_block_swap")
            }
        )
        settings = SampleSettings(
            sample_prompts=flags.pop("sample_prompts"),
            vae=flags.pop("vae"),
            text_encoder=chosen.weights,
            text_tokenizer=chosen.tokenizer,
            fp8_text_encoder=chosen.fp8,
            clip=flags.pop("clip"),
        )
        model_version = flags.pop("model_version")
        flags["task"] = flags["task"] or model_version
        config = SampleConfig(sample=settings, memory=memory, **flags)
        from masktrain.sample.run import run  # torch: only once the flags are known to be good

        return run(config)

    run_job(job)
