"""``SidecarModelForCausalLM.from_pretrained``: load a causal LM with a sidecar's revocation applied.

The result is the ordinary transformers model that ``AutoModelForCausalLM.from_pretrained`` would
return, so generation, PEFT and Accelerate keep working; only the covered weights hold
``theta_AMS - lam * delta - gamma * transport``. ``model.config.hf_sidecar_revocation`` records
which sidecars and coefficients were applied (an empty list when none were).

For a full checkpoint the edit is applied tensor by tensor while ``from_pretrained`` reads the
safetensors files (:mod:`hf_sidecar.streaming`), on the device and in the dtype that the device
map and ``dtype`` assign, including disk offload. For a base model plus PEFT adapters the adapters
are merged first and the edit is applied to the merged weights in place, because the sidecar was
built against the merged weights.

Revoking at load time is not deletion: the checkpoint files and the sidecar still contain the
memory. Publishing a revoked checkpoint (:func:`hf_sidecar.revoke_checkpoint`) and removing the
others is deletion.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError

from .edit import REVOCATION_CONFIG_KEY, as_sidecar_list, record_revocation, resolve_coefficients, revoke_model_
from .sidecar import CONFIG_FILE, PROCESS_FILE, SIDECAR_FILES, TENSORS_FILE, LowRank, Sidecar, SidecarError, check_format_version
from .streaming import VERIFY_MODES, StreamingRevocation, open_pread, revocation_hooks

logger = logging.getLogger(__name__)

SidecarSource = Sidecar | str | Path
ADAPTER_CONFIG = "adapter_config.json"
_FLOATING_DTYPES = ("F64", "F32", "F16", "BF16")
# from_pretrained options that would bypass or defeat reading the checkpoint tensor by tensor.
_UNSUPPORTED_OPTIONS = {
    "state_dict": "it holds a second full copy of the weights; pass the checkpoint folder instead",
    "gguf_file": "GGUF weights are dequantized by another loader; convert the checkpoint to safetensors first",
    "quantization_config": "the edit would have to run before quantization, which is untested; quantize the revoked model after loading",
}


# ------------------------------------------------------------------------------------------------
# Sidecars whose tensors are read on demand


class _LazyUpdates(Mapping):
    """The ``delta`` or ``transport`` table of a sidecar, read from its file each time a tensor is requested.

    A dense sidecar is as large as the weights it covers. Reading each update only while its
    tensor is edited keeps one update in memory at a time instead of the whole sidecar.
    """

    def __init__(self, handle, kind: str, parameters: Mapping[str, dict], path: Path):
        self._handle = handle
        self._kind = kind
        self._path = path
        self._storage = {name: entry[kind]["storage"] for name, entry in parameters.items() if entry.get(kind)}

    def __getitem__(self, name: str):
        storage = self._storage[name]
        key = f"{self._kind}.{name}"
        if storage == "factored":
            return LowRank(self._read(f"{key}.A"), self._read(f"{key}.B"))
        return self._read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._storage)

    def __len__(self) -> int:
        return len(self._storage)

    def _read(self, key: str) -> torch.Tensor:
        tensor = self._handle.get_tensor(key)
        if not torch.isfinite(tensor).all():
            raise SidecarError(f"Sidecar tensor {key} in {self._path} contains NaN or infinite values. Rebuild the sidecar; it cannot be applied.")
        return tensor


def _check_lazy_tensors(handle, config: dict, path: Path) -> None:
    """Check the tensor keys, shapes and dtypes of a sidecar file from its header, as :meth:`Sidecar.validate` does from the tensors."""
    shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    dtypes = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
    parameters = config.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise SidecarError(f"{path.parent / CONFIG_FILE} has no 'parameters' table; the sidecar covers nothing.")
    expected_keys = set()
    for name, entry in parameters.items():
        shape = tuple(entry["shape"])
        for kind in ("delta", "transport"):
            spec = entry.get(kind)
            if spec is None:
                continue
            key = f"{kind}.{name}"
            if spec.get("storage") == "factored":
                expected_keys |= {f"{key}.A", f"{key}.B"}
                if f"{key}.A" not in shapes or f"{key}.B" not in shapes:
                    raise SidecarError(f"Sidecar tensor {key}.A or {key}.B is missing from {path}; download or rebuild the sidecar.")
                a, b = shapes[f"{key}.A"], shapes[f"{key}.B"]
                if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                    raise SidecarError(f"Sidecar factors {key}.A {list(a)} and {key}.B {list(b)} in {path} do not form a product B @ A.")
                found = (b[0], a[1])
            else:
                expected_keys.add(key)
                if key not in shapes:
                    raise SidecarError(f"Sidecar tensor {key} is missing from {path}; download or rebuild the sidecar.")
                found = shapes[key]
            if found != shape:
                raise SidecarError(
                    f"Sidecar tensor {key} in {path} has shape {list(found)} but the parameter has shape {list(shape)}. "
                    "The sidecar belongs to another architecture."
                )
    extra = sorted(set(shapes) - expected_keys)
    if extra:
        raise SidecarError(f"{path} contains tensor {extra[0]!r}, which its config does not list. Download or rebuild the sidecar.")
    not_floating = sorted(key for key, dtype in dtypes.items() if dtype not in _FLOATING_DTYPES)
    if not_floating:
        raise SidecarError(f"Sidecar tensor {not_floating[0]} in {path} has dtype {dtypes[not_floating[0]]}; sidecar tensors are floating point.")


def open_sidecar_folder(folder: str | Path, stack: contextlib.ExitStack) -> Sidecar:
    """Open a sidecar folder whose tensors are read from disk only when a tensor is edited.

    The format version, keys and shapes are checked from the files' headers, and each tensor's
    values when it is read. ``stack`` closes the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Sidecar folder {folder} not found. Pass the folder that Sidecar.save_pretrained wrote.")
    for name in (TENSORS_FILE, CONFIG_FILE, PROCESS_FILE):
        if not (folder / name).is_file():
            raise SidecarError(f"Sidecar folder {folder} has no {name}. A sidecar folder contains {', '.join(SIDECAR_FILES)}.")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        process = json.loads((folder / PROCESS_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SidecarError(f"A JSON file in sidecar folder {folder} is invalid ({err}); the file is truncated or corrupt.") from err
    check_format_version(config, folder / CONFIG_FILE)
    path = folder / TENSORS_FILE
    try:
        handle = stack.enter_context(open_pread(path))
        _check_lazy_tensors(handle, config, path)
    except (SafetensorError, OSError) as err:
        raise SidecarError(f"Could not read {path}: {err}. The file is truncated or corrupt; download or rebuild the sidecar.") from err
    sidecar = Sidecar({}, {}, config, process)
    sidecar.delta = _LazyUpdates(handle, "delta", config["parameters"], path)
    sidecar.transport = _LazyUpdates(handle, "transport", config["parameters"], path)
    sidecar.source = {"path": str(folder.resolve())}
    return sidecar


def resolve_sidecar(
    source: SidecarSource,
    stack: contextlib.ExitStack,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    hub_options: Mapping | None = None,
) -> Sidecar:
    """Return ``source`` itself if it is a :class:`Sidecar`, else open it from a local folder or a Hub repository.

    As in :meth:`Sidecar.from_pretrained`, an existing local folder wins over a repo id of the
    same name. ``hub_options`` go to :func:`hf_sidecar.hub.download_sidecar` (``endpoint``,
    ``cache_dir``, ``force_download``, ``local_files_only``).
    """
    if isinstance(source, Sidecar):
        return source
    folder = Path(source) / subfolder if subfolder else Path(source)
    if folder.is_dir() or isinstance(source, Path):
        return open_sidecar_folder(folder, stack)
    from .hub import SidecarHubError, download_sidecar, is_repo_id

    if not is_repo_id(str(source)):
        return open_sidecar_folder(folder, stack)
    local, hub_source = download_sidecar(str(source), subfolder=subfolder, revision=revision, token=token, **dict(hub_options or {}))
    try:
        sidecar = open_sidecar_folder(local, stack)
    except SidecarError as err:
        raise type(err)(f"Sidecar {source} ({hub_source['subfolder'] or '.'}, commit {hub_source['commit']}) is invalid: {err}") from err
    except FileNotFoundError as err:
        raise SidecarHubError(str(err), repo_id=str(source), revision=revision) from err
    sidecar.source = dict(hub_source)
    return sidecar


# ------------------------------------------------------------------------------------------------
# Models


def _resolve_dtype(dtype, torch_dtype):
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass only dtype (torch_dtype is its older name).")
    dtype = dtype if dtype is not None else torch_dtype
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; pass e.g. torch.bfloat16, 'bfloat16' or 'auto'.")
        dtype = getattr(torch, dtype)
    return dtype


def _split_adapters(pretrained: str | Path, adapters) -> tuple[str | Path, list[str | Path]]:
    """Return the base model and the adapters to merge, reading a local adapter folder's base model."""
    if adapters is None:
        listed = []
    elif isinstance(adapters, (str, Path)):
        listed = [adapters]
    else:
        listed = list(adapters)
    folder = Path(pretrained)
    if folder.is_dir() and (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file():
        base = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise ValueError(
                f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path. Pass the base model as the first argument "
                f"and the adapter as adapters=[{str(folder)!r}]."
            )
        logger.info("%s is a PEFT adapter; loading its base model %s", folder, base)
        return base, [folder, *listed]
    return pretrained, listed


def _merge_adapters(model, adapters: Sequence[str | Path], token):
    """Merge each PEFT adapter into ``model`` in order, as the merged checkpoint was made."""
    from peft import PeftModel

    offloaded = sorted(name for name, parameter in model.named_parameters() if parameter.device.type == "meta")
    if offloaded:
        raise ValueError(
            f"Parameter {offloaded[0]!r} is offloaded by the device map, and merging adapters into offloaded weights is not "
            "supported. Use a device map without CPU or disk offload, or merge the adapters and save the merged checkpoint, "
            "then load that with the sidecar."
        )
    options = {"token": token} if token is not None else {}
    for adapter in adapters:
        logger.info("Merging PEFT adapter %s", adapter)
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False, **options).merge_and_unload()
    return model


class SidecarModelForCausalLM:
    """Loads causal language models with a sidecar's revocation applied; a factory like ``AutoModelForCausalLM``.

    :meth:`from_pretrained` returns the plain transformers model, not an instance of this class.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("SidecarModelForCausalLM is a factory; call SidecarModelForCausalLM.from_pretrained(...).")

    @staticmethod
    def _auto_class():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *model_args,
        sidecar: SidecarSource | Sequence[SidecarSource] | None = None,
        lam: float | None = None,
        gamma: float | None = None,
        revoke: bool = True,
        adapters: str | Path | Sequence[str | Path] | None = None,
        sidecar_subfolder: str | None = None,
        sidecar_revision: str | None = None,
        sidecar_kwargs: Mapping | None = None,
        verify: str = "auto",
        device_map=None,
        max_memory: Mapping | None = None,
        offload_folder: str | Path | None = None,
        dtype=None,
        torch_dtype=None,
        revision: str | None = None,
        token: str | bool | None = None,
        **kwargs,
    ):
        """Load a causal LM and apply ``sidecar``'s revocation to its weights.

        Args:
            pretrained_model_name_or_path: a local folder or Hub repo id of the safety-trained
                checkpoint, a base model when ``adapters`` are given, or a local PEFT adapter
                folder, whose ``base_model_name_or_path`` is then loaded and the adapter merged.
            sidecar: a :class:`Sidecar`, a sidecar folder or a Hub repo id, or a list of these
                (several memories of the same safety run). Required unless ``revoke=False``.
            lam, gamma: the edit coefficients; None takes each sidecar's recommended value.
            revoke: False loads the checkpoint unmodified and records that nothing was revoked.
            adapters: PEFT adapters (folders or Hub ids) merged into the base model in order
                before the edit. Offloaded device maps are not supported with adapters.
            sidecar_subfolder, sidecar_revision: where the sidecar is in its Hub repository.
            sidecar_kwargs: other options for the sidecar download (``endpoint``, ``cache_dir``,
                ``force_download``, ``local_files_only``).
            verify: ``"auto"`` refuses a checkpoint whose files have the sidecar's file names but
                other sha256s before reading any tensor, and verifies the content digest while
                reading when the file names differ (a resharded copy). ``"content"`` always
                verifies the content digest while reading.
            device_map, max_memory, offload_folder, dtype, revision, token: as in transformers'
                ``from_pretrained``; ``torch_dtype`` is accepted as the older name of ``dtype``.
                Disk offload of revoked tensors needs ``offload_folder``, where they are written.
            **kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

        Raises:
            SidecarMismatchError: the checkpoint is not the one the sidecars were built for.
            SidecarError: a sidecar file is malformed.
        """
        for option, reason in _UNSUPPORTED_OPTIONS.items():
            if kwargs.get(option) is not None:
                raise ValueError(f"{option}= is not supported with a sidecar: {reason}.")
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r} is not supported; use one of {VERIFY_MODES}.")
        load_options = dict(kwargs, device_map=device_map, max_memory=max_memory, revision=revision, token=token)
        if offload_folder is not None:
            load_options["offload_folder"] = str(offload_folder)
        dtype = _resolve_dtype(dtype, torch_dtype)
        if dtype is not None:
            load_options["dtype"] = dtype
        base, adapter_list = _split_adapters(pretrained_model_name_or_path, adapters)
        auto_class = cls._auto_class()

        if not revoke:
            model = auto_class.from_pretrained(base, *model_args, **load_options)
            if adapter_list:
                model = _merge_adapters(model, adapter_list, token)
            if getattr(model.config, REVOCATION_CONFIG_KEY, None) is None:
                setattr(model.config, REVOCATION_CONFIG_KEY, [])
            logger.info("Loaded %s without revocation", base)
            return model
        if sidecar is None:
            raise ValueError("No sidecar given: pass sidecar= (a Sidecar, a sidecar folder or a Hub repo id), or revoke=False.")

        sources = list(sidecar) if isinstance(sidecar, (list, tuple)) else [sidecar]
        with contextlib.ExitStack() as stack:
            loaded = [
                resolve_sidecar(source, stack, subfolder=sidecar_subfolder, revision=sidecar_revision, token=token, hub_options=sidecar_kwargs)
                for source in sources
            ]
            sidecars = as_sidecar_list(loaded)
            coefficients = [resolve_coefficients(item, lam, gamma) for item in sidecars]
            if adapter_list:
                model = auto_class.from_pretrained(base, *model_args, **load_options)
                model = _merge_adapters(model, adapter_list, token)
                revoke_model_(model, sidecars, lam=lam, gamma=gamma, verify=True)
                verified_by = dict.fromkeys((item.memory for item in sidecars), "content digest")
            else:
                revocation = StreamingRevocation(sidecars, coefficients, verify=verify, progress=_progress_enabled())
                with revocation_hooks(revocation):
                    model = auto_class.from_pretrained(base, *model_args, **load_options)
                revocation.check_complete()
                verified_by = revocation.verified_by
            record_revocation(model, sidecars, coefficients)
            for entry in getattr(model.config, REVOCATION_CONFIG_KEY):
                entry["verified_by"] = verified_by[entry["memory"]]
        for item, (lam_i, gamma_i) in zip(sidecars, coefficients):
            logger.info(
                "Revoked memory %r from %s at load time (lam=%g, gamma=%g). The checkpoint files still contain it: "
                "load-time revocation is not deletion.", item.memory, base, lam_i, gamma_i,
            )
        return model


def _progress_enabled() -> bool:
    from transformers.utils import logging as transformers_logging

    return transformers_logging.is_progress_bar_enabled()


__all__ = ["SidecarModelForCausalLM", "open_sidecar_folder", "resolve_sidecar"]
