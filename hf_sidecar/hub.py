"""Sidecars on the Hugging Face Hub: pulled through the huggingface_hub cache, pushed into subfolders.

Layout: a repository keeps its checkpoint or adapter where its owner put it (usually the root) and
each sidecar in its own subfolder, ``sidecars/<memory>/`` by default, holding the four sidecar
files. Pushing a sidecar writes only that subfolder, and at most appends a short section that
lists the sidecars to the root ``README.md``, between :data:`ROOT_SECTION_BEGIN` and
:data:`ROOT_SECTION_END`. The owner's text before and after that section is never changed.

Privacy: a sidecar stores the memory update itself, so pushes create private repositories unless
``private=False`` is passed, and pushing to a public repository issues a
:class:`PublicRepositoryWarning`.

Integrity: every downloaded file is hashed and compared with the id the Hub gave it, which the
cache keeps as the blob's name: the sha256 for LFS files, the git blob sha1 for others. A corrupt
download or cache entry raises :class:`SidecarHubError` instead of loading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx2
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

from . import __version__
from .edit import REVOCATION_CONFIG_KEY
from .io import CheckpointError, atomic_directory, checkpoint_files, sha256_file
from .sidecar import CARD_FILE, CONFIG_FILE, PROCESS_FILE, SIDECAR_FILES, TENSORS_FILE, Sidecar, SidecarError

logger = logging.getLogger(__name__)

SIDECARS_FOLDER = "sidecars"
ROOT_CARD = "README.md"
ROOT_SECTION_BEGIN = "<!-- hf-sidecar: sidecars begin -->"
ROOT_SECTION_END = "<!-- hf-sidecar: sidecars end -->"
MAX_FOLDER_NAME_CHARS = 64
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONNECTION_ERRORS = (httpx2.ConnectError, httpx2.TimeoutException, OfflineModeIsEnabled)


class SidecarHubError(OSError):
    """Raised when a sidecar or a revoked checkpoint cannot be pulled from or pushed to the Hub.

    ``repo_id``, ``revision`` and ``path_in_repo`` name what failed. ``revision`` and
    ``path_in_repo`` are None where the failure concerns the whole repository. The path is not
    stored in ``OSError.filename``, which names local files and would change ``str(error)``.
    """

    def __init__(self, message: str, *, repo_id: str, revision: str | None = None, filename: str | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.revision = revision
        self.path_in_repo = filename


class PublicRepositoryWarning(UserWarning):
    """Issued before a sidecar, which stores the memory update, is pushed to a public repository."""


@dataclass(frozen=True)
class PulledSidecar:
    """A sidecar loaded from the Hub, with the local folder that contains its files."""

    sidecar: Sidecar
    folder: Path
    source: dict


# ------------------------------------------------------------------------------------------------
# Names and layout


def is_repo_id(value: str) -> bool:
    """Return whether ``value`` is a valid Hub repo id (``name`` or ``namespace/name``)."""
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def default_subfolder(memory: str) -> str:
    """Return ``sidecars/<memory>``, with the memory name reduced to characters safe in a path.

    Names longer than :data:`MAX_FOLDER_NAME_CHARS` are cut and get a hash suffix, so the same
    memory always maps to the same folder.
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", memory).strip("-.") or "memory"
    if len(name) > MAX_FOLDER_NAME_CHARS:
        suffix = hashlib.sha256(memory.encode()).hexdigest()[:8]
        name = f"{name[: MAX_FOLDER_NAME_CHARS - 9].rstrip('-.')}-{suffix}"
    return f"{SIDECARS_FOLDER}/{name}"


def normalize_subfolder(subfolder: str, *, allow_root: bool) -> str:
    """Return ``subfolder`` without leading or trailing slashes, or raise ValueError if it is not a relative path."""
    cleaned = subfolder.strip().strip("/")
    parts = cleaned.split("/") if cleaned else []
    if "\\" in cleaned or any(part in ("", ".", "..") for part in parts) or (parts and parts[0] == ".git"):
        raise ValueError(f"Invalid subfolder {subfolder!r}: pass a relative path inside the repository, such as 'sidecars/my-memory'.")
    if not cleaned and not allow_root:
        raise ValueError(
            "A sidecar cannot be pushed to the repository root, where it could overwrite the checkpoint's own files "
            "and README. Pass a subfolder such as 'sidecars/my-memory', or leave subfolder unset for the default."
        )
    return cleaned


