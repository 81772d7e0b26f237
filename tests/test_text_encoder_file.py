"""Single-file text encoders: ComfyUI's T5 (``umt5_xxl_*.safetensors``, transformers' names, the
embedding stored once) loads with its tokenizer from ``--t5_tokenizer`` and encodes exactly as the
same weights from a folder; without a tokenizer folder, and for Qwen2.5-VL files, the errors say
what to do in one line. (Moved out of ``test_single_file.py``, which holds the transformers and
VAEs.)"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from masktrain.errors import ModelLoadError
from masktrain.models.single_file import text_encoder_file_error


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


def test_single_file_text_encoder_errors_for_qwen_and_the_other_familys_flag(tmp_path) -> None:
    from masktrain.config import CacheConfig
    from masktrain.errors import SettingError
    from masktrain.models import get_family

    with pytest.raises(ModelLoadError, match=r"single-file Qwen2\.5-VL text encoders are not read yet"):
        get_family("qwen_image").load_text_encoder(
            str(tmp_path / "qwen_2.5_vl_7b.safetensors"), torch.device("cpu"), torch.float32
        )
    with pytest.raises(SettingError, match="--t5_tokenizer is not used with --arch qwen_image"):
        CacheConfig.from_flags(
            dataset_config=tmp_path,
            arch="qwen_image",
            vae="tiny",
            text_encoders={"--text_encoder": "tiny"},
            tokenizers={"--t5_tokenizer": "dir"},
        )
