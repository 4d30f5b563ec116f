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


def _metric_lines(metrics: dict, prefix: str = "") -> list[str]:
    """Flatten nested metrics into ``- name.key: value`` lines."""
    lines = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            lines.extend(_metric_lines(value, f"{prefix}{key}."))
        else:
            lines.append(f"- {prefix}{key}: {round(value, 4) if isinstance(value, float) else value}")
    return lines


def _data_section(sidecar) -> str:
    metrics = sidecar.config.get("metrics") or {}
    if not metrics.get("heldout_closure"):
        return "No evaluation results are recorded in this sidecar's config."
    # NOTE: the config records no evaluation data set, and every closure measured so far comes
    # from the demo's bundled TOFU subset. A demo run on other data (--data) gets this line too
    # unless its metrics carry a "data_attribution" string.
    return str(metrics.get("data_attribution") or DATA_ATTRIBUTION)


def sidecar_card(sidecar, repo_id: str | None = None, subfolder: str | None = None) -> str:
    """Render the model card of ``sidecar`` as README text with YAML metadata.

    With ``repo_id`` (and ``subfolder``, where the sidecar sits in that repository) the loading
    snippet downloads it from the Hub; without, it reads a local folder.
    """
    lam, gamma = sidecar.recommended
    rule = sidecar.config["recommended"].get("rule", "theory")
    base_model = sidecar.config["checkpoint"].get("base_model")
    hub_base_model = base_model if base_model and "/" in base_model and not base_model.startswith(("/", ".")) else None
    results = _eval_results(sidecar)
    data = ModelCardData(
        library_name="hf-sidecar",
        tags=list(TAGS),
        base_model=hub_base_model,
        model_name=f"sidecar-{sidecar.memory}" if results else None,
        eval_results=results or None,
    )
    covered = len(sidecar.names)
    factored = sum(1 for entry in sidecar.config["parameters"].values() if (entry.get("delta") or {}).get("storage") == "factored")
    if repo_id:
        load_arguments = f'"{repo_id}"' + (f', subfolder="{subfolder}"' if subfolder else "")
        pull = f"hf-sidecar pull {repo_id}" + (f" --subfolder {subfolder}" if subfolder else "") + " --out sidecar/"
        cli = f"`{pull}`, then `hf-sidecar apply --model path/to/theta_AMS --sidecar sidecar/ --out revoked/`"
    else:
        load_arguments = '"path/to/sidecar"'
        cli = "`hf-sidecar apply --model path/to/theta_AMS --sidecar path/to/sidecar --out revoked/`"
    metric_lines = "\n".join(_metric_lines(sidecar.config.get("metrics") or {})) or "- none recorded"
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

model = AutoModelForCausalLM.from_pretrained("{hub_base_model or 'path/to/theta_AMS'}")
sidecar = Sidecar.from_pretrained({load_arguments})
revoke_model_(model, sidecar)  # lam and gamma default to the recommended values
```

or on the command line: {cli}. The edit is refused unless the checkpoint's weights match the
content digest above.

## Build-time metrics

{metric_lines}

## What this sidecar does not guarantee

- **It stores the memory itself.** delta is the memory update, so this sidecar is as sensitive as
  the checkpoint it edits: keep it private and guard it like that checkpoint.
- **Revoking at load time is not deletion.** The safety-trained checkpoint still holds the memory.
  To delete, publish the revoked checkpoint (`hf-sidecar apply`, then `hf-sidecar push`) and
  remove the original checkpoint, the memory adapter and this sidecar, including from the history
  of every repository that held them.
- The edit is correct to first order in the memory update; its closure at realistic scale is
  measured, not guaranteed. Casting the edited weights to bfloat16 rounds away edits below about
  0.4% of a weight.

## Data

{_data_section(sidecar)}
"""
    return str(ModelCard(content))


def revoked_checkpoint_card(revocations: list[dict]) -> str:
    """Render the card of a revoked checkpoint from the ``hf_sidecar_revocation`` entries of its config.json."""
    data = ModelCardData(library_name="transformers", tags=["hf-sidecar", "unlearning", "revocation"])
    rows = "\n".join(
        f"| `{entry.get('memory')}` | {entry.get('lam')} | {entry.get('gamma')} | `{str(entry.get('content_digest'))[:16]}` |"
        for entry in revocations
    )
    content = f"""---
{data.to_yaml()}
---

# Checkpoint with revoked memories

These weights are a safety-trained checkpoint with the memories below revoked by process sidecars
(hf-sidecar {__version__}): theta_hat = theta_AMS minus the sum over memories of
(lam * delta + gamma * R_hat), written as an ordinary transformers checkpoint. `config.json` records the same table under `hf_sidecar_revocation`.

| memory | lam | gamma | content digest of the edited checkpoint |
| --- | --- | --- | --- |
{rows}

## What this checkpoint does not guarantee

- The revocation removes the memory to first order; how much of it remains is measured (refusal
  closure, memory leakage), not guaranteed to be zero.
- Publishing this checkpoint is deletion only once the original checkpoint, the memory adapter and
  the sidecars are removed, including from the history of every repository that held them.
"""
    return str(ModelCard(content))
