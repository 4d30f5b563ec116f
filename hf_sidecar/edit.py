"""Applying the edit ``theta_hat = theta_AMS - sum_i (lam * delta_i + gamma * transport_i)``.

Edits accumulate in float32 (float64 for float64 weights) and are cast back to the checkpoint's
dtype once, so several sidecars or a bfloat16 checkpoint lose no more than one rounding.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .io import SAFETENSORS_INDEX, CheckpointError, atomic_directory, atomic_save_safetensors, checkpoint_files, load_checkpoint
from .sidecar import LowRank, Sidecar, SidecarMismatchError

logger = logging.getLogger(__name__)

REVOCATION_CONFIG_KEY = "hf_sidecar_revocation"


def as_sidecar_list(sidecars: Sidecar | Sequence[Sidecar]) -> list[Sidecar]:
    """Normalize one sidecar or several into a list, refusing sidecars of different processes."""
    result = [sidecars] if isinstance(sidecars, Sidecar) else list(sidecars)
    if not result:
        raise ValueError("No sidecar given: pass at least one Sidecar.")
    digests = {sidecar.process_digest for sidecar in result}
    if len(digests) > 1:
        raise SidecarMismatchError(
            "The sidecars were built through different safety processes "
            f"({', '.join(f'{s.memory!r}: {s.process_digest[:12]}' for s in result)}); only sidecars of the same run can be combined."
        )
    memories = [sidecar.memory for sidecar in result]
    if len(set(memories)) != len(memories):
        raise ValueError(f"The same memory is listed twice among the sidecars: {memories}.")
    return result


def resolve_coefficients(sidecar: Sidecar, lam: float | None, gamma: float | None) -> tuple[float, float]:
    """Fill missing coefficients from the sidecar's recommendation."""
    recommended_lam, recommended_gamma = sidecar.recommended
    return (recommended_lam if lam is None else float(lam), recommended_gamma if gamma is None else float(gamma))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def edit_tensor(
    name: str,
    theta: torch.Tensor,
    sidecars: Sequence[Sidecar],
    coefficients: Sequence[tuple[float, float]],
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """Return the revoked value of one tensor, computed on its own device in float32 or wider.

    Dense updates are multiplied by their coefficient, then subtracted. The factored updates of
    all sidecars are stacked into one ``B @ A`` product and subtracted in a single ``addmm_``, so
    a low-rank edit never forms a dense update. With ``inplace`` the edit overwrites ``theta``
    when it already has the accumulation dtype, for a caller that owns it.
    """
    wide = accumulation_dtype(theta.dtype)
    result = theta if inplace and theta.dtype == wide else theta.to(wide, copy=True)
    left, right = [], []
    for sidecar, (lam, gamma) in zip(sidecars, coefficients):
        if name not in sidecar.config["parameters"]:
            continue
        for table, coefficient in ((sidecar.delta, lam), (sidecar.transport, gamma)):
            update = table.get(name) if coefficient != 0 else None
            if update is None:
                continue
            if isinstance(update, LowRank):
                left.append(update.B.to(device=result.device, dtype=wide) * coefficient)
                right.append(update.A.to(device=result.device, dtype=wide))
                continue
            dense = update.to(device=result.device, dtype=wide)
            # Multiply, then subtract: the same rounding as the formula, unlike a fused sub_(alpha=).
            # A coefficient of 1 leaves the update unchanged, so its multiplication is skipped.
            result.sub_(dense if coefficient == 1 else dense * coefficient)
            # Release this update before the next is read, so a dense edit holds one at a time.
            del update, dense
    if left:
        result.addmm_(torch.cat(left, dim=1), torch.cat(right, dim=0), alpha=-1)
    return result.to(theta.dtype)


def _coefficients(sidecars: Sequence[Sidecar], lam, gamma) -> list[tuple[float, float]]:
    return [resolve_coefficients(sidecar, lam, gamma) for sidecar in sidecars]


def revoke_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    sidecars: Sidecar | Sequence[Sidecar],
    *,
    lam: float | None = None,
    gamma: float | None = None,
    verify: bool = True,
) -> dict[str, torch.Tensor]:
    """Return a copy of ``state_dict`` with the sidecars' edit applied to the covered tensors.

    ``lam`` and ``gamma`` default to each sidecar's recommended values. With ``verify`` the
    covered tensors must match the checkpoint the sidecars were built for.
    """
    sidecars = as_sidecar_list(sidecars)
    if verify:
        for sidecar in sidecars:
            sidecar.check_state(state_dict, where="the state dict")
    coefficients = _coefficients(sidecars, lam, gamma)
    covered = set().union(*(sidecar.names for sidecar in sidecars))
    result = dict(state_dict)
    for name in covered:
        result[name] = edit_tensor(name, state_dict[name], sidecars, coefficients)
    return result


