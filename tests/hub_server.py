"""Hub-protocol HTTP server for tests that drive the real huggingface_hub client.

The server implements the part of the Hugging Face Hub HTTP API that huggingface_hub 2.4.0 calls
from ``HfApi``, ``hf_hub_download`` and ``snapshot_download`` (read from the client's
``hf_api.py``, ``file_download.py``, ``_commit_api.py``, ``lfs.py`` and ``utils/_http.py``).
Repositories live in memory with their full commit history, and file contents are stored on disk,
addressed by sha256, under the root folder given to :class:`HubServer`.

Two listeners run on 127.0.0.1. The Hub listener serves the API, ``resolve`` and the LFS batch
protocol. The storage listener plays the CDN and S3 role: it takes LFS uploads and serves LFS
downloads through signed URLs. Because its port differs, the client treats it as another origin,
as it treats the real CDN. It stops following the HEAD redirect there and sends no Authorization
header to it.

Client settings that the tests need (names from huggingface_hub 2.4.0 ``constants.py``):

* ``HF_HUB_DISABLE_XET``: with ``hf_xet`` installed the client uploads and downloads through Xet
  storage, which this server does not implement. ``is_xet_available()`` reads
  ``constants.HF_HUB_DISABLE_XET`` on every call, so patching the constant works after import.
* ``HF_ENDPOINT`` is read once at import. Pass ``endpoint=server.url`` to ``HfApi``,
  ``hf_hub_download`` and ``snapshot_download`` instead.
* ``HF_HUB_OFFLINE`` is read once at import into ``constants.HF_HUB_OFFLINE``, but
  ``constants.is_offline_mode()`` reads that constant on every call, so patching it works too.

:func:`hub_client_env` applies these settings, and the ``hub_server`` fixture starts a server with
two users, ``alice`` and ``bob``, whose tokens are :data:`ALICE_TOKEN` and :data:`BOB_TOKEN`.

Not implemented: Xet storage, tags, gated-access requests, LFS multipart transfers, cross-repo
copies, discussions beyond the pull request number, tree pagination and ``.gitignore`` handling in
preupload. An unknown route returns 404 and logs a warning with the method and path.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest

logger = logging.getLogger(__name__)

ALICE_TOKEN = "hf_test_alice_write"
BOB_TOKEN = "hf_test_bob_write"

REPO_TYPE_PLURALS = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# Files above this size are sent to LFS even when the repository's .gitattributes does not match
# them, because the Hub rejects git pushes of larger files outside LFS. NOTE: the exact rule of
# the Hub's preupload endpoint is not visible from the client, so this limit is an approximation.
REGULAR_FILE_MAX_BYTES = 10 * 1024 * 1024
SIGNED_URL_LIFETIME_S = 3600
COPY_CHUNK_BYTES = 1024 * 1024
# stop() waits up to this long per listener for the serve loop to notice the shutdown request.
SHUTDOWN_POLL_INTERVAL_S = 0.05
LFS_POINTER_TEMPLATE = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"

# LFS patterns of the .gitattributes that the Hub commits into new model repositories. The Hub
# adds patterns over time, so this copy may lack the newest ones.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
        "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
        "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
        "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
        "*.zst", "*tfevents*",
    )
)  # fmt: skip

_API_REPO_PATH = re.compile(
    r"^/api/(?P<plural>models|datasets|spaces)/(?P<namespace>[^/]+)/(?P<name>[^/]+)"
    r"(?:/(?P<action>[^/]+)(?:/(?P<rest>.*))?)?$"
)
_RESOLVE_PATH = re.compile(
    r"^/(?:(?P<plural>datasets|spaces)/)?(?P<namespace>[^/]+)/(?P<name>[^/]+)"
    r"/resolve/(?P<revision>[^/]+)/(?P<path>.+)$"
)
_LFS_PATH = re.compile(
    r"^/(?:(?P<plural>datasets|spaces)/)?(?P<namespace>[^/]+)/(?P<name>[^/]+)\.git"
    r"/info/lfs/objects/(?P<operation>batch|verify)$"
)
_STORAGE_PATH = re.compile(r"^/lfs/(?P<oid>[0-9a-f]{64})$")
_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_BRANCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_BYTE_RANGE = re.compile(r"^bytes=(?P<start>\d*)-(?P<end>\d*)$")


class HubError(Exception):
    """An HTTP error response in the form the Hub sends it.

    ``error_code`` goes to the ``X-Error-Code`` header, which ``hf_raise_for_status`` maps to
    ``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``RemoteEntryNotFoundError`` and
    ``GatedRepoError``. ``message`` goes to ``X-Error-Message`` and to the JSON body's ``error``.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = dict(headers or {})


def _repo_not_found(user: str | None) -> HubError:
    """Build the error for a missing repository or one the user may not see.

    Anonymous requests get 401 and authenticated ones 404, for private and missing repositories
    alike. The Hub returns 401 in these cases, as a comment in huggingface_hub 2.4.0
    ``utils/_http.py`` states.
    """
    if user is None:
        return HubError(401, "Invalid username or password.", error_code="RepoNotFound")
    return HubError(404, "Repository not found", error_code="RepoNotFound")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")


def _entry_not_found(path: str, commit_oid: str, reason: str = "Entry not found") -> HubError:
    """Build the error for a missing file.

    The client records the miss in its cache under the commit from ``X-Repo-Commit``.
    """
    return HubError(
        404,
        f"{reason}: {path}",
        error_code="EntryNotFound",
        headers={"X-Repo-Commit": commit_oid},
    )


def _bad_request(message: str) -> HubError:
    return HubError(400, message)


def _format_date(moment: datetime) -> str:
    """Format a UTC datetime as the Hub does (``parse_datetime`` in the client expects this)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _git_blob_sha1(data: bytes) -> str:
    """Return the git object id of a blob with this content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(oid: str, size: int) -> bytes:
    return LFS_POINTER_TEMPLATE.format(oid=oid, size=size).encode()


def _validate_repo_path(path: str) -> str:
    """Return ``path`` if it is a valid file path inside a repository, else raise 400."""
    segments = path.split("/")
    if not path or any(segment in ("", ".", "..") for segment in segments) or segments[0] == ".git":
        raise _bad_request(f"Invalid path in repository: {path!r}")
    return path


