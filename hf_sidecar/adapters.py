"""Adapter mode: phases trained as PEFT LoRA adapters, and exact low-rank sidecars.

A LoRA phase changes each targeted weight by ``s * B @ A`` (``s = lora_alpha / r``). With both
safety traces started from the same recorded initial factors, the transported residual is

    R_hat = [S(theta_A + eps * delta) - S(theta_A - eps * delta)] / (2 * eps) - delta
          = s * (B_plus @ A_plus - B_minus @ A_minus) / (2 * eps)

which is stored exactly as factors of rank at most 2r: ``A = [A_plus; A_minus]`` and
``B = [s/(2 eps) B_plus, -s/(2 eps) B_minus]``. No SVD truncation is involved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .data import TokenizedExample
from .io import atomic_directory, atomic_save_safetensors, atomic_write_json, content_digest
from .process import ProcessConfig, ProcessMismatchError, ProcessRecord, load_parameters, record_process, run_process
from .sidecar import LowRank, Sidecar, make_config

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterSpec:
    """LoRA settings of one adapter phase; ``init_seed`` fixes the initial factors."""

    r: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    init_seed: int = 0

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_dict(self) -> dict:
        values = asdict(self)
        values["target_modules"] = list(self.target_modules)
        return values

    @classmethod
    def from_dict(cls, values: Mapping) -> "AdapterSpec":
        return cls(
            r=int(values["r"]),
            lora_alpha=float(values["lora_alpha"]),
            target_modules=tuple(values["target_modules"]),
            init_seed=int(values["init_seed"]),
        )


def attach_lora(model: torch.nn.Module, spec: AdapterSpec):
    """Wrap ``model`` in a PEFT LoRA adapter whose initial factors depend on ``spec.init_seed`` only."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, target_modules=list(spec.target_modules), lora_dropout=0.0, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        peft_model = get_peft_model(model, config)
    dtype = next(model.parameters()).dtype
    for name, parameter in peft_model.named_parameters():
        if ".lora_" in name and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    return peft_model


