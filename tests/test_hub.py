"""Pushing and pulling sidecars through the real huggingface_hub client against the test Hub server."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants, snapshot_download

from hf_sidecar.card import sidecar_card
from hf_sidecar.cli import main
from hf_sidecar.edit import REVOCATION_CONFIG_KEY, revoke_checkpoint, revoke_state_dict
from hf_sidecar.hub import (
    ROOT_SECTION_BEGIN,
    PublicRepositoryWarning,
    SidecarHubError,
    default_subfolder,
    hub_checkpoint_matches,
    pull_sidecar,
)
from hf_sidecar.sidecar import SIDECAR_FILES, TENSORS_FILE, Sidecar, SidecarMismatchError

from hub_server import ALICE_TOKEN, BOB_TOKEN, HubServer, hub_server  # noqa: F401 - fixture

REPO = "alice/model"
FOLDER = "sidecars/authors"
ROOT_README = "---\nlicense: mit\n---\n\n# My adapter\n\nWritten by its owner; hf-sidecar must keep this text.\n"


@pytest.fixture(scope="module")
def built(setup, dense_run, tmp_path_factory):
    """A small run's theta_AMS folder, its sidecar 'authors', a second sidecar and a LoRA adapter folder."""
    import shutil

    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("hub-run")
    shutil.copytree(dense_run.folder / "theta_AMS", folder / "theta_AMS")
    sidecar, theta_ams = dense_run.sidecar, dense_run.theta_ams
    sidecar.save_pretrained(folder / "sidecar")
    config = copy.deepcopy(sidecar.config)
    config["memory"] = "publishers"
    second = Sidecar(sidecar.delta, sidecar.transport, config, sidecar.process)

    adapter = get_peft_model(setup.model(seed=6), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    adapter.save_pretrained(folder / "adapter")
    (folder / "adapter" / "README.md").write_text(ROOT_README)
    return SimpleNamespace(sidecar=sidecar, second=second, theta_ams=theta_ams, folder=folder)


@pytest.fixture
def api(hub_server: HubServer) -> HfApi:
    return HfApi(endpoint=hub_server.url, token=ALICE_TOKEN)


def _push(server: HubServer, sidecar: Sidecar, repo_id: str = REPO, **options):
    options.setdefault("token", ALICE_TOKEN)
    return sidecar.push_to_hub(repo_id, endpoint=server.url, **options)


def _load(server: HubServer, repo_id: str = REPO, **options) -> Sidecar:
    options.setdefault("token", ALICE_TOKEN)
    return Sidecar.from_pretrained(repo_id, endpoint=server.url, **options)


def _read(api: HfApi, path: str, revision: str | None = None) -> bytes:
    return Path(api.hf_hub_download(REPO, path, revision=revision)).read_bytes()


def _cache_blob(folder: Path, name: str) -> Path:
    return Path(os.path.realpath(folder / name))


# ------------------------------------------------------------------------------------------------
# Round trips and layout


def test_round_trip_is_byte_identical(hub_server, api, built, tmp_path):
    commit = _push(hub_server, built.sidecar)
    pulled = pull_sidecar(REPO, endpoint=hub_server.url, token=ALICE_TOKEN)
    expected = tmp_path / "expected"
    built.sidecar.save_pretrained(expected, card=sidecar_card(built.sidecar, repo_id=REPO, subfolder=FOLDER))

    assert default_subfolder("authors") == FOLDER
    for name in SIDECAR_FILES:
        assert (pulled.folder / name).read_bytes() == (expected / name).read_bytes(), name
    assert pulled.sidecar.source == {"repo_id": REPO, "revision": "main", "commit": commit.oid, "subfolder": FOLDER}
    first = revoke_state_dict(built.theta_ams, built.sidecar, lam=0.5, gamma=1.5)
    second = revoke_state_dict(built.theta_ams, pulled.sidecar, lam=0.5, gamma=1.5)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert api.model_info(REPO).private is True


def test_two_sidecars_and_adapter_coexist(hub_server, api, built):
    api.create_repo(REPO, private=True)
    api.upload_folder(folder_path=built.folder / "adapter", repo_id=REPO)
    adapter_files = sorted(path.name for path in (built.folder / "adapter").iterdir())
    before = {name: _read(api, name) for name in adapter_files}

    _push(hub_server, built.sidecar)
    _push(hub_server, built.second)

    files = set(api.list_repo_files(REPO))
    for memory in ("authors", "publishers"):
        assert {f"sidecars/{memory}/{name}" for name in SIDECAR_FILES} <= files
    assert files - {".gitattributes"} == {f"sidecars/{m}/{n}" for m in ("authors", "publishers") for n in SIDECAR_FILES} | set(adapter_files)
    for name in adapter_files:
        if name != "README.md":
            assert _read(api, name) == before[name], name
    assert _load(hub_server, subfolder="sidecars/publishers").memory == "publishers"
    assert _load(hub_server, subfolder=FOLDER).memory == "authors"
    with pytest.raises(SidecarHubError, match=r"contains 2 sidecars \('sidecars/authors', 'sidecars/publishers'\)\. Pass subfolder="):
        _load(hub_server)


def test_root_readme_survives_pushes(hub_server, api, built):
    api.create_repo(REPO, private=True)
    api.upload_file(path_or_fileobj=ROOT_README.encode(), path_in_repo="README.md", repo_id=REPO)

    _push(hub_server, built.sidecar)
    after_first = _read(api, "README.md").decode()
    _push(hub_server, built.sidecar)
    after_repeat = _read(api, "README.md").decode()
    _push(hub_server, built.second, update_root_card=False)
    after_no_card = _read(api, "README.md").decode()
    _push(hub_server, built.second)
    after_second = _read(api, "README.md").decode()

    assert after_first.startswith(ROOT_README)
    assert after_first.count(ROOT_SECTION_BEGIN) == 1
    assert f"[`{FOLDER}`]({FOLDER}/README.md)" in after_first
    assert after_repeat == after_first
    assert after_no_card == after_first
    assert after_second.startswith(ROOT_README)
    assert after_second.count("[`sidecars/publishers`]") == 1
    assert after_second.count(f"[`{FOLDER}`]") == 1
    assert ModelCard(after_second).data.license == "mit"


def test_sidecar_card_metadata(hub_server, api, built):
    sidecar = Sidecar(built.sidecar.delta, built.sidecar.transport, copy.deepcopy(built.sidecar.config), built.sidecar.process)
    sidecar.config["metrics"] = {"heldout_closure": {"task_arithmetic": 0.5, "sidecar_2d": 0.75}}
    sidecar.config["recommended"] = {"lam": 1.25, "gamma": 0.75, "rule": "validation_closure"}
    sidecar.config["checkpoint"]["base_model"] = "alice/base-checkpoint"
    _push(hub_server, sidecar)

    card = ModelCard(_read(api, f"{FOLDER}/README.md").decode())

    assert card.data.library_name == "hf-sidecar"
    assert set(card.data.tags) >= {"process-sidecar", "unlearning", "revocation"}
    assert card.data.base_model == "alice/base-checkpoint"
    results = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert results == {"Held-out refusal closure (sidecar_2d)": 0.75, "Held-out refusal closure (task_arithmetic)": 0.5}
    assert "lam = 1.25, gamma = 0.75" in card.text
    assert f'Sidecar.from_pretrained("{REPO}", subfolder="{FOLDER}")' in card.text
    assert "as sensitive as" in card.text
    assert "Revoking at load time is not deletion" in card.text
    assert "TOFU" in card.text


def test_pinned_revision_survives_later_push(hub_server, built):
    first = _push(hub_server, built.sidecar)
    changed = Sidecar(built.sidecar.delta, built.sidecar.transport, copy.deepcopy(built.sidecar.config), built.sidecar.process)
    changed.config["recommended"] = {"lam": 0.5, "gamma": 0.25, "rule": "validation_closure"}
    second = _push(hub_server, changed)

    pinned = _load(hub_server, revision=first.oid)
    latest = _load(hub_server)

    assert pinned.recommended == (1.0, 1.0)
    assert pinned.source["commit"] == first.oid
    assert latest.recommended == (0.5, 0.25)
    assert latest.source["commit"] == second.oid


def test_push_to_branch_and_pull_request(hub_server, api, built):
    _push(hub_server, built.sidecar, revision="dev")
    proposal = _push(hub_server, built.second, create_pr=True)

    assert _load(hub_server, revision="dev").source["revision"] == "dev"
    assert not any(path.startswith("sidecars/") for path in api.list_repo_files(REPO))
    assert proposal.pr_revision == "refs/pr/1"
    assert _load(hub_server, revision="refs/pr/1").memory == "publishers"


# ------------------------------------------------------------------------------------------------
# Privacy


def test_private_repo_rejects_other_readers(hub_server, built):
    _push(hub_server, built.sidecar)

    with pytest.raises(SidecarHubError) as anonymous:
        _load(hub_server, subfolder=FOLDER, token=False)
    with pytest.raises(SidecarHubError) as other_user:
        _load(hub_server, token=BOB_TOKEN)

    assert "HTTP 401" in str(anonymous.value)
    assert f"{REPO}@main, file {FOLDER}/sidecar_config.json" in str(anonymous.value)
    assert "pass token=" in str(anonymous.value)
    assert anonymous.value.repo_id == REPO
    assert "HTTP 404" in str(other_user.value)
    assert _load(hub_server).memory == "authors"


def test_public_push_warns(hub_server, api, built):
    with pytest.warns(PublicRepositoryWarning, match=f"public repository {REPO}"):
        _push(hub_server, built.sidecar, private=False)
    assert api.model_info(REPO).private is False

    with pytest.warns(PublicRepositoryWarning):
        _push(hub_server, built.second)


def test_private_request_on_public_repo_is_rejected(hub_server, api, built):
    api.create_repo(REPO, private=False)

    with pytest.raises(SidecarHubError, match="is public, but private=True was requested"):
        _push(hub_server, built.sidecar, private=True)
    assert api.list_repo_files(REPO) == [".gitattributes"]


def test_push_without_write_token_fails(hub_server, api, built):
    api.create_repo(REPO, private=True)

    with pytest.raises(SidecarHubError, match="HTTP 403.*write token of the user or organization 'alice'"):
        _push(hub_server, built.sidecar, token=BOB_TOKEN)
    assert api.list_repo_files(REPO) == [".gitattributes"]


# ------------------------------------------------------------------------------------------------
# Layout rules


def test_push_rejects_foreign_or_root_folder(hub_server, api, built):
    api.create_repo(REPO, private=True)
    api.upload_folder(folder_path=built.folder / "adapter", path_in_repo="adapter", repo_id=REPO)

    with pytest.raises(SidecarHubError, match="Subfolder adapter of alice/model@main already contains files that are not a sidecar's"):
        _push(hub_server, built.sidecar, subfolder="adapter")
    with pytest.raises(ValueError, match="cannot be pushed to the repository root"):
        _push(hub_server, built.sidecar, subfolder="/")
    with pytest.raises(ValueError, match="Invalid subfolder '../escape'"):
        _push(hub_server, built.sidecar, subfolder="../escape")
    assert not any(path.startswith("sidecars/") or path.endswith("sidecar_config.json") for path in api.list_repo_files(REPO))


def test_default_subfolder_is_a_safe_path():
    assert default_subfolder("Jane Doe+John Roe") == "sidecars/Jane-Doe-John-Roe"
    long_name = default_subfolder("x" * 200)
    assert len(long_name.split("/")[1]) <= 64
    assert long_name == default_subfolder("x" * 200)
    assert long_name != default_subfolder("x" * 201)


# ------------------------------------------------------------------------------------------------
# Errors and integrity


def test_missing_revision_names_repo_and_revision(hub_server, built):
    _push(hub_server, built.sidecar)

    for subfolder in (None, FOLDER):
        with pytest.raises(SidecarHubError, match=f"Revision 'no-such-branch' does not exist in {REPO}") as error:
            _load(hub_server, revision="no-such-branch", subfolder=subfolder)
        assert error.value.revision == "no-such-branch"


def test_missing_file_names_file(hub_server, api, built):
    _push(hub_server, built.sidecar)
    api.delete_file(f"{FOLDER}/process.json", repo_id=REPO)

    with pytest.raises(SidecarHubError, match=f"{REPO}@main has no file {FOLDER}/process.json") as error:
        _load(hub_server)
    assert error.value.path_in_repo == f"{FOLDER}/process.json"
    with pytest.raises(SidecarHubError, match=f"{REPO}@main has no file sidecars/other/sidecar_config.json"):
        _load(hub_server, subfolder="sidecars/other")


def test_missing_repo_mentions_local_folder(hub_server):
    with pytest.raises(SidecarHubError, match="No local folder alice/absent exists.*Repository alice/absent was not found"):
        _load(hub_server, "alice/absent")


def test_repo_without_sidecar_is_reported(hub_server, api):
    api.create_repo(REPO, private=True)
    with pytest.raises(SidecarHubError, match=f"{REPO}@main contains no sidecar"):
        _load(hub_server)


def test_corrupt_cache_entry_is_detected(hub_server, built):
    commit = _push(hub_server, built.sidecar)
    pulled = pull_sidecar(REPO, revision=commit.oid, endpoint=hub_server.url, token=ALICE_TOKEN)
    blob = _cache_blob(pulled.folder, TENSORS_FILE)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))

    with pytest.raises(SidecarHubError, match=f"File {FOLDER}/{TENSORS_FILE} of {REPO}@{commit.oid} is corrupt") as error:
        _load(hub_server, revision=commit.oid)
    assert "force_download=True" in str(error.value)
    assert _load(hub_server, revision=commit.oid, force_download=True).memory == "authors"


