"""Single-file checkpoints: ComfyUI / original key names -> diffusers names, for the WAN
transformer (through diffusers' own converter) and the WAN 2.1 / 2.2 and Qwen-Image VAEs (our
own mapping: diffusers' VAE converter assumes the released depth). Used by ``single_file``."""

from __future__ import annotations

import re


def wan_transformer_names(names: dict[str, str]) -> dict[str, str]:
    """diffusers name -> file key, from {unprefixed name: file key}, through diffusers' own
    converter (run on the names only: it renames keys and carries the values along)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    if "condition_embedder.time_embedder.linear_1.weight" in names:
        return dict(names)  # already diffusers names
    converted = convert_wan_transformer_to_diffusers(dict(names))
    # FLF2V's image position embedding, which only diffusers' conversion script maps.
    emb_pos = "img_emb.emb_pos"
    return {
        new.replace(emb_pos, "condition_embedder.image_embedder.pos_embed"): old
        for new, old in converted.items()
    }


_VAE_FIXED = {
    "conv1": "quant_conv",
    "conv2": "post_quant_conv",
    "encoder.conv1": "encoder.conv_in",
    "decoder.conv1": "decoder.conv_in",
    "encoder.head.0": "encoder.norm_out",
    "encoder.head.2": "encoder.conv_out",
    "decoder.head.0": "decoder.norm_out",
    "decoder.head.2": "decoder.conv_out",
}
_RESNET_PARTS = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)
_MIDDLE = {"0": "mid_block.resnets.0.", "1": "mid_block.attentions.0.", "2": "mid_block.resnets.1."}


def _resnet(rest: str) -> str:
    for old, new in _RESNET_PARTS:
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def _is_resample(rest: str) -> bool:
    return rest.startswith(("resample.", "time_conv."))


def wan_vae_names(keys: list[str]) -> dict[str, str]:
    """diffusers name -> original key for a WAN 2.1, WAN 2.2 or Qwen-Image VAE.

    diffusers' ``convert_wan_vae_to_diffusers`` hard-codes the released WAN 2.1 VAE (three decoder
    resnets per level, one decoder shortcut) and does not cover the WAN 2.2 VAE; this is the same
    mapping written for any depth (the test checks it equals diffusers' on the released layout).
    Keys already in diffusers names pass through unchanged."""
    # WAN 2.1 layout: the decoder's flat ``upsamples`` hold (num_res_blocks + 1) resnets then a
    # resample per level; the first resample's index gives the group size.
    first = [
        int(m.group(1))
        for k in keys
        if (m := re.match(r"decoder\.upsamples\.(\d+)\.(resample|time_conv)\.", k))
    ]
    group = min(first) + 1 if first else len(keys)
    out: dict[str, str] = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        if module in _VAE_FIXED:
            new = f"{_VAE_FIXED[module]}.{param}"
        elif m := re.match(r"(encoder|decoder)\.middle\.([012])\.(.+)", key):
            new = f"{m.group(1)}.{_MIDDLE[m.group(2)]}{_resnet(m.group(3))}"
        elif m := re.match(
            r"(encoder|decoder)\.(?:down|up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(.+)", key
        ):
            # WAN 2.2: nested per-level blocks; the level's resample becomes its down/upsampler.
            side, level, rest = m.group(1), m.group(2), m.group(4)
            blocks = "down_blocks" if side == "encoder" else "up_blocks"
            if _is_resample(rest):
                new = f"{side}.{blocks}.{level}.{'downsampler' if side == 'encoder' else 'upsampler'}.{rest}"
            else:
                new = f"{side}.{blocks}.{level}.resnets.{m.group(3)}.{_resnet(rest)}"
        elif m := re.match(r"encoder\.downsamples\.(\d+)\.(.+)", key):
            new = f"encoder.down_blocks.{m.group(1)}.{_resnet(m.group(2))}"
        elif m := re.match(r"decoder\.upsamples\.(\d+)\.(.+)", key):
            level, index = divmod(int(m.group(1)), group)
            rest = m.group(2)
            if _is_resample(rest):
                new = f"decoder.up_blocks.{level}.upsamplers.0.{rest}"
            else:
                new = f"decoder.up_blocks.{level}.resnets.{index}.{_resnet(rest)}"
        else:
            new = key
        out[new] = key
    if len(out) != len(keys):
        raise ValueError("two VAE keys map to one diffusers name; the file mixes layouts")
    return out
