"""sha256 of checkpoint files for load-time checks, without hashing unchanged files twice.

A sidecar records the sha256 of the safetensors files it was built for, so a load can reject
other files before reading any tensor. Hashing costs about a second per gigabyte, a large share
of a load, so two sources stand in for it:

- a file in the huggingface_hub cache is stored as ``blobs/<sha256>``, named after the id the Hub
  reported for it, and that name is taken as its digest;
- the digest of any other file is kept in a small JSON cache, keyed by the file's real path and
  its device, inode, size, modification time and change time. Writing the file or replacing it
  changes the change time (which user programs cannot set), so a stale entry is never used for a
  modified file, unless the system clock is moved back. ``HF_SIDECAR_DIGEST_CACHE`` sets the
  cache file's path, or turns the cache off with ``off``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from .io import atomic_write_json, sha256_file

logger = logging.getLogger(__name__)

DIGEST_CACHE_ENV = "HF_SIDECAR_DIGEST_CACHE"
MAX_CACHED_DIGESTS = 4096
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_PROGRESS_MIN_BYTES = 1 << 30
_cache_lock = threading.Lock()


def digest_cache_path() -> Path | None:
    """Return the digest cache file: ``$HF_SIDECAR_DIGEST_CACHE``, else ``<HF_HOME>/hf-sidecar/file-sha256.json``; None when off."""
    value = os.environ.get(DIGEST_CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "false") else Path(value)
    import huggingface_hub

    return Path(huggingface_hub.constants.HF_HOME) / "hf-sidecar" / "file-sha256.json"


def _stat_key(path: Path) -> list[int]:
    status = path.stat()
    return [status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns]


def hub_blob_sha256(path: Path) -> str | None:
    """Return the sha256 that names a huggingface_hub cache blob, or None for a file outside the blob store."""
    real = Path(os.path.realpath(path))
    return real.name if real.parent.name == "blobs" and _SHA256.match(real.name) else None


class FileDigestCache:
    """The JSON digest cache: real path to ``{"stat": [...], "sha256": ...}``, oldest entries dropped first."""

    def __init__(self, path: Path | None):
        self.path = path
        self._entries: dict[str, dict] = self._read() if path is not None else {}
        self._changed = False

    def _read(self) -> dict[str, dict]:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            logger.warning("Ignoring the unreadable digest cache %s (%s); it will be rewritten", self.path, err)
            return {}
        return entries if isinstance(entries, dict) else {}

    def lookup(self, path: Path) -> str | None:
        entry = self._entries.get(str(path))
        if not isinstance(entry, dict) or entry.get("stat") != _stat_key(path):
            return None
        digest = entry.get("sha256")
        return digest if isinstance(digest, str) and _SHA256.match(digest) else None

    def store(self, path: Path, stat_key: list[int], digest: str) -> None:
        self._entries.pop(str(path), None)
        self._entries[str(path)] = {"stat": stat_key, "sha256": digest}
        self._changed = True

    def save(self) -> None:
        if self.path is None or not self._changed:
            return
        entries = dict(list(self._entries.items())[-MAX_CACHED_DIGESTS:])
        try:
            with _cache_lock:
                atomic_write_json(self.path, entries)
        except OSError as err:
            logger.warning("Could not write the digest cache %s: %s; the files will be hashed again next time", self.path, err)
        self._changed = False


def _hash_unchanged(path: Path) -> tuple[str, list[int] | None]:
    """Hash a file and return its digest with its stat key, or None for the key if it changed while being hashed."""
    before = _stat_key(path)
    digest = sha256_file(path)
    return digest, before if _stat_key(path) == before else None


def file_sha256s(paths: Sequence[Path], *, progress: bool = True) -> dict[str, str]:
    """Map each file's name to its sha256, from the Hub cache's blob names, the digest cache, or by hashing."""
    digests: dict[str, str] = {}
    cache = FileDigestCache(digest_cache_path())
    to_hash: list[Path] = []
    for path in paths:
        real = Path(os.path.realpath(path))
        known = hub_blob_sha256(real) or cache.lookup(real)
        if known:
            digests[Path(path).name] = known
        else:
            to_hash.append(real)
    if to_hash:
        began = time.perf_counter()
        total = sum(path.stat().st_size for path in to_hash)
        show = progress and total >= _HASH_PROGRESS_MIN_BYTES
        names = {real: Path(path).name for path in paths for real in [Path(os.path.realpath(path))]}
        with tqdm(total=len(to_hash), desc="Hashing checkpoint files", unit="file", disable=not show) as bar:
            # hashlib releases the GIL for large buffers, so threads hash several shards at once.
            with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1, len(to_hash))) as pool:
                for real, (digest, stat_key) in zip(to_hash, pool.map(_hash_unchanged, to_hash)):
                    digests[names[real]] = digest
                    if stat_key is not None:
                        cache.store(real, stat_key, digest)
                    bar.update(1)
        cache.save()
        logger.info("Hashed %d checkpoint files (%.0f MB) in %.1f s", len(to_hash), total / 1e6, time.perf_counter() - began)
    return digests


def compare_files(expected: Mapping[str, str], found: Mapping[str, str | None]) -> str:
    """Return ``"match"``, ``"differ"`` (the same file names with other bytes) or ``"renamed"`` (other file names)."""
    if not expected or set(expected) != set(found):
        return "renamed"
    return "match" if all(found[name] == digest for name, digest in expected.items()) else "differ"
