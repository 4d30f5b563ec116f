"""Building a sidecar: the memory update and the transported residual estimated by traces.

The transported residual is ``R = J_S delta - delta``, where ``J_S`` is the Jacobian of the
safety process ``S`` with respect to its start point. The centered secant estimates it as

    J_eps(delta) = [S(theta_A + eps * delta) - S(theta_A - eps * delta)] / (2 * eps)
    R_hat        = J_eps(delta) - delta

With ``eps = 1`` the positive endpoint is the safety-trained checkpoint itself, so building costs
one extra trace, from ``theta_A - delta``. The exact mode computes ``J_S delta`` by forward-mode
differentiation instead (see :mod:`hf_sidecar.jvp`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .data import TokenizedExample
from .io import content_digest
from .process import ProcessRecord, run_process
from .sidecar import Sidecar, make_config

logger = logging.getLogger(__name__)

ESTIMATORS = ("secant", "exact_jvp")


@dataclass
class BuildResult:
    """A built sidecar with what its traces cost and the trace endpoints, for evaluation."""

    sidecar: Sidecar
    trace_seconds: list[float] = field(default_factory=list)
    endpoints: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def memory_update(theta_a: Mapping[str, torch.Tensor], theta_am: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``theta_AM - theta_A`` on every tensor the memory phase changed."""
    delta = {}
    for name, after in theta_am.items():
        if name not in theta_a:
            raise KeyError(f"theta_A has no tensor {name!r}, which theta_AM has; both must come from the same architecture.")
        before = theta_a[name]
        if before.shape != after.shape:
            raise ValueError(f"Tensor {name!r} has shape {tuple(before.shape)} in theta_A and {tuple(after.shape)} in theta_AM.")
        if not torch.equal(before, after):
            delta[name] = after.detach().to(torch.promote_types(after.dtype, torch.float32)) - before.detach().to(
                torch.promote_types(before.dtype, torch.float32)
            )
    if not delta:
        raise ValueError("theta_AM equals theta_A: the memory phase changed nothing, so there is nothing to revoke.")
    return delta


