"""File input and output: atomic writes, checkpoint reading with clear errors, and digests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """Raised when a checkpoint folder or file is missing, truncated or corrupt."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save ``tensors`` with safetensors through a temporary file, so a crash leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, temporary, metadata=metadata or {"format": "pt"})
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``path`` only when the block succeeds.

    A failure inside the block removes the temporary folder and leaves any existing ``path``
    untouched; on success the old folder is swapped out and deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = None
    if path.exists():
        backup = path.parent / f".{path.name}.old-{os.getpid()}"
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(path, backup)
    os.replace(staging, path)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def sha256_file(path: str | Path, chunk_size: int = 1 << 22) -> str:
    """Return the hex sha256 of a file, the value the Hub reports as an LFS file's id."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(folder: str | Path) -> list[Path]:
    """List the safetensors files of a model folder: the shards named by its index, or the single file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Checkpoint folder {folder} not found. Pass a folder written by save_pretrained.")
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err}). Save the checkpoint again.") from err
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / SAFETENSORS_SINGLE).is_file():
        files = [folder / SAFETENSORS_SINGLE]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"No safetensors weights in {folder}. Save the model with save_pretrained(safe_serialization=True).")
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"Checkpoint file {file} named by {index} is missing. Download or save the checkpoint again.")
    return files


def _open_error(file: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"Could not read {file}: {err}. The file is truncated or corrupt; save or download it again.")


def iter_checkpoint(folder: str | Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield ``(name, tensor, file)`` for every tensor of a checkpoint folder, one tensor at a time."""
    for file in checkpoint_files(folder):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name), file
        except (SafetensorError, OSError) as err:
            raise _open_error(file, err) from err


def load_checkpoint(folder: str | Path, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Load the tensors of a checkpoint folder (only ``names`` when given)."""
    tensors = {}
    for name, tensor, _ in iter_checkpoint(folder):
        if names is None or name in names:
            tensors[name] = tensor
    if names is not None:
        missing = sorted(names - tensors.keys())
        if missing:
            raise CheckpointError(f"Checkpoint {folder} has no tensor {missing[0]!r} ({len(missing)} missing in all). Is this the right checkpoint?")
    return tensors


def file_digests(folder: str | Path) -> dict[str, str]:
    """Map each safetensors file name of a checkpoint folder to its sha256."""
    return {file.name: sha256_file(file) for file in checkpoint_files(folder)}


class ContentDigest:
    """Incremental sha256 over named tensors in sorted name order of (name, dtype, shape, raw bytes).

    The digest depends only on tensor contents, so it survives resharding. Tensors may arrive out
    of order, because they are buffered by name until their turn comes.
    """

    def __init__(self, names: list[str]):
        self._order = sorted(names)
        self._next = 0
        self._pending: dict[str, bytes] = {}
        self._hash = hashlib.sha256()

    @staticmethod
    def encode(name: str, tensor: torch.Tensor) -> bytes:
        tensor = tensor.detach().to("cpu").contiguous()
        header = f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode()
        return header + tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else header

    def update(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._order:
            return
        self._pending[name] = self.encode(name, tensor)
        while self._next < len(self._order) and self._order[self._next] in self._pending:
            self._hash.update(self._pending.pop(self._order[self._next]))
            self._next += 1

    @property
    def missing(self) -> list[str]:
        return [name for name in self._order[self._next :] if name not in self._pending]

    def hexdigest(self) -> str:
        if self._next != len(self._order):
            raise CheckpointError(f"Content digest is incomplete: tensor {self.missing[0]!r} was never seen.")
        return self._hash.hexdigest()


def content_digest(tensors: Mapping[str, torch.Tensor], names: list[str] | None = None) -> str:
    """Digest ``tensors`` (only ``names`` when given) as :class:`ContentDigest` does."""
    names = sorted(names if names is not None else tensors.keys())
    digest = ContentDigest(names)
    for name in names:
        digest.update(name, tensors[name])
    return digest.hexdigest()
