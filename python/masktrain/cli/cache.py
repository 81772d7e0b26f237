"""``masktrain cache``: latents, mask weights and text embeddings for a dataset TOML."""

from __future__ import annotations

from pathlib import Path

import click

from masktrain import catalog
from masktrain.cli.options import F, existing_file, flag, option
from masktrain.cli.outcome import run_job


def _text_encoder_options(command: F) -> F:
    """One option per text-encoder flag of the catalog (``--t5``, ``--text_encoder``, ...), and one
    switch per fp8 text-encoder flag (``--fp8_t5``, ``--fp8_vl``)."""
    for spec in reversed(list(catalog.ARCHES.values())):
        help = (
            f"Tokenizer folder for a single-file {spec.text_encoder} ({spec.text_flag} FILE.safetensors): "
            f"the tokenizer of {spec.tokenizer_hub_id}."
        )
        command = option(spec.tokenizer_flag.removeprefix("--"), default=None, help=help)(command)
    fp8_flags: dict[str, list[str]] = {}
    for spec in catalog.ARCHES.values():
        fp8_flags.setdefault(spec.fp8_text_flag, []).append(spec.name)
    for fp8_flag, names in reversed(fp8_flags.items()):
        help = f"Text encoder in fp8 (e4m3) to save memory (--arch {' / '.join(names)})."
        command = flag(fp8_flag.removeprefix("--"), help)(command)
    by_flag: dict[str, list[catalog.ArchSpec]] = {}
    for spec in catalog.ARCHES.values():
        by_flag.setdefault(spec.text_flag, []).append(spec)
    for text_flag, specs in reversed(by_flag.items()):
        models = "; ".join(f"{spec.title}: {spec.text_encoder}" for spec in specs)
        help = f"Text encoder ({models}): 'tiny', or a local diffusers folder."
        command = option(text_flag.removeprefix("--"), default=None, help=help)(command)
    return command


@click.command("cache")
@option("dataset_config", type=existing_file(), required=True, help="The dataset TOML.")
@option(
    "arch", type=click.Choice(catalog.ARCH_NAMES), required=True, help=f"Model family: {catalog.described()}."
)
@option("vae", required=True, help="VAE: 'tiny', a local diffusers folder or a .safetensors file.")
@_text_encoder_options
@option("device", default=None, help="Encoding device [default: cuda when available, else cpu].")
@option("batch_size", type=click.IntRange(min=1), default=4, show_default=True)
@option(
    "num_workers",
    type=click.IntRange(min=1),
    default=None,
    help="Threads for image preparation [default: one per core].",
)
@option(
    "skip_existing",
    switch=True,
    default=True,
    show_default=True,
    help="Skip items whose cache file is up to date.",
)
def cache(
    dataset_config: Path,
    arch: str,
    vae: str,
    device: str | None,
    batch_size: int,
    num_workers: int | None,
    skip_existing: bool,
    **text_encoders: str | bool | None,
) -> None:
    """Cache latents, mask weights and text embeddings for a dataset TOML."""
    from masktrain.config.cache import CacheConfig

    def job() -> bool:
        config = CacheConfig.from_flags(
            dataset_config=dataset_config,
            arch=arch,
            vae=vae,
            text_encoders={
                f"--{name}": value
                for name, value in text_encoders.items()
                if not isinstance(value, bool) and not name.endswith("tokenizer")
            },
            tokenizers={
                f"--{name}": value  # type: ignore[misc]  # strings or None: click options without a type
                for name, value in text_encoders.items()
                if name.endswith("tokenizer")
            },
            fp8_text={f"--{name}": value for name, value in text_encoders.items() if isinstance(value, bool)},
            device=device,
            batch_size=batch_size,
            skip_existing=skip_existing,
            num_workers=num_workers,
        )
        from masktrain.cache import run  # torch: only once the flags are known to be good

        return any(summary.failed for summary in run(config))

    raise SystemExit(1 if run_job(job) else 0)
