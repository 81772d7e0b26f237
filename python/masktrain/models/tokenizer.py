"""Real tokenizer objects built in code for the tiny models: byte-level BPE over the 256 byte
symbols, so any caption encodes, with ``<pad>`` 0, ``</s>`` 1 (appended) and ``<unk>`` 2.

:func:`tiny_vl_tokenizer` is the tiny Qwen2.5-VL's: the same 259 tokens plus Qwen's chat and
vision markers as single special tokens (ids 259 on, :data:`QWEN_VL_SPECIAL_TOKENS` order), so
the processor can expand ``<|image_pad|>`` and the model can find its images; like Qwen's own
tokenizer it appends nothing. :func:`tiny_qwen3_tokenizer` is the tiny Qwen3's: the 259 tokens,
Qwen3's chat and think markers (:data:`QWEN3_SPECIAL_TOKENS`) and the part of Qwen3's chat template
that renders text turns, the generation prompt and ``enable_thinking=False``'s empty think block.
:func:`tiny_mistral_tokenizer` is FLUX.2 dev's tiny Mistral's: the 259 tokens, Mistral's markers
and the text part of its chat template."""

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
#: Qwen3's chat and think markers, in the order of their ids in :func:`tiny_qwen3_tokenizer`.
QWEN3_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
#: Qwen3's chat template (Qwen/Qwen3-4B tokenizer_config.json) for text turns without tools: the
#: same text for every message list the pipelines render.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}"
)

#: Mistral-Small-3.1's begin and turn markers, in the order of their ids in
#: :func:`tiny_mistral_tokenizer`.
MISTRAL_SPECIAL_TOKENS = ("<s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
#: The text-only part of Mistral-Small-3.1's chat template (Flux2Pipeline's system and user turns,
#: their content as a string or a list of text parts), written from its markers: the released
#: tokenizer's own template is the one that counts.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | map(attribute='text') | join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST]' + text + '[/INST]' }}"
    "{% else %}{{ text + '</s>' }}{% endif %}{% endfor %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return _byte_level(extra_specials=(), append_eos=True)


def tiny_vl_tokenizer() -> PreTrainedTokenizerFast:
    return _byte_level(extra_specials=QWEN_VL_SPECIAL_TOKENS, append_eos=False)


def tiny_qwen3_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = _byte_level(extra_specials=QWEN3_SPECIAL_TOKENS, append_eos=False)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def tiny_mistral_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = _byte_level(extra_specials=MISTRAL_SPECIAL_TOKENS, append_eos=False)
    tokenizer.bos_token = "<s>"
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


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
