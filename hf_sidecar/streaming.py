"""Applying a sidecar's edit inside transformers' ``from_pretrained`` as each tensor is read.

transformers 5.x loads a safetensors checkpoint in three steps, all in
``transformers/modeling_utils.py`` and ``transformers/core_model_loading.py``:

1. ``PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config)``
   receives the resolved local files and the final device map, and builds the disk offload index;
2. ``convert_and_load_state_dict_in_model(model, state_dict, load_config, disk_offload_index)``
   receives every checkpoint key mapped to a lazy safetensors slice;
3. ``_materialize_copy(tensor, device, dtype)`` reads one slice and moves it to the device and
   dtype that the device map and ``dtype`` assign to it, on a thread pool.

:func:`revocation_hooks` wraps these three functions while one load runs. Step 1 checks the
checkpoint against the sidecars before any tensor data is read. Step 2 replaces the slices of
covered tensors by :class:`_RevokingSlice` and removes covered tensors from the disk offload
index. Step 3 then reads a covered tensor, moves it to its assigned device, computes
``theta - lam * delta - gamma * transport`` there in float32 and casts the result to the assigned
dtype once. transformers re-saves disk-offloaded tensors that are missing from the index into the
offload folder with Accelerate's safetensors offload format, so the forward pass reads the
revoked values from there instead of from the original checkpoint file.

No public extension point exists for this, so the hooks depend on these private names. They were
written against transformers 5.25. :func:`revocation_hooks` checks that the names exist, and
:meth:`StreamingRevocation.check_complete` raises if a covered tensor was loaded without passing
through the edit, so a changed loader fails loudly instead of loading unrevoked weights.

Covered tensors are read with safetensors' ``pread`` backend into fresh memory, not through the
memory map that transformers opens, so their original pages are never mapped into the process
next to the revoked copies.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .edit import accumulation_dtype, edit_tensor
from .file_digests import compare_files, file_sha256s
from .io import CheckpointError
from .sidecar import Sidecar, SidecarMismatchError

logger = logging.getLogger(__name__)

VERIFY_MODES = ("auto", "content")
TESTED_TRANSFORMERS = "5.25"

# Names of safetensors dtypes, as headers store them, to torch's names without the "torch." prefix.
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def open_pread(path: str | Path):
    """Open a safetensors file whose tensors are read with ``pread`` into fresh memory, not memory-mapped.

    safetensors versions without the ``backend`` argument (0.8 has it) fall back to the memory map.
    """
    try:
        return safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except TypeError:
        return safe_open(str(path), framework="pt", device="cpu")


# ------------------------------------------------------------------------------------------------
# Checkpoint file digests


def files_differ_error(sidecar: Sidecar, where: str, expected: Mapping[str, str], found: Mapping[str, str]) -> SidecarMismatchError:
    name = next(name for name in sorted(expected) if found.get(name) != expected[name])
    return SidecarMismatchError(
        f"Sidecar {sidecar.memory!r} was built for a checkpoint whose {name} has sha256 {expected[name][:16]}, but "
        f"{where} has {found[name][:16]}, so no weight was read. Load the checkpoint the sidecar was built for. If this "
        "checkpoint holds the same weights saved again, pass verify='content' to check its tensors instead."
    )


# ------------------------------------------------------------------------------------------------
# Content digest verified while tensors stream in


def hash_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    """Add one tensor to a sha256 exactly as :meth:`hf_sidecar.io.ContentDigest.encode` encodes it."""
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
    if tensor.numel():
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


class StreamingDigest:
    """sha256 over named tensors in sorted name order, fed in any order from several threads.

    A tensor that arrives before its turn is not kept: its name is noted and ``reread`` reads it
    again when its turn comes, so out-of-order arrival costs reads rather than memory.
    """

    def __init__(self, names: Sequence[str], reread):
        self._order = sorted(names)
        self._names = set(self._order)
        self._next = 0
        self._waiting: set[str] = set()
        self._hash = hashlib.sha256()
        self._reread = reread
        self._lock = threading.Lock()
        self.rereads = 0

    def update(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._names:
            return
        with self._lock:
            if self._next >= len(self._order) or name in self._waiting or name < self._order[self._next]:
                return
            if name != self._order[self._next]:
                self._waiting.add(name)
                return
            hash_tensor(self._hash, name, tensor)
            self._next += 1
            while self._next < len(self._order) and self._order[self._next] in self._waiting:
                waiting = self._order[self._next]
                self._waiting.discard(waiting)
                hash_tensor(self._hash, waiting, self._reread(waiting))
                self.rereads += 1
                self._next += 1

    @property
    def complete(self) -> bool:
        return self._next == len(self._order)

    def hexdigest(self) -> str:
        if not self.complete:
            raise CheckpointError(f"Content digest is incomplete: tensor {self._order[self._next]!r} was never read.")
        return self._hash.hexdigest()


# ------------------------------------------------------------------------------------------------
# The revocation of one load


@dataclass(frozen=True)
class TensorLocation:
    """Location of a checkpoint tensor: its file, and its dtype and shape from that file's safetensors header."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