@dataclass(frozen=True)
class RepoFileEntry:
    """One file in a commit's file table, whose content is in the object store under ``sha256``.

    ``blob_id`` is the git blob sha1 of the content for regular files, and of the LFS pointer
    file for LFS files, as the Hub reports it in ``oid`` and ``blobId``.
    """

    sha256: str
    size: int
    is_lfs: bool
    blob_id: str

    @property
    def etag(self) -> str:
        """Return the ETag of ``resolve``: sha256 for LFS files, git blob sha1 otherwise."""
        return self.sha256 if self.is_lfs else self.blob_id

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, self.size))


@dataclass(frozen=True)
class CommitRecord:
    """A commit with its complete file table, so that any commit can be served later."""

    oid: str
    parent: str | None
    files: Mapping[str, RepoFileEntry]
    title: str
    message: str
    author: str
    date: datetime


@dataclass
class RepoRecord:
    """A repository: refs map full ref names (``refs/heads/main``, ``refs/pr/1``) to commits."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: datetime
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, CommitRecord] = field(default_factory=dict)
    lfs_oids: set[str] = field(default_factory=set)
    pr_count: int = 0

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    @property
    def key(self) -> str:
        """Return the repository key used in signed storage URLs, such as ``model:alice/demo``."""
        return f"{self.repo_type}:{self.repo_id}"

    def web_path(self) -> str:
        """Return the repository's path on the web site, such as ``datasets/alice/demo``."""
        return URL_PREFIXES[self.repo_type] + self.repo_id


@dataclass(frozen=True)
class TokenInfo:
    """The user behind an access token and whether the token may write."""

    user: str
    can_write: bool


@dataclass(frozen=True)
class RecordedRequest:
    """One request that a listener handled, on the ``hub`` or the ``storage`` listener.

    ``authenticated`` records whether the request carried an Authorization header, and
    ``byte_range`` the value of its Range header.
    """

    listener: str
    method: str
    path: str
    authenticated: bool
    byte_range: str | None


@dataclass(frozen=True)
class _CommitRequest:
    """A parsed NDJSON commit body."""

    title: str
    message: str
    parent_commit: str | None
    operations: list[tuple[str, dict[str, Any]]]


class ObjectStore:
    """Content-addressed file storage: each content is stored once, under its sha256."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` and return its sha256."""
        sha256, _ = self.put_chunks(iter([data]))
        return sha256

    def put_chunks(self, chunks: Iterator[bytes], expected_sha256: str | None = None) -> tuple[str, int]:
        """Store a stream of chunks and return its sha256 and size.

        The content is written to a temporary file and renamed into place, so a reader never sees
        a partial object. Raises 400 when ``expected_sha256`` is given and differs.
        """
        digest = hashlib.sha256()
        size = 0
        handle, temporary = tempfile.mkstemp(dir=self.root, prefix="upload-")
        try:
            with os.fdopen(handle, "wb") as output:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    output.write(chunk)
            sha256 = digest.hexdigest()
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise _bad_request(f"Uploaded content has sha256 {sha256}, expected {expected_sha256}")
            destination = self.path(sha256)
            destination.parent.mkdir(exist_ok=True)
            os.replace(temporary, destination)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        return sha256, size


