"""Real tokenizer objects built in code for the tiny models: byte-level BPE over the 256 byte
symbols, so any caption encodes, with ``<pad>`` 0, ``</s>`` 1 (appended) and ``<unk>`` 2.

:func:`tiny_vl_tokenizer` is the tiny Qwen2.5-VL's: the same 259 tokens plus Qwen's chat and
vision markers as single special tokens (ids 259 on, :data:`QWEN_VL_SPECIAL_TOKENS` order), so
the processor can expand ``<|image_pad|>`` and the model can find its images; like Qwen's own
tokenizer it appends nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

#: Qwen2.5-VL's chat and vision markers, in the order of their ids in :func:`tiny_vl_tokenizer`.
QWEN_VL_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return _byte_level(extra_specials=(), append_eos=True)


def tiny_vl_tokenizer() -> PreTrainedTokenizerFast:
    return _byte_level(extra_specials=QWEN_VL_SPECIAL_TOKENS, append_eos=False)


def _byte_level(extra_specials: tuple[str, ...], append_eos: bool) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{s: i + 3 for i, s in enumerate(symbols)}}
    vocab |= {token: len(vocab) + i for i, token in enumerate(extra_specials)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<pad>", "</s>", "<unk>", *extra_specials])
    if append_eos:
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # transformers' __init__ has no annotations
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
