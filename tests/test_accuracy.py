"""Order of accuracy of the sidecar edit in a smooth regime, and the secant against the exact JVP.

float64, AdamW with a large epsilon (1e-2) and no clipping keep the process map smooth, so the
asymptotic orders show at moderate scales: as the memory update is scaled by t, the (1, 1)
sidecar's absolute error to the oracle falls as t^2 and task arithmetic's as t.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_sidecar.build import build_sidecar, memory_update, run_oracle
from hf_sidecar.edit import revoke_state_dict
from hf_sidecar.jvp import process_jvp
from hf_sidecar.process import ProcessConfig, load_parameters, record_process, run_process, state_of, train

SCALES = (0.1, 0.01, 0.001)
SMOOTH = ProcessConfig(learning_rate=1e-2, num_epochs=1, batch_size=8, adam_epsilon=1e-2, max_grad_norm=None, lr_scheduler="constant", max_length=64)


def _norm(state) -> float:
    return math.sqrt(sum((value.double() ** 2).sum().item() for value in state.values()))


def _difference(first, second) -> dict:
    return {name: first[name] - second[name] for name in second}


@pytest.fixture(scope="module")
def smooth(setup):
    model = setup.model(dtype=torch.float64, attn_implementation="eager")
    theta_a = state_of(dict(model.named_parameters()))
    memory_examples = dict(list(setup.memory.items())[:16])
    train(model, "memory", SMOOTH, memory_examples, progress=False)
    delta = memory_update(theta_a, state_of(dict(model.named_parameters())))
    load_parameters(model, theta_a)
    record = record_process("safety", SMOOTH, setup.safety, [n for n, _ in model.named_parameters()], torch.float64)
    oracle = run_oracle(model, record, setup.safety, theta_a, progress=False)
    return model, record, theta_a, delta, oracle


def _sidecar_at_scale(model, record, examples, theta_a, delta, scale):
    theta_am = {name: theta_a[name] + scale * delta.get(name, 0) for name in theta_a}
    theta_ams = run_process(model, record, examples, start_state=theta_am, progress=False)
    built = build_sidecar(model, record, examples, theta_a=theta_a, theta_am=theta_am, theta_ams=theta_ams, progress=False)
    return built.sidecar, theta_ams


def _slope(scales, errors) -> float:
    return float(np.polyfit(np.log10(scales), np.log10(errors), 1)[0])


def test_sidecar_error_is_second_order(setup, smooth):
    model, record, theta_a, delta, oracle = smooth
    sidecar_errors, task_errors = [], []
    for scale in SCALES:
        sidecar, theta_ams = _sidecar_at_scale(model, record, setup.safety, theta_a, delta, scale)
        revoked = revoke_state_dict(theta_ams, sidecar, lam=1.0, gamma=1.0)
        task = revoke_state_dict(theta_ams, sidecar, lam=1.0, gamma=0.0)
        sidecar_errors.append(_norm(_difference(revoked, oracle)))
        task_errors.append(_norm(_difference(task, oracle)))

    sidecar_slope = _slope(SCALES, sidecar_errors)
    task_slope = _slope(SCALES, task_errors)
    assert sidecar_slope > 1.8, (sidecar_errors, sidecar_slope)
    assert 0.8 < task_slope < 1.2, (task_errors, task_slope)
    assert all(s < t for s, t in zip(sidecar_errors, task_errors))


def test_secant_converges_to_exact_jvp(setup, smooth):
    model, record, theta_a, delta, _ = smooth
    gaps = []
    for scale in SCALES:
        sidecar, _ = _sidecar_at_scale(model, record, setup.safety, theta_a, delta, scale)
        _, exact = process_jvp(model, record, setup.safety, theta_a, {n: scale * d for n, d in delta.items()}, progress=False)
        secant = {
            name: sidecar.delta_tensor(name, torch.float64) + (sidecar.transport_tensor(name, torch.float64) if name in sidecar.transport else 0)
            for name in exact
        }
        gaps.append(_norm(_difference(secant, exact)) / _norm(exact))

    assert gaps[0] < 0.05, gaps
    assert gaps[1] < gaps[0] / 5, gaps
    assert gaps[2] < gaps[1] / 5, gaps


def test_exact_jvp_estimator_builds_a_sidecar(setup, smooth):
    model, record, theta_a, delta, oracle = smooth
    scale = 0.01
    theta_am = {name: theta_a[name] + scale * delta.get(name, 0) for name in theta_a}
    theta_ams = run_process(model, record, setup.safety, start_state=theta_am, progress=False)
    built = build_sidecar(
        model, record, setup.safety, theta_a=theta_a, theta_am=theta_am, theta_ams=theta_ams, estimator="exact_jvp", progress=False
    )
    revoked = revoke_state_dict(theta_ams, built.sidecar, lam=1.0, gamma=1.0)
    task = revoke_state_dict(theta_ams, built.sidecar, lam=1.0, gamma=0.0)

    assert built.sidecar.config["estimator"] == "exact_jvp"
    assert _norm(_difference(revoked, oracle)) < 0.1 * _norm(_difference(task, oracle))


def test_jvp_primal_matches_replay(setup, smooth):
    model, record, theta_a, delta, oracle = smooth
    # Llama's eager attention takes its softmax in float32 even for float64 weights, so the two
    # implementations of the same AdamW steps agree to float32 rounding, not float64.
    end, _ = process_jvp(model, record, setup.safety, theta_a, {}, progress=False)
    assert max(abs(end[n] - oracle[n]).max().item() for n in oracle) < 1e-7


def test_jvp_handles_unused_embedding_rows(setup, smooth):
    # Most vocabulary rows never appear in the safety batches, so their gradient is exactly zero
    # at every step: the guarded square root must keep their tangent finite (and equal to the input).
    model, record, theta_a, delta, _ = smooth
    _, exact = process_jvp(model, record, setup.safety, theta_a, delta, progress=False)
    used = {token for example in setup.safety.values() for token in example.input_ids}
    unused = sorted(set(range(exact["model.embed_tokens.weight"].shape[0])) - used)
    assert unused, "every token is used; the test needs an unused row"
    rows = exact["model.embed_tokens.weight"][unused]
    assert torch.isfinite(rows).all()