class HubState:
    """Repositories, tokens and objects behind both listeners. One lock guards all of it."""

    def __init__(self, root: Path) -> None:
        self.store = ObjectStore(root / "objects")
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], RepoRecord] = {}
        self.tokens: dict[str, TokenInfo] = {}
        self.requests: list[RecordedRequest] = []
        self.signing_key = secrets.token_bytes(32)
        self.hub_url = ""
        self.storage_url = ""
        self._commit_counter = 0

    # Authentication and access.

    def authenticate(self, authorization: str | None) -> str | None:
        """Return the user of a ``Bearer`` token, or None for an anonymous request.

        Raises 401 "Invalid credentials in Authorization header" for an unknown token, the one
        401 message that ``hf_raise_for_status`` does not turn into ``RepositoryNotFoundError``.
        """
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        info = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if info is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return info.user

    def can_write(self, authorization: str | None) -> bool:
        _, _, token = (authorization or "").partition(" ")
        info = self.tokens.get(token.strip())
        return info is not None and info.can_write

    def readable_repo(self, repo_type: str, repo_id: str, user: str | None) -> RepoRecord:
        """Return the repository if ``user`` may read it, else raise the Hub's RepoNotFound error."""
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo.namespace):
            raise _repo_not_found(user)
        return repo

    def writable_repo(self, repo_type: str, repo_id: str, user: str | None, can_write: bool) -> RepoRecord:
        """Return the repository if ``user`` may push to it.

        Anonymous writes get 401 with ``X-Error-Code: RepoNotFound``. Against huggingface.co the
        client turns any 401 on an ``/api/{type}s/`` URL into ``RepositoryNotFoundError``, but its
        pattern only matches https URLs, so this plain-HTTP server sends the code explicitly.
        """
        repo = self.readable_repo(repo_type, repo_id, user)
        if user is None:
            raise _repo_not_found(None)
        if user != repo.namespace or not can_write:
            raise HubError(403, f"You don't have the rights to write to {repo_id}. Use a write token of its owner.")
        return repo

    # Revisions.

    def resolve(self, repo: RepoRecord, revision: str) -> CommitRecord:
        """Return the commit that a branch, ``refs/...`` name or commit sha points to."""
        ref = self._ref_name(repo, revision)
        if ref is not None:
            return repo.commits[repo.refs[ref]]
        if _COMMIT_SHA.match(revision) and revision in repo.commits:
            return repo.commits[revision]
        raise _revision_not_found(revision)

    @staticmethod
    def _ref_name(repo: RepoRecord, revision: str) -> str | None:
        """Return the full ref name for ``revision`` if it names an existing ref."""
        for candidate in (revision, f"refs/heads/{revision}"):
            if candidate in repo.refs:
                return candidate
        return None

    def history(self, repo: RepoRecord, head: CommitRecord) -> list[CommitRecord]:
        """Return ``head`` and its ancestors, newest first."""
        commits = [head]
        while commits[-1].parent is not None:
            commits.append(repo.commits[commits[-1].parent])
        return commits

    # Repositories.

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> RepoRecord:
        """Create a repository whose first commit adds the Hub's default .gitattributes."""
        if (repo_type, repo_id) in self.repos:
            raise HubError(409, f"You already created this {repo_type} repo")
        repo = RepoRecord(
            repo_type=repo_type, repo_id=repo_id, private=private, created_at=datetime.now(timezone.utc)
        )
        attributes = DEFAULT_GITATTRIBUTES.encode()
        entry = RepoFileEntry(
            sha256=self.store.put_bytes(attributes),
            size=len(attributes),
            is_lfs=False,
            blob_id=_git_blob_sha1(attributes),
        )
        commit = self._new_commit(None, {".gitattributes": entry}, "initial commit", "", author)
        repo.commits[commit.oid] = commit
        repo.refs["refs/heads/main"] = commit.oid
        self.repos[(repo_type, repo_id)] = repo
        logger.info("Created %s repository %s (private=%s)", repo_type, repo_id, private)
        return repo

    def _new_commit(
        self,
        parent: str | None,
        files: Mapping[str, RepoFileEntry],
        title: str,
        message: str,
        author: str,
    ) -> CommitRecord:
        """Build a commit whose oid is a sha1 over its parent, file table, text and a counter.

        The counter makes two otherwise identical commits get different oids, as git's
        timestamps do.
        """
        self._commit_counter += 1
        table = sorted((path, entry.blob_id) for path, entry in files.items())
        payload = json.dumps([parent, table, title, message, author, self._commit_counter])
        return CommitRecord(
            oid=hashlib.sha1(payload.encode()).hexdigest(),
            parent=parent,
            files=dict(files),
            title=title,
            message=message,
            author=author,
            date=datetime.now(timezone.utc),
        )

    # Commits.

    def apply_commit(
        self,
        repo: RepoRecord,
        revision: str,
        request: _CommitRequest,
        author: str,
        create_pr: bool,
    ) -> tuple[CommitRecord, int | None]:
        """Apply a commit on a branch or pull request ref and return it with the new PR number.

        With ``create_pr``, a new ``refs/pr/N`` starts at ``parentCommit`` (or at the head of
        ``revision``) and receives the commit. Without it, ``parentCommit`` must equal the head of
        ``revision``, else the commit is rejected with 412.
        """
        ref = self._ref_name(repo, revision)
        if ref is None:
            if _COMMIT_SHA.match(revision) and revision in repo.commits:
                raise _bad_request(f"Cannot commit to {revision}: it is a commit, not a branch.")
            raise _revision_not_found(revision)
        head = repo.commits[repo.refs[ref]]
        pr_number = None
        if create_pr:
            base = head if request.parent_commit is None else self._commit_or_raise(repo, request.parent_commit)
            repo.pr_count += 1
            pr_number = repo.pr_count
            ref = f"refs/pr/{pr_number}"
            head = base
        elif request.parent_commit is not None and request.parent_commit != head.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")

        files = dict(head.files)
        for key, value in request.operations:
            self._apply_operation(repo, files, key, value, head.oid)
        self._check_file_directory_conflicts(files)
        commit = self._new_commit(head.oid, files, request.title, request.message, author)
        repo.commits[commit.oid] = commit
        repo.refs[ref] = commit.oid
        logger.info("Committed %s to %s %s (%d operations)", commit.oid, repo.repo_id, ref, len(request.operations))
        return commit, pr_number

    def _commit_or_raise(self, repo: RepoRecord, oid: str) -> CommitRecord:
        if oid not in repo.commits:
            raise _revision_not_found(oid)
        return repo.commits[oid]

    def _apply_operation(
        self,
        repo: RepoRecord,
        files: dict[str, RepoFileEntry],
        key: str,
        value: dict[str, Any],
        parent_oid: str,
    ) -> None:
        """Apply one NDJSON commit line (``file``, ``lfsFile``, ``deletedFile``, ``deletedFolder``)."""
        raw_path = str(value.get("path", ""))
        path = _validate_repo_path(raw_path.strip("/") if key == "deletedFolder" else raw_path)
        if key == "file":
            files[path] = self._regular_file_entry(value)
        elif key == "lfsFile":
            files[path] = self._lfs_file_entry(repo, value)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                # The client looks for this sentence to suggest a folder deletion instead.
                raise _entry_not_found(path, parent_oid, "A file with this name doesn't exist")
        elif key == "deletedFolder":
            removed = [name for name in files if name.startswith(path + "/")]
            if not removed:
                raise _entry_not_found(path, parent_oid, "A folder with this name doesn't exist")
            for name in removed:
                del files[name]
        else:
            raise _bad_request(f"Unknown commit operation key: {key!r}")

    def _regular_file_entry(self, value: dict[str, Any]) -> RepoFileEntry:
        if value.get("encoding", "base64") != "base64":
            raise _bad_request(f"Unsupported file encoding: {value.get('encoding')!r}")
        try:
            content = base64.b64decode(str(value.get("content", "")), validate=True)
        except ValueError as error:
            raise _bad_request(f"Invalid base64 content for {value.get('path')!r}: {error}") from error
        return RepoFileEntry(
            sha256=self.store.put_bytes(content), size=len(content), is_lfs=False, blob_id=_git_blob_sha1(content)
        )

    def _lfs_file_entry(self, repo: RepoRecord, value: dict[str, Any]) -> RepoFileEntry:
        """Return the entry for an ``lfsFile`` line, whose object must have been uploaded to this repo."""
        oid = str(value.get("oid", ""))
        if value.get("algo", "sha256") != "sha256" or oid not in repo.lfs_oids:
            raise _bad_request(
                f"LFS object {oid!r} for {value.get('path')!r} was not uploaded to {repo.repo_id}. "
                "Upload it through the LFS batch endpoint first."
            )
        size = self.store.path(oid).stat().st_size
        if value.get("size") is not None and value["size"] != size:
            raise _bad_request(f"LFS object {oid} has size {size}, but the commit gives {value['size']}")
        return RepoFileEntry(sha256=oid, size=size, is_lfs=True, blob_id=_git_blob_sha1(_lfs_pointer(oid, size)))

    @staticmethod
    def _check_file_directory_conflicts(files: Mapping[str, RepoFileEntry]) -> None:
        """Raise 400 when a file path is also a directory of another file, which git cannot store."""
        directories: set[str] = set()
        for path in files:
            parts = path.split("/")
            directories.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
        conflicts = sorted(directories & files.keys())
        if conflicts:
            raise _bad_request(f"Paths are both a file and a directory: {conflicts}")

    # Branches.

    def create_branch(self, repo: RepoRecord, branch: str, starting_point: str | None) -> None:
        if not _BRANCH_NAME.match(branch) or ".." in branch or branch.startswith("refs/"):
            raise _bad_request(f"Invalid branch name: {branch!r}")
        if f"refs/heads/{branch}" in repo.refs:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self.resolve(repo, starting_point or "main")
        repo.refs[f"refs/heads/{branch}"] = start.oid

    def delete_branch(self, repo: RepoRecord, branch: str) -> None:
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch main")
        if repo.refs.pop(f"refs/heads/{branch}", None) is None:
            raise _revision_not_found(branch)

    # LFS.

    def sign(self, method: str, oid: str, repo_key: str, expires: int) -> str:
        """Return the HMAC that authorizes one storage URL, like an S3 presigned URL."""
        message = f"{method}\n{oid}\n{repo_key}\n{expires}".encode()
        return hmac.new(self.signing_key, message, hashlib.sha256).hexdigest()

    def signed_storage_url(self, method: str, oid: str, repo_key: str) -> str:
        expires = int(time.time()) + SIGNED_URL_LIFETIME_S
        query = urlencode(
            {"repo": repo_key, "expires": expires, "signature": self.sign(method, oid, repo_key, expires)}
        )
        return f"{self.storage_url}/lfs/{oid}?{query}"

    def verify_signature(self, method: str, oid: str, query: Mapping[str, list[str]]) -> str:
        """Return the repository key of a signed storage URL, or raise 403."""
        repo_key = query.get("repo", [""])[0]
        expires = query.get("expires", ["0"])[0]
        signature = query.get("signature", [""])[0]
        if not expires.isdigit() or int(expires) < time.time():
            raise HubError(403, "Request has expired")
        if not hmac.compare_digest(signature, self.sign(method, oid, repo_key, int(expires))):
            raise HubError(403, "The request signature does not match")
        return repo_key


