"""Several memories: per-memory sidecars and revoking any subset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_sidecar.build import build_sidecar
from hf_sidecar.edit import revoke_state_dict
from hf_sidecar.memories import build_memory_sidecars, sequential_updates
from hf_sidecar.process import ProcessConfig, load_parameters, record_process, run_process, state_of, train
from hf_sidecar.sidecar import SidecarMismatchError

SMOOTH = ProcessConfig(learning_rate=1e-2, num_epochs=1, batch_size=8, adam_epsilon=1e-2, max_grad_norm=None, lr_scheduler="constant", max_length=64)
SCALES = (0.1, 0.01, 0.001)


def _norm(state) -> float:
    return math.sqrt(sum((value.double() ** 2).sum().item() for value in state.values()))


def _error(first, second) -> float:
    return _norm({name: first[name] - second[name] for name in second})


@pytest.fixture(scope="module")
def three_memories(setup):
    """theta_A, three memory directions trained in turn, and the safety record (float64, smooth regime)."""
    model = setup.model(seed=4, dtype=torch.float64, attn_implementation="eager")
    theta_a = state_of(dict(model.named_parameters()))
    items = list(setup.memory.items())
    states = [theta_a]
    for index in range(3):
        chunk = dict(items[index * 8 : (index + 1) * 8])
        train(model, f"memory-{index}", SMOOTH, chunk, progress=False)
        states.append(state_of(dict(model.named_parameters())))
    directions = sequential_updates(states)
    load_parameters(model, theta_a)
    record = record_process("safety", SMOOTH, setup.safety, [n for n, _ in model.named_parameters()], torch.float64)
    return model, record, theta_a, directions


def _scaled_run(setup, model, record, theta_a, directions, scale):
    updates = {f"m{i}": {n: scale * d for n, d in direction.items()} for i, direction in enumerate(directions)}
    theta_am = dict(theta_a)
    for update in updates.values():
        for name, value in update.items():
            theta_am[name] = theta_am[name] + value
    theta_ams = run_process(model, record, setup.safety, start_state=theta_am, progress=False)
    return updates, theta_am, theta_ams


def test_single_memory_matches_one_memory_construction(setup, three_memories):
    model, record, theta_a, directions = three_memories
    update = {n: 0.1 * d for n, d in directions[0].items()}
    theta_am = {n: theta_a[n] + update[n] if n in update else theta_a[n] for n in theta_a}
    theta_ams = run_process(model, record, setup.safety, start_state=theta_am, progress=False)

    single = build_sidecar(model, record, setup.safety, theta_a=theta_a, theta_am=theta_am, theta_ams=theta_ams, memory="m0", progress=False).sidecar
    several = build_memory_sidecars(model, record, setup.safety, theta_am=theta_am, theta_ams=theta_ams, updates={"m0": update}, progress=False)["m0"]

    assert several.names == single.names
    for name in single.names:
        torch.testing.assert_close(several.delta_tensor(name, torch.float64), single.delta_tensor(name, torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(several.transport_tensor(name, torch.float64), single.transport_tensor(name, torch.float64), rtol=0, atol=1e-9)


def test_subset_revocation_is_second_order(setup, three_memories):
    model, record, theta_a, directions = three_memories
    # One subset of each size keeps the test short; the benchmark covers all seven.
    subsets = [(0,), (0, 2), (0, 1, 2)]
    sidecar_errors = {subset: [] for subset in subsets}
    task_errors = {subset: [] for subset in subsets}
    for scale in SCALES:
        updates, theta_am, theta_ams = _scaled_run(setup, model, record, theta_a, directions, scale)
        sidecars = build_memory_sidecars(
            model, record, setup.safety, theta_am=theta_am, theta_ams=theta_ams, updates=updates, estimator="exact_jvp", progress=False
        )
        for subset in subsets:
            kept = {n: theta_a[n].clone() for n in theta_a}
            for index in set(range(3)) - set(subset):
                for name, value in updates[f"m{index}"].items():
                    kept[name] = kept[name] + value
            oracle = run_process(model, record, setup.safety, start_state=kept, progress=False)
            chosen = [sidecars[f"m{i}"] for i in subset]
            sidecar_errors[subset].append(_error(revoke_state_dict(theta_ams, chosen, lam=1.0, gamma=1.0), oracle))
            task_errors[subset].append(_error(revoke_state_dict(theta_ams, chosen, lam=1.0, gamma=0.0), oracle))

    for subset in subsets:
        sidecar_slope = float(np.polyfit(np.log10(SCALES), np.log10(sidecar_errors[subset]), 1)[0])
        task_slope = float(np.polyfit(np.log10(SCALES), np.log10(task_errors[subset]), 1)[0])
        assert sidecar_slope > 1.8, (subset, sidecar_errors[subset])
        assert 0.8 < task_slope < 1.2, (subset, task_errors[subset])


def test_sidecar_of_another_run_is_rejected(setup, three_memories):
    model, record, theta_a, directions = three_memories
    updates, theta_am, theta_ams = _scaled_run(setup, model, record, theta_a, directions, 0.1)
    ours = build_memory_sidecars(model, record, setup.safety, theta_am=theta_am, theta_ams=theta_ams, updates=updates, progress=False)

    other_record = record_process("safety", ProcessConfig(**{**SMOOTH.to_dict(), "seed": 77}), setup.safety, record.trainable, torch.float64)
    other_ams = run_process(model, other_record, setup.safety, start_state=theta_am, progress=False)
    theirs = build_memory_sidecars(model, other_record, setup.safety, theta_am=theta_am, theta_ams=other_ams, updates={"m1": updates["m1"]}, progress=False)

    with pytest.raises(SidecarMismatchError, match="different safety processes"):
        revoke_state_dict(theta_ams, [ours["m0"], theirs["m1"]])
    with pytest.raises(SidecarMismatchError, match="content digest"):
        revoke_state_dict(theta_ams, [theirs["m1"]])


def test_memories_benchmark_report(tmp_path):
    from hf_sidecar.memories import run_memories_benchmark

    report = run_memories_benchmark(tmp_path, preset="test", num_memories=2, progress=False)

    assert len(report["subsets"]) == 3
    assert report["cost"] == {**report["cost"], "sidecar_traces": 2, "oracle_runs_for_every_subset": 3}
    for row in report["subsets"]:
        for value in list(row["heldout_closure"].values()) + list(row["param_error"].values()):
            assert math.isfinite(value)
    assert "revoked subset" in (tmp_path / "memories.md").read_text()


def test_cli_builds_and_applies_several_memories(setup, tmp_path):
    from safetensors.torch import load_file

    from hf_sidecar.cli import main
    from hf_sidecar.data import write_jsonl

    model = setup.model(seed=9)
    folders = {}

    def save(name):
        model.save_pretrained(tmp_path / name)
        setup.tokenizer.save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)

    config = ProcessConfig(learning_rate=3e-3, num_epochs=1, batch_size=8, max_length=64, seed=1)
    save("A")
    items = list(setup.memory.items())
    train(model, "memory-a", config, dict(items[:8]), progress=False)
    save("AM1")
    train(model, "memory-b", config, dict(items[8:16]), progress=False)
    save("AM12")
    record = train(model, "safety", config, setup.safety, progress=False)
    save("AMS")
    record.save(tmp_path / "process.json")
    write_jsonl(tmp_path / "safety.jsonl", setup.splits.phase_s)

    code = main([
        "build", "--theta-a", folders["A"], "--theta-am", folders["AM1"], "--theta-am", folders["AM12"], "--memory", "a", "--memory", "b",
        "--theta-ams", folders["AMS"], "--process", str(tmp_path / "process.json"), "--data", str(tmp_path / "safety.jsonl"),
        "--out", str(tmp_path / "sidecars"), "--no-progress",
    ])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "sidecars").iterdir()) == ["a", "b"]

    code = main([
        "apply", "--model", folders["AMS"], "--sidecar", str(tmp_path / "sidecars" / "a"), "--sidecar", str(tmp_path / "sidecars" / "b"),
        "--out", str(tmp_path / "revoked"), "--lam", "1", "--gamma", "1", "--no-progress",
    ])
    assert code == 0
    from hf_sidecar.sidecar import Sidecar

    theta_ams = load_file(tmp_path / "AMS" / "model.safetensors")
    expected = revoke_state_dict(theta_ams, [Sidecar.from_pretrained(tmp_path / "sidecars" / m) for m in ("a", "b")], lam=1.0, gamma=1.0)
    revoked = load_file(tmp_path / "revoked" / "model.safetensors")
    assert all(torch.equal(revoked[n], expected[n]) for n in expected)
    assert not torch.equal(revoked["model.norm.weight"], theta_ams["model.norm.weight"])


def test_cli_rejects_unpaired_memory_names(setup, tmp_path, capsys):
    from hf_sidecar.cli import main

    code = main([
        "build", "--theta-a", "A", "--theta-am", "AM1", "--theta-am", "AM12", "--memory", "a",
        "--theta-ams", "AMS", "--process", str(tmp_path / "missing.json"), "--data", "x.jsonl", "--out", str(tmp_path / "out"),
    ])
    assert code == 2
    assert "2 --theta-am checkpoints but 1 --memory names" in capsys.readouterr().err
