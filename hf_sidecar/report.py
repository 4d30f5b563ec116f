"""Writing demo results: report.json, report.md and the validation-closure heatmap."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from .evaluation import Grid
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

CLOSURE_ROWS = (
    ("no_edit", "No edit (θ_AMS)"),
    ("task_arithmetic", "Task arithmetic, best λ on validation"),
    ("diagonal", "Diagonal γ = λ, best on validation"),
    ("sidecar_2d", "Sidecar 2D, best (λ, γ) on validation"),
    ("sidecar_1_1", "Sidecar (1, 1), the theory default"),
)

# Timed parts of a trial, in the order they run. The report's "other" column (greedy behaviour,
# saving) is the rest of the total.
SECONDS_COLUMNS = (
    ("phase_a", "public skill"),
    ("phase_m", "memory"),
    ("phase_s", "safety"),
    ("sidecar_trace", "sidecar trace"),
    ("oracle_trace", "oracle trace"),
    ("grid", "grid and held-out scores"),
)


# Marker and legend label of each selected edit on a closure heatmap.
SELECTION_MARKERS = {"task_arithmetic": ("s", "task arithmetic"), "diagonal": ("D", "diagonal"), "sidecar_2d": ("*", "sidecar 2D")}


def draw_closure_grid(axes, grid: Grid, *, title: str, fontsize: int):
    """Draw the grid's closure on ``axes`` as a labelled heatmap with each value printed, and return the image."""
    image = axes.imshow(grid.closure, origin="lower", cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(grid.gammas)), [f"{g:g}" for g in grid.gammas])
    axes.set_yticks(range(len(grid.lams)), [f"{lam:g}" for lam in grid.lams])
    axes.set_xlabel("γ (transport)")
    axes.set_ylabel("λ (memory)")
    axes.set_title(title)
    for i in range(len(grid.lams)):
        for j in range(len(grid.gammas)):
            axes.text(j, i, f"{grid.closure[i, j]:.2f}", ha="center", va="center", fontsize=fontsize, color="white")
    return image


def save_heatmap(grid: Grid, selected: dict[str, tuple[float, float]], path: str | Path, title: str = "Validation closure") -> None:
    """Draw the grid's closure as a PNG heatmap with the selected edits marked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.6, 4.6), dpi=120)
    image = draw_closure_grid(axes, grid, title=title, fontsize=6)
    for kind, (lam, gamma) in selected.items():
        marker, label = SELECTION_MARKERS[kind]
        axes.scatter([grid.gammas.index(gamma)], [grid.lams.index(lam)], marker=marker, s=140, facecolors="none", edgecolors="red", linewidths=1.6, label=label)
    axes.legend(loc="upper left", fontsize=7, framealpha=0.8)
    figure.colorbar(image, ax=axes, label="closure")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _behaviour_note(config: dict) -> str:
    note = f"Refusals are judged by is_refusal on greedy answers of at most {config.get('max_new_tokens')} new tokens."
    if config.get("base_model") is None:
        note += (
            " A small model trained from scratch rarely writes a clean refusal or answers unseen public questions,"
            " so these columns say little here; a pretrained model (the smollm2 preset) is the one to read."
        )
    elif (config.get("max_new_tokens") or 0) < 32:
        note += (
            " Answers this short are often cut off before the fact or the refusal they should state,"
            " so refusal rates and retention understate what longer answers show."
        )
    return note


def _ties(count: int) -> str:
    if not count:
        return ""
    return f" (ties in {count}: the same closure)" if count > 1 else " (a tie in 1: the same closure)"


def _tenths(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def summarize(trials: list[dict]) -> dict:
    """Counts and means across trials of the method's claim: the 2D edit beats the baselines."""
    with_oracle = [t for t in trials if t.get("heldout_closure")]
    beats_ta = sum(t["heldout_closure"]["sidecar_2d"] > t["heldout_closure"]["task_arithmetic"] for t in with_oracle)
    beats_diag = sum(t["heldout_closure"]["sidecar_2d"] > t["heldout_closure"]["diagonal"] for t in with_oracle)
    # A tie is the same closure, usually because validation selected the same (λ, γ) for both edits.
    ties_ta = sum(t["heldout_closure"]["sidecar_2d"] == t["heldout_closure"]["task_arithmetic"] for t in with_oracle)
    ties_diag = sum(t["heldout_closure"]["sidecar_2d"] == t["heldout_closure"]["diagonal"] for t in with_oracle)
    means = {}
    if with_oracle:
        for key, _ in CLOSURE_ROWS:
            means[key] = float(np.mean([t["heldout_closure"][key] for t in with_oracle]))
    return {
        "trials": len(trials),
        "trials_with_oracle": len(with_oracle),
        "sidecar_2d_beats_task_arithmetic": beats_ta,
        "sidecar_2d_beats_diagonal": beats_diag,
        "sidecar_2d_ties_task_arithmetic": ties_ta,
        "sidecar_2d_ties_diagonal": ties_diag,
        "mean_heldout_closure": means,
    }