class _Listener(ThreadingHTTPServer):
    """One listening socket with a role (``hub`` or ``storage``) and the shared state."""

    daemon_threads = True

    def __init__(self, role: str, state: HubState) -> None:
        super().__init__(("127.0.0.1", 0), _HubRequestHandler)
        self.role = role
        self.state = state
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close_connections(self) -> None:
        """Shut down kept-alive client connections so their handler threads exit."""
        with self.connections_lock:
            for connection in list(self.connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Request handler of both listeners. Error responses take the form of :class:`HubError`."""

    protocol_version = "HTTP/1.1"
    # Idle kept-alive connections close after this many seconds.
    timeout = 60
    server: _Listener

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The base class would log the query string, which contains the signatures of storage URLs.
        logger.debug("%s %s %s -> %s", self.server.role, self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - name fixed by the base class
        logger.debug("%s %s", self.server.role, format % args)

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # Dispatch and responses.

    def _dispatch(self) -> None:
        self._body_read = False
        url = urlsplit(self.path)
        self._url_path = url.path
        self._query = parse_qs(url.query)
        state = self.server.state
        with state.lock:
            state.requests.append(
                RecordedRequest(
                    listener=self.server.role,
                    method=self.command,
                    path=url.path,
                    authenticated=self.headers.get("Authorization") is not None,
                    byte_range=self.headers.get("Range"),
                )
            )
        try:
            if self.server.role == "storage":
                self._route_storage(url.path)
            else:
                self._route_hub(url.path)
        except HubError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError) as error:
            logger.debug("Client closed the connection during %s %s: %s", self.command, self._url_path, error)
            self.close_connection = True
        except Exception as error:  # noqa: BLE001 - a handler bug must reach the test log, not kill the thread
            logger.exception("Handler failed on %s %s", self.command, self._url_path)
            self._send_error(HubError(500, f"Internal test-server error: {error}"))

    def _send_error(self, error: HubError) -> None:
        log = logger.error if error.status >= 500 else logger.info
        log("%s %s -> %d %s", self.command, self._url_path, error.status, error.message)
        # Header values must be latin-1 on one line, but messages may quote any path.
        header_message = error.message.encode("ascii", "backslashreplace").decode().replace("\n", " ")
        headers = {"X-Error-Message": header_message, **error.headers}
        if error.error_code is not None:
            headers["X-Error-Code"] = error.error_code
        self._send_json({"error": error.message}, status=error.status, headers=headers)

    def _send_json(
        self,
        payload: Any,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        body = json.dumps(payload).encode()
        self._send_bytes(body, status=status, content_type=content_type, headers=headers)

    def _send_bytes(
        self,
        body: bytes,
        status: int = 200,
        content_type: str = "application/octet-stream",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._start_response(status, len(body), content_type, headers)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _start_response(
        self, status: int, length: int, content_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        """Send the status line and headers, and close the connection if the request body was not read."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if not self._body_read and self._has_body():
            # An unread body would be parsed as the next request on this kept-alive connection.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    # Request bodies.

    def _has_body(self) -> bool:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return True
        return int(self.headers.get("Content-Length") or 0) > 0

    def _iter_body(self) -> Iterator[bytes]:
        """Yield the request body in chunks, for both Content-Length and chunked transfer coding."""
        self._body_read = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            yield from self._iter_chunked_body()
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, COPY_CHUNK_BYTES))
            if not chunk:
                raise _bad_request("Request body ended before Content-Length bytes")
            remaining -= len(chunk)
            yield chunk

    def _iter_chunked_body(self) -> Iterator[bytes]:
        while True:
            size_line = self.rfile.readline().split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError as error:
                raise _bad_request(f"Invalid chunk size {size_line!r} in chunked request body") from error
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # Skip trailer headers.
                return
            yield self.rfile.read(size)
            self.rfile.readline()

    def _read_body(self) -> bytes:
        return b"".join(self._iter_body())

    def _read_json(self) -> Any:
        body = self._read_body()
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as error:
            raise _bad_request(f"Request body is not valid JSON: {error}") from error

    def _user(self) -> str | None:
        return self.server.state.authenticate(self.headers.get("Authorization"))

    def _can_write(self) -> bool:
        return self.server.state.can_write(self.headers.get("Authorization"))

    # Routing.

    def _route_hub(self, path: str) -> None:
        method = self.command
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami()
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo()
        if path == "/api/repos/delete" and method == "DELETE":
            return self._delete_repo()
        if path == "/api/validate-yaml" and method == "POST":
            # README metadata is not validated. The client only needs a JSON response.
            self._read_body()
            return self._send_json({"errors": [], "warnings": []})
        if (match := _RESOLVE_PATH.match(path)) and method in ("GET", "HEAD"):
            return self._resolve(match)
        if (match := _LFS_PATH.match(path)) and method == "POST":
            return self._lfs(match)
        if match := _API_REPO_PATH.match(path):
            handler = _API_ROUTES.get((method, match["action"]))
            if handler is not None:
                repo_type = REPO_TYPE_PLURALS[match["plural"]]
                repo_id = f"{unquote(match['namespace'])}/{unquote(match['name'])}"
                return handler(self, repo_type, repo_id, match["rest"] or "")
        logger.warning("Test Hub server has no route for %s %s", method, path)
        raise HubError(404, f"The test Hub server does not implement {method} {path}")

    def _route_storage(self, path: str) -> None:
        match = _STORAGE_PATH.match(path)
        if match is None:
            raise HubError(404, f"No storage object at {path}")
        oid = match["oid"]
        if self.command == "PUT":
            return self._storage_upload(oid)
        if self.command in ("GET", "HEAD"):
            self.server.state.verify_signature("GET", oid, self._query)
            return self._send_object(oid, {"ETag": f'"{oid}"'})
        raise HubError(405, f"Method {self.command} is not allowed on storage objects")

    # Users and repositories.

    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        role = "write" if self._can_write() else "read"
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test token", "role": role}},
            }
        )

    def _create_repo(self) -> None:
        payload = self._read_json()
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or user
        name = str(payload.get("name", ""))
        if repo_type not in URL_PREFIXES or not _REPO_NAME.match(name) or name.endswith(".git"):
            raise _bad_request(f"Invalid repository type or name: {repo_type!r}, {name!r}")
        if namespace != user or not self._can_write():
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace!r}")
        repo_id = f"{namespace}/{name}"
        state = self.server.state
        url = f"{state.hub_url}/{URL_PREFIXES[repo_type]}{repo_id}"
        with state.lock:
            if (repo_type, repo_id) in state.repos:
                # The Hub adds the existing repository's URL to the 409 body.
                message = f"You already created this {repo_type} repo"
                logger.info("POST /api/repos/create -> 409 %s: %s", message, repo_id)
                return self._send_json(
                    {"error": message, "url": url}, status=409, headers={"X-Error-Message": message}
                )
            repo = state.create_repo(repo_type, repo_id, payload.get("visibility") == "private", user)
        self._send_json({"url": url, "name": repo_id, "id": hashlib.sha1(repo.key.encode()).hexdigest()[:24]})

    def _delete_repo(self) -> None:
        payload = self._read_json()
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or None
        user = self._user()
        repo_id = f"{namespace or user}/{payload.get('name', '')}"
        state = self.server.state
        with state.lock:
            repo = state.writable_repo(repo_type, repo_id, user, self._can_write())
            del state.repos[(repo.repo_type, repo.repo_id)]
        logger.info("Deleted %s repository %s", repo_type, repo_id)
        self._send_json({})

    def _repo_settings(self, repo_type: str, repo_id: str, rest: str) -> None:
        payload = self._read_json()
        state = self.server.state
        with state.lock:
            repo = state.writable_repo(repo_type, repo_id, self._user(), self._can_write())
            if "visibility" in payload:
                repo.private = payload["visibility"] == "private"
            if "private" in payload:
                repo.private = bool(payload["private"])
            if "gated" in payload:
                repo.gated = payload["gated"] not in (False, None, "false")
        self._send_json({})

    def _repo_info(self, repo_type: str, repo_id: str, rest: str) -> None:
        """Serve ``/api/{type}s/{id}`` and ``.../revision/{rev}``, with file sizes when ``blobs`` is set."""
        revision = unquote(rest) if rest else "main"
        with_blobs = self._query.get("blobs", ["false"])[0].lower() in ("1", "true")
        state = self.server.state
        with state.lock:
            repo = state.readable_repo(repo_type, repo_id, self._user())
            commit = state.resolve(repo, revision)
            info = _repo_info_payload(repo, commit, with_blobs)
        self._send_json(info)

    # Tree, paths-info, refs and commits.

    def _tree(self, repo_type: str, repo_id: str, rest: str) -> None:
        revision, _, encoded_path = rest.partition("/")
        base = unquote(encoded_path).strip("/")
        recursive = self._query.get("recursive", ["false"])[0].lower() in ("1", "true")
        state = self.server.state
        with state.lock:
            repo = state.readable_repo(repo_type, repo_id, self._user())
            commit = state.resolve(repo, unquote(revision))
            entries = _list_tree(commit.files, base, recursive)
        if entries is None:
            raise _entry_not_found(base, commit.oid)
        self._send_json(entries)

    def _paths_info(self, repo_type: str, repo_id: str, rest: str) -> None:
        form = parse_qs(self._read_body().decode())
        requested = [path.strip("/") for path in form.get("paths", [])]
        state = self.server.state
        with state.lock:
            repo = state.readable_repo(repo_type, repo_id, self._user())
            commit = state.resolve(repo, unquote(rest))
        entries = []
        for path in requested:
            if path in commit.files:
                entries.append(_file_payload(path, commit.files[path]))
            elif any(name.startswith(path + "/") for name in commit.files):
                entries.append(_folder_payload(path, commit.files))
        self._send_json(entries)

    def _refs(self, repo_type: str, repo_id: str, rest: str) -> None:
        state = self.server.state
        with state.lock:
            repo = state.readable_repo(repo_type, repo_id, self._user())
            refs = sorted(repo.refs.items())
        branches = [
            {"name": ref.removeprefix("refs/heads/"), "ref": ref, "targetCommit": oid}
            for ref, oid in refs
            if ref.startswith("refs/heads/")
        ]
        pulls = [
            {"name": ref.removeprefix("refs/"), "ref": ref, "targetCommit": oid}
            for ref, oid in refs
            if ref.startswith("refs/pr/")
        ]
        payload: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if self._query.get("include_prs"):
            payload["pullRequests"] = pulls
        self._send_json(payload)

    def _commits(self, repo_type: str, repo_id: str, rest: str) -> None:
        state = self.server.state
        with state.lock:
            repo = state.readable_repo(repo_type, repo_id, self._user())
            history = state.history(repo, state.resolve(repo, unquote(rest or "main")))
        self._send_json(
            [
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": commit.author}],
                    "date": _format_date(commit.date),
                }
                for commit in history
            ]
        )

    def _branch(self, repo_type: str, repo_id: str, rest: str) -> None:
        branch = unquote(rest)
        payload = self._read_json() if self.command == "POST" else {}
        state = self.server.state
        with state.lock:
            repo = state.writable_repo(repo_type, repo_id, self._user(), self._can_write())
            if self.command == "POST":
                state.create_branch(repo, branch, payload.get("startingPoint"))
            else:
                state.delete_branch(repo, branch)
        self._send_json({})

    # Uploads: preupload, LFS batch and verify, storage PUT, commit.

    def _preupload(self, repo_type: str, repo_id: str, rest: str) -> None:
        """Tell the client which files go to LFS, and send the remote oid of existing files.

        A file goes to LFS when the revision's .gitattributes marks it, when its sample contains a
        NUL byte (git's binary heuristic), or when it is larger than ``REGULAR_FILE_MAX_BYTES``.
        """
        payload = self._read_json()
        create_pr = bool(self._query.get("create_pr"))
        state = self.server.state
        with state.lock:
            repo, _ = self._repo_for_upload(repo_type, repo_id, create_pr)
            commit = state.resolve(repo, unquote(rest))
            patterns = _lfs_patterns(state.store, commit.files.get(".gitattributes"))
        upload_modes = []
        for item in payload.get("files", []):
            path = str(item.get("path", ""))
            sample = base64.b64decode(item.get("sample", ""))
            is_lfs = (
                b"\0" in sample or int(item.get("size", 0)) > REGULAR_FILE_MAX_BYTES or _matches_any(path, patterns)
            )
            existing = commit.files.get(path)
            upload_modes.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if is_lfs else "regular",
                    "shouldIgnore": False,
                    "oid": existing.etag if existing is not None else None,
                }
            )
        self._send_json({"files": upload_modes, "commitOid": commit.oid})

    def _repo_for_upload(self, repo_type: str, repo_id: str, create_pr: bool) -> tuple[RepoRecord, str]:
        """Return the repository and user of an upload. Opening a pull request needs only read access."""
        state = self.server.state
        user = self._user()
        if user is None:
            state.readable_repo(repo_type, repo_id, user)  # A private or missing repo raises first.
            raise _repo_not_found(None)
        if create_pr:
            return state.readable_repo(repo_type, repo_id, user), user
        return state.writable_repo(repo_type, repo_id, user, self._can_write()), user

    def _lfs(self, match: re.Match[str]) -> None:
        repo_type = REPO_TYPE_PLURALS.get(match["plural"] or "models", "model")
        repo_id = f"{unquote(match['namespace'])}/{unquote(match['name'])}"
        payload = self._read_json()
        if match["operation"] == "verify":
            return self._lfs_verify(repo_type, repo_id, payload)
        return self._lfs_batch(repo_type, repo_id, payload)

    def _lfs_batch(self, repo_type: str, repo_id: str, payload: Mapping[str, Any]) -> None:
        """Respond to a git LFS batch request with ``basic`` upload actions for objects not stored yet.

        The client sends ``ref`` only when it pushes to a branch. A request without it belongs to a
        pull request, for which read access is enough.
        """
        if payload.get("operation") != "upload":
            raise HubError(422, f"Unsupported LFS batch operation: {payload.get('operation')!r}")
        state = self.server.state
        with state.lock:
            repo, _ = self._repo_for_upload(repo_type, repo_id, create_pr="ref" not in payload)
            known = set(repo.lfs_oids)
        objects = []
        for item in payload.get("objects", []):
            oid, size = str(item.get("oid", "")), item.get("size")
            if not _SHA256.match(oid) or not isinstance(size, int) or size < 0:
                error = {"code": 422, "message": "Invalid oid or size"}
                objects.append({"oid": oid, "size": size if isinstance(size, int) else 0, "error": error})
                continue
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in known:
                verify_url = f"{state.hub_url}/{repo.web_path()}.git/info/lfs/objects/verify"
                entry["actions"] = {
                    "upload": {"href": state.signed_storage_url("PUT", oid, repo.key), "header": {}},
                    "verify": {"href": verify_url, "header": {}},
                }
            objects.append(entry)
        self._send_json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_verify(self, repo_type: str, repo_id: str, payload: Mapping[str, Any]) -> None:
        state = self.server.state
        oid, size = str(payload.get("oid", "")), payload.get("size")
        with state.lock:
            repo = state.readable_repo(repo_type, repo_id, self._user())
            stored = oid in repo.lfs_oids
        if not stored or state.store.path(oid).stat().st_size != size:
            raise HubError(404, f"LFS object {oid} of size {size} was not uploaded")
        self._send_json({"success": True})

    def _storage_upload(self, oid: str) -> None:
        """Store an LFS object PUT to a signed URL, and reject content whose sha256 is not ``oid``."""
        state = self.server.state
        repo_key = state.verify_signature("PUT", oid, self._query)
        state.store.put_chunks(self._iter_body(), expected_sha256=oid)
        repo_type, _, repo_id = repo_key.partition(":")
        with state.lock:
            repo = state.repos.get((repo_type, repo_id))
            if repo is None:
                raise HubError(404, f"Repository {repo_id} not found: it was deleted during the upload")
            repo.lfs_oids.add(oid)
        self._send_bytes(b"", headers={"ETag": f'"{oid}"'})

    def _commit(self, repo_type: str, repo_id: str, rest: str) -> None:
        request = _parse_commit_body(self._read_body())
        create_pr = bool(self._query.get("create_pr"))
        state = self.server.state
        with state.lock:
            repo, user = self._repo_for_upload(repo_type, repo_id, create_pr)
            commit, pr_number = state.apply_commit(repo, unquote(rest), request, user, create_pr)
            web_url = f"{state.hub_url}/{repo.web_path()}"
        response: dict[str, Any] = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{web_url}/commit/{commit.oid}",
            "hookOutput": "",
        }
        if pr_number is not None:
            response["pullRequestUrl"] = f"{web_url}/discussions/{pr_number}"
        self._send_json(response)

    # Downloads.

    def _resolve(self, match: re.Match[str]) -> None:
        """Serve ``/{repo}/resolve/{rev}/{path}`` as the Hub does.

        Regular files come back directly with their git blob sha1 as ETag. LFS files get a 302 to a
        signed storage URL, carrying ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``, because
        the client reads the metadata from the redirect response when it leaves the Hub's origin.
        """
        repo_type = REPO_TYPE_PLURALS.get(match["plural"] or "models", "model")
        repo_id = f"{unquote(match['namespace'])}/{unquote(match['name'])}"
        path = unquote(match["path"])
        state = self.server.state
        user = self._user()
        with state.lock:
            repo = state.readable_repo(repo_type, repo_id, user)
            if repo.gated and user != repo.namespace:
                status = 401 if user is None else 403
                raise HubError(status, f"Access to {repo_id} is restricted.", error_code="GatedRepo")
            commit = state.resolve(repo, unquote(match["revision"]))
            entry = commit.files.get(path)
        if entry is None:
            raise _entry_not_found(path, commit.oid)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.etag}"', "Accept-Ranges": "bytes"}
        if not entry.is_lfs:
            return self._send_object(entry.sha256, headers)
        headers.update(
            {
                "Location": state.signed_storage_url("GET", entry.sha256, repo.key),
                "X-Linked-Etag": f'"{entry.sha256}"',
                "X-Linked-Size": str(entry.size),
            }
        )
        self._send_bytes(b"", status=302, headers=headers)

    def _send_object(self, sha256: str, headers: Mapping[str, str]) -> None:
        """Send a stored object, or the byte range that the ``Range`` header requests."""
        object_path = self.server.state.store.path(sha256)
        size = object_path.stat().st_size
        byte_range = _parse_range(self.headers.get("Range"), size)
        status, start, end = 200, 0, size
        response_headers = dict(headers)
        if byte_range is not None:
            status, (start, end) = 206, byte_range
            response_headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self._start_response(status, end - start, "application/octet-stream", response_headers)
        if self.command == "HEAD":
            return
        with object_path.open("rb") as source:
            source.seek(start)
            _copy_bytes(source, self.wfile, end - start)