def test_corrupt_download_is_detected(hub_server, api, built):
    _push(hub_server, built.sidecar)
    (info,) = api.get_paths_info(REPO, [f"{FOLDER}/{TENSORS_FILE}"])
    stored = hub_server.state.store.path(info.lfs.sha256)
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))

    with pytest.raises(SidecarHubError, match=f"File {FOLDER}/{TENSORS_FILE} of {REPO}@main is corrupt"):
        _load(hub_server)


def test_offline_mode_serves_cached_revisions(hub_server, built, monkeypatch):
    first = _push(hub_server, built.sidecar)
    _load(hub_server)
    later = _push(hub_server, built.second)
    requests_before = len(hub_server.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    pinned = _load(hub_server, revision=first.oid)
    branch = _load(hub_server)
    with pytest.raises(SidecarHubError, match=f"of {REPO}@{later.oid} is not in the local cache") as error:
        _load(hub_server, revision=later.oid, subfolder="sidecars/publishers")

    assert pinned.source["commit"] == first.oid
    assert branch.source["commit"] == first.oid, "offline, main resolves to the commit cached for it"
    assert "HF_HUB_OFFLINE=1" in str(error.value)
    assert hub_server.requests[requests_before:] == []


# ------------------------------------------------------------------------------------------------
# The checkpoint binding


def test_pulled_sidecar_edits_only_its_checkpoint(hub_server, api, built, setup, tmp_path):
    api.create_repo(REPO, private=True)
    api.upload_folder(folder_path=built.folder / "theta_AMS", repo_id=REPO)
    commit = _push(hub_server, built.sidecar)
    sidecar = _load(hub_server)
    checkpoint = snapshot_download(REPO, ignore_patterns=["sidecars/*"], endpoint=hub_server.url, token=ALICE_TOKEN)
    other = setup.model(seed=123)
    other.save_pretrained(tmp_path / "other")

    assert hub_checkpoint_matches(sidecar, REPO, endpoint=hub_server.url, token=ALICE_TOKEN)
    revoked = revoke_checkpoint(checkpoint, sidecar, tmp_path / "revoked", progress=False)
    recorded = json.loads((revoked / "config.json").read_text())[REVOCATION_CONFIG_KEY][0]["source"]
    assert recorded == {"repo_id": REPO, "revision": "main", "commit": commit.oid, "subfolder": FOLDER}
    with pytest.raises(SidecarMismatchError, match="content digest"):
        revoke_checkpoint(tmp_path / "other", sidecar, tmp_path / "wrong", progress=False)
    assert not (tmp_path / "wrong").exists()


# ------------------------------------------------------------------------------------------------
# Command line


@pytest.fixture
def cli_endpoint(hub_server, monkeypatch) -> str:
    """Point huggingface_hub's default endpoint at the test server, as HF_ENDPOINT would at import."""
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_server.url + "/{repo_id}/resolve/{revision}/{filename}")
    return hub_server.url


