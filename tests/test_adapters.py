"""Adapter mode: LoRA phases, exact factored sidecars, and the revocation as a PEFT adapter."""

from __future__ import annotations

import pytest
import torch

from hf_sidecar.adapters import (
    AdapterSpec,
    adapter_trace,
    build_adapter_sidecar,
    export_revocation_adapter,
    factored_update,
    train_adapter_phase,
)
from hf_sidecar.edit import revoke_state_dict
from hf_sidecar.process import ProcessConfig, load_parameters, state_of
from hf_sidecar.sidecar import LowRank, Sidecar

MEMORY = ProcessConfig(learning_rate=5e-3, num_epochs=2, batch_size=8, max_length=64, seed=1)
SAFETY = ProcessConfig(learning_rate=3e-3, num_epochs=1, batch_size=6, max_length=64, seed=2)
MEMORY_SPEC = AdapterSpec(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), init_seed=10)
SAFETY_SPEC = AdapterSpec(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), init_seed=20)


@pytest.fixture(scope="module")
def adapter_run(setup, tmp_path_factory):
    model = setup.model(seed=7)
    theta_a = state_of(dict(model.named_parameters()))
    model, _, memory_factors = train_adapter_phase(model, "memory", MEMORY, setup.memory, MEMORY_SPEC, progress=False)
    theta_am = state_of(dict(model.named_parameters()))
    model, record, safety_factors = train_adapter_phase(model, "safety", SAFETY, setup.safety, SAFETY_SPEC, progress=False)
    theta_ams = state_of(dict(model.named_parameters()))
    delta = factored_update(memory_factors)
    built = build_adapter_sidecar(
        model, record, setup.safety, theta_a=theta_a, memory_update=delta, theta_ams=theta_ams, safety_factors=safety_factors,
        memory="authors", progress=False,
    )
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder / "theta_AMS")
    return {
        "model": model, "record": record, "theta_a": theta_a, "theta_am": theta_am, "theta_ams": theta_ams,
        "delta": delta, "safety_factors": safety_factors, "built": built, "sidecar": built.sidecar, "folder": folder,
    }


def test_memory_factors_reproduce_dense_update(adapter_run):
    for name, update in adapter_run["delta"].items():
        dense = adapter_run["theta_am"][name] - adapter_run["theta_a"][name]
        torch.testing.assert_close(update.dense(), dense, rtol=0, atol=1e-6)
    unchanged = [n for n in adapter_run["theta_a"] if n not in adapter_run["delta"]]
    assert all(torch.equal(adapter_run["theta_am"][n], adapter_run["theta_a"][n]) for n in unchanged)


def test_factored_sidecar_stores_ranks(adapter_run):
    sidecar = adapter_run["sidecar"]
    name = "model.layers.0.self_attn.q_proj.weight"
    assert isinstance(sidecar.delta[name], LowRank) and sidecar.delta[name].rank == 4
    assert isinstance(sidecar.transport[name], LowRank) and sidecar.transport[name].rank == 8
    assert sidecar.config["parameters"][name]["transport"] == {"storage": "factored", "rank": 8}
    assert "model.layers.0.self_attn.k_proj.weight" not in sidecar.config["parameters"]
    assert len(adapter_run["built"].trace_seconds) == 1


def test_transport_factors_equal_dense_secant(setup, adapter_run):
    # Dense secant through merged endpoints: S(theta_A - delta) as a full model state.
    model = adapter_run["model"]
    start = {n: v - adapter_run["delta"][n].dense() if n in adapter_run["delta"] else v for n, v in adapter_run["theta_a"].items()}
    minus_factors = adapter_trace(model, adapter_run["record"], setup.safety, start, progress=False)
    minus = dict(start)
    for name, (a, b, scaling) in minus_factors.items():
        minus[name] = start[name] + scaling * b @ a
    for name, update in adapter_run["sidecar"].transport.items():
        dense = (adapter_run["theta_ams"][name] - minus[name]) / 2 - adapter_run["delta"][name].dense()
        torch.testing.assert_close(update.dense(), dense, rtol=0, atol=2e-6)
    load_parameters(model, adapter_run["theta_ams"])


