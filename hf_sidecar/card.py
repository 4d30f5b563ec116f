"""The sidecar's model card, built with huggingface_hub's ``ModelCard`` and ``ModelCardData``."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from . import __version__

TAGS = ["process-sidecar", "unlearning", "revocation"]
DATA_ATTRIBUTION = (
    "Evaluated on a subset of TOFU (Maini, Feng, Schwarzschild, Lipton, Kolter, 2024, "
    "arXiv:2401.06121; locuslab/tofu, MIT licence)."
)


def _eval_results(sidecar) -> list:
    from huggingface_hub import EvalResult

    metrics = sidecar.config.get("metrics") or {}
    results = []
    for key, value in sorted((metrics.get("heldout_closure") or {}).items()):
        if value is None:
            continue
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type="tofu-subset",
                dataset_name="TOFU subset (held-out memorized-author prompts)",
                metric_type="refusal_closure",
                metric_name=f"Held-out refusal closure ({key})",
                metric_value=round(float(value), 4),
            )
        )
    return results


def sidecar_card(sidecar, repo_id: str | None = None) -> str:
    """Render the model card of ``sidecar`` as README text with YAML metadata."""
    lam, gamma = sidecar.recommended
    rule = sidecar.config["recommended"].get("rule", "theory")
    base_model = sidecar.config["checkpoint"].get("base_model")
    results = _eval_results(sidecar)
    data = ModelCardData(
        library_name="hf-sidecar",
        tags=list(TAGS),
        base_model=base_model if base_model and "/" in base_model and not base_model.startswith(("/", ".")) else None,
        model_name=f"sidecar-{sidecar.memory}" if results else None,
        eval_results=results or None,
    )
    covered = len(sidecar.names)
    factored = sum(1 for entry in sidecar.config["parameters"].values() if (entry.get("delta") or {}).get("storage") == "factored")
    location = repo_id or "path/to/sidecar"
    metrics = sidecar.config.get("metrics") or {}
    metric_lines = "\n".join(f"- {key}: {value}" for key, value in metrics.items() if not isinstance(value, dict)) or "- none recorded"
    content = f"""---
{data.to_yaml()}
---

# Process sidecar for memory `{sidecar.memory}`

This sidecar revokes the memory `{sidecar.memory}` from a safety-trained checkpoint while keeping
the effect of its safety training. It stores the memory update delta and the transported residual
R_hat, the estimate of how safety training moved that update, for {covered} parameter tensors
({factored} stored as low-rank factors). Built with hf-sidecar {__version__}.

## The edit

    theta_hat = theta_AMS - lam * delta - gamma * R_hat

Recommended: lam = {lam:g}, gamma = {gamma:g} (rule `{rule}`). The residual was estimated with the
{sidecar.config.get('estimator', 'secant')} estimator at epsilon = {sidecar.config.get('epsilon')}
through the recorded safety process `{sidecar.config['process']['name']}` ({sidecar.config['process']['num_steps']} steps,
process digest `{sidecar.process_digest[:16]}`).

It applies only to the checkpoint with content digest `{sidecar.content_digest}`
(the sha256 over the covered tensors); hf-sidecar refuses any other checkpoint.

## Loading

```python
from hf_sidecar import Sidecar, revoke_model_
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("path/to/theta_AMS")
sidecar = Sidecar.from_pretrained("{location}")
revoke_model_(model, sidecar)  # lam and gamma default to the recommended values
```

or on the command line: `hf-sidecar apply --model path/to/theta_AMS --sidecar {location} --out revoked/`.

## Build-time metrics

{metric_lines}

## What this sidecar does not guarantee

- **It stores the memory itself.** delta is the memory update, so this sidecar is as sensitive as
  the checkpoint it edits: keep it private and guard it like that checkpoint.
- **Revoking at load time is not deletion.** The safety-trained checkpoint still holds the memory.
  To delete, publish the revoked checkpoint (`hf-sidecar apply`) and remove the original
  checkpoint, the memory adapter and this sidecar.
- The edit is correct to first order in the memory update; its closure at realistic scale is
  measured, not guaranteed. Casting the edited weights to bfloat16 rounds away edits below about
  0.4% of a weight.

## Data

{DATA_ATTRIBUTION}
"""
    return str(ModelCard(content))