def test_cli_push_and_pull(cli_endpoint, api, built, tmp_path, capsys):
    local = built.folder / "sidecar"

    assert main(["push", str(local), REPO, "--token", ALICE_TOKEN]) == 0
    pushed = capsys.readouterr().out
    assert main(["pull", REPO, "--token", ALICE_TOKEN, "--out", str(tmp_path / "pulled")]) == 0
    pulled = capsys.readouterr().out
    assert main(["pull", REPO, "--token", ALICE_TOKEN, "--revision", "nope"]) == 2
    error = capsys.readouterr().err

    assert f"Pushed sidecar 'authors' to {REPO}, folder {FOLDER}" in pushed
    assert f"Pulled sidecar 'authors' from {REPO}, folder {FOLDER}, revision main, commit {api.model_info(REPO).sha}" in pulled
    assert pulled.strip().endswith(str(tmp_path / "pulled"))
    for name in (TENSORS_FILE, "sidecar_config.json", "process.json"):
        assert (tmp_path / "pulled" / name).read_bytes() == (local / name).read_bytes(), name
    assert (tmp_path / "pulled" / "README.md").read_bytes() == _read(api, f"{FOLDER}/README.md")
    assert "hf-sidecar pull: error: Revision 'nope' does not exist in alice/model" in error
    assert api.model_info(REPO).private is True