def test_replayed_trace_reproduces_safety_factors(setup, adapter_run):
    model = adapter_run["model"]
    factors = adapter_trace(model, adapter_run["record"], setup.safety, adapter_run["theta_am"], progress=False)
    for name, (a, b, _) in factors.items():
        assert torch.equal(a, adapter_run["safety_factors"][name][0]), name
        assert torch.equal(b, adapter_run["safety_factors"][name][1]), name
    load_parameters(model, adapter_run["theta_ams"])


def test_changed_initial_factors_are_rejected(setup, adapter_run):
    from dataclasses import replace

    from hf_sidecar.process import ProcessMismatchError

    record = replace(adapter_run["record"], adapter={**adapter_run["record"].adapter, "init_seed": 999})
    with pytest.raises(ProcessMismatchError, match="initial adapter factors differ"):
        adapter_trace(adapter_run["model"], record, setup.safety, adapter_run["theta_am"], progress=False)
    load_parameters(adapter_run["model"], adapter_run["theta_ams"])


def test_factored_sidecar_round_trip(adapter_run, tmp_path):
    adapter_run["sidecar"].save_pretrained(tmp_path / "sidecar")
    loaded = Sidecar.from_pretrained(tmp_path / "sidecar")
    first = revoke_state_dict(adapter_run["theta_ams"], adapter_run["sidecar"], lam=1.0, gamma=0.75)
    second = revoke_state_dict(adapter_run["theta_ams"], loaded, lam=1.0, gamma=0.75)
    assert all(torch.equal(first[n], second[n]) for n in first)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "sidecar" / "sidecar.safetensors"))
    assert "delta.model.layers.0.mlp.up_proj.weight.A" in keys
    assert "transport.model.layers.0.mlp.up_proj.weight.B" in keys


@pytest.mark.parametrize(("lam", "gamma"), [(1.0, 1.0), (1.25, 0.5), (0.0, 1.0)])
def test_exported_adapter_reproduces_dense_edit_logits(setup, adapter_run, tmp_path, lam, gamma):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    export_revocation_adapter(adapter_run["sidecar"], tmp_path / "revocation", lam=lam, gamma=gamma)
    base = AutoModelForCausalLM.from_pretrained(adapter_run["folder"] / "theta_AMS")
    merged = PeftModel.from_pretrained(base, tmp_path / "revocation").merge_and_unload()

    dense = AutoModelForCausalLM.from_pretrained(adapter_run["folder"] / "theta_AMS")
    load_parameters(dense, revoke_state_dict(adapter_run["theta_ams"], adapter_run["sidecar"], lam=lam, gamma=gamma))

    ids = torch.tensor([list(setup.safety.values())[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        unedited = AutoModelForCausalLM.from_pretrained(adapter_run["folder"] / "theta_AMS")(input_ids=ids).logits
        assert (merged(input_ids=ids).logits - unedited).abs().max() > 1e-4, "the adapter changed nothing"


def test_dense_sidecar_cannot_be_exported(setup, tmp_path):
    from hf_sidecar.build import build_sidecar
    from hf_sidecar.process import train

    model = setup.model(seed=8)
    theta_a = state_of(dict(model.named_parameters()))
    train(model, "memory", MEMORY, setup.memory, progress=False)
    theta_am = state_of(dict(model.named_parameters()))
    record = train(model, "safety", SAFETY, setup.safety, progress=False)
    theta_ams = state_of(dict(model.named_parameters()))
    sidecar = build_sidecar(model, record, setup.safety, theta_a=theta_a, theta_am=theta_am, theta_ams=theta_ams, progress=False).sidecar
    with pytest.raises(ValueError, match="stores delta.* densely"):
        export_revocation_adapter(sidecar, tmp_path / "out")
    assert not (tmp_path / "out").exists()