_RouteHandler = Callable[[_HubRequestHandler, str, str, str], None]

_API_ROUTES: dict[tuple[str, str | None], _RouteHandler] = {
    ("GET", None): _HubRequestHandler._repo_info,
    ("GET", "revision"): _HubRequestHandler._repo_info,
    ("GET", "tree"): _HubRequestHandler._tree,
    ("POST", "paths-info"): _HubRequestHandler._paths_info,
    ("GET", "refs"): _HubRequestHandler._refs,
    ("GET", "commits"): _HubRequestHandler._commits,
    ("POST", "branch"): _HubRequestHandler._branch,
    ("DELETE", "branch"): _HubRequestHandler._branch,
    ("POST", "preupload"): _HubRequestHandler._preupload,
    ("POST", "commit"): _HubRequestHandler._commit,
    ("PUT", "settings"): _HubRequestHandler._repo_settings,
}


def _parse_commit_body(body: bytes) -> _CommitRequest:
    """Parse the NDJSON commit body: a ``header`` line, then one line per operation."""
    try:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise _bad_request(f"Commit body is not valid NDJSON: {error}") from error
    if not lines or lines[0].get("key") != "header":
        raise _bad_request("Commit body must start with a 'header' line")
    header = lines[0].get("value", {})
    return _CommitRequest(
        title=str(header.get("summary", "")),
        message=str(header.get("description", "")),
        parent_commit=header.get("parentCommit"),
        operations=[(str(line.get("key")), dict(line.get("value", {}))) for line in lines[1:]],
    )


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Return the ``[start, end)`` of a single-range ``Range`` header, None to send everything.

    Raises 416 for an unsatisfiable range. A multi-range header is ignored, which HTTP allows.
    """
    if not header:
        return None
    match = _BYTE_RANGE.match(header.strip())
    if match is None:
        return None
    if match["start"]:
        start = int(match["start"])
        end = min(int(match["end"]) + 1, size) if match["end"] else size
    elif match["end"]:
        start, end = max(size - int(match["end"]), 0), size
    else:
        return None
    if start >= size or start >= end:
        raise HubError(416, f"Range {header} is not satisfiable for {size} bytes",
                       headers={"Content-Range": f"bytes */{size}"})
    return start, end


def _copy_bytes(source: BinaryIO, destination: BinaryIO, length: int) -> None:
    remaining = length
    while remaining > 0:
        chunk = source.read(min(remaining, COPY_CHUNK_BYTES))
        if not chunk:
            break
        destination.write(chunk)
        remaining -= len(chunk)


def _lfs_patterns(store: ObjectStore, gitattributes: RepoFileEntry | None) -> list[str]:
    """Return the patterns that a .gitattributes file marks with ``filter=lfs``."""
    if gitattributes is None:
        return []
    text = store.path(gitattributes.sha256).read_text(errors="replace")
    patterns = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 1 and not fields[0].startswith("#") and "filter=lfs" in fields[1:]:
            patterns.append(fields[0])
    return patterns


def _matches_any(path: str, patterns: list[str]) -> bool:
    """Match a path against .gitattributes patterns.

    NOTE: fnmatch approximates git's wildmatch: a pattern without a slash is matched against the
    file name, one with a slash against the whole path, and ``*`` also crosses slashes there.
    """
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path if "/" in pattern else name, pattern) for pattern in patterns)


def _file_payload(path: str, entry: RepoFileEntry) -> dict[str, Any]:
    """Return a file entry in the form of the tree and paths-info endpoints."""
    payload: dict[str, Any] = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": path}
    if entry.is_lfs:
        payload["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return payload


def _folder_payload(path: str, files: Mapping[str, RepoFileEntry]) -> dict[str, Any]:
    """Return a folder entry whose oid is a sha1 over the files below it, not a real git tree id."""
    below = sorted((name, entry.blob_id) for name, entry in files.items() if name.startswith(path + "/"))
    oid = hashlib.sha1(json.dumps(below).encode()).hexdigest()
    return {"type": "directory", "oid": oid, "size": 0, "path": path}


def _list_tree(files: Mapping[str, RepoFileEntry], base: str, recursive: bool) -> list[dict[str, Any]] | None:
    """Return the tree listing of folder ``base`` ("" for the root), or None if it is no folder.

    NOTE: the listing is never paginated. The Hub sends at most 1000 entries per page with a
    ``Link`` header, which the client follows, so large trees take one response here.
    """
    prefix = f"{base}/" if base else ""
    folders: set[str] = set()
    file_entries = []
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        depth = len(parts) - 1 if recursive else min(len(parts) - 1, 1)
        folders.update(prefix + "/".join(parts[: index + 1]) for index in range(depth))
        if recursive or len(parts) == 1:
            file_entries.append(_file_payload(path, files[path]))
    if base and not file_entries and not folders:
        return None
    return [_folder_payload(folder, files) for folder in sorted(folders)] + file_entries


def _repo_info_payload(repo: RepoRecord, commit: CommitRecord, with_blobs: bool) -> dict[str, Any]:
    """Return the ``/api/{type}s/{id}`` response for ``commit``, with blob details if requested."""
    siblings = []
    for path, entry in sorted(commit.files.items()):
        sibling: dict[str, Any] = {"rfilename": path}
        if with_blobs:
            sibling.update({"size": entry.size, "blobId": entry.blob_id})
            if entry.is_lfs:
                sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
        siblings.append(sibling)
    return {
        "_id": hashlib.sha1(repo.key.encode()).hexdigest()[:24],
        "id": repo.repo_id,
        "author": repo.namespace,
        "sha": commit.oid,
        "lastModified": _format_date(commit.date),
        "createdAt": _format_date(repo.created_at),
        "private": repo.private,
        "gated": "auto" if repo.gated else False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
        "usedStorage": sum(entry.size for entry in commit.files.values()),
    }


class HubServer:
    """A Hub-protocol server on 127.0.0.1 whose repositories live under ``root``.

    Use :meth:`start` and :meth:`stop`, or the instance as a context manager. :attr:`url` is the
    value for ``endpoint=``. Requests handled by both listeners are kept in :attr:`requests`, so
    a test can check which protocol path the client took.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.state = HubState(self.root)
        self._listeners: list[_Listener] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> HubServer:
        """Start both listeners on free ports and return self."""
        if self._listeners:
            raise RuntimeError("HubServer is already running. Call stop() before start().")
        hub = _Listener("hub", self.state)
        storage = _Listener("storage", self.state)
        self.state.hub_url, self.state.storage_url = hub.url, storage.url
        for listener in (hub, storage):
            thread = threading.Thread(
                target=listener.serve_forever,
                kwargs={"poll_interval": SHUTDOWN_POLL_INTERVAL_S},
                name=f"hub-server-{listener.role}",
                daemon=True,
            )
            thread.start()
            self._listeners.append(listener)
            self._threads.append(thread)
        logger.info("Test Hub server started at %s (storage at %s)", hub.url, storage.url)
        return self

    def stop(self) -> None:
        """Stop both listeners and close kept-alive connections. Calling it twice is harmless."""
        for listener in self._listeners:
            listener.shutdown()
            listener.close_connections()
            listener.server_close()
        for thread in self._threads:
            thread.join(timeout=10)
        if self._listeners:
            logger.info("Test Hub server at %s stopped", self.state.hub_url)
        self._listeners, self._threads = [], []

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The Hub endpoint, ``http://127.0.0.1:<port>``."""
        if not self.state.hub_url:
            raise RuntimeError("HubServer has not been started.")
        return self.state.hub_url

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the requests handled so far, oldest first."""
        with self.state.lock:
            return list(self.state.requests)

    def add_token(self, token: str, user: str, *, write: bool = True) -> None:
        """Accept ``token`` as ``user``, who owns the namespace of the same name."""
        with self.state.lock:
            self.state.tokens[token] = TokenInfo(user=user, can_write=write)

    def set_gated(self, repo_id: str, gated: bool = True, repo_type: str = "model") -> None:
        """Gate downloads of a repository: only its owner may then resolve files."""
        with self.state.lock:
            self.state.repos[(repo_type, repo_id)].gated = gated


def hub_client_env(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    """Point huggingface_hub at a private cache under ``home`` and switch off Xet and telemetry.

    Patches the module constants for this process and sets the environment variables for
    subprocesses. No token is picked up from the user's environment or token file. Returns the
    hub cache folder to pass as ``cache_dir``.
    """
    from huggingface_hub import constants

    cache = home / "hub"
    settings = {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "HF_HUB_OFFLINE": "0",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


@contextmanager
def running_hub_server(root: Path) -> Iterator[HubServer]:
    """Run a :class:`HubServer` with the users ``alice`` and ``bob`` for the duration of the block."""
    server = HubServer(root)
    server.add_token(ALICE_TOKEN, "alice")
    server.add_token(BOB_TOKEN, "bob")
    with server:
        yield server


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """Start a test Hub server and point huggingface_hub's cache and settings at ``tmp_path``.

    Import it into a ``conftest.py`` to share it: ``from hub_server import hub_server``.
    """
    hub_client_env(monkeypatch, tmp_path / "hf_home")
    with running_hub_server(tmp_path / "hub_server") as server:
        yield server
