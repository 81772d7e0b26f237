"""Single-file text encoders: ComfyUI's T5 (``umt5_xxl_*.safetensors``, transformers' names, the
embedding stored once) loads with its tokenizer from ``--t5_tokenizer`` and encodes exactly as the
same weights from a folder; without a tokenizer folder, the error says
what to do in one line; ComfyUI's Qwen2.5-VL file (``qwen_2.5_vl_7b*.safetensors``: the language
model under ``model.``, the vision tower and ``lm_head`` beside it) likewise with
``--text_encoder_tokenizer``. (Moved out of ``test_single_file.py``, which holds the transformers and
VAEs.)"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from masktrain.errors import ModelLoadError
from masktrain.models.weights_file import text_encoder_file_error


def save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))
    return path


def test_text_encoder_file_error_is_one_line() -> None:
    error = text_encoder_file_error("--t5", Path("/m/umt5_xxl_fp16.safetensors"))
    assert isinstance(error, ModelLoadError)
    assert str(error).startswith(
        "--t5 /m/umt5_xxl_fp16.safetensors: a single-file text encoder carries no tokenizer"
    )
    assert "\n" not in str(error) and "tokenizer/" in str(error)


# --- single-file text encoders (ComfyUI's umt5_xxl_*.safetensors) ----------------------------------


@pytest.fixture(scope="module")
def t5_file(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny UMT5 as ComfyUI stores T5 (transformers' names, the embedding once, under
    ``shared``), and its tokenizer saved to a folder."""
    from transformers import UMT5Config, UMT5EncoderModel

    from masktrain.models import loading
    from masktrain.models.tokenizer import tiny_tokenizer
    from masktrain.models.wan import TINY_T5

    root = tmp_path_factory.mktemp("t5")
    tokenizer = tiny_tokenizer()
    # the built-in tiny UMT5's weights (its seed), so the file must encode as --t5 tiny does
    model = loading.seeded(lambda: UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TINY_T5)))
    state = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    tokenizer.save_pretrained(root / "tokenizer")
    return save(root / "umt5_xxl_fp16.safetensors", state), root / "tokenizer"


def test_a_single_file_t5_with_a_tokenizer_folder_encodes_as_the_folder_model(t5_file) -> None:
    from masktrain.models import get_family

    path, tokenizer = t5_file
    family = get_family("wan")
    cpu = torch.device("cpu")
    loaded = family.load_text_encoder(str(path), cpu, torch.float32, tokenizer=str(tokenizer))
    reference = family.load_text_encoder("tiny", cpu, torch.float32)
    model = loaded.model
    assert model.shared.weight.data_ptr() == model.encoder.embed_tokens.weight.data_ptr()  # tied, once
    captions = ["a photo of a woman", "a red car"]
    for got, expected in zip(
        family.encode_text(loaded, captions), family.encode_text(reference, captions), strict=True
    ):
        assert torch.equal(got, expected)


def test_a_single_file_t5_without_a_tokenizer_says_which_to_fetch_and_where(t5_file) -> None:
    from masktrain.models import get_family

    with pytest.raises(ModelLoadError) as error:
        get_family("wan").load_text_encoder(str(t5_file[0]), torch.device("cpu"), torch.float32)
    message = str(error.value)
    assert message.startswith(f"--t5 {t5_file[0]}: a single-file text encoder carries no tokenizer")
    assert "pass --t5_tokenizer DIR" in message and "google/umt5-xxl" in message and "\n" not in message


def test_cache_reads_a_single_file_t5_with_its_tokenizer_flag(t5_file, tmp_path) -> None:
    from helpers import cache_tiny, make_dataset

    make_dataset(tmp_path, count=2)
    summaries = cache_tiny(tmp_path, text_encoder=str(t5_file[0]), text_tokenizer=str(t5_file[1]))
    assert all(not summary.failed for summary in summaries)
    assert len(list(tmp_path.rglob("*_wan_te.safetensors"))) == 2