class _RevokingSlice:
    """Stand-in for the lazy safetensors slice of a covered tensor; reading it returns the revoked tensor."""

    __slots__ = ("name", "source", "revocation")

    def __init__(self, name: str, source, revocation: "StreamingRevocation"):
        self.name = name
        self.source = source
        self.revocation = revocation

    def __getattr__(self, attribute: str):
        # get_shape(), get_dtype() and any other attribute that transformers reads from the slice.
        return getattr(self.source, attribute)

    def __getitem__(self, index):
        # NOTE: only loaders that slice directly (tensor-parallel sharding) come here; they then cast
        # the slice again, so a dtype change rounds twice. This path is untested.
        return self.revocation.materialize(self.name, None, None)[index]

    def materialize(self, device, dtype) -> torch.Tensor:
        return self.revocation.materialize(self.name, device, dtype)


class StreamingRevocation:
    """The state of one ``from_pretrained`` call that applies ``sidecars`` as tensors are read.

    ``verify="auto"`` compares the checkpoint files' sha256 with those the sidecars record and
    rejects other bytes under the same file names before any tensor is read. When the file names
    differ (a resharded copy) it verifies the content digest as tensors stream in instead.
    ``verify="content"`` always verifies the content digest while streaming.
    """

    def __init__(self, sidecars: Sequence[Sidecar], coefficients: Sequence[tuple[float, float]], *, verify: str = "auto", progress: bool = True):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r} is not supported; use one of {VERIFY_MODES}.")
        self.sidecars = list(sidecars)
        self.coefficients = list(coefficients)
        self.verify = verify
        self.progress = progress
        self.covered = sorted(set().union(*(sidecar.names for sidecar in self.sidecars)))
        self._covered = set(self.covered)
        self.state = "ready"
        self.locations: dict[str, TensorLocation] = {}
        self.file_digests: dict[str, str] = {}
        self.verified_by: dict[str, str] = {}
        self._handles: dict[Path, object] = {}
        self._digests: list[tuple[Sidecar, StreamingDigest]] = []
        self._edited: set[str] = set()
        self._lock = threading.Lock()
        self._offload_index: dict | None = None
        self._offload_folder: str | None = None
        self._offload_removed: dict[str, dict] = {}

    # --------------------------------------------------------------------------------------------
    # Before any tensor data is read

    def begin(self, model, state_dict, checkpoint_files, load_config) -> None:
        """Check the checkpoint's headers and file digests against the sidecars and prepare the reads."""
        self.state = "loading"
        if state_dict is not None or not checkpoint_files:
            raise ValueError("Load-time revocation reads safetensors checkpoint files; passing a state_dict is not supported.")
        files = [Path(file) for file in checkpoint_files]
        not_safetensors = [file for file in files if file.suffix != ".safetensors"]
        if not_safetensors:
            raise CheckpointError(
                f"{not_safetensors[0]} is not a safetensors file; load-time revocation reads safetensors checkpoints only. "
                "Save the model with save_pretrained(safe_serialization=True) first."
            )
        self._read_headers(files)
        where = f"checkpoint {Path(files[0]).parent}"
        for sidecar in self.sidecars:
            self._check_headers(sidecar, where)
        self._check_file_digests(files, where)
        self._check_offload_folder(load_config)
        self._offload_folder = getattr(load_config, "disk_offload_folder", None)

    def _read_headers(self, files: Sequence[Path]) -> None:
        for file in files:
            try:
                handle = open_pread(file)
                self._handles[file] = handle
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    dtype = SAFETENSORS_DTYPES.get(piece.get_dtype(), piece.get_dtype())
                    self.locations[key] = TensorLocation(file, dtype, tuple(piece.get_shape()))
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"Could not read the safetensors header of {file}: {err}. Download or save the checkpoint again.") from err

    def _check_headers(self, sidecar: Sidecar, where: str) -> None:
        for name in sidecar.names:
            entry = sidecar.config["parameters"][name]
            location = self.locations.get(name)
            if location is None:
                raise SidecarMismatchError(
                    f"{where} has no tensor {name!r}, which sidecar {sidecar.memory!r} edits, so no weight was read. "
                    "Load the checkpoint the sidecar was built for."
                )
            if location.shape != tuple(entry["shape"]) or location.dtype != entry["dtype"]:
                raise SidecarMismatchError(
                    f"Tensor {name!r} in {where} is {location.dtype} {list(location.shape)}, but sidecar {sidecar.memory!r} "
                    f"expects {entry['dtype']} {list(entry['shape'])}, so no weight was read. Load the checkpoint the sidecar was built for."
                )

    def _check_file_digests(self, files: Sequence[Path], where: str) -> None:
        pending = []
        for sidecar in self.sidecars:
            expected = sidecar.config["checkpoint"].get("files") or {}
            if self.verify == "content":
                reason = "verify='content' was passed"
            elif not expected:
                reason = "the sidecar records no file digests"
            else:
                reason = "the file names differ from those the sidecar records"
            if self.verify == "auto" and compare_files(expected, dict.fromkeys(file.name for file in files)) != "renamed":
                if not self.file_digests:
                    self.file_digests = file_sha256s(files, progress=self.progress)
                verdict = compare_files(expected, self.file_digests)
                if verdict == "differ":
                    raise files_differ_error(sidecar, where, expected, self.file_digests)
                if verdict == "match":
                    self.verified_by[sidecar.memory] = "file sha256"
                    logger.info("The files of %s match sidecar %r by sha256", where, sidecar.memory)
                    continue
            pending.append((sidecar, reason))
        shared: dict[tuple[str, ...], StreamingDigest] = {}
        for sidecar, reason in pending:
            names = tuple(sidecar.names)
            if names not in shared:
                shared[names] = StreamingDigest(names, self.read)
            self._digests.append((sidecar, shared[names]))
            self.verified_by[sidecar.memory] = "content digest"
            logger.info(
                "Verifying the content digest %s of sidecar %r as the tensors of %s are read, because %s",
                sidecar.content_digest[:16], sidecar.memory, where, reason,
            )

    def _check_offload_folder(self, load_config) -> None:
        device_map = getattr(load_config, "device_map", None)
        if not device_map or "disk" not in device_map.values() or getattr(load_config, "disk_offload_folder", None):
            return
        from transformers.integrations.accelerate import expand_device_map

        on_disk = [name for name, device in expand_device_map(device_map, self.covered).items() if device == "disk"]
        if on_disk:
            raise ValueError(
                f"The device map offloads {on_disk[0]!r} ({len(on_disk)} revoked tensors in all) to disk, where the forward pass "
                "would read the unrevoked checkpoint file. Pass offload_folder= so the revoked tensors can be written there."
            )

    # --------------------------------------------------------------------------------------------
    # While tensors are read

    def wrap_state_dict(self, state_dict: dict, disk_offload_index: dict | None) -> dict:
        """Replace the lazy slices of covered tensors and drop them from the disk offload index."""
        wrapped = dict(state_dict)
        for name in self._covered.intersection(wrapped):
            wrapped[name] = _RevokingSlice(name, wrapped[name], self)
        if disk_offload_index is not None:
            self._offload_index = disk_offload_index
            for target, entry in list(disk_offload_index.items()):
                if entry.get("weight_name") in self._covered:
                    self._offload_removed[target] = disk_offload_index.pop(target)
            if self._offload_removed:
                logger.info("Writing %d revoked disk-offloaded tensors to the offload folder", len(self._offload_removed))
        return wrapped

    def read(self, name: str) -> torch.Tensor:
        """Read one checkpoint tensor from its file into fresh CPU memory."""
        location = self.locations[name]
        return self._handles[location.file].get_tensor(name)

    def materialize(self, name: str, device, dtype) -> torch.Tensor:
        """Read, verify and revoke one covered tensor on ``device``; return it in ``dtype``.

        The edit runs in float32 (float64 for float64 weights) on the device itself, and the
        result is cast to ``dtype`` once (the checkpoint's dtype when ``dtype`` is None).
        """
        raw = self.read(name)
        for _, digest in self._digests:
            digest.update(name, raw)
        target_dtype = dtype if dtype is not None else raw.dtype
        # Move in the checkpoint's dtype, which is the smallest transfer, then widen on the device.
        theta = raw.to(device) if device is not None else raw
        del raw
        theta = theta.to(accumulation_dtype(theta.dtype))
        # theta is a fresh copy that nothing else references, so the edit may overwrite it.
        revoked = edit_tensor(name, theta, self.sidecars, self.coefficients, inplace=True)
        del theta
        with self._lock:
            self._edited.add(name)
        return revoked.to(target_dtype)

    # --------------------------------------------------------------------------------------------
    # After the tensors are read

    def finish(self, model, disk_offload_index: dict | None) -> None:
        """Verify the content digests, check every covered tensor was edited, and re-tie offloaded aliases."""
        self.state = "finished"
        for sidecar, digest in self._digests:
            found = digest.hexdigest() if digest.complete else None
            if found != sidecar.content_digest:
                raise SidecarMismatchError(
                    f"Sidecar {sidecar.memory!r} was built for a checkpoint with content digest {sidecar.content_digest[:16]}, but "
                    f"the tensors read have {found[:16] if found else 'an incomplete digest'}. The load was aborted; the sidecar "
                    "applies only to the exact safety-trained weights it was built from."
                )
            if digest.rereads:
                logger.debug("Content digest of %r read %d tensors twice because they arrived out of order", sidecar.memory, digest.rereads)
        missing = [name for name in self.covered if name not in self._edited]
        if missing:
            import transformers

            raise RuntimeError(
                f"transformers {transformers.__version__} loaded {missing[0]!r} ({len(missing)} covered tensors in all) without "
                f"passing it through hf-sidecar's edit; its loading internals differ from those of transformers {TESTED_TRANSFORMERS}, "
                "which this hook was written for. Write a revoked checkpoint with hf_sidecar.revoke_checkpoint and load that instead."
            )
        if disk_offload_index is not None and self._offload_removed:
            self._retie_offloaded(model, disk_offload_index)

    def _retie_offloaded(self, model, index: dict) -> None:
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        for target in self._offload_removed:
            if target in index:
                continue
            source = tied.get(target)
            if source is None or source not in index:
                raise RuntimeError(
                    f"The revoked value of disk-offloaded tensor {target!r} was not written to the offload folder. "
                    "Load without disk offload, or write a revoked checkpoint with hf_sidecar.revoke_checkpoint."
                )
            index[target] = index[source]

    def discard_offloaded(self) -> None:
        """Delete the revoked tensors written to the offload folder by a load that failed."""
        if not self._offload_index or not self._offload_folder:
            return
        folder = os.path.realpath(self._offload_folder)
        for target in self._offload_removed:
            entry = self._offload_index.get(target)
            path = entry and entry.get("safetensors_file")
            if path and os.path.realpath(path).startswith(folder + os.sep):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def check_complete(self) -> None:
        """Raise unless the hooked loader ran this revocation from start to end."""
        if self.state != "finished":
            import transformers

            raise RuntimeError(
                f"transformers {transformers.__version__} loaded the model without calling the loading step that hf-sidecar "
                f"hooks into (written for transformers {TESTED_TRANSFORMERS}), so the sidecar was not applied. Write a "
                "revoked checkpoint with hf_sidecar.revoke_checkpoint and load that instead."
            )

    def close(self) -> None:
        for handle in self._handles.values():
            with contextlib.suppress(Exception):
                handle.__exit__(None, None, None)
        self._handles.clear()