def test_cli_push_revoked_checkpoint(cli_endpoint, api, built, tmp_path, capsys):
    revoked = revoke_checkpoint(built.folder / "theta_AMS", built.sidecar, tmp_path / "revoked", progress=False)
    api.create_repo("alice/kept-card", private=True)
    api.upload_file(path_or_fileobj=ROOT_README.encode(), path_in_repo="README.md", repo_id="alice/kept-card")

    assert main(["push", str(revoked), "alice/revoked", "--token", ALICE_TOKEN]) == 0
    assert "deletion only once the original checkpoint" in capsys.readouterr().out
    assert main(["push", str(revoked), "alice/kept-card", "--token", ALICE_TOKEN]) == 0

    files = set(api.list_repo_files("alice/revoked"))
    assert {"model.safetensors", "config.json", "README.md"} <= files
    assert api.model_info("alice/revoked").private is True
    card = Path(api.hf_hub_download("alice/revoked", "README.md")).read_text()
    assert "| `authors` |" in card
    assert "history of every repository" in card
    assert Path(api.hf_hub_download("alice/kept-card", "README.md")).read_text() == ROOT_README
    weights = Path(api.hf_hub_download("alice/revoked", "model.safetensors")).read_bytes()
    assert weights == (revoked / "model.safetensors").read_bytes()


def test_cli_push_rejects_other_folders(cli_endpoint, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["push", str(tmp_path / "empty"), REPO, "--token", ALICE_TOKEN]) == 2
    assert "contains neither sidecar_config.json" in capsys.readouterr().err


def test_cli_pull_offline_in_fresh_process(hub_server, api, built, tmp_path):
    commit = _push(hub_server, built.sidecar)
    _load(hub_server, revision=commit.oid)
    requests_before = len(hub_server.requests)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": hub_server.url}

    result = subprocess.run(
        [sys.executable, "-m", "hf_sidecar.cli", "pull", REPO, "--revision", commit.oid, "--out", str(tmp_path / "offline")],
        env=environment, capture_output=True, text=True, timeout=120, check=False,
    )

    assert result.returncode == 0, result.stderr
    assert f"commit {commit.oid}" in result.stdout
    assert (tmp_path / "offline" / TENSORS_FILE).read_bytes() == (built.folder / "sidecar" / TENSORS_FILE).read_bytes()
    assert hub_server.requests[requests_before:] == []