def lora_parameter_names(peft_model) -> list[str]:
    return [name for name, _ in peft_model.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def lora_factors(peft_model, adapter_name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Map each adapted weight's checkpoint name to its ``(A, B, scaling)``, detached copies."""
    from peft.tuners.lora import LoraLayer

    factors = {}
    for module_name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            name = module_name.removeprefix(PEFT_PREFIX) + ".weight"
            factors[name] = (
                module.lora_A[adapter_name].weight.detach().clone(),
                module.lora_B[adapter_name].weight.detach().clone(),
                float(module.scaling[adapter_name]),
            )
    if not factors:
        raise ValueError("The model has no LoRA layers; attach an adapter before reading its factors.")
    return factors


def factored_update(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]) -> dict[str, LowRank]:
    """``s * B @ A`` of each adapted weight, as factors with the scaling folded into B."""
    return {name: LowRank(A.float().clone(), (B.float() * scaling).clone()) for name, (A, B, scaling) in factors.items()}


def merge_lora(peft_model):
    """Merge the adapter into the base weights and return the plain transformers model."""
    return peft_model.merge_and_unload()


def unload_lora(peft_model):
    """Remove the adapter without merging and return the plain transformers model."""
    return peft_model.unload()


def train_adapter_phase(
    model: torch.nn.Module,
    name: str,
    config: ProcessConfig,
    examples: Mapping[str, TokenizedExample],
    spec: AdapterSpec,
    *,
    pad_token_id: int = 0,
    progress: bool = True,
) -> tuple[torch.nn.Module, ProcessRecord, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """Train one LoRA phase on ``model`` and merge it.

    Returns the merged plain model, the replayable record (trainable parameters are the LoRA
    factors under PEFT's names, started from the factors ``spec.init_seed`` gives) and the
    trained factors.
    """
    peft_model = attach_lora(model, spec)
    names = lora_parameter_names(peft_model)
    dtype = next(peft_model.parameters()).dtype
    record = record_process(name, config, examples, names, dtype, adapter=spec.to_dict())
    record.start_digest = content_digest(dict(peft_model.named_parameters()), names)
    logger.info("Training adapter phase %s: %d steps, LoRA r=%d on %s", name, record.num_steps, spec.r, ",".join(spec.target_modules))
    end = run_process(peft_model, record, examples, pad_token_id=pad_token_id, progress=progress)
    record.end_digest = content_digest(end)
    factors = lora_factors(peft_model)
    return merge_lora(peft_model), record, factors


def adapter_trace(
    model: torch.nn.Module,
    record: ProcessRecord,
    examples: Mapping[str, TokenizedExample],
    start: Mapping[str, torch.Tensor],
    *,
    pad_token_id: int = 0,
    description: str = "trace",
    progress: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Replay an adapter process from base weights ``start`` and return the trained factors.

    The plain ``model`` gets ``start`` loaded, a fresh adapter with the recorded initial
    factors (checked against the recorded start digest), the recorded steps, and is unwrapped
    again, so it can serve the next trace.
    """
    if not record.adapter:
        raise ValueError(f"Process {record.name!r} was not recorded in adapter mode.")
    spec = AdapterSpec.from_dict(record.adapter)
    load_parameters(model, start)
    peft_model = attach_lora(model, spec)
    if record.start_digest is not None:
        found = content_digest(dict(peft_model.named_parameters()), record.trainable)
        if found != record.start_digest:
            unload_lora(peft_model)
            raise ProcessMismatchError(
                f"The initial adapter factors differ from the recorded ones (digest {found[:12]} instead of {record.start_digest[:12]}); "
                "replay with the same PEFT version and adapter settings, or both traces pick up an error as large as the safety update."
            )
    try:
        run_process(peft_model, record, examples, pad_token_id=pad_token_id, description=description, progress=progress)
        return lora_factors(peft_model)
    finally:
        unload_lora(peft_model)


def transported_residual(
    plus: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]], minus: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]], epsilon: float
) -> dict[str, LowRank]:
    """Exact factors of ``s (B+ A+ - B- A-) / (2 eps)``, of rank at most 2r."""
    residual = {}
    for name, (a_plus, b_plus, scaling) in plus.items():
        a_minus, b_minus, _ = minus[name]
        factor = scaling / (2 * epsilon)
        residual[name] = LowRank(
            torch.cat([a_plus.float(), a_minus.float()], dim=0),
            torch.cat([b_plus.float() * factor, -b_minus.float() * factor], dim=1),
        )
    return residual


@dataclass
class AdapterBuildResult:
    sidecar: Sidecar
    trace_seconds: list[float] = field(default_factory=list)


def build_adapter_sidecar(
    model: torch.nn.Module,
    record: ProcessRecord,
    examples: Mapping[str, TokenizedExample],
    *,
    theta_a: Mapping[str, torch.Tensor],
    memory_update: Mapping[str, LowRank],
    theta_ams: Mapping[str, torch.Tensor],
    safety_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None,
    epsilon: float = 1.0,
    memory: str = "memory",
    checkpoint_files: Mapping[str, str] | None = None,
    base_model: str | None = None,
    scoring_refusals: Sequence[str] = (),
    pad_token_id: int = 0,
    progress: bool = True,
) -> AdapterBuildResult:
    """Build a factored sidecar for a LoRA safety process.

    ``model`` is the plain (unwrapped) model; ``theta_a`` its full parameter state before the
    memory; ``memory_update`` the memory adapter's factored update. With ``epsilon = 1`` and the
    recorded safety factors given, the positive endpoint is reused and one trace runs.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}.")
    result = AdapterBuildResult(sidecar=None)  # type: ignore[arg-type]
    delta = {name: update.dense(torch.float32) for name, update in memory_update.items()}

    def trace(scale: float, label: str):
        start = {}
        for name, value in theta_a.items():
            start[name] = (value.float() + scale * delta[name]).to(value.dtype) if name in delta else value
        began = time.perf_counter()
        factors = adapter_trace(model, record, examples, start, pad_token_id=pad_token_id, description=f"trace {label}", progress=progress)
        result.trace_seconds.append(time.perf_counter() - began)
        logger.info("Trace from %s took %.1f s", label, result.trace_seconds[-1])
        return factors

    plus = safety_factors if (epsilon == 1.0 and safety_factors is not None) else trace(epsilon, f"theta_A + {epsilon:g} delta")
    minus = trace(-epsilon, f"theta_A - {epsilon:g} delta")
    transport = transported_residual(plus, minus, epsilon)
    load_parameters(model, theta_ams)

    names = sorted(set(memory_update) | set(transport))
    missing = [name for name in names if name not in theta_ams]
    if missing:
        raise KeyError(f"theta_AMS has no tensor {missing[0]!r}, which the adapters change.")
    config = make_config(
        memory=memory,
        delta=dict(memory_update),
        transport=transport,
        shapes={name: tuple(theta_ams[name].shape) for name in names},
        dtypes={name: theta_ams[name].dtype for name in names},
        epsilon=epsilon,
        estimator="secant",
        checkpoint={"base_model": base_model, "files": dict(checkpoint_files or {}), "content_digest": content_digest(theta_ams, names)},
        process=record.summary(),
        mode="adapter",
        scoring_refusals=scoring_refusals,
        build={"traces": len(result.trace_seconds), "trace_seconds": [round(s, 3) for s in result.trace_seconds]},
    )
    result.sidecar = Sidecar(dict(memory_update), transport, config, record.to_dict())
    result.sidecar.validate()
    return result


def export_revocation_adapter(
    sidecars: Sidecar | Sequence[Sidecar],
    out_dir: str | Path,
    *,
    lam: float | None = None,
    gamma: float | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``theta_hat - theta_AMS`` as a standard PEFT LoRA adapter folder.

    Each covered weight gets ``A = [A_delta; A_transport]`` and ``B = [-lam B_delta, -gamma B_transport]``
    with ``lora_alpha = r`` so PEFT's scaling is 1: ``PeftModel.from_pretrained(model_AMS, out_dir)``
    followed by ``merge_and_unload()`` gives the revoked weights. Only factored sidecars can be
    exported this way; a dense tensor raises ``ValueError``.
    """
    from .edit import as_sidecar_list, resolve_coefficients

    sidecars = as_sidecar_list(sidecars)
    pieces: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for sidecar in sidecars:
        lam_i, gamma_i = resolve_coefficients(sidecar, lam, gamma)
        for kind, table, coefficient in (("delta", sidecar.delta, lam_i), ("transport", sidecar.transport, gamma_i)):
            for name, update in table.items():
                if not isinstance(update, LowRank):
                    raise ValueError(
                        f"Sidecar {sidecar.memory!r} stores {kind}.{name} densely, which a LoRA adapter cannot express; "
                        "use hf-sidecar apply to write the revoked checkpoint instead."
                    )
                if coefficient == 0:
                    continue
                a_list, b_list = pieces.setdefault(name, ([], []))
                a_list.append(update.A.float())
                b_list.append(-coefficient * update.B.float())
    if not pieces:
        raise ValueError("Both coefficients are zero, so the revocation adapter would be empty.")
    tensors = {}
    rank_pattern = {}
    for name, (a_list, b_list) in sorted(pieces.items()):
        module = name.removesuffix(".weight")
        a = torch.cat(a_list, dim=0)
        b = torch.cat(b_list, dim=1)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
        rank_pattern[module] = a.shape[0]
    ranks = sorted(set(rank_pattern.values()))
    default_rank = ranks[-1]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": default_rank,
        "lora_alpha": default_rank,
        # Full module paths, so PEFT adapts exactly the covered weights and no others.
        "target_modules": sorted(rank_pattern),
        "rank_pattern": {module: rank for module, rank in rank_pattern.items() if rank != default_rank},
        "alpha_pattern": {module: rank for module, rank in rank_pattern.items() if rank != default_rank},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        atomic_save_safetensors(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
        atomic_write_json(staging / "adapter_config.json", config)
    logger.info("Wrote the revocation adapter for %d weights to %s", len(pieces), out_dir)
    return out_dir
