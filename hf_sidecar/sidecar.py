"""The sidecar artifact: the memory update and its transported residual, with their config.

A sidecar folder contains exactly four files:

- ``sidecar.safetensors``: ``delta.<name>`` (the memory update) and ``transport.<name>`` (the
  transported residual), dense, or as ``.A``/``.B`` factors whose product ``B @ A`` is the matrix;
- ``sidecar_config.json``: what the sidecar covers, which checkpoint it applies to, the
  recommended edit coefficients and build-time metrics;
- ``process.json``: the recorded safety process the residual was estimated through;
- ``README.md``: the model card.

Parameter names are those of the safety-trained checkpoint as transformers saves it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import __version__
from .io import ContentDigest, atomic_directory, atomic_save_safetensors, atomic_write_json, atomic_write_text, checkpoint_files, sha256_file

logger = logging.getLogger(__name__)

SIDECAR_FORMAT_VERSION = "1.0"
TENSORS_FILE = "sidecar.safetensors"
CONFIG_FILE = "sidecar_config.json"
PROCESS_FILE = "process.json"
CARD_FILE = "README.md"
SIDECAR_FILES = (TENSORS_FILE, CONFIG_FILE, PROCESS_FILE, CARD_FILE)
RECOMMENDATION_RULES = ("theory", "validation_closure")


class SidecarError(ValueError):
    """Raised when a sidecar is malformed: missing, misshaped or non-finite tensors, or a bad config."""


class SidecarMismatchError(SidecarError):
    """Raised when a sidecar is applied to a checkpoint it was not built against."""


@dataclass(frozen=True)
class LowRank:
    """A matrix stored as factors, equal to ``B @ A`` (any LoRA scaling is folded into ``B``)."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def dense(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        return self.B.to(device=device, dtype=dtype) @ self.A.to(device=device, dtype=dtype)


Update = torch.Tensor | LowRank