def test_the_other_familys_tokenizer_flag_is_named(tmp_path) -> None:
    from masktrain.config import CacheConfig
    from masktrain.errors import SettingError

    with pytest.raises(SettingError, match="--t5_tokenizer is not used with --arch qwen_image"):
        CacheConfig.from_flags(
            dataset_config=tmp_path,
            arch="qwen_image",
            vae="tiny",
            text_encoders={"--text_encoder": "tiny"},
            tokenizers={"--t5_tokenizer": "dir"},
        )


# --- ComfyUI's qwen_2.5_vl_7b*.safetensors -------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_file(tmp_path_factory):
    """A small Qwen2.5-VL language model with the released 128-dim heads and RoPE sections, stored
    as ComfyUI stores Qwen2.5-VL (``model.`` + transformers' names, with a vision tower and
    ``lm_head`` that are not read), its tokenizer saved to a folder; and the same model."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    from masktrain.models import loading
    from masktrain.models.tokenizer import tiny_tokenizer

    root = tmp_path_factory.mktemp("qwen")
    tokenizer = tiny_tokenizer()
    config = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=128000,
        rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]},
    )
    model = loading.seeded(lambda: Qwen2_5_VLTextModel(config)).eval()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["visual.blocks.0.attn.qkv.weight"] = torch.ones(12, 4)
    state["lm_head.weight"] = torch.ones(len(tokenizer), 256)
    tokenizer.save_pretrained(root / "tokenizer")
    return save(root / "qwen_2.5_vl_7b.safetensors", state), root / "tokenizer", model, tokenizer


def test_a_single_file_qwen_vl_encodes_as_the_same_weights_do(qwen_file) -> None:
    from masktrain.models import get_family
    from masktrain.models.base import TextEncoder
    from masktrain.models.qwen_image import MAX_LENGTH

    path, tokenizer_dir, model, tokenizer = qwen_file
    family = get_family("qwen_image")
    loaded = family.load_text_encoder(
        str(path), torch.device("cpu"), torch.float32, tokenizer=str(tokenizer_dir)
    )
    config = loaded.model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers) == (2, 1, 2)
    reference = TextEncoder(tokenizer=tokenizer, model=model, max_length=MAX_LENGTH)
    captions = ["a photo of a woman", "a red car parked by the sea"]
    for got, expected in zip(
        family.encode_text(loaded, captions), family.encode_text(reference, captions), strict=True
    ):
        assert got.shape[0] > 0 and torch.equal(got, expected)


def test_a_single_file_qwen_vl_without_a_tokenizer_says_which_to_fetch(qwen_file) -> None:
    from masktrain.models import get_family

    with pytest.raises(ModelLoadError) as error:
        get_family("qwen_image").load_text_encoder(str(qwen_file[0]), torch.device("cpu"), torch.float32)
    message = str(error.value)
    assert message.startswith(
        f"--text_encoder {qwen_file[0]}: a single-file text encoder carries no tokenizer"
    )
    assert "pass --text_encoder_tokenizer DIR" in message and "Qwen/Qwen2.5-VL-7B-Instruct" in message


def test_cache_reads_a_single_file_qwen_vl_with_its_tokenizer_flag(qwen_file, tmp_path) -> None:
    from helpers import make_dataset
    from masktrain.cache import run
    from masktrain.config import CacheConfig

    toml = make_dataset(tmp_path, count=2)
    config = CacheConfig.from_flags(
        dataset_config=toml,
        arch="qwen_image",
        vae="tiny",
        text_encoders={"--text_encoder": str(qwen_file[0])},
        tokenizers={"--text_encoder_tokenizer": str(qwen_file[1])},
        fp8_text={"--fp8_vl": True},
        device="cpu",
    )
    assert all(not summary.failed for summary in run(config))
    assert len(list(tmp_path.rglob("*_qwen_image_te.safetensors"))) == 2