@torch.no_grad()
def revoke_model_(
    model: torch.nn.Module,
    sidecars: Sidecar | Sequence[Sidecar],
    *,
    lam: float | None = None,
    gamma: float | None = None,
    verify: bool = True,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """Apply the edit to a loaded model's parameters in place and record it in ``model.config``.

    ``reference`` contains the safety-trained tensors to edit from (for re-editing with other
    coefficients, as the Space does); without it the model's current weights are the start.
    Tied parameters are edited once because ``named_parameters`` lists each tensor once.
    """
    sidecars = as_sidecar_list(sidecars)
    parameters = dict(model.named_parameters())
    source = reference if reference is not None else parameters
    if verify:
        for sidecar in sidecars:
            sidecar.check_state(source, where="the model")
    coefficients = _coefficients(sidecars, lam, gamma)
    covered = set().union(*(sidecar.names for sidecar in sidecars))
    for name in sorted(covered):
        if name not in parameters:
            raise SidecarMismatchError(f"The model has no parameter {name!r}, which the sidecar edits.")
        parameters[name].copy_(edit_tensor(name, source[name].to(parameters[name].device), sidecars, coefficients))
    record_revocation(model, sidecars, coefficients)
    return model


def revocation_info(sidecars: Sequence[Sidecar], coefficients: Sequence[tuple[float, float]]) -> list[dict]:
    return [
        {
            "memory": sidecar.memory,
            "lam": lam,
            "gamma": gamma,
            "content_digest": sidecar.content_digest,
            "process_digest": sidecar.process_digest,
            "source": sidecar.source,
        }
        for sidecar, (lam, gamma) in zip(sidecars, coefficients)
    ]


def record_revocation(model: torch.nn.Module, sidecars: Sequence[Sidecar], coefficients: Sequence[tuple[float, float]]) -> None:
    """Store which sidecars and coefficients were applied in ``model.config``, so a served model can report it."""
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, REVOCATION_CONFIG_KEY, revocation_info(sidecars, coefficients))


def revoke_checkpoint(
    model_dir: str | Path,
    sidecars: Sidecar | Sequence[Sidecar],
    out_dir: str | Path,
    *,
    lam: float | None = None,
    gamma: float | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the revoked checkpoint of ``model_dir`` to ``out_dir``, one shard at a time.

    Non-weight files (config, tokenizer, generation config) are copied; each safetensors shard is
    rewritten with the same name and tensor set, so the index stays valid. ``config.json``
    records the applied sidecars under ``hf_sidecar_revocation``. The folder appears only when
    complete. An existing non-empty ``out_dir`` is replaced only with ``overwrite=True``, and
    never when it is ``model_dir`` itself or contains it.
    """
    model_dir = Path(model_dir)
    out_path = Path(out_dir)
    if out_path.resolve() == model_dir.resolve() or model_dir.resolve().is_relative_to(out_path.resolve()):
        raise ValueError(f"The output folder {out_path} is the checkpoint folder {model_dir} or contains it; choose another --out.")
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())) and not overwrite:
        raise FileExistsError(
            f"The output folder {out_path} already exists and is not empty; choose another --out, "
            "or pass overwrite=True (--overwrite) to replace it."
        )
    sidecars = as_sidecar_list(sidecars)
    coefficients = _coefficients(sidecars, lam, gamma)
    covered = sorted(set().union(*(sidecar.names for sidecar in sidecars)))
    files = checkpoint_files(model_dir)
    for sidecar in sidecars:
        if sidecar.check_file_digests(model_dir):
            logger.info("Checkpoint files of %s match sidecar %r by sha256", model_dir, sidecar.memory)
        else:
            sidecar.check_state(load_checkpoint(model_dir, set(sidecar.names)), where=str(model_dir))
    with atomic_directory(out_dir) as staging:
        for item in model_dir.iterdir():
            if item.suffix == ".safetensors" or item.name.startswith("."):
                continue
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        remaining = set(covered)
        for file in tqdm(files, desc="Revoking shards", disable=not progress or len(files) < 2):
            from safetensors import safe_open

            tensors = {}
            with safe_open(str(file), framework="pt") as handle:
                metadata = handle.metadata() or {"format": "pt"}
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    if name in remaining:
                        tensor = edit_tensor(name, tensor, sidecars, coefficients)
                        remaining.discard(name)
                    tensors[name] = tensor
            atomic_save_safetensors(tensors, staging / file.name, metadata=metadata)
            del tensors
        if remaining:
            raise CheckpointError(f"Checkpoint {model_dir} has no tensor {sorted(remaining)[0]!r} for the sidecar to edit.")
        config_path = staging / "config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            config[REVOCATION_CONFIG_KEY] = revocation_info(sidecars, coefficients)
            config_path.write_text(json.dumps(config, indent=2) + "\n")
    logger.info("Wrote revoked checkpoint to %s (%d tensors edited)", out_dir, len(covered))
    return Path(out_dir)


__all__ = ["edit_tensor", "revoke_state_dict", "revoke_model_", "revoke_checkpoint", "REVOCATION_CONFIG_KEY", "SAFETENSORS_INDEX"]