def _dense(update: Update, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(update, LowRank):
        return update.dense(dtype, device)
    return update.to(device=device, dtype=dtype)


def _storage(update: Update | None) -> dict | None:
    if update is None:
        return None
    if isinstance(update, LowRank):
        return {"storage": "factored", "rank": update.rank}
    return {"storage": "dense"}


class Sidecar:
    """Memory update ``delta`` and transported residual ``transport`` for one memory.

    Applying it computes ``theta_AMS - lam * delta - gamma * transport`` tensor by tensor (see
    :mod:`hf_sidecar.edit`). Construct one with :func:`hf_sidecar.build_sidecar` or load one with
    :meth:`from_pretrained`.
    """

    def __init__(self, delta: Mapping[str, Update], transport: Mapping[str, Update], config: dict, process: dict):
        self.delta = dict(delta)
        self.transport = dict(transport)
        self.config = config
        self.process = process
        self.source: dict | None = None

    # ----------------------------------------------------------------------------------------
    # What the sidecar covers

    @property
    def names(self) -> list[str]:
        return sorted(self.config["parameters"])

    @property
    def memory(self) -> str:
        return self.config.get("memory", "memory")

    @property
    def recommended(self) -> tuple[float, float]:
        recommended = self.config["recommended"]
        return float(recommended["lam"]), float(recommended["gamma"])

    @property
    def content_digest(self) -> str:
        return self.config["checkpoint"]["content_digest"]

    @property
    def process_digest(self) -> str:
        return self.config["process"]["digest"]

    def delta_tensor(self, name: str, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor | None:
        update = self.delta.get(name)
        return None if update is None else _dense(update, dtype, device)

    def transport_tensor(self, name: str, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor | None:
        update = self.transport.get(name)
        return None if update is None else _dense(update, dtype, device)

    def nbytes(self) -> int:
        total = 0
        for update in list(self.delta.values()) + list(self.transport.values()):
            tensors = (update.A, update.B) if isinstance(update, LowRank) else (update,)
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    # ----------------------------------------------------------------------------------------
    # Validation

    def validate(self) -> None:
        """Check that every covered parameter has finite tensors of its configured shape."""
        parameters = self.config.get("parameters")
        if not isinstance(parameters, dict) or not parameters:
            raise SidecarError("Sidecar config has no 'parameters' table; the sidecar covers nothing.")
        for name, entry in parameters.items():
            shape = tuple(entry["shape"])
            for kind, table in (("delta", self.delta), ("transport", self.transport)):
                expected = entry.get(kind)
                update = table.get(name)
                if expected is None:
                    if update is not None:
                        raise SidecarError(f"Sidecar tensor {kind}.{name} is present but the config does not list it.")
                    continue
                if update is None:
                    raise SidecarError(
                        f"Sidecar tensor {kind}.{name} is missing from {TENSORS_FILE}. The file is incomplete; rebuild or download the sidecar again."
                    )
                tensors = {"A": update.A, "B": update.B} if isinstance(update, LowRank) else {"": update}
                if tuple(update.shape) != shape:
                    raise SidecarError(
                        f"Sidecar tensor {kind}.{name} has shape {tuple(update.shape)} but the parameter has shape {shape}. "
                        "The sidecar belongs to another architecture."
                    )
                if isinstance(update, LowRank) and update.A.shape[0] != update.B.shape[1]:
                    raise SidecarError(f"Sidecar factors {kind}.{name}.A and .B have mismatched ranks {update.A.shape[0]} and {update.B.shape[1]}.")
                for suffix, tensor in tensors.items():
                    if not torch.isfinite(tensor).all():
                        key = f"{kind}.{name}" + (f".{suffix}" if suffix else "")
                        raise SidecarError(f"Sidecar tensor {key} contains NaN or infinite values. Rebuild the sidecar; it cannot be applied.")
        extra = sorted((set(self.delta) | set(self.transport)) - set(parameters))
        if extra:
            raise SidecarError(f"Sidecar tensor for {extra[0]!r} is not listed in the config's parameters.")

    # ----------------------------------------------------------------------------------------
    # Checkpoint binding

    def check_file_digests(self, folder: str | Path) -> bool:
        """Check whether the safetensors files of ``folder`` are byte-identical to those the sidecar was built for."""
        expected = self.config["checkpoint"].get("files") or {}
        if not expected:
            return False
        files = {file.name: file for file in checkpoint_files(folder)}
        if set(files) != set(expected):
            return False
        return all(sha256_file(files[name]) == digest for name, digest in expected.items())

    def check_state(self, tensors: Mapping[str, torch.Tensor], *, where: str = "the checkpoint") -> None:
        """Raise :class:`SidecarMismatchError` unless ``tensors`` hold the safety-trained weights the sidecar was built against."""
        missing = [name for name in self.names if name not in tensors]
        if missing:
            raise SidecarMismatchError(
                f"{where} has no tensor {missing[0]!r}, which sidecar {self.memory!r} edits ({len(missing)} missing). "
                "Apply the sidecar to the checkpoint it was built for."
            )
        for name in self.names:
            shape = tuple(self.config["parameters"][name]["shape"])
            if tuple(tensors[name].shape) != shape:
                raise SidecarMismatchError(
                    f"Tensor {name!r} in {where} has shape {tuple(tensors[name].shape)}, sidecar {self.memory!r} expects {shape}."
                )
        digest = ContentDigest(self.names)
        for name in self.names:
            digest.update(name, tensors[name])
        found = digest.hexdigest()
        if found != self.content_digest:
            raise SidecarMismatchError(
                f"Sidecar {self.memory!r} was built for a checkpoint with content digest {self.content_digest[:16]}, "
                f"but {where} has {found[:16]}. It applies only to the exact safety-trained weights it was built from"
                + (f" ({self.config['checkpoint']['base_model']})" if self.config["checkpoint"].get("base_model") else "")
                + "; a sidecar built for other weights would edit the wrong values."
            )

    # ----------------------------------------------------------------------------------------
    # Saving and loading

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return the tensors under their file keys: ``delta.<name>``, ``transport.<name>`` or their ``.A``/``.B`` factors."""
        tensors = {}
        for kind, table in (("delta", self.delta), ("transport", self.transport)):
            for name, update in table.items():
                if isinstance(update, LowRank):
                    tensors[f"{kind}.{name}.A"] = update.A.contiguous()
                    tensors[f"{kind}.{name}.B"] = update.B.contiguous()
                else:
                    tensors[f"{kind}.{name}"] = update.contiguous()
        return tensors

    def save_pretrained(self, save_directory: str | Path, *, card: str | None = None) -> Path:
        """Write the sidecar folder atomically: on any failure, an existing folder stays as it was."""
        from .card import sidecar_card

        self.validate()
        save_directory = Path(save_directory)
        with atomic_directory(save_directory) as staging:
            atomic_save_safetensors(self.state_dict(), staging / TENSORS_FILE, metadata={"format": "pt"})
            atomic_write_json(staging / CONFIG_FILE, self.config)
            atomic_write_json(staging / PROCESS_FILE, self.process)
            atomic_write_text(staging / CARD_FILE, card if card is not None else sidecar_card(self))
        logger.info("Saved sidecar %r to %s", self.memory, save_directory)
        return save_directory

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | Path,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        endpoint: str | None = None,
        validate: bool = True,
    ) -> "Sidecar":
        """Load a sidecar from a local folder or, when no such folder exists, from a Hub repository.

        As in transformers and PEFT, an existing folder ``pretrained`` (joined with ``subfolder``)
        wins, and the Hub options are then ignored. Otherwise a string that is a valid repo id is
        downloaded through the huggingface_hub cache (:func:`hf_sidecar.hub.load_from_hub`), and
        ``source`` records its repo id, revision, commit and subfolder. A ``Path`` is always read as
        a local folder. Loading checks the format version, tensor keys, shapes and values.
        """
        folder = Path(pretrained) / subfolder if subfolder else Path(pretrained)
        if folder.is_dir() or isinstance(pretrained, Path):
            return cls._load_folder(folder, validate=validate)
        from huggingface_hub.errors import RepositoryNotFoundError

        from .hub import SidecarHubError, is_repo_id, load_from_hub

        if not is_repo_id(str(pretrained)):
            return cls._load_folder(folder, validate=validate)
        try:
            return load_from_hub(
                str(pretrained), subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir,
                local_files_only=local_files_only, force_download=force_download, endpoint=endpoint, validate=validate,
            )
        except SidecarHubError as err:
            if not isinstance(err.__cause__, RepositoryNotFoundError):
                raise
            raise SidecarHubError(
                f"No local folder {folder} exists, so {pretrained!r} was read as a repo id. {err}",
                repo_id=err.repo_id, revision=err.revision, filename=err.path_in_repo,
            ) from err.__cause__

    def push_to_hub(
        self,
        repo_id: str,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        update_root_card: bool = True,
        endpoint: str | None = None,
    ):
        """Push the sidecar into ``subfolder`` (default ``sidecars/<memory>``) of a Hub repository.

        A new repository is private unless ``private=False``, and pushing to a public one issues
        :class:`hf_sidecar.hub.PublicRepositoryWarning`. Files outside the subfolder stay as they
        are, except that the root README gains a section listing the sidecar (see
        :func:`hf_sidecar.hub.push_sidecar`). Returns huggingface_hub's ``CommitInfo``.
        """
        from .hub import push_sidecar

        return push_sidecar(
            self, repo_id, subfolder=subfolder, revision=revision, private=private, token=token,
            commit_message=commit_message, create_pr=create_pr, update_root_card=update_root_card, endpoint=endpoint,
        )

    @classmethod
    def _load_folder(cls, path: str | Path, *, validate: bool = True) -> "Sidecar":
        """Load a local sidecar folder, checking its format version, tensor keys, shapes and values."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"Sidecar folder {folder} not found. Pass the folder that Sidecar.save_pretrained wrote.")
        for name in (TENSORS_FILE, CONFIG_FILE, PROCESS_FILE):
            if not (folder / name).is_file():
                raise SidecarError(f"Sidecar folder {folder} has no {name}. A sidecar folder contains {', '.join(SIDECAR_FILES)}.")
        config = _read_json(folder / CONFIG_FILE)
        check_format_version(config, folder / CONFIG_FILE)
        process = _read_json(folder / PROCESS_FILE)
        delta: dict[str, Update] = {}
        transport: dict[str, Update] = {}
        try:
            with safe_open(str(folder / TENSORS_FILE), framework="pt") as handle:
                keys = list(handle.keys())
                raw = {key: handle.get_tensor(key) for key in keys}
        except (SafetensorError, OSError) as err:
            raise SidecarError(f"Could not read {folder / TENSORS_FILE}: {err}. The file is truncated or corrupt; download or rebuild the sidecar.") from err
        parameters = config.get("parameters", {})
        for kind, table in (("delta", delta), ("transport", transport)):
            for name, entry in parameters.items():
                spec = entry.get(kind)
                if spec is None:
                    continue
                key = f"{kind}.{name}"
                if spec.get("storage") == "factored":
                    if f"{key}.A" not in raw or f"{key}.B" not in raw:
                        raise SidecarError(f"Sidecar tensor {key}.A or {key}.B is missing from {folder / TENSORS_FILE}; download or rebuild the sidecar.")
                    table[name] = LowRank(raw.pop(f"{key}.A"), raw.pop(f"{key}.B"))
                else:
                    if key not in raw:
                        raise SidecarError(f"Sidecar tensor {key} is missing from {folder / TENSORS_FILE}; download or rebuild the sidecar.")
                    table[name] = raw.pop(key)
        if raw:
            raise SidecarError(f"{folder / TENSORS_FILE} contains tensor {sorted(raw)[0]!r}, which its config does not list.")
        sidecar = cls(delta, transport, config, process)
        sidecar.source = {"path": str(folder.resolve())}
        if validate:
            sidecar.validate()
        return sidecar

    def __repr__(self) -> str:
        lam, gamma = self.recommended
        return (
            f"Sidecar(memory={self.memory!r}, parameters={len(self.names)}, epsilon={self.config.get('epsilon')}, "
            f"recommended=(lam={lam}, gamma={gamma}), content_digest={self.content_digest[:12]})"
        )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SidecarError(f"{path} is not valid JSON ({err}); the file is truncated or corrupt.") from err


def check_format_version(config: dict, where: Path | str) -> None:
    """Accept any minor version of the supported major format version, reject others clearly."""
    version = str(config.get("format_version", ""))
    major = version.split(".")[0]
    if major != SIDECAR_FORMAT_VERSION.split(".")[0]:
        raise SidecarError(
            f"{where} has format_version {version!r}, but hf-sidecar {__version__} reads version "
            f"{SIDECAR_FORMAT_VERSION.split('.')[0]}.x. Upgrade hf-sidecar (pip install -U hf-sidecar) to read it."
        )


def make_config(
    *,
    memory: str,
    delta: Mapping[str, Update],
    transport: Mapping[str, Update],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, torch.dtype],
    epsilon: float,
    estimator: str,
    checkpoint: dict,
    process: dict,
    mode: str,
    scoring_refusals: Iterable[str] = (),
    recommended: dict | None = None,
    metrics: dict | None = None,
    build: dict | None = None,
) -> dict:
    """Assemble ``sidecar_config.json`` for the given tensors."""
    names = sorted(set(delta) | set(transport))
    return {
        "format_version": SIDECAR_FORMAT_VERSION,
        "library": {"name": "hf-sidecar", "version": __version__},
        "memory": memory,
        "mode": mode,
        "epsilon": float(epsilon),
        "estimator": estimator,
        "recommended": recommended or {"lam": 1.0, "gamma": 1.0, "rule": "theory"},
        "parameters": {
            name: {
                "shape": list(shapes[name]),
                "dtype": str(dtypes[name]).removeprefix("torch."),
                "delta": _storage(delta.get(name)),
                "transport": _storage(transport.get(name)),
            }
            for name in names
        },
        "checkpoint": checkpoint,
        "process": process,
        "scoring_refusals": list(scoring_refusals),
        "metrics": metrics or {},
        "build": build or {},
    }