# ------------------------------------------------------------------------------------------------
# The hooks


_thread = threading.local()
_install_lock = threading.Lock()
_install_count = 0
_originals: dict[str, object] = {}


def _active() -> StreamingRevocation | None:
    return getattr(_thread, "revocation", None)


def _hooked_load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
    original = _originals["_load_pretrained_model"]
    revocation = _active()
    if revocation is None or revocation.state != "ready":
        return original(model, state_dict, checkpoint_files, load_config, *args, **kwargs)
    revocation.begin(model, state_dict, checkpoint_files, load_config)
    try:
        loading_info, disk_offload_index = original(model, state_dict, checkpoint_files, load_config, *args, **kwargs)
        revocation.finish(model, disk_offload_index)
    except BaseException:
        revocation.discard_offloaded()
        raise
    return loading_info, disk_offload_index


def _hooked_convert(model, state_dict, load_config, disk_offload_index=None, *args, **kwargs):
    original = _originals["convert_and_load_state_dict_in_model"]
    revocation = _active()
    if revocation is not None and revocation.state == "loading":
        state_dict = revocation.wrap_state_dict(state_dict, disk_offload_index)
    return original(model, state_dict, load_config, disk_offload_index, *args, **kwargs)


def _hooked_materialize(tensor, device=None, dtype=None):
    # Runs on transformers' loader threads, so the revocation comes from the slice, not the thread.
    if isinstance(tensor, _RevokingSlice):
        return tensor.materialize(device, dtype)
    return _originals["_materialize_copy"](tensor, device, dtype)


