"""End-to-end tests of the test Hub server, driven only through the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    HfFileSystem,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub_server import ALICE_TOKEN, BOB_TOKEN, HubServer, RecordedRequest, hub_server  # noqa: F401 - fixture

REPO_ID = "alice/demo"
BINARY_SIZE = 6 * 1024 * 1024


@pytest.fixture
def api(hub_server: HubServer) -> HfApi:
    """Return a client authenticated as alice, with ``alice/demo`` created."""
    client = HfApi(endpoint=hub_server.url, token=ALICE_TOKEN)
    client.create_repo(REPO_ID)
    return client


@pytest.fixture
def cache_dir(hub_server: HubServer, tmp_path: Path) -> Path:
    """Return the hub cache folder that the ``hub_server`` fixture points the client at."""
    return tmp_path / "hf_home" / "hub"


def _download(
    server: HubServer,
    cache_dir: Path,
    filename: str,
    *,
    repo_id: str = REPO_ID,
    revision: str | None = None,
    token: str | bool = ALICE_TOKEN,
) -> bytes:
    path = hf_hub_download(
        repo_id, filename, revision=revision, endpoint=server.url, token=token, cache_dir=cache_dir
    )
    return Path(path).read_bytes()


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _requests_since(server: HubServer, count: int) -> list[RecordedRequest]:
    return server.requests[count:]


def test_whoami_returns_token_user(hub_server: HubServer) -> None:
    assert HfApi(endpoint=hub_server.url, token=ALICE_TOKEN).whoami()["name"] == "alice"

    with pytest.raises(HfHubHTTPError) as error:
        HfApi(endpoint=hub_server.url, token="hf_unknown").whoami()
    assert error.value.response.status_code == 401


def test_create_repo_conflict_and_exist_ok(api: HfApi) -> None:
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo(REPO_ID)
    assert error.value.response.status_code == 409

    url = api.create_repo(REPO_ID, exist_ok=True)
    assert url.repo_id == REPO_ID
    assert api.list_repo_files(REPO_ID) == [".gitattributes"]


def test_create_repo_in_other_namespace_is_forbidden(api: HfApi) -> None:
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo("bob/stolen")
    assert error.value.response.status_code == 403


def test_small_text_round_trip(hub_server: HubServer, api: HfApi, cache_dir: Path) -> None:
    content = "déjà vu\nline two\n".encode()
    api.upload_file(path_or_fileobj=content, path_in_repo="notes/hello.txt", repo_id=REPO_ID)

    storage_requests = [request for request in hub_server.requests if request.listener == "storage"]
    assert storage_requests == []
    (info,) = api.get_paths_info(REPO_ID, ["notes/hello.txt"])
    assert info.lfs is None
    assert info.blob_id == _git_blob_sha1(content)

    path = hf_hub_download(REPO_ID, "notes/hello.txt", endpoint=hub_server.url, token=ALICE_TOKEN, cache_dir=cache_dir)
    assert Path(path).read_bytes() == content
    # The cache names blobs after the ETag, which is the git blob sha1 for regular files.
    assert Path(path).resolve().name == _git_blob_sha1(content)


# weights.bin goes to LFS through the default .gitattributes, payload.dat through its NUL bytes.
@pytest.mark.parametrize("path_in_repo", ["weights.bin", "raw/payload.dat"])
def test_binary_round_trip_goes_through_lfs(
    hub_server: HubServer, api: HfApi, cache_dir: Path, tmp_path: Path, path_in_repo: str
) -> None:
    header = b"\0\1binary"
    content = header + random.Random(0).randbytes(BINARY_SIZE - len(header))
    sha256 = hashlib.sha256(content).hexdigest()
    local_file = tmp_path / "upload.tmp"
    local_file.write_bytes(content)
    before = len(hub_server.requests)

    api.upload_file(path_or_fileobj=local_file, path_in_repo=path_in_repo, repo_id=REPO_ID)

    upload_requests = [(r.listener, r.method, r.path) for r in _requests_since(hub_server, before)]
    assert ("hub", "POST", "/alice/demo.git/info/lfs/objects/batch") in upload_requests
    assert ("storage", "PUT", f"/lfs/{sha256}") in upload_requests
    assert ("hub", "POST", "/alice/demo.git/info/lfs/objects/verify") in upload_requests
    (info,) = api.get_paths_info(REPO_ID, [path_in_repo])
    assert info.lfs is not None
    assert info.lfs.sha256 == sha256
    assert info.size == BINARY_SIZE

    before = len(hub_server.requests)
    path = hf_hub_download(REPO_ID, path_in_repo, endpoint=hub_server.url, token=ALICE_TOKEN, cache_dir=cache_dir)
    assert Path(path).read_bytes() == content
    assert Path(path).resolve().name == sha256
    storage_gets = [r for r in _requests_since(hub_server, before) if r.listener == "storage"]
    assert [(r.method, r.path) for r in storage_gets] == [("GET", f"/lfs/{sha256}")]
    # Like the real CDN, the storage listener is another origin, so the client drops the token.
    assert not storage_gets[0].authenticated


def test_pinned_commit_served_after_later_push(hub_server: HubServer, api: HfApi, cache_dir: Path) -> None:
    first = api.upload_file(path_or_fileobj=b"version 1\n", path_in_repo="model.txt", repo_id=REPO_ID)
    api.upload_file(path_or_fileobj=b"version 2\n", path_in_repo="model.txt", repo_id=REPO_ID)
    api.upload_file(path_or_fileobj=b"later\n", path_in_repo="added_later.txt", repo_id=REPO_ID)

    assert _download(hub_server, cache_dir, "model.txt", revision=first.oid) == b"version 1\n"
    assert _download(hub_server, cache_dir, "model.txt") == b"version 2\n"
    assert "added_later.txt" not in api.list_repo_files(REPO_ID, revision=first.oid)
    assert api.model_info(REPO_ID, revision=first.oid).sha == first.oid

    snapshot = Path(
        snapshot_download(
            REPO_ID, revision=first.oid, endpoint=hub_server.url, token=ALICE_TOKEN, cache_dir=cache_dir
        )
    )
    assert snapshot.name == first.oid
    assert (snapshot / "model.txt").read_bytes() == b"version 1\n"
    assert not (snapshot / "added_later.txt").exists()


def test_private_repo_rejects_anonymous_and_other_users(hub_server: HubServer, cache_dir: Path) -> None:
    owner = HfApi(endpoint=hub_server.url, token=ALICE_TOKEN)
    owner.create_repo("alice/secret", private=True)
    owner.upload_file(path_or_fileobj=b"classified\n", path_in_repo="secret.txt", repo_id="alice/secret")

    with pytest.raises(RepositoryNotFoundError) as anonymous:
        _download(hub_server, cache_dir, "secret.txt", repo_id="alice/secret", token=False)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as other_user:
        _download(hub_server, cache_dir, "secret.txt", repo_id="alice/secret", token=BOB_TOKEN)
    assert other_user.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_server.url, token=False).model_info("alice/secret")

    assert owner.model_info("alice/secret").private is True
    assert _download(hub_server, cache_dir, "secret.txt", repo_id="alice/secret") == b"classified\n"


def test_missing_revision_raises_revision_not_found(hub_server: HubServer, api: HfApi, cache_dir: Path) -> None:
    with pytest.raises(RevisionNotFoundError):
        _download(hub_server, cache_dir, ".gitattributes", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO_ID, revision="0" * 40)


def test_missing_file_raises_entry_not_found(hub_server: HubServer, api: HfApi, cache_dir: Path) -> None:
    with pytest.raises(EntryNotFoundError):
        _download(hub_server, cache_dir, "missing.txt")
    assert api.file_exists(REPO_ID, "missing.txt") is False
    assert api.file_exists(REPO_ID, ".gitattributes") is True


def test_missing_repo_raises_repository_not_found(hub_server: HubServer, cache_dir: Path) -> None:
    client = HfApi(endpoint=hub_server.url, token=ALICE_TOKEN)
    with pytest.raises(RepositoryNotFoundError):
        _download(hub_server, cache_dir, "config.json", repo_id="alice/absent")
    with pytest.raises(RepositoryNotFoundError):
        client.model_info("alice/absent")
    assert client.repo_exists("alice/absent") is False


def test_offline_mode_serves_pinned_revision_from_cache(
    hub_server: HubServer, api: HfApi, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = api.upload_file(path_or_fileobj=b"cached\n", path_in_repo="cached.txt", repo_id=REPO_ID)
    api.upload_file(path_or_fileobj=b"never fetched\n", path_in_repo="uncached.txt", repo_id=REPO_ID)
    snapshot_download(
        REPO_ID, revision=commit.oid, endpoint=hub_server.url, token=ALICE_TOKEN, cache_dir=cache_dir
    )
    before = len(hub_server.requests)

    # huggingface_hub 2.4.0 reads HF_HUB_OFFLINE once at import, but is_offline_mode() reads the constant.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    assert _download(hub_server, cache_dir, "cached.txt", revision=commit.oid) == b"cached\n"
    snapshot = snapshot_download(
        REPO_ID, revision=commit.oid, endpoint=hub_server.url, token=ALICE_TOKEN, cache_dir=cache_dir
    )
    assert (Path(snapshot) / "cached.txt").read_bytes() == b"cached\n"
    with pytest.raises(LocalEntryNotFoundError):
        _download(hub_server, cache_dir, "uncached.txt")
    assert _requests_since(hub_server, before) == []


def test_offline_env_variable_in_fresh_process(hub_server: HubServer, api: HfApi, cache_dir: Path) -> None:
    commit = api.upload_file(path_or_fileobj=b"cached\n", path_in_repo="cached.txt", repo_id=REPO_ID)
    _download(hub_server, cache_dir, "cached.txt", revision=commit.oid)
    before = len(hub_server.requests)
    script = textwrap.dedent(
        f"""
        from huggingface_hub import constants, hf_hub_download
        assert constants.HF_HUB_OFFLINE
        print(hf_hub_download({REPO_ID!r}, "cached.txt", revision={commit.oid!r},
                              endpoint={hub_server.url!r}, cache_dir={str(cache_dir)!r}))
        """
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}

    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == b"cached\n"
    assert _requests_since(hub_server, before) == []


def test_upload_folder_into_subfolder_keeps_root_files(
    hub_server: HubServer, api: HfApi, cache_dir: Path, tmp_path: Path
) -> None:
    api.upload_file(path_or_fileobj=b'{"hidden": 8}\n', path_in_repo="config.json", repo_id=REPO_ID)
    api.upload_file(path_or_fileobj=b"---\nlicense: mit\n---\n# Demo\n", path_in_repo="README.md", repo_id=REPO_ID)
    root_before = {info.path: info.blob_id for info in api.get_paths_info(REPO_ID, ["config.json", "README.md"])}
    folder = tmp_path / "adapter"
    (folder / "nested").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 4}\n')
    (folder / "nested" / "notes.txt").write_text("nested\n")

    api.upload_folder(folder_path=folder, path_in_repo="adapter", repo_id=REPO_ID)

    assert sorted(api.list_repo_files(REPO_ID)) == [
        ".gitattributes",
        "README.md",
        "adapter/adapter_config.json",
        "adapter/nested/notes.txt",
        "config.json",
    ]
    root_after = {info.path: info.blob_id for info in api.get_paths_info(REPO_ID, ["config.json", "README.md"])}
    assert root_after == root_before
    assert _download(hub_server, cache_dir, "config.json") == b'{"hidden": 8}\n'
    listing = {(entry.path, type(entry).__name__) for entry in api.list_repo_tree(REPO_ID, path_in_repo="adapter")}
    assert listing == {("adapter/adapter_config.json", "RepoFile"), ("adapter/nested", "RepoFolder")}


def test_branch_commit_leaves_main_untouched(hub_server: HubServer, api: HfApi, cache_dir: Path) -> None:
    api.create_branch(REPO_ID, branch="dev")
    with pytest.raises(HfHubHTTPError) as error:
        api.create_branch(REPO_ID, branch="dev")
    assert error.value.response.status_code == 409
    api.create_branch(REPO_ID, branch="dev", exist_ok=True)

    api.upload_file(path_or_fileobj=b"dev only\n", path_in_repo="dev.txt", repo_id=REPO_ID, revision="dev")

    assert _download(hub_server, cache_dir, "dev.txt", revision="dev") == b"dev only\n"
    assert "dev.txt" not in api.list_repo_files(REPO_ID)
    branches = {ref.name for ref in api.list_repo_refs(REPO_ID).branches}
    assert branches == {"main", "dev"}


def test_create_pr_commit_opens_pr_ref(hub_server: HubServer, api: HfApi, cache_dir: Path) -> None:
    main_before = api.model_info(REPO_ID).sha
    operation = CommitOperationAdd(path_in_repo="proposal.txt", path_or_fileobj=b"proposal\n")

    commit = api.create_commit(REPO_ID, operations=[operation], commit_message="Propose", create_pr=True)

    assert commit.pr_revision == "refs/pr/1"
    assert commit.pr_num == 1
    assert api.model_info(REPO_ID).sha == main_before
    assert _download(hub_server, cache_dir, "proposal.txt", revision="refs/pr/1") == b"proposal\n"
    pull_requests = api.list_repo_refs(REPO_ID, include_pull_requests=True).pull_requests
    assert pull_requests is not None
    assert [(ref.ref, ref.target_commit) for ref in pull_requests] == [("refs/pr/1", commit.oid)]


def test_stale_parent_commit_is_rejected(api: HfApi) -> None:
    first = api.upload_file(path_or_fileobj=b"one\n", path_in_repo="a.txt", repo_id=REPO_ID)
    second = api.upload_file(path_or_fileobj=b"two\n", path_in_repo="a.txt", repo_id=REPO_ID)
    operation = CommitOperationAdd(path_in_repo="b.txt", path_or_fileobj=b"b\n")

    with pytest.raises(HfHubHTTPError) as error:
        api.create_commit(REPO_ID, operations=[operation], commit_message="stale", parent_commit=first.oid)
    assert error.value.response.status_code == 412

    fresh = CommitOperationAdd(path_in_repo="b.txt", path_or_fileobj=b"b\n")
    commit = api.create_commit(REPO_ID, operations=[fresh], commit_message="fresh", parent_commit=second.oid)
    assert api.model_info(REPO_ID).sha == commit.oid


def test_writes_need_owner_write_token(hub_server: HubServer, api: HfApi) -> None:
    hub_server.add_token("hf_test_alice_read", "alice", write=False)
    clients = {
        "anonymous": HfApi(endpoint=hub_server.url, token=False),
        "other user": HfApi(endpoint=hub_server.url, token=BOB_TOKEN),
        "read token": HfApi(endpoint=hub_server.url, token="hf_test_alice_read"),
    }
    expected_status = {"anonymous": 401, "other user": 403, "read token": 403}

    for name, client in clients.items():
        with pytest.raises(HfHubHTTPError) as error:
            client.upload_file(path_or_fileobj=b"x\n", path_in_repo="x.txt", repo_id=REPO_ID)
        assert error.value.response.status_code == expected_status[name], name
    assert "x.txt" not in api.list_repo_files(REPO_ID)


def test_gated_repo_raises_gated_error(hub_server: HubServer, api: HfApi, cache_dir: Path) -> None:
    api.upload_file(path_or_fileobj=b"gated\n", path_in_repo="g.txt", repo_id=REPO_ID)
    api.update_repo_settings(REPO_ID, gated="auto")

    with pytest.raises(GatedRepoError):
        _download(hub_server, cache_dir, "g.txt", token=BOB_TOKEN)
    with pytest.raises(GatedRepoError):
        _download(hub_server, cache_dir, "g.txt", token=False)
    assert _download(hub_server, cache_dir, "g.txt") == b"gated\n"


def test_delete_file_keeps_history(hub_server: HubServer, api: HfApi, cache_dir: Path) -> None:
    added = api.upload_file(path_or_fileobj=b"short-lived\n", path_in_repo="tmp.txt", repo_id=REPO_ID)
    api.delete_file("tmp.txt", repo_id=REPO_ID, commit_message="Remove tmp.txt")

    assert "tmp.txt" not in api.list_repo_files(REPO_ID)
    assert _download(hub_server, cache_dir, "tmp.txt", revision=added.oid) == b"short-lived\n"
    titles = [commit.title for commit in api.list_repo_commits(REPO_ID)]
    assert titles == ["Remove tmp.txt", "Upload tmp.txt with huggingface_hub", "initial commit"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("tmp.txt", repo_id=REPO_ID)


def test_delete_repo(api: HfApi) -> None:
    api.delete_repo(REPO_ID)

    assert api.repo_exists(REPO_ID) is False
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(REPO_ID)
    api.delete_repo(REPO_ID, missing_ok=True)


def test_dataset_repo_round_trip(hub_server: HubServer, cache_dir: Path) -> None:
    client = HfApi(endpoint=hub_server.url, token=ALICE_TOKEN)
    client.create_repo("alice/table", repo_type="dataset")
    client.upload_file(
        path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data.csv", repo_id="alice/table", repo_type="dataset"
    )

    path = hf_hub_download(
        "alice/table", "data.csv", repo_type="dataset", endpoint=hub_server.url, token=ALICE_TOKEN, cache_dir=cache_dir
    )

    assert Path(path).read_bytes() == b"a,b\n1,2\n"
    with pytest.raises(RepositoryNotFoundError):
        client.model_info("alice/table")


def test_file_system_range_reads(hub_server: HubServer, api: HfApi) -> None:
    content = random.Random(1).randbytes(BINARY_SIZE)
    api.upload_file(path_or_fileobj=content, path_in_repo="shard.bin", repo_id=REPO_ID)
    file_system = HfFileSystem(endpoint=hub_server.url, token=ALICE_TOKEN)
    before = len(hub_server.requests)

    with file_system.open(f"{REPO_ID}/shard.bin", "rb") as handle:
        handle.seek(BINARY_SIZE - 100)
        tail = handle.read()

    assert tail == content[-100:]
    storage_ranges = [r.byte_range for r in _requests_since(hub_server, before) if r.listener == "storage"]
    assert storage_ranges
    assert all(byte_range is not None for byte_range in storage_ranges)