def render_markdown(report: dict) -> str:
    """Render the report as tables a person reads: per-trial closures, errors, behaviour and timings."""
    trials = report["trials"]
    lines = [
        "# hf-sidecar demo report",
        "",
        f"Preset `{report['preset']}`, {len(trials)} trial(s), hf-sidecar {report['version']}. "
        "Closure is measured on held-out prompts about memorized authors; 1 is the oracle's refusal behaviour, 0 is no edit.",
        "",
    ]
    sizes = trials[0].get("split_sizes")
    if sizes:
        lines += [
            f"Prompts per trial: {sizes['validation']} validation (to select λ and γ), {sizes['test']} held-out memorized-author, "
            f"{sizes['public_eval']} public.",
            "",
        ]
    if any(t.get("heldout_closure") for t in trials):
        summary = report["summary"]
        several = summary["trials_with_oracle"] > 1
        header = "| edit | " + " | ".join(f"trial {i} (seed {t['seed']})" for i, t in enumerate(trials)) + (" | mean |" if several else " |")
        lines += ["## Held-out refusal closure", "", header, "|---" * (len(trials) + 1 + several) + "|"]
        for key, label in CLOSURE_ROWS:
            row = [_format(t["heldout_closure"][key]) if t.get("heldout_closure") else "n/a" for t in trials]
            if several:
                row.append(_format(summary["mean_heldout_closure"][key]))
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines += ["", "Selected coefficients (λ, γ) on validation closure:", ""]
        for i, t in enumerate(trials):
            if t.get("selected"):
                selected = ", ".join(f"{kind} ({v['lam']:g}, {v['gamma']:g})" for kind, v in t["selected"].items())
                lines.append(f"- trial {i}: {selected}")
        grid_values = report["config"]["grid"]
        edge = max(grid_values)
        # On a grid of two values every point is at an edge, so the warning would carry no information.
        at_edge = [] if len(grid_values) < 3 else [
            f"trial {i} {kind}" for i, t in enumerate(trials) if t.get("selected")
            for kind, v in t["selected"].items() if max(v["lam"], v["gamma"]) >= edge
        ]
        if at_edge:
            lines += ["", f"Selected at the grid's edge ({edge:g}): {', '.join(at_edge)}. A wider grid may select larger coefficients."]
        count = summary["trials_with_oracle"]
        lines += [
            "",
            f"The 2D edit beats task arithmetic in {summary['sidecar_2d_beats_task_arithmetic']} of {count} trials"
            f"{_ties(summary.get('sidecar_2d_ties_task_arithmetic', 0))} "
            f"and the diagonal in {summary['sidecar_2d_beats_diagonal']} of {count}{_ties(summary.get('sidecar_2d_ties_diagonal', 0))}.",
            "",
            "## Counterfactual parameter error",
            "",
            "‖θ̂ − θ_AS‖ / ‖θ_AMS − θ_AS‖, lower is better.",
            "",
            "| edit | " + " | ".join(f"trial {i}" for i in range(len(trials))) + " |",
            "|---" * (len(trials) + 1) + "|",
            "| Task arithmetic (1, 0) | " + " | ".join(_format((t["param_error"] or {}).get("task_arithmetic")) for t in trials) + " |",
            "| Sidecar (1, 1) | " + " | ".join(_format((t["param_error"] or {}).get("sidecar_1_1")) for t in trials) + " |",
        ]
    lines += [
        "",
        "## Greedy behaviour",
        "",
        _behaviour_note(report["config"]),
        "",
        "| model | refusal rate, memorized held-out | refusal rate, public | memory leakage (ROUGE-L recall) | public retention (ROUGE-L recall) |",
        "|---|---|---|---|---|",
    ]
    for i, t in enumerate(trials):
        for name, values in t.get("behaviour", {}).items():
            lines.append(
                f"| trial {i}: {name} | {_format(values['refusal_rate_memorized'])} | {_format(values['refusal_rate_public'])} | "
                f"{_format(values['memory_leakage'])} | {_format(values['public_retention'])} |"
            )
    lines += ["", "## Seconds", "", _seconds_table(report)]
    sizes = trials[0].get("sizes")
    if sizes:
        share = sizes["sidecar_bytes"] / sizes["checkpoint_bytes"] if sizes["checkpoint_bytes"] else float("nan")
        lines += [
            "",
            f"Sidecar folder on disk (all files): {sizes['sidecar_bytes']:,} bytes; model checkpoint (safetensors files): "
            f"{sizes['checkpoint_bytes']:,} bytes ({share:.1%}).",
        ]
    lines.append("")
    return "\n".join(lines)


def _seconds_table(report: dict) -> str:
    """Render the seconds per part of each trial as a table. A phase that the preset does not run shows a dash."""
    skipped = {"phase_a"} if report.get("config", {}).get("phase_a", True) is None else set()
    lines = [
        "| trial | " + " | ".join(label for _, label in SECONDS_COLUMNS) + " | other | total | total, minutes |",
        "|---" * (len(SECONDS_COLUMNS) + 4) + "|",
    ]
    for i, t in enumerate(report["trials"]):
        seconds = t["seconds"]
        parts = [None if key in skipped else seconds.get(key) for key, _ in SECONDS_COLUMNS]
        total = seconds.get("total")
        other = total - sum(v for v in parts if v is not None) if total is not None else None
        cells = ["–" if key in skipped else _tenths(v) for (key, _), v in zip(SECONDS_COLUMNS, parts)]
        cells += [_tenths(other), _tenths(total), _tenths(None if total is None else total / 60)]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