def _targets():
    import transformers.core_model_loading as core_model_loading
    import transformers.modeling_utils as modeling_utils

    return modeling_utils, core_model_loading


def _install() -> None:
    global _install_count
    with _install_lock:
        if _install_count == 0:
            import transformers

            modeling_utils, core_model_loading = _targets()
            load = modeling_utils.PreTrainedModel.__dict__.get("_load_pretrained_model")
            convert = getattr(modeling_utils, "convert_and_load_state_dict_in_model", None)
            materialize = getattr(core_model_loading, "_materialize_copy", None)
            if not isinstance(load, staticmethod) or convert is None or materialize is None:
                raise RuntimeError(
                    f"transformers {transformers.__version__} lacks the loading functions that hf-sidecar hooks into "
                    f"(written for transformers {TESTED_TRANSFORMERS}). Install transformers {TESTED_TRANSFORMERS}, or write a "
                    "revoked checkpoint with hf_sidecar.revoke_checkpoint and load that."
                )
            _originals.update(
                {"_load_pretrained_model": load.__func__, "load_descriptor": load,
                 "convert_and_load_state_dict_in_model": convert, "_materialize_copy": materialize}
            )
            modeling_utils.PreTrainedModel._load_pretrained_model = staticmethod(_hooked_load_pretrained_model)
            modeling_utils.convert_and_load_state_dict_in_model = _hooked_convert
            core_model_loading._materialize_copy = _hooked_materialize
            logger.debug("Installed the load-time revocation hooks into transformers %s", transformers.__version__)
        _install_count += 1


def _uninstall() -> None:
    global _install_count
    with _install_lock:
        _install_count -= 1
        if _install_count == 0:
            modeling_utils, core_model_loading = _targets()
            modeling_utils.PreTrainedModel._load_pretrained_model = _originals["load_descriptor"]
            modeling_utils.convert_and_load_state_dict_in_model = _originals["convert_and_load_state_dict_in_model"]
            core_model_loading._materialize_copy = _originals["_materialize_copy"]
            _originals.clear()
            logger.debug("Removed the load-time revocation hooks")


@contextlib.contextmanager
def revocation_hooks(revocation: StreamingRevocation) -> Iterator[StreamingRevocation]:
    """Apply ``revocation`` to the next ``from_pretrained`` call in this thread.

    Loads in other threads pass through the hooks unchanged. The hooks are removed when the last
    active revocation ends.
    """
    if _active() is not None:
        raise RuntimeError("A load with revocation is already running in this thread; nested loads are not supported.")
    _install()
    _thread.revocation = revocation
    try:
        yield revocation
    finally:
        _thread.revocation = None
        revocation.close()
        _uninstall()
