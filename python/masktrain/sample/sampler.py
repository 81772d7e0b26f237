"""The sampler of one run: encodes the prompt file once, then generates every prompt whenever it is
asked to (``train.loop`` at the steps ``config.sample`` names; ``masktrain sample`` once).

Memory: the text encoder is loaded on the device only to encode the prompts (and their negative
prompts) when the sampler is built, before the transformer loads, and is freed right after; the
embeddings wait in host memory. The VAE waits in host memory and is on the device only while
sampling. Generation goes through the family's diffusers pipeline (``ModelFamily.generate``) with
the transformer(s) being trained, adapters on, in eval mode (``Experts.sampling``).

Noise: a prompt without ``--d`` uses ``--seed`` plus its index, so every sampling of a run starts
from the same noise and the contact sheet compares steps, not seeds. Sizes are rounded down to
what the pipeline takes (``ModelFamily.sample_size_multiple``; WAN frames to 4k+1), with a log
line. Prompts are read by the family's ``encode_prompt``.

Qwen-Image-Edit: a prompt and its negative prompt are each read with the prompt's ``--ci`` control
images by Qwen2.5-VL's vision tower (``QwenImageFamily.encode_prompt``, as the edit pipelines read
them), and the pipeline gets the images; a prompt without ``--ci`` samples text-to-image.

Qwen-Image-Layered: each prompt decomposes its ``--ci`` image (RGBA) into ``--f`` layers and the
base (``models.qwen_layered.generate``); the prompt is read as text only, as musubi reads it.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch

from masktrain import catalog
from masktrain.config.sample import SampleSettings
from masktrain.config.sample_prompts import SamplePrompt, load_prompts
from masktrain.denoiser.experts import Experts
from masktrain.device import autocast
from masktrain.models import fit
from masktrain.models.base import ModelFamily, SampleRequest, TextBatch
from masktrain.sample.outputs import sample_path, write_contact_sheet, write_layers, write_sample
from masktrain.sample.prompt_images import PromptImages

log = logging.getLogger(__name__)


class Sampler:
    """Generates the prompts of ``settings.sample_prompts`` (see the module docstring)."""

    def __init__(
        self,
        settings: SampleSettings,
        family: ModelFamily,
        device: torch.device,
        dtype: torch.dtype,
        autocast: torch.dtype | None,
        seed: int,
        output_dir: Path,
        output_name: str,
        task: str | None = None,
        one_frame: bool = False,
    ) -> None:
        assert settings.sample_prompts is not None and settings.vae and settings.text_encoder
        self.family, self.device, self.dtype, self.autocast = family, device, dtype, autocast
        self.seed, self.output_dir, self.output_name = seed, output_dir, output_name
        self.prompts = load_prompts(settings.sample_prompts)
        self.mode, self.task = catalog.mode_of(family.spec, task), task
        if any(prompt.guidance_scale is not None for prompt in self.prompts):
            log.info(
                "--g (embedded guidance) in %s is ignored: %s has none; --l sets the CFG scale",
                settings.sample_prompts,
                family.spec.title,
            )
        started = time.perf_counter()
        self._images = PromptImages.of(self.prompts, self.mode, settings.clip, device, dtype, one_frame)
        self._embeddings = self._encode(settings)
        self.vae = family.load_vae(settings.vae, torch.device("cpu"), dtype)
        self.layered = self.mode is not None and self.mode.kind == "layered"  # writes RGBA layers
        family.check_sampling_vae(self.vae, settings.vae, task)
        self._spatial = family.sample_size_multiple(self.vae)
        self._temporal = family.temporal_factor(self.vae)
        self.feed = fit.sampling_feed(
            family,
            self.vae,
            settings.vae,
            self._embeddings.values(),
            settings.text_encoder,
            0 if self.mode is None else self.mode.conditioning_channels,
            self._images.image_dim,
        )
        log.info(
            "sampling: %d prompt(s) from %s encoded in %.1f s; the text encoder is freed, the VAE waits "
            "in host memory",
            len(self.prompts),
            settings.sample_prompts,
            time.perf_counter() - started,
        )

    def _negative(self, prompt: SamplePrompt) -> str | None:
        """The negative prompt, when guidance is on."""
        if self._cfg(prompt) <= 1:
            return None
        if prompt.negative_prompt is not None:
            return prompt.negative_prompt
        return self.family.default_negative_prompt

    def _cfg(self, prompt: SamplePrompt) -> float:
        """The prompt's ``--l``, else 1 (no guidance) for a step-distilled version (Z-Image Turbo,
        FLUX.2 klein: they sample in a few steps without CFG), else the family's default."""
        if prompt.cfg_scale is not None:
            return prompt.cfg_scale
        task = catalog.task_of(self.family.spec, self.task)
        if task is not None and task.distilled_base is not None:
            return 1.0
        return self.family.default_cfg_scale

    def _controls(self, prompt: SamplePrompt) -> tuple[Path, ...]:
        """The control images an edit prompt's text embeddings read (none in another mode)."""
        return prompt.control_image_paths if self._images.edit else ()

    def _encode(self, settings: SampleSettings) -> dict[tuple[str, tuple[Path, ...]], torch.Tensor]:
        """Each prompt's and negative prompt's embedding, by text and the control images it read
        (Qwen-Image-Edit reads the prompt's ``--ci`` images with both, as its pipeline does)."""
        assert settings.text_encoder is not None
        encoder = self.family.load_prompt_encoder(
            settings.text_encoder,
            self.device,
            self.dtype,
            fp8=settings.fp8_text_encoder,
            tokenizer=settings.text_tokenizer,
            task=self.task,
        )
        images = {
            self._controls(prompt): self._images.images.get(prompt.index, ()) for prompt in self.prompts
        }
        texts = {(prompt.prompt, self._controls(prompt)) for prompt in self.prompts}
        texts |= {
            (negative, self._controls(prompt))
            for prompt in self.prompts
            if (negative := self._negative(prompt)) is not None
        }
        embeddings = {}
        for text, controls in sorted(texts):
            embeddings[text, controls] = self.family.encode_prompt(encoder, text, images[controls], self.task)
        del encoder
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return embeddings

    def _text(self, text: str, prompt: SamplePrompt) -> TextBatch:
        embedding = self._embeddings[text, self._controls(prompt)]
        return self.family.collate_text([embedding]).to(self.device, self.dtype)

    def request(self, prompt: SamplePrompt) -> tuple[SampleRequest, int]:
        """The pipeline's inputs for `prompt`, and its seed."""
        seed = prompt.seed if prompt.seed is not None else self.seed + prompt.index
        width = max(self._spatial, prompt.width // self._spatial * self._spatial)
        height = max(self._spatial, prompt.height // self._spatial * self._spatial)
        frames = (prompt.frames - 1) // self._temporal * self._temporal + 1
        if (width, height, frames) != (prompt.width, prompt.height, prompt.frames):
            log.info(
                "%s: %dx%d, %d frame(s) generated as %dx%d, %d frame(s) (multiples of %d pixels%s)",
                prompt.where,
                prompt.width,
                prompt.height,
                prompt.frames,
                width,
                height,
                frames,
                self._spatial,
                f"; {self._temporal}k+1 frames" if self._temporal > 1 else "",
            )
        negative = self._negative(prompt)
        request = SampleRequest(
            width=width,
            height=height,
            frames=frames,
            steps=prompt.steps,
            cfg_scale=self._cfg(prompt),
            flow_shift=prompt.flow_shift,
            text=self._text(prompt.prompt, prompt),
            negative=None if negative is None else self._text(negative, prompt),
            generator=torch.Generator().manual_seed(seed),
            **self._images.request_fields(prompt, width, height),
        )
        return request, seed

    def run(self, experts: Experts, step: int) -> list[Path]:
        """Generate every prompt with the transformers as they are now; write the samples (named
        by `step`) and the contact sheet. Returns the sample files."""
        started = time.perf_counter()
        written = []
        self.vae.to(self.device)
        try:
            with experts.sampling():
                for prompt in self.prompts:
                    request, seed = self.request(prompt)
                    with autocast(self.device, self.autocast):
                        frames = self.family.generate(
                            experts.low, experts.high, experts.boundary, self.vae, request
                        )
                    if self.layered:  # RGBA images: the base and --f layers (sample.outputs)
                        path = sample_path(self.output_dir, self.output_name, step, prompt.index, seed, False)
                        write_layers(path, frames)
                    else:
                        path = sample_path(
                            self.output_dir, self.output_name, step, prompt.index, seed, frames.shape[0] > 1
                        )
                        write_sample(path, frames, self.family.spec.video_fps)
                    written.append(path)
        finally:
            self.vae.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        sheet = write_contact_sheet(self.output_dir, self.output_name, self.prompts)
        log.info(
            "sampled %d prompt(s) at step %d in %.1f s: %s",
            len(written),
            step,
            time.perf_counter() - started,
            sheet,
        )
        return written