def _in_folder(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def sidecar_folders(files: Iterable[str]) -> list[str]:
    """List the folders ("" for the root) that contain a sidecar config among repository file paths."""
    folders = set()
    for path in files:
        pure = PurePosixPath(path)
        if pure.name == CONFIG_FILE:
            folders.add("" if str(pure.parent) == "." else str(pure.parent))
    return sorted(folders)


def _describe(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision or constants.DEFAULT_REVISION}"


# ------------------------------------------------------------------------------------------------
# Errors


def _hub_error(
    err: Exception,
    *,
    repo_id: str,
    revision: str | None,
    filename: str | None = None,
    action: str = "download",
    cache_dir: str | Path | None = None,
) -> SidecarHubError:
    """Translate a huggingface_hub error into a :class:`SidecarHubError` that names the repo, revision and file."""
    where = _describe(repo_id, revision) + (f", file {filename}" if filename else "")
    status = getattr(getattr(err, "response", None), "status_code", None)
    if action not in ("download", "read") and status in (401, 403):
        message = (
            f"Could not {action} {where}: HTTP {status}. Pass token= (or run `hf auth login`) with a write token of "
            f"the user or organization {repo_id.split('/')[0]!r}."
        )
    elif isinstance(err, GatedRepoError):
        message = f"Access to {repo_id} is gated ({where}). Request access on the Hub, then pass a token of an approved user."
    elif isinstance(err, RepositoryNotFoundError) and status == 401:
        message = (
            f"Repository {repo_id} was not found or needs authentication (HTTP 401, {where}). If it is private, "
            "pass token= (or run `hf auth login`) with a token that may read it."
        )
    elif isinstance(err, RepositoryNotFoundError):
        message = (
            f"Repository {repo_id} was not found, or the token's user may not read it (HTTP {status}, {where}). "
            "Check the repo id and the token."
        )
    elif isinstance(err, RevisionNotFoundError):
        message = (
            f"Revision {revision!r} does not exist in {repo_id}" + (f" (requested for {filename})" if filename else "")
            + ". Pass an existing branch, tag or commit sha."
        )
    elif isinstance(err, LocalEntryNotFoundError):
        cache = cache_dir or constants.HF_HUB_CACHE
        message = (
            f"{filename or 'The revision'} of {_describe(repo_id, revision)} is not in the local cache {cache}, and the Hub "
            "was not contacted (HF_HUB_OFFLINE=1, local_files_only=True, or no connection). Download it once online, "
            "or pass a revision that was downloaded before."
        )
    elif isinstance(err, EntryNotFoundError):
        message = f"{_describe(repo_id, revision)} has no file {filename}. Check the repo id, revision and subfolder."
    else:
        message = f"Could not {action} {where}: {err}"
    error = SidecarHubError(message, repo_id=repo_id, revision=revision, filename=filename)
    error.__cause__ = err
    return error


# ------------------------------------------------------------------------------------------------
# Pulling


def _cached_listing(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> tuple[str, list[str]]:
    """Return the commit and the cached file paths of ``revision`` from the huggingface_hub cache alone.

    Reads the cache layout that huggingface_hub documents: ``refs/<branch>`` contains the commit
    sha of a branch, and ``snapshots/<commit>/`` the downloaded files of that commit.
    """
    revision = revision or constants.DEFAULT_REVISION
    storage = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = revision if _COMMIT_SHA.match(revision) else None
    ref = storage / "refs" / revision
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    snapshot = storage / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise _hub_error(LocalEntryNotFoundError(f"{revision} not cached"), repo_id=repo_id, revision=revision, cache_dir=cache_dir)
    files = [path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file()]
    return commit, files


def _commit_of(path: Path, filename: str) -> str | None:
    """Return the commit sha of a file in the cache, ``snapshots/<commit>/<filename>``, or None elsewhere."""
    snapshot = path.parents[len(PurePosixPath(filename).parts) - 1]
    return snapshot.name if snapshot.parent.name == "snapshots" and _COMMIT_SHA.match(snapshot.name) else None


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def verify_cached_file(path: str | Path, *, repo_id: str, revision: str | None, filename: str) -> None:
    """Raise :class:`SidecarHubError` unless a cached file's content hashes to the id the Hub gave it.

    The cache stores each file as a blob named after its ETag: the sha256 for LFS files, the git
    blob sha1 for regular files. A copy outside the blob store (``local_dir`` downloads, or
    caches on file systems without symlinks) has no such name and is not checked.
    """
    blob = Path(os.path.realpath(path))
    if blob.parent.name != "blobs":
        logger.debug("Not verifying %s: %s is not a cache blob", filename, blob)
        return
    expected = blob.name
    if _SHA256.match(expected):
        kind, found = "sha256", sha256_file(blob)
    elif _COMMIT_SHA.match(expected):
        kind, found = "git blob sha1", _git_blob_sha1(blob)
    else:
        logger.debug("Not verifying %s: blob name %s is neither a sha256 nor a sha1", filename, expected)
        return
    if found != expected:
        raise SidecarHubError(
            f"File {filename} of {_describe(repo_id, revision)} is corrupt: its {kind} is {found[:16]}, but the Hub "
            f"lists {expected[:16]}. Download it again with force_download=True (hf-sidecar pull --force-download).",
            repo_id=repo_id,
            revision=revision,
            filename=filename,
        )


def _choose_folder(files: list[str], subfolder: str | None, repo_id: str, revision: str | None) -> str:
    if subfolder is not None:
        return normalize_subfolder(subfolder, allow_root=True)
    candidates = sidecar_folders(files)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise SidecarHubError(
            f"{_describe(repo_id, revision)} contains no sidecar (no {CONFIG_FILE} in any folder). Pass subfolder= if the "
            "sidecar is in a folder that is not cached yet, or push one with Sidecar.push_to_hub.",
            repo_id=repo_id,
            revision=revision,
        )
    listed = ", ".join(repr(folder or ".") for folder in candidates)
    raise SidecarHubError(
        f"{_describe(repo_id, revision)} contains {len(candidates)} sidecars ({listed}). Pass subfolder= to choose one.",
        repo_id=repo_id,
        revision=revision,
    )


def _list_files(api: HfApi, repo_id: str, revision: str | None, cache_dir, offline: bool) -> list[str]:
    """List the repository's files at ``revision``, online or, when offline or unreachable, from the cache."""
    if not offline:
        try:
            return api.list_repo_files(repo_id, revision=revision)
        except _CONNECTION_ERRORS as err:
            # NOTE: no test reaches this fallback, because the test server is always reachable.
            logger.warning("Could not reach the Hub for %s (%s); looking in the local cache", _describe(repo_id, revision), err)
        except HfHubHTTPError as err:
            raise _hub_error(err, repo_id=repo_id, revision=revision) from err
    return _cached_listing(repo_id, revision, cache_dir)[1]


def download_sidecar(
    repo_id: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    endpoint: str | None = None,
) -> tuple[Path, dict]:
    """Download a sidecar's files into the huggingface_hub cache and return their folder and source.

    All files come from one commit: the first download resolves ``revision`` (default ``main``)
    to a commit sha, and the other files are fetched at that sha, so a push during the download
    cannot mix two versions. With ``subfolder=None`` the repository must contain exactly one
    sidecar. Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only``), the files come from the
    cache, which serves any revision downloaded before. The source dict records ``repo_id``,
    ``revision``, ``commit`` and ``subfolder``.
    """
    offline = local_files_only or constants.is_offline_mode()
    api = HfApi(endpoint=endpoint, token=token, library_name="hf-sidecar", library_version=__version__)
    folder = subfolder
    if folder is None:
        folder = _choose_folder(_list_files(api, repo_id, revision, cache_dir, offline), None, repo_id, revision)
    folder = normalize_subfolder(folder, allow_root=True)

    paths: dict[str, Path] = {}
    commit: str | None = None
    for name in (CONFIG_FILE, TENSORS_FILE, PROCESS_FILE, CARD_FILE):
        filename = _in_folder(folder, name)
        try:
            path = Path(
                hf_hub_download(
                    repo_id, filename, revision=commit or revision, token=token, cache_dir=cache_dir,
                    local_files_only=offline, force_download=force_download, endpoint=endpoint,
                    library_name="hf-sidecar", library_version=__version__,
                )
            )
        except (EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled) as err:
            if name == CARD_FILE and isinstance(err, EntryNotFoundError):
                logger.info("%s has no model card %s; loading the sidecar without it", _describe(repo_id, revision), filename)
                continue
            raise _hub_error(err, repo_id=repo_id, revision=revision, filename=filename, cache_dir=cache_dir) from err
        verify_cached_file(path, repo_id=repo_id, revision=revision, filename=filename)
        commit = commit or _commit_of(path, filename)
        paths[name] = path

    local = paths[CONFIG_FILE].parent
    if any(path.parent != local for path in paths.values()):
        raise SidecarHubError(
            f"The files of {_describe(repo_id, revision)} {folder or '.'} landed in different cache folders; "
            "download them again with force_download=True.",
            repo_id=repo_id,
            revision=revision,
        )
    source = {"repo_id": repo_id, "revision": revision or constants.DEFAULT_REVISION, "commit": commit, "subfolder": folder}
    logger.info("Resolved sidecar %s %s at commit %s to %s", _describe(repo_id, revision), folder or ".", commit, local)
    return local, source


def load_from_hub(repo_id: str, *, validate: bool = True, **download_options) -> Sidecar:
    """Download a sidecar (see :func:`download_sidecar` for the options) and load it.

    ``Sidecar.source`` records the repo id, revision, commit and subfolder it came from. Loading
    checks the format version, tensor keys, shapes and values as a local load does; an error
    there names the repository and commit.
    """
    return pull_sidecar(repo_id, validate=validate, **download_options).sidecar


def pull_sidecar(repo_id: str, *, out: str | Path | None = None, validate: bool = True, **download_options) -> PulledSidecar:
    """Download and load a sidecar, then copy its files byte for byte into ``out`` when given.

    Without ``out`` the returned folder is in the huggingface_hub cache, whose files must not be
    modified. ``out`` is replaced
    atomically: on failure an existing folder stays as it was.
    """
    folder, source = download_sidecar(repo_id, **download_options)
    try:
        sidecar = Sidecar._load_folder(folder, validate=validate)
    except SidecarError as err:
        where = f"{_describe(repo_id, download_options.get('revision'))} ({source['subfolder'] or '.'}, commit {source['commit']})"
        raise type(err)(f"Sidecar {where} is invalid: {err}") from err
    sidecar.source = dict(source)
    if out is not None:
        out = Path(out)
        with atomic_directory(out) as staging:
            for name in SIDECAR_FILES:
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, staging / name)
        folder = out
        logger.info("Copied sidecar %r to %s", sidecar.memory, out)
    return PulledSidecar(sidecar=sidecar, folder=folder, source=source)


# ------------------------------------------------------------------------------------------------
# Pushing


def _prepare_repo(api: HfApi, repo_id: str, private: bool | None, description: str, warn_public: bool) -> bool:
    """Create the repository if needed (private unless ``private`` is False) and return whether it is private.

    Raises when ``private=True`` was requested for an existing public repository, and warns
    before anything goes to a public one when ``warn_public`` is set.
    """
    try:
        is_private = bool(api.repo_info(repo_id).private)
        exists = True
    except RepositoryNotFoundError:
        exists = False
    except HfHubHTTPError as err:
        raise _hub_error(err, repo_id=repo_id, revision=None, action="read") from err
    if not exists:
        is_private = True if private is None else bool(private)
        try:
            api.create_repo(repo_id, private=is_private, exist_ok=True)
        except HfHubHTTPError as err:
            raise _hub_error(err, repo_id=repo_id, revision=None, action="create repository for") from err
        logger.info("Created %s repository %s", "private" if is_private else "public", repo_id)
    elif private and not is_private:
        raise SidecarHubError(
            f"Repository {repo_id} is public, but private=True was requested for the {description}. Make the repository "
            "private first (HfApi().update_repo_settings(repo_id, private=True)), or pass private=False to publish.",
            repo_id=repo_id,
        )
    if not is_private and warn_public:
        warnings.warn(
            f"Pushing {description} to the public repository {repo_id}. A sidecar stores the memory update itself, so anyone "
            "who can read the repository can read the memory. Use a private repository unless the memory is public.",
            PublicRepositoryWarning,
            stacklevel=4,
        )
        logger.warning("Pushing %s to the public repository %s", description, repo_id)
    return is_private


def _prepare_branch(api: HfApi, repo_id: str, revision: str | None) -> None:
    """Create branch ``revision`` from ``main`` if it does not exist, as transformers' push_to_hub does."""
    if revision is None or revision == constants.DEFAULT_REVISION or revision.startswith("refs/pr/"):
        return
    if _COMMIT_SHA.match(revision):
        raise SidecarHubError(
            f"Cannot push to revision {revision!r} of {repo_id}: it is a commit sha. Pass a branch name.",
            repo_id=repo_id,
            revision=revision,
        )
    try:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    except HfHubHTTPError as err:
        raise _hub_error(err, repo_id=repo_id, revision=revision, action="create branch") from err


def _head(api: HfApi, repo_id: str, revision: str | None):
    """Return the repository info at ``revision`` with file sizes and LFS sha256s."""
    try:
        return api.repo_info(repo_id, revision=revision, files_metadata=True)
    except HfHubHTTPError as err:
        raise _hub_error(err, repo_id=repo_id, revision=revision, action="read") from err


def _commit(api: HfApi, repo_id: str, operations: list, *, message: str, revision, create_pr: bool, parent: str) -> CommitInfo:
    try:
        return api.create_commit(
            repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr, parent_commit=parent,
        )
    except HfHubHTTPError as err:
        raise _hub_error(err, repo_id=repo_id, revision=revision, action="push to") from err


def _check_target_folder(files: Iterable[str], folder: str, repo_id: str, revision: str | None) -> None:
    """Reject a subfolder that contains anything besides an earlier version of a sidecar."""
    inside = sorted(path for path in files if path.startswith(folder + "/"))
    foreign = [path for path in inside if path.removeprefix(folder + "/") not in SIDECAR_FILES]
    if foreign or (inside and _in_folder(folder, CONFIG_FILE) not in inside):
        example = (foreign or inside)[0]
        raise SidecarHubError(
            f"Subfolder {folder} of {_describe(repo_id, revision)} already contains files that are not a sidecar's "
            f"(for example {example}). Pushing would overwrite them; pass another subfolder.",
            repo_id=repo_id,
            revision=revision,
            filename=example,
        )
    if folder in set(files):
        raise SidecarHubError(
            f"{folder} is a file in {_describe(repo_id, revision)}, so it cannot be a sidecar folder; pass another subfolder.",
            repo_id=repo_id,
            revision=revision,
            filename=folder,
        )


def _lfs_sha256s(siblings, folder: str) -> dict[str, str | None]:
    """Map the names of the safetensors files directly in ``folder`` to their LFS sha256 (None outside LFS)."""
    prefix = f"{folder}/" if folder else ""
    found = {}
    for sibling in siblings:
        name = sibling.rfilename.removeprefix(prefix)
        if sibling.rfilename.startswith(prefix) and "/" not in name and name.endswith(".safetensors"):
            found[name] = sibling.lfs.sha256 if sibling.lfs else None
    return found


def hub_checkpoint_matches(
    sidecar: Sidecar,
    repo_id: str,
    *,
    subfolder: str = "",
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> bool:
    """Return whether the safetensors files in a Hub folder are byte-identical to those the sidecar was built for.

    The check compares the LFS sha256s the Hub lists, so no weight is downloaded. It returns
    False for a resharded copy of the right weights too. The content digest then decides as the
    tensors are read (:meth:`Sidecar.check_state`).
    """
    expected = sidecar.config["checkpoint"].get("files") or {}
    api = HfApi(endpoint=endpoint, token=token, library_name="hf-sidecar", library_version=__version__)
    info = _head(api, repo_id, revision)
    found = _lfs_sha256s(info.siblings or [], normalize_subfolder(subfolder, allow_root=True))
    return bool(expected) and found == expected


def _log_checkpoint_match(sidecar: Sidecar, siblings, repo_id: str, revision: str | None) -> None:
    expected = sidecar.config["checkpoint"].get("files") or {}
    found = _lfs_sha256s(siblings, "")
    if not expected or set(found) != set(expected):
        logger.debug("No checkpoint with the files %s at the root of %s", sorted(expected), repo_id)
    elif found == expected:
        logger.info("The checkpoint at the root of %s matches sidecar %r by sha256", _describe(repo_id, revision), sidecar.memory)
    else:
        logger.warning(
            "The safetensors files at the root of %s differ from those sidecar %r was built for; it will edit them "
            "only if their tensors match its content digest %s",
            _describe(repo_id, revision), sidecar.memory, sidecar.content_digest[:16],
        )


def _newline_of(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def root_card_with_section(text: str | None, folder: str) -> str | None:
    """Return the root card with ``folder`` listed in its sidecar section, or None if it is listed already.

    Only the section between :data:`ROOT_SECTION_BEGIN` and :data:`ROOT_SECTION_END` changes.
    A card without the section gets it appended, and a missing card becomes the section alone.
    """
    newline = _newline_of(text or "")
    link = f"[`{folder}`]({folder}/{CARD_FILE})"
    entry = f"- {link}: process sidecar"
    if text is not None and ROOT_SECTION_BEGIN in text and ROOT_SECTION_END in text:
        head, rest = text.split(ROOT_SECTION_BEGIN, 1)
        section, tail = rest.split(ROOT_SECTION_END, 1)
        if link in section:
            return None
        section = section.rstrip("\r\n") + newline + entry + newline
        return head + ROOT_SECTION_BEGIN + section + ROOT_SECTION_END + tail
    block = newline.join(
        [
            ROOT_SECTION_BEGIN,
            "## Process sidecars",
            "",
            "These subfolders hold process sidecars, made with hf-sidecar, that revoke a memory from this",
            "checkpoint at load time. Each stores the memory update itself, so guard it like the checkpoint.",
            "Revoking at load time is not deletion.",
            "",
            entry,
            ROOT_SECTION_END,
            "",
        ]
    )
    if text is None or not text.strip():
        return block
    return text + ("" if text.endswith(("\n", "\r\n")) else newline) + newline + block


def _root_card_operation(api: HfApi, repo_id: str, commit: str, files: set[str], folder: str) -> CommitOperationAdd | None:
    """Build the operation that lists ``folder`` in the root README, or None when nothing changes."""
    text = None
    if ROOT_CARD in files:
        try:
            raw = Path(api.hf_hub_download(repo_id, ROOT_CARD, revision=commit)).read_bytes()
        except HfHubHTTPError as err:
            raise _hub_error(err, repo_id=repo_id, revision=commit, filename=ROOT_CARD) from err
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            logger.warning("The root %s of %s is not UTF-8 text; leaving it unchanged", ROOT_CARD, repo_id)
            return None
    updated = root_card_with_section(text, folder)
    if updated is None:
        return None
    return CommitOperationAdd(path_in_repo=ROOT_CARD, path_or_fileobj=updated.encode("utf-8"))


def push_sidecar(
    sidecar: Sidecar,
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
) -> CommitInfo:
    """Push a sidecar into ``subfolder`` (default ``sidecars/<memory>``) of a Hub repository in one commit.

    The commit contains the four sidecar files, with a model card that names this repository and
    subfolder. With ``update_root_card`` it also lists the sidecar in a section of the root
    README. The rest of the root README and every other file stay untouched. A new repository
    is private unless ``private=False``. A ``revision`` that names no branch yet is created from
    ``main``. The commit is based on the head read at the start, so a concurrent push makes it
    fail instead of overwriting the other push's README.
    """
    sidecar.validate()
    folder = normalize_subfolder(subfolder if subfolder is not None else default_subfolder(sidecar.memory), allow_root=False)
    api = HfApi(endpoint=endpoint, token=token, library_name="hf-sidecar", library_version=__version__)
    _prepare_repo(api, repo_id, private, f"sidecar {sidecar.memory!r}", warn_public=True)
    _prepare_branch(api, repo_id, revision)
    head = _head(api, repo_id, revision)
    files = {sibling.rfilename for sibling in head.siblings or []}
    _check_target_folder(files, folder, repo_id, revision)
    _log_checkpoint_match(sidecar, head.siblings or [], repo_id, revision)

    from .card import sidecar_card

    with tempfile.TemporaryDirectory(prefix="hf-sidecar-push-") as temporary:
        local = Path(temporary) / "sidecar"
        sidecar.save_pretrained(local, card=sidecar_card(sidecar, repo_id=repo_id, subfolder=folder))
        operations = [CommitOperationAdd(path_in_repo=f"{folder}/{name}", path_or_fileobj=str(local / name)) for name in SIDECAR_FILES]
        if update_root_card:
            root = _root_card_operation(api, repo_id, head.sha, files, folder)
            if root is not None:
                operations.append(root)
        message = commit_message or f"Add process sidecar {folder}"
        commit = _commit(api, repo_id, operations, message=message, revision=revision, create_pr=create_pr, parent=head.sha)
    logger.info("Pushed sidecar %r to %s %s (commit %s)", sidecar.memory, repo_id, folder, commit.oid)
    return commit


def _revocation_entries(folder: Path) -> list[dict]:
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{folder} has no config.json. Pass the folder that hf-sidecar apply wrote.") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err}). Write the revoked checkpoint again with hf-sidecar apply.") from err
    entries = config.get(REVOCATION_CONFIG_KEY)
    if not entries:
        raise CheckpointError(
            f"{config_path} has no {REVOCATION_CONFIG_KEY!r} entry, so {folder} is not a revoked checkpoint. "
            "Write one with hf-sidecar apply (revoke_checkpoint)."
        )
    return entries


def push_revoked_checkpoint(
    folder: str | Path,
    repo_id: str,
    *,
    subfolder: str = "",
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
) -> CommitInfo:
    """Push the revoked checkpoint that :func:`hf_sidecar.revoke_checkpoint` wrote, for deletion rather than hiding.

    The files of ``folder`` go to ``subfolder`` (default the root) in one commit. A README that
    already exists there is kept; otherwise the commit adds a card that records which memories
    were revoked. A new repository is private unless ``private=False``. Replaced weights and any
    sidecar in the same repository remain readable in its history, which this function reports
    but cannot erase.
    """
    from .card import revoked_checkpoint_card

    folder = Path(folder)
    entries = _revocation_entries(folder)
    checkpoint_files(folder)
    target = normalize_subfolder(subfolder, allow_root=True)
    api = HfApi(endpoint=endpoint, token=token, library_name="hf-sidecar", library_version=__version__)
    _prepare_repo(api, repo_id, private, "revoked checkpoint", warn_public=False)
    _prepare_branch(api, repo_id, revision)
    head = _head(api, repo_id, revision)
    files = {sibling.rfilename for sibling in head.siblings or []}

    local_files = sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))
    card_path = _in_folder(target, ROOT_CARD)
    operations = []
    for path in local_files:
        path_in_repo = _in_folder(target, path.name)
        if path.name == ROOT_CARD and path_in_repo in files:
            logger.info("Keeping the existing %s of %s; not uploading %s", path_in_repo, repo_id, path)
            continue
        operations.append(CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(path)))
    if card_path not in files and not (folder / ROOT_CARD).is_file():
        operations.append(CommitOperationAdd(path_in_repo=card_path, path_or_fileobj=revoked_checkpoint_card(entries).encode("utf-8")))

    replaced = sorted(_in_folder(target, path.name) for path in local_files if path.suffix == ".safetensors" and _in_folder(target, path.name) in files)
    if replaced:
        logger.warning(
            "This push replaces %s in %s, but earlier commits keep the replaced weights readable. To delete them, "
            "delete the repository and push again, or squash its history (HfApi.super_squash_history).",
            ", ".join(replaced), repo_id,
        )
    sidecars = sidecar_folders(files)
    if sidecars:
        logger.warning(
            "%s still contains sidecars (%s), which store the memory update. Delete them, and squash the history, to "
            "complete the deletion.", repo_id, ", ".join(folder_name or "." for folder_name in sidecars),
        )
    memories = ", ".join(str(entry.get("memory")) for entry in entries)
    message = commit_message or f"Add checkpoint with memory {memories} revoked"
    commit = _commit(api, repo_id, operations, message=message, revision=revision, create_pr=create_pr, parent=head.sha)
    logger.info("Pushed revoked checkpoint %s to %s (commit %s)", folder, repo_id, commit.oid)
    return commit