def shifted(theta: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """``theta + scale * delta`` in the dtype of ``theta`` (tensors without a delta are shared)."""
    result = dict(theta)
    for name, direction in delta.items():
        base = theta[name]
        result[name] = (base.to(direction.dtype) + scale * direction).to(base.dtype)
    return result


def build_sidecar(
    model: torch.nn.Module,
    record: ProcessRecord,
    examples: Mapping[str, TokenizedExample],
    *,
    theta_a: Mapping[str, torch.Tensor],
    theta_am: Mapping[str, torch.Tensor],
    theta_ams: Mapping[str, torch.Tensor] | None = None,
    epsilon: float = 1.0,
    estimator: str = "secant",
    memory: str = "memory",
    checkpoint_files: Mapping[str, str] | None = None,
    base_model: str | None = None,
    scoring_refusals: list[str] | None = None,
    pad_token_id: int = 0,
    progress: bool = True,
    keep_endpoints: bool = False,
    replay: Callable[[Mapping[str, torch.Tensor], str], dict[str, torch.Tensor]] | None = None,
    covered: Sequence[str] | None = None,
) -> BuildResult:
    """Estimate the transported residual of ``record`` and return the sidecar.

    ``theta_a`` and ``theta_am`` are full parameter states (every named parameter of ``model``);
    ``theta_ams`` is the recorded process's end point from ``theta_am``. With ``epsilon = 1`` and
    the secant estimator, ``theta_ams`` is reused as the positive endpoint, so one trace runs.
    The model's parameters are overwritten by the traces.

    ``replay`` maps a start state and a label to the end state. It replaces ``run_process`` for a
    process whose end state is not its trained parameters, such as a PEFT adapter merged into the
    weights. ``covered`` then names the tensors of ``model`` that the process changes.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not supported; use one of {ESTIMATORS}.")
    if replay is not None and (estimator != "secant" or covered is None):
        raise ValueError("A custom replay needs the secant estimator and the list of covered tensors.")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}.")
    parameter_names = [name for name, _ in model.named_parameters()]
    missing = [name for name in parameter_names if name not in theta_a]
    if missing:
        raise KeyError(f"theta_A has no tensor {missing[0]!r}; pass the full parameter state of the model.")
    delta = memory_update({n: theta_a[n] for n in parameter_names}, {n: theta_am[n] for n in parameter_names})
    trained = list(covered) if covered is not None else list(record.trainable)
    if theta_ams is None:
        raise ValueError("theta_ams (the safety-trained parameters) is required: the sidecar is bound to it.")
    if covered is None and record.end_digest is not None and content_digest(theta_ams, trained) != record.end_digest:
        logger.warning(
            "theta_AMS does not match the end digest recorded by process %r; the sidecar will be bound to the given theta_AMS anyway.",
            record.name,
        )

    result = BuildResult(sidecar=None)  # type: ignore[arg-type]
    full_delta = {name: delta.get(name, torch.zeros_like(theta_a[name], dtype=torch.promote_types(theta_a[name].dtype, torch.float32))) for name in trained}

    def trace(start: Mapping[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
        began = time.perf_counter()
        if replay is not None:
            end = replay(start, f"trace {label}")
        else:
            end = run_process(model, record, examples, start_state=start, pad_token_id=pad_token_id, description=f"trace {label}", progress=progress)
        result.trace_seconds.append(time.perf_counter() - began)
        logger.info("Trace from %s took %.1f s", label, result.trace_seconds[-1])
        return end

    if estimator == "secant":
        if epsilon == 1.0:
            plus = {name: theta_ams[name] for name in trained}
        else:
            plus = trace(shifted(theta_a, delta, epsilon), f"theta_A + {epsilon} delta")
        minus = trace(shifted(theta_a, delta, -epsilon), f"theta_A - {epsilon} delta")
        jacobian_delta = {
            name: (plus[name].to(full_delta[name].dtype) - minus[name].to(full_delta[name].dtype)) / (2 * epsilon) for name in trained
        }
        if keep_endpoints:
            result.endpoints = {"plus": plus, "minus": minus}
    else:
        from .jvp import process_jvp

        began = time.perf_counter()
        end, jacobian_delta = process_jvp(model, record, examples, dict(theta_a), full_delta, pad_token_id=pad_token_id, progress=progress)
        result.trace_seconds.append(time.perf_counter() - began)
        if keep_endpoints:
            result.endpoints = {"oracle": end}

    transport = {}
    for name in trained:
        residual = jacobian_delta[name].to(full_delta[name].dtype) - full_delta[name]
        if torch.count_nonzero(residual):
            transport[name] = residual
    shapes = {name: tuple(theta_ams[name].shape) for name in set(delta) | set(transport)}
    dtypes = {name: theta_ams[name].dtype for name in shapes}
    checkpoint = {
        "base_model": base_model,
        "files": dict(checkpoint_files or {}),
        "content_digest": content_digest(theta_ams, sorted(shapes)),
    }
    config = make_config(
        memory=memory,
        delta=delta,
        transport=transport,
        shapes=shapes,
        dtypes=dtypes,
        epsilon=epsilon,
        estimator=estimator,
        checkpoint=checkpoint,
        process=record.summary(),
        mode="adapter" if record.adapter else "dense",
        scoring_refusals=scoring_refusals or [],
        build={"traces": len(result.trace_seconds), "trace_seconds": [round(s, 3) for s in result.trace_seconds]},
    )
    result.sidecar = Sidecar(delta, transport, config, record.to_dict())
    result.sidecar.validate()
    return result


def run_oracle(
    model: torch.nn.Module,
    record: ProcessRecord,
    examples: Mapping[str, TokenizedExample],
    theta_a: Mapping[str, torch.Tensor],
    *,
    pad_token_id: int = 0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Compute the counterfactual ``theta_AS = S(theta_A)``: one trace, only for evaluation."""
    return run_process(model, record, examples, start_state=theta_a, pad_token_id=pad_token_id, description="oracle trace", progress=progress)
