"""Building, saving, loading and applying sidecars, and how bad input is rejected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_sidecar.build import build_sidecar, memory_update
from hf_sidecar.edit import revoke_checkpoint, revoke_model_, revoke_state_dict
from hf_sidecar.io import CheckpointError, file_digests, load_checkpoint
from hf_sidecar.process import ProcessConfig, load_parameters, state_of, train
from hf_sidecar.sidecar import CONFIG_FILE, SIDECAR_FILES, TENSORS_FILE, Sidecar, SidecarError, SidecarMismatchError

SAFETY = ProcessConfig(learning_rate=1e-3, num_epochs=1, batch_size=6, max_length=64, seed=1)
MEMORY = ProcessConfig(learning_rate=3e-3, num_epochs=2, batch_size=8, max_length=64, seed=2)


@pytest.fixture(scope="module")
def run(setup, tmp_path_factory):
    """theta_A, theta_AM, theta_AMS of a small run, the safety record and its sidecar (epsilon = 1)."""
    folder = tmp_path_factory.mktemp("run")
    model = setup.model(seed=5)
    theta_a = state_of(dict(model.named_parameters()))
    train(model, "memory", MEMORY, setup.memory, progress=False)
    theta_am = state_of(dict(model.named_parameters()))
    record = train(model, "safety", SAFETY, setup.safety, progress=False)
    theta_ams = state_of(dict(model.named_parameters()))
    model.save_pretrained(folder / "theta_AMS")
    setup.tokenizer.save_pretrained(folder / "theta_AMS")
    built = build_sidecar(
        model, record, setup.safety, theta_a=theta_a, theta_am=theta_am, theta_ams=theta_ams,
        checkpoint_files=file_digests(folder / "theta_AMS"), memory="authors", progress=False, keep_endpoints=True,
    )
    load_parameters(model, theta_ams)
    return {
        "model": model, "record": record, "theta_a": theta_a, "theta_am": theta_am, "theta_ams": theta_ams,
        "sidecar": built.sidecar, "built": built, "folder": folder,
    }


def test_epsilon_one_runs_one_trace(run):
    assert len(run["built"].trace_seconds) == 1
    assert run["sidecar"].config["build"]["traces"] == 1


def test_edit_one_one_is_trace_midpoint(run):
    plus, minus = run["built"].endpoints["plus"], run["built"].endpoints["minus"]
    revoked = revoke_state_dict(run["theta_ams"], run["sidecar"], lam=1.0, gamma=1.0)

    for name in run["record"].trainable:
        midpoint = (plus[name] + minus[name]) / 2
        torch.testing.assert_close(revoked[name], midpoint, rtol=0, atol=2e-6)
    assert torch.equal(plus["model.norm.weight"], run["theta_ams"]["model.norm.weight"])


def test_gamma_zero_is_task_arithmetic(run):
    delta = memory_update(run["theta_a"], run["theta_am"])
    for lam in (0.5, 1.0, 1.5):
        revoked = revoke_state_dict(run["theta_ams"], run["sidecar"], lam=lam, gamma=0.0)
        for name, value in delta.items():
            expected = (run["theta_ams"][name].float() - lam * value.float()).to(run["theta_ams"][name].dtype)
            assert torch.equal(revoked[name], expected), name


def test_zero_coefficients_leave_weights_unchanged(run):
    revoked = revoke_state_dict(run["theta_ams"], run["sidecar"], lam=0.0, gamma=0.0)
    assert all(torch.equal(revoked[n], run["theta_ams"][n]) for n in run["theta_ams"])


def test_other_epsilon_runs_two_traces(setup, run):
    from hf_sidecar.process import run_process

    model, record = run["model"], run["record"]
    built = build_sidecar(
        model, record, setup.safety, theta_a=run["theta_a"], theta_am=run["theta_am"], theta_ams=run["theta_ams"],
        epsilon=0.5, progress=False,
    )
    delta = memory_update(run["theta_a"], run["theta_am"])
    plus = run_process(model, record, setup.safety, start_state={n: v + 0.5 * delta[n] for n, v in run["theta_a"].items()}, progress=False)
    minus = run_process(model, record, setup.safety, start_state={n: v - 0.5 * delta[n] for n, v in run["theta_a"].items()}, progress=False)
    load_parameters(model, run["theta_ams"])

    assert len(built.trace_seconds) == 2
    assert built.sidecar.config["epsilon"] == 0.5
    name = "model.layers.0.mlp.up_proj.weight"
    expected = (plus[name] - minus[name]) / (2 * 0.5) - delta[name]
    torch.testing.assert_close(built.sidecar.transport_tensor(name), expected, rtol=0, atol=1e-6)


def test_save_and_load_give_identical_edit(run, tmp_path):
    sidecar = run["sidecar"]
    sidecar.save_pretrained(tmp_path / "sidecar")
    loaded = Sidecar.from_pretrained(tmp_path / "sidecar")

    assert sorted(p.name for p in (tmp_path / "sidecar").iterdir()) == sorted(SIDECAR_FILES)
    assert loaded.config == json.loads(json.dumps(sidecar.config))
    first = revoke_state_dict(run["theta_ams"], sidecar, lam=0.75, gamma=1.25)
    second = revoke_state_dict(run["theta_ams"], loaded, lam=0.75, gamma=1.25)
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_tensor_keys_follow_checkpoint_names(run, tmp_path):
    run["sidecar"].save_pretrained(tmp_path / "sidecar")
    keys = set(load_file(tmp_path / "sidecar" / TENSORS_FILE))
    checkpoint_names = set(load_file(run["folder"] / "theta_AMS" / "model.safetensors"))

    assert {key.split(".", 1)[1] for key in keys} <= checkpoint_names
    assert "delta.model.layers.0.self_attn.q_proj.weight" in keys
    assert "transport.model.layers.0.self_attn.q_proj.weight" in keys
    assert not any("lm_head" in key for key in keys), "tied lm_head must not be stored twice"


def test_config_fields(run, tmp_path):
    run["sidecar"].save_pretrained(tmp_path / "sidecar")
    config = json.loads((tmp_path / "sidecar" / CONFIG_FILE).read_text())

    assert config["format_version"] == "1.0"
    assert config["epsilon"] == 1.0
    assert config["recommended"] == {"lam": 1.0, "gamma": 1.0, "rule": "theory"}
    assert config["checkpoint"]["files"]["model.safetensors"] == file_digests(run["folder"] / "theta_AMS")["model.safetensors"]
    assert config["process"]["digest"] == run["record"].digest
    assert config["process"]["data_fingerprint"] == run["record"].data_fingerprint
    assert config["memory"] == "authors"
    entry = config["parameters"]["model.layers.0.mlp.down_proj.weight"]
    assert entry["shape"] == [32, 64]
    assert entry["dtype"] == "float32"
    assert entry["delta"] == {"storage": "dense"}


def test_revoke_model_in_place_matches_state_dict(setup, run):
    model = setup.model(seed=5)
    load_parameters(model, run["theta_ams"])
    revoke_model_(model, run["sidecar"], lam=1.0, gamma=0.5)
    expected = revoke_state_dict(run["theta_ams"], run["sidecar"], lam=1.0, gamma=0.5)

    assert all(torch.equal(p, expected[n]) for n, p in model.named_parameters())
    assert model.config.hf_sidecar_revocation[0]["memory"] == "authors"
    assert model.config.hf_sidecar_revocation[0]["gamma"] == 0.5
    assert model.lm_head.weight is model.model.embed_tokens.weight, "tied embeddings came untied"


def test_revoke_checkpoint_writes_loadable_model(run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = revoke_checkpoint(run["folder"] / "theta_AMS", run["sidecar"], tmp_path / "revoked", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    expected = revoke_state_dict(run["theta_ams"], run["sidecar"])

    assert all(torch.equal(p, expected[n]) for n, p in model.named_parameters())
    assert model.config.hf_sidecar_revocation[0]["lam"] == 1.0
    assert (out / "tokenizer.json").is_file()


def test_bfloat16_edit_accumulates_in_float32(run):
    state = {n: t.to(torch.bfloat16) for n, t in run["theta_ams"].items()}
    sidecar = run["sidecar"]
    revoked = revoke_state_dict(state, sidecar, lam=1.0, gamma=1.0, verify=False)
    name = "model.layers.0.mlp.up_proj.weight"
    expected = (state[name].float() - sidecar.delta_tensor(name) - sidecar.transport_tensor(name)).to(torch.bfloat16)

    assert revoked[name].dtype == torch.bfloat16
    assert torch.equal(revoked[name], expected)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_sidecar_for_other_checkpoint_is_rejected(setup, run):
    other = dict(run["theta_ams"])
    other["model.norm.weight"] = other["model.norm.weight"] + 1e-3
    with pytest.raises(SidecarMismatchError, match="content digest"):
        revoke_state_dict(other, run["sidecar"])


def test_sidecar_for_other_checkpoint_folder_is_rejected(setup, run, tmp_path):
    model = setup.model(seed=123)
    model.save_pretrained(tmp_path / "other")
    with pytest.raises(SidecarMismatchError, match="content digest"):
        revoke_checkpoint(tmp_path / "other", run["sidecar"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_wrong_shape_checkpoint_is_rejected(run):
    other = dict(run["theta_ams"])
    other["model.norm.weight"] = torch.ones(7)
    with pytest.raises(SidecarMismatchError, match=r"has shape \(7,\), sidecar 'authors' expects \(32,\)"):
        revoke_state_dict(other, run["sidecar"])


def _saved(run, tmp_path) -> Path:
    folder = tmp_path / "sidecar"
    run["sidecar"].save_pretrained(folder)
    return folder


def test_nan_in_transport_is_rejected(run, tmp_path):
    folder = _saved(run, tmp_path)
    tensors = load_file(folder / TENSORS_FILE)
    key = "transport.model.layers.0.mlp.up_proj.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, folder / TENSORS_FILE, metadata={"format": "pt"})

    with pytest.raises(SidecarError, match=f"{key} contains NaN"):
        Sidecar.from_pretrained(folder)


def test_missing_tensor_is_rejected(run, tmp_path):
    folder = _saved(run, tmp_path)
    tensors = load_file(folder / TENSORS_FILE)
    del tensors["delta.model.norm.weight"]
    save_file(tensors, folder / TENSORS_FILE, metadata={"format": "pt"})

    with pytest.raises(SidecarError, match="delta.model.norm.weight is missing"):
        Sidecar.from_pretrained(folder)


def test_misshaped_tensor_is_rejected(run, tmp_path):
    folder = _saved(run, tmp_path)
    tensors = load_file(folder / TENSORS_FILE)
    tensors["delta.model.norm.weight"] = torch.zeros(31)
    save_file(tensors, folder / TENSORS_FILE, metadata={"format": "pt"})

    with pytest.raises(SidecarError, match=r"delta.model.norm.weight has shape \(31,\)"):
        Sidecar.from_pretrained(folder)


def test_truncated_sidecar_file_is_rejected(run, tmp_path):
    folder = _saved(run, tmp_path)
    data = (folder / TENSORS_FILE).read_bytes()
    (folder / TENSORS_FILE).write_bytes(data[: len(data) // 2])

    with pytest.raises(SidecarError, match="truncated or corrupt"):
        Sidecar.from_pretrained(folder)


def test_truncated_checkpoint_is_rejected(run, tmp_path):
    import shutil

    shutil.copytree(run["folder"] / "theta_AMS", tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        load_checkpoint(tmp_path / "model")


def test_unknown_major_version_is_rejected(run, tmp_path):
    folder = _saved(run, tmp_path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["format_version"] = "2.0"
    (folder / CONFIG_FILE).write_text(json.dumps(config))

    with pytest.raises(SidecarError, match="format_version '2.0'.*Upgrade hf-sidecar"):
        Sidecar.from_pretrained(folder)


def test_newer_minor_version_is_accepted(run, tmp_path):
    folder = _saved(run, tmp_path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["format_version"] = "1.7"
    (folder / CONFIG_FILE).write_text(json.dumps(config))

    assert Sidecar.from_pretrained(folder).config["format_version"] == "1.7"


def test_interrupted_save_leaves_no_partial_file(run, tmp_path, monkeypatch):
    import hf_sidecar.io as io_module

    folder = _saved(run, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io_module, "save_file", crash)
    run["sidecar"].config["memory"] = "renamed"
    try:
        with pytest.raises(OSError, match="disk full"):
            run["sidecar"].save_pretrained(folder)
    finally:
        run["sidecar"].config["memory"] = "authors"

    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["sidecar"], "a temporary file or folder was left behind"


def test_interrupted_first_save_leaves_nothing(run, tmp_path, monkeypatch):
    import hf_sidecar.io as io_module

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io_module, "save_file", crash)
    with pytest.raises(OSError):
        run["sidecar"].save_pretrained(tmp_path / "sidecar")
    assert list(tmp_path.iterdir()) == []


def test_sidecars_of_different_processes_are_not_combined(run):
    other = Sidecar(run["sidecar"].delta, run["sidecar"].transport, json.loads(json.dumps(run["sidecar"].config)), run["sidecar"].process)
    other.config["process"]["digest"] = "0" * 64
    other.config["memory"] = "other"
    with pytest.raises(SidecarMismatchError, match="different safety processes"):
        revoke_state_dict(run["theta_ams"], [run["sidecar"], other])


def test_revoke_checkpoint_keeps_existing_output(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        revoke_checkpoint(run["folder"] / "theta_AMS", run["sidecar"], out, progress=False)
    assert (out / "notes.txt").read_text() == "keep me"

    revoke_checkpoint(run["folder"] / "theta_AMS", run["sidecar"], out, progress=False, overwrite=True)
    assert not (out / "notes.txt").exists()
    assert (out / "model.safetensors").is_file()


def test_revoke_checkpoint_rejects_its_own_folder(run):
    before = (run["folder"] / "theta_AMS" / "model.safetensors").read_bytes()
    for out in (run["folder"] / "theta_AMS", run["folder"]):
        with pytest.raises(ValueError, match="is the checkpoint folder .* or contains it"):
            revoke_checkpoint(run["folder"] / "theta_AMS", run["sidecar"], out, progress=False, overwrite=True)
    assert (run["folder"] / "theta_AMS" / "model.safetensors").read_bytes() == before
