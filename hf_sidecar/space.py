"""The Gradio app of the hf-sidecar Space: one prompt answered before and after revocation.

The page shows, side by side, the greedy answers of the safety-trained model (theta_AMS), of the
model revoked with the sidecar at the slider's (lam, gamma), of task arithmetic at (lam, 0), and
of the oracle theta_AS when the artifacts include it, each with a refusal badge judged by
:func:`hf_sidecar.metrics.is_refusal`. It also shows the validation-closure heatmap with the
selected edits and the current sliders, and the sidecar's card.

The app reads either a folder that ``hf-sidecar demo`` wrote (:func:`artifacts_source`) or Hub
repositories named by environment variables (:func:`source_from_environment`). Prompts reach
only the tokenizer, no user input becomes a path, and gradio's upload route, which every gradio
app has whether or not it shows a file input, is answered with 403 (:class:`RejectUploads`).

Privacy: gradio (checked on 6.31) starts a version check against api.gradio.app when a
``Blocks`` is created and sends usage analytics unless analytics are disabled, so
:func:`disable_telemetry` sets ``GRADIO_ANALYTICS_ENABLED=False`` before gradio is imported, and
:func:`build_app` passes ``analytics_enabled=False`` as well.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .live import (
    BEFORE,
    COEFFICIENT_MAX,
    COEFFICIENT_MIN,
    EDITED_VARIANTS,
    ORACLE,
    SIDECAR,
    TASK_ARITHMETIC,
    Answer,
    LiveRevocation,
    PromptError,
    check_coefficient,
)
from .sidecar import CARD_FILE, Sidecar

if TYPE_CHECKING:
    import gradio as gr

    from .evaluation import Grid

logger = logging.getLogger(__name__)

# Environment variables that select what a Space serves (Spaces exposes its "Variables" this way).
ENV_ARTIFACTS = "HF_SIDECAR_ARTIFACTS"
ENV_TRIAL = "HF_SIDECAR_TRIAL"
ENV_MODEL_REPO = "HF_SIDECAR_MODEL_REPO"
ENV_MODEL_REVISION = "HF_SIDECAR_MODEL_REVISION"
ENV_SIDECAR_REPO = "HF_SIDECAR_SIDECAR_REPO"
ENV_SIDECAR_SUBFOLDER = "HF_SIDECAR_SIDECAR_SUBFOLDER"
ENV_SIDECAR_REVISION = "HF_SIDECAR_SIDECAR_REVISION"
ENV_ORACLE_REPO = "HF_SIDECAR_ORACLE_REPO"
ENV_ORACLE_REVISION = "HF_SIDECAR_ORACLE_REVISION"
ENV_MAX_NEW_TOKENS = "HF_SIDECAR_MAX_NEW_TOKENS"
# Keys of the optional JSON config file, each the lower-case variable name without the prefix.
CONFIG_KEYS = {
    name.removeprefix("HF_SIDECAR_").lower(): name
    for name in (
        ENV_ARTIFACTS, ENV_TRIAL, ENV_MODEL_REPO, ENV_MODEL_REVISION, ENV_SIDECAR_REPO, ENV_SIDECAR_SUBFOLDER,
        ENV_SIDECAR_REVISION, ENV_ORACLE_REPO, ENV_ORACLE_REVISION, ENV_MAX_NEW_TOKENS,
    )
}

TELEMETRY_ENVIRONMENT = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}

VARIANT_TITLES = {
    BEFORE: "Before revocation",
    SIDECAR: "Revoked with the sidecar",
    TASK_ARITHMETIC: "Task arithmetic",
    ORACLE: "Oracle",
}
DEFAULT_QUEUE_SIZE = 16


def disable_telemetry(*, offline: bool = False) -> None:
    """Turn off gradio analytics and Hub telemetry for this process, and with ``offline`` all Hub requests.

    huggingface_hub reads ``HF_HUB_OFFLINE`` and ``HF_HUB_DISABLE_TELEMETRY`` when it is first
    imported, so they take effect only if this runs before that import (``spaces/app.py`` does).
    gradio reads ``GRADIO_ANALYTICS_ENABLED`` when a ``Blocks`` is created.
    """
    os.environ.update(TELEMETRY_ENVIRONMENT)
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"


# --------------------------------------------------------------------------------------------
# What the app serves


@dataclass
class ExamplePrompt:
    """A prompt offered on the page, with a label that explains why it is interesting."""

    label: str
    prompt: str


@dataclass
class SpaceSource:
    """Locations of the safety-trained model, the sidecar and the optional oracle and grid.

    ``model``, ``sidecar`` and ``oracle`` are local folders when ``local`` is true and Hub repo
    ids otherwise. ``grid`` is a ``grid.json`` written by the demo, and ``safety_data`` the
    safety phase's JSONL; both are optional and local.
    """

    model: str
    sidecar: str
    local: bool
    sidecar_subfolder: str | None = None
    oracle: str | None = None
    model_revision: str | None = None
    sidecar_revision: str | None = None
    oracle_revision: str | None = None
    grid: Path | None = None
    safety_data: Path | None = None
    examples: list[ExamplePrompt] = field(default_factory=list)


def artifacts_source(folder: str | Path, *, trial: int = 0) -> SpaceSource:
    """Describe a demo output folder (the ``--out`` of ``hf-sidecar demo``) or one of its trial folders.

    The trial folder must contain ``theta_AMS/`` and ``sidecar/``. ``theta_AS/`` (the oracle),
    ``grid.json`` and ``safety_data.jsonl`` are used when present.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"Artifacts folder {root} not found. Pass the folder that `hf-sidecar demo --out` wrote.")
    trial_dir = root if (root / "theta_AMS").is_dir() else root / f"trial-{trial}"
    for required in ("theta_AMS", "sidecar"):
        if not (trial_dir / required).is_dir():
            raise FileNotFoundError(
                f"{trial_dir / required} not found. Pass the folder that `hf-sidecar demo --out` wrote, or one of its "
                f"trial-N folders; it needs theta_AMS/ and sidecar/."
            )
    oracle = trial_dir / "theta_AS"
    grid = trial_dir / "grid.json"
    safety = trial_dir / "safety_data.jsonl"
    return SpaceSource(
        model=str(trial_dir / "theta_AMS"),
        sidecar=str(trial_dir / "sidecar"),
        local=True,
        oracle=str(oracle) if oracle.is_dir() else None,
        grid=grid if grid.is_file() else None,
        safety_data=safety if safety.is_file() else None,
    )


def source_from_environment(environ: Mapping[str, str] | None = None, config_file: str | Path | None = None) -> SpaceSource:
    """Read what to serve from ``HF_SIDECAR_*`` variables, falling back to a JSON config file.

    ``HF_SIDECAR_ARTIFACTS`` names a local demo output folder. Otherwise
    ``HF_SIDECAR_MODEL_REPO`` names the Hub repository of the safety-trained checkpoint and
    ``HF_SIDECAR_SIDECAR_REPO`` the sidecar's (default: the model repository, where ``hf-sidecar
    push`` puts sidecars under ``sidecars/<memory>``). ``HF_SIDECAR_ORACLE_REPO`` adds the oracle
    column. The config file uses the same names in lower case without the prefix
    (``{"model_repo": "user/model"}``); a variable wins over the file.
    """
    environ = os.environ if environ is None else environ
    settings: dict[str, str] = {}
    if config_file is not None and Path(config_file).is_file():
        try:
            loaded = json.loads(Path(config_file).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"Space config {config_file} is not valid JSON ({err}). Fix the file or delete it.") from err
        if not isinstance(loaded, dict):
            raise ValueError(f"Space config {config_file} must hold a JSON object, got {type(loaded).__name__}.")
        unknown = sorted(set(loaded) - set(CONFIG_KEYS) - {"examples"})
        if unknown:
            raise ValueError(f"Space config {config_file} has unknown key {unknown[0]!r}; the keys are {sorted(CONFIG_KEYS)} and 'examples'.")
        settings = {CONFIG_KEYS[key]: str(value) for key, value in loaded.items() if key in CONFIG_KEYS and value is not None}
        examples = [ExamplePrompt(str(item["label"]), str(item["prompt"])) for item in loaded.get("examples", [])]
    else:
        examples = []
    for name in CONFIG_KEYS.values():
        if environ.get(name):
            settings[name] = environ[name]

    if settings.get(ENV_ARTIFACTS):
        source = artifacts_source(settings[ENV_ARTIFACTS], trial=_integer(settings, ENV_TRIAL, 0))
    elif settings.get(ENV_MODEL_REPO):
        source = SpaceSource(
            model=settings[ENV_MODEL_REPO],
            sidecar=settings.get(ENV_SIDECAR_REPO) or settings[ENV_MODEL_REPO],
            local=False,
            sidecar_subfolder=settings.get(ENV_SIDECAR_SUBFOLDER),
            oracle=settings.get(ENV_ORACLE_REPO),
            model_revision=settings.get(ENV_MODEL_REVISION),
            sidecar_revision=settings.get(ENV_SIDECAR_REVISION),
            oracle_revision=settings.get(ENV_ORACLE_REVISION),
        )
    else:
        raise ValueError(
            f"Nothing to serve: set {ENV_ARTIFACTS} to a folder that `hf-sidecar demo` wrote, or {ENV_MODEL_REPO} "
            f"(and optionally {ENV_SIDECAR_REPO}, {ENV_ORACLE_REPO}) to Hub repositories"
            + (f", as variables or in {config_file}." if config_file else " as environment variables.")
        )
    source.examples = examples
    return source


def max_new_tokens_from_environment(environ: Mapping[str, str] | None = None, default: int = 48) -> int:
    """Return the generation limit set by ``HF_SIDECAR_MAX_NEW_TOKENS``, or ``default``."""
    return _integer(os.environ if environ is None else environ, ENV_MAX_NEW_TOKENS, default)


def _integer(settings: Mapping[str, str], name: str, default: int) -> int:
    value = settings.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}.") from None


def load_live(source: SpaceSource, *, max_new_tokens: int = 48, device: str | None = None) -> tuple[LiveRevocation, str]:
    """Load the model, sidecar and oracle of ``source``; return the live model and the sidecar card's text.

    Local sources are read with ``local_files_only``, so they make no Hub request. The model
    loads in its checkpoint's dtype, which the sidecar's content digest is checked against.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io import load_checkpoint

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hub_options = {"local_files_only": True} if source.local else {"revision": source.model_revision}
    logger.info("Loading the safety-trained model from %s", source.model)
    model = AutoModelForCausalLM.from_pretrained(source.model, dtype="auto", **hub_options).to(device)
    tokenizer = AutoTokenizer.from_pretrained(source.model, **hub_options)

    if source.local:
        sidecar = Sidecar.from_pretrained(Path(source.sidecar))
        card_path = Path(source.sidecar) / CARD_FILE
    else:
        from .hub import pull_sidecar

        pulled = pull_sidecar(source.sidecar, subfolder=source.sidecar_subfolder, revision=source.sidecar_revision)
        sidecar = pulled.sidecar
        card_path = Path(pulled.folder) / CARD_FILE
    if card_path.is_file():
        card = card_path.read_text(encoding="utf-8")
    else:
        from .card import sidecar_card

        card = sidecar_card(sidecar)

    oracle = None
    if source.oracle:
        names = {name for name, _ in model.named_parameters()}
        if source.local:
            oracle_dir = source.oracle
        else:
            from huggingface_hub import snapshot_download

            oracle_dir = snapshot_download(source.oracle, revision=source.oracle_revision, allow_patterns=["*.safetensors", "*.json"])
        logger.info("Loading the oracle from %s", source.oracle)
        oracle = load_checkpoint(oracle_dir, names)
    live = LiveRevocation(model, tokenizer, sidecar, oracle=oracle, max_new_tokens=max_new_tokens)
    return live, card


# --------------------------------------------------------------------------------------------
# Example prompts


def example_prompts(sidecar: Sidecar, *, safety_data: str | Path | None = None) -> list[ExamplePrompt]:
    """Pick a safety-trained memorized question, a held-out memorized question and a public question.

    The recorded safety process lists its example ids. The demo names them after the bundled
    TOFU rows (``fictitious-0050-refusal``, ``world-facts-0013-retain``), so the bundled data
    shows which memorized questions safety training saw. For other data, ``safety_data`` (the
    safety phase's JSONL) gives the first two kinds of prompt, and the held-out one is left out.
    """
    from .data import load_data, read_examples

    safety_ids = {example_id for step in sidecar.process.get("steps", []) for example_id in step.get("examples", [])}
    data = load_data()
    by_id = {example.id: example for example in [*data.fictitious, *data.public]}
    seen = [by_id[i.removesuffix("-refusal")] for i in sorted(safety_ids) if i.endswith("-refusal") and i.removesuffix("-refusal") in by_id]
    authors = sorted({example.author for example in seen if example.author})
    memorized = set(sidecar.memory.split("+"))
    examples: list[ExamplePrompt] = []
    if seen and authors and set(authors) <= memorized:
        examples.append(ExamplePrompt(f"Safety-trained question about {seen[0].author}", seen[0].question))
        held_out = [e for e in data.fictitious if e.author in authors and f"{e.id}-refusal" not in safety_ids]
        if held_out:
            examples.append(ExamplePrompt(f"Held-out question about {held_out[0].author}", held_out[0].question))
        public = [e for e in data.public if f"{e.id}-retain" not in safety_ids]
        if public:
            examples.append(ExamplePrompt("Public question", public[0].question))
        return examples

    if safety_data is not None and Path(safety_data).is_file():
        rows = read_examples(safety_data)
        refusals = [row for row in rows if row.kind == "refusal"]
        retained = [row for row in rows if row.kind == "retain"]
        if refusals:
            examples.append(ExamplePrompt("Safety-trained memorized question", refusals[0].question))
        if retained:
            examples.append(ExamplePrompt("Public question (safety retain set)", retained[0].question))
    if not examples:
        logger.warning("Found no example prompts for sidecar %r: its safety data is neither bundled nor given", sidecar.memory)
    return examples


# --------------------------------------------------------------------------------------------
# What the page shows


def _coefficients_text(lam: float | None, gamma: float | None) -> str:
    return "" if lam is None else f" (λ = {lam:g}, γ = {gamma:g})"


def column_title(variant: str, lam: float, gamma: float) -> str:
    """The Markdown heading of one answer column at the sliders' coefficients."""
    if variant == SIDECAR:
        return f"### {VARIANT_TITLES[variant]}{_coefficients_text(lam, gamma)}"
    if variant == TASK_ARITHMETIC:
        return f"### {VARIANT_TITLES[variant]}{_coefficients_text(lam, 0.0)}"
    if variant == ORACLE:
        return f"### {VARIANT_TITLES[variant]} θ_AS (never saw the memory)"
    return f"### {VARIANT_TITLES[variant]} (θ_AMS)"


def badge_html(answer: Answer | None) -> str:
    """An inline badge saying whether ``answer`` refuses, as judged by :func:`hf_sidecar.metrics.is_refusal`.

    ``data-refusal`` is ``true``, ``false`` or ``pending`` (no answer yet); an answer without
    text (the model ended at once) is not a refusal and gets its own label.
    """
    if answer is None:
        return '<span class="refusal-badge" data-refusal="pending" style="color:#666">no answer yet</span>'
    if not answer.text.strip():
        return (
            '<span class="refusal-badge" data-refusal="false" data-empty="true" '
            'style="background:#777;color:white;padding:2px 8px;border-radius:8px">No text</span>'
        )
    if answer.refusal:
        return (
            '<span class="refusal-badge" data-refusal="true" '
            'style="background:#5b3fa6;color:white;padding:2px 8px;border-radius:8px">Refuses</span>'
        )
    return (
        '<span class="refusal-badge" data-refusal="false" '
        'style="background:#1565c0;color:white;padding:2px 8px;border-radius:8px">Answers</span>'
    )


def strip_front_matter(card: str) -> str:
    """Remove the YAML metadata block from the start of a model card's text."""
    if card.startswith("---"):
        end = card.find("\n---", 3)
        if end != -1:
            return card[end + 4 :].lstrip("\n")
    return card


def card_summary(sidecar: Sidecar) -> str:
    """Markdown facts from the sidecar's config: what it revokes, epsilon, the recommendation, digests."""
    config = sidecar.config
    lam, gamma = sidecar.recommended
    parameters = config["parameters"]
    factored = sum(1 for entry in parameters.values() if (entry.get("delta") or {}).get("storage") == "factored")
    process = config.get("process", {})
    lines = [
        f"- **Revokes memory:** `{sidecar.memory}`",
        f"- **Covers:** {len(parameters)} tensors ({factored} stored as low-rank factors), mode `{config.get('mode')}`",
        f"- **ε (secant step):** {config.get('epsilon')}, estimator `{config.get('estimator')}`",
        f"- **Recommended:** λ = {lam:g}, γ = {gamma:g} (rule `{config['recommended'].get('rule', 'theory')}`)",
        f"- **Applies to checkpoint content digest:** `{sidecar.content_digest}`",
        f"- **Safety process:** `{process.get('name')}`, {process.get('num_steps')} steps, digest `{str(process.get('digest'))[:16]}`",
    ]
    closures = (config.get("metrics") or {}).get("heldout_closure") or {}
    if closures:
        measured = ", ".join(f"{name} {value:.3f}" for name, value in closures.items() if value is not None)
        lines.append(f"- **Held-out refusal closure at build time:** {measured}")
    lines.append(
        "\nThe sidecar stores the memory update itself, so it is as sensitive as the checkpoint. Revoking at load time, as "
        "this page does, changes what the served model says; it is not deletion."
    )
    return "\n".join(lines)


def selected_points(sidecar: Sidecar) -> dict[str, tuple[float, float]]:
    """Return the edits chosen on the validation grid at build time, from the sidecar's metrics (empty if none)."""
    selected = (sidecar.config.get("metrics") or {}).get("validation_selected") or {}
    return {kind: (float(point["lam"]), float(point["gamma"])) for kind, point in selected.items()}


def closure_figure(grid: Grid, selected: Mapping[str, tuple[float, float]], lam: float, gamma: float):
    """Draw the validation-closure heatmap with the selected edits and the current ``(lam, gamma)``.

    Returns a matplotlib figure. A point between grid values is placed by linear interpolation of
    the grid indices, and a point outside the grid is clamped to its edge.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .report import SELECTION_MARKERS, draw_closure_grid

    figure, axes = plt.subplots(figsize=(5.6, 5.0), dpi=100)
    image = draw_closure_grid(axes, grid, title="Validation refusal closure", fontsize=7)

    def position(point_lam: float, point_gamma: float) -> tuple[float, float]:
        x = float(np.interp(point_gamma, grid.gammas, range(len(grid.gammas))))
        y = float(np.interp(point_lam, grid.lams, range(len(grid.lams))))
        return x, y

    for kind, (point_lam, point_gamma) in selected.items():
        if kind not in SELECTION_MARKERS:
            continue
        marker, label = SELECTION_MARKERS[kind]
        x, y = position(point_lam, point_gamma)
        axes.scatter([x], [y], marker=marker, s=150, facecolors="none", edgecolors="red", linewidths=1.6, label=f"{label} ({point_lam:g}, {point_gamma:g})")
    # A wide hollow ring, so a selected edit under the sliders' point stays visible inside it.
    x, y = position(lam, gamma)
    axes.scatter([x], [y], marker="o", s=460, facecolors="none", edgecolors="black", linewidths=2.4, label=f"sliders ({lam:g}, {gamma:g})")
    axes.scatter([x], [y], marker="o", s=460, facecolors="none", edgecolors="white", linewidths=1.0)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=7, markerscale=0.6, frameon=False)
    figure.colorbar(image, ax=axes, label="closure")
    figure.tight_layout()
    plt.close(figure)
    return figure


# --------------------------------------------------------------------------------------------
# The app


class PageHandlers:
    """The page's event handlers: each validates its inputs and turns a :class:`PromptError` into a ``gr.Error``."""

    def __init__(self, live: LiveRevocation, grid: Grid | None, selected: Mapping[str, tuple[float, float]], show_heatmap: bool) -> None:
        self.live = live
        self.grid = grid
        self.selected = selected
        self.show_heatmap = show_heatmap and grid is not None

    @staticmethod
    def _column(variant: str, answer: Answer, lam: float, gamma: float) -> list:
        return [column_title(variant, lam, gamma), badge_html(answer), answer.text]

    def _answer(self, prompt: str, lam: float, gamma: float, variants: Sequence[str] | None = None) -> dict[str, Answer]:
        import gradio as gr

        try:
            return self.live.answer(prompt, lam, gamma, variants=variants)
        except PromptError as err:
            raise gr.Error(str(err)) from None

    def generate(self, prompt: str, lam: float, gamma: float) -> list:
        """Answer ``prompt`` in every column; returns the session's last prompt, the status and each column's title, badge and text."""
        answers = self._answer(prompt, lam, gamma)
        lam, gamma = answers[SIDECAR].lam, answers[SIDECAR].gamma
        refusing = [VARIANT_TITLES[variant].lower() for variant, answer in answers.items() if answer.refusal]
        outputs: list = [str(prompt).strip(), f"Answered at λ = {lam:g}, γ = {gamma:g}. Refusing: {', '.join(refusing) or 'none'}."]
        for variant in self.live.variants:
            outputs += self._column(variant, answers[variant], lam, gamma)
        return outputs

    def recompute(self, last_prompt: str, lam: float, gamma: float) -> list:
        """Recompute the two revoked columns and the heatmap at new coefficients, for the session's last prompt if any."""
        import gradio as gr

        try:
            lam = check_coefficient("lam", lam)
            gamma = check_coefficient("gamma", gamma)
        except PromptError as err:
            raise gr.Error(str(err)) from None
        outputs: list = []
        if last_prompt:
            answers = self._answer(last_prompt, lam, gamma, variants=EDITED_VARIANTS)
            outputs.append(f"Revoked answers recomputed at λ = {lam:g}, γ = {gamma:g}.")
            for variant in EDITED_VARIANTS:
                outputs += self._column(variant, answers[variant], lam, gamma)
        else:
            outputs.append(f"Coefficients set to λ = {lam:g}, γ = {gamma:g}. Press Generate to answer.")
            for variant in EDITED_VARIANTS:
                outputs += [column_title(variant, lam, gamma), gr.skip(), gr.skip()]
        if self.show_heatmap:
            outputs.append(closure_figure(self.grid, self.selected, lam, gamma))
        return outputs

    def answers(self, prompt: str, lam: float, gamma: float) -> dict:
        """Answer ``prompt`` with every compared model; returns one entry per model with its text and refusal flag."""
        return {variant: answer.to_dict() for variant, answer in self._answer(prompt, lam, gamma).items()}


def build_app(
    artifacts: str | Path | None = None,
    *,
    source: SpaceSource | None = None,
    live: LiveRevocation | None = None,
    card: str | None = None,
    trial: int = 0,
    max_new_tokens: int = 48,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    examples: Sequence[ExamplePrompt] | None = None,
) -> gr.Blocks:
    """Build the Space's page for a demo output folder ``artifacts`` or a :class:`SpaceSource`.

    ``live`` and ``card`` reuse an already loaded model (tests build several apps on one).
    ``examples`` overrides the example prompts, which otherwise come from the source or from
    :func:`example_prompts`. The queue accepts up to ``queue_size`` waiting requests, and every
    event that touches the model runs one at a time.
    """
    if queue_size < 1:
        raise ValueError(f"queue_size must be at least 1, got {queue_size}.")
    if source is None:
        if artifacts is None:
            raise ValueError("Pass artifacts (a folder that `hf-sidecar demo` wrote) or a SpaceSource.")
        source = artifacts_source(artifacts, trial=trial)
    disable_telemetry(offline=source.local)
    import gradio as gr

    if live is None:
        live, card = load_live(source, max_new_tokens=max_new_tokens)
    card = card or ""
    sidecar = live.sidecar
    grid = None
    if source.grid is not None:
        from .evaluation import Grid

        grid = Grid.from_dict(json.loads(source.grid.read_text(encoding="utf-8")))
    selected = selected_points(sidecar)
    if examples is None:
        examples = source.examples or example_prompts(sidecar, safety_data=source.safety_data)
    lam0, gamma0 = sidecar.recommended
    lam0 = min(max(lam0, COEFFICIENT_MIN), COEFFICIENT_MAX)
    gamma0 = min(max(gamma0, COEFFICIENT_MIN), COEFFICIENT_MAX)
    variants = live.variants

    with gr.Blocks(title="hf-sidecar: revoke a memory, keep safety", analytics_enabled=False) as app:
        gr.Markdown(
            "# Revoke a memory, keep safety training\n"
            "A model learned private facts (the *memory*) and was then safety-trained to refuse questions about them. "
            f"Its sidecar revokes the memory `{sidecar.memory}`: θ̂ = θ_AMS − λ Δ_M − γ R̂. Ask a question and compare "
            "the answers before revocation, after revocation with the sidecar, after task arithmetic (γ = 0)"
            + (", and from the oracle that never saw the memory." if live.has_oracle else ".")
        )
        last_prompt = gr.State("")
        with gr.Row():
            prompt = gr.Textbox(
                label="Prompt", placeholder="Ask about an author…", lines=2, max_length=live.max_prompt_chars,
                elem_id="prompt", scale=4,
            )
            generate = gr.Button("Generate", variant="primary", elem_id="generate", scale=1)
        if examples:
            gr.Examples(
                examples=[[example.prompt] for example in examples], inputs=[prompt], example_labels=[example.label for example in examples],
                label="Example prompts", cache_examples=False, elem_id="examples",
            )
        with gr.Row():
            lam = gr.Slider(COEFFICIENT_MIN, COEFFICIENT_MAX, value=lam0, step=0.05, label="λ (memory coefficient)", elem_id="lam")
            gamma = gr.Slider(COEFFICIENT_MIN, COEFFICIENT_MAX, value=gamma0, step=0.05, label="γ (transport coefficient)", elem_id="gamma")
        status = gr.Markdown("Pick an example prompt or type one, then press Generate.", elem_id="status")
        titles, badges, texts = {}, {}, {}
        with gr.Row(equal_height=True):
            for variant in variants:
                with gr.Column(elem_id=f"column-{variant}", min_width=200):
                    titles[variant] = gr.Markdown(column_title(variant, lam0, gamma0), elem_id=f"title-{variant}")
                    badges[variant] = gr.HTML(badge_html(None), elem_id=f"badge-{variant}", js_on_load=None)
                    texts[variant] = gr.Textbox(label="Answer", lines=4, interactive=False, elem_id=f"answer-{variant}")
        with gr.Row():
            with gr.Column():
                if grid is not None:
                    heatmap = gr.Plot(closure_figure(grid, selected, lam0, gamma0), label="Validation closure", elem_id="heatmap", format="png")
                else:
                    heatmap = None
                    gr.Markdown("No validation grid in these artifacts, so the closure heatmap is not shown.", elem_id="heatmap-missing")
            with gr.Column():
                gr.Markdown("## The sidecar\n" + card_summary(sidecar), elem_id="card")
                with gr.Accordion("Full model card", open=False):
                    gr.Markdown(strip_front_matter(card), elem_id="card-full")

        handlers = PageHandlers(live, grid, selected, heatmap is not None)
        column_components = [component for variant in variants for component in (titles[variant], badges[variant], texts[variant])]
        gr.on(
            triggers=[generate.click, prompt.submit], fn=handlers.generate, inputs=[prompt, lam, gamma],
            outputs=[last_prompt, status, *column_components], api_name="generate", concurrency_id="model",
            concurrency_limit=1,
        )
        edited_components = [component for variant in EDITED_VARIANTS for component in (titles[variant], badges[variant], texts[variant])]
        gr.on(
            triggers=[lam.release, gamma.release], fn=handlers.recompute, inputs=[last_prompt, lam, gamma],
            outputs=[status, *edited_components, *([heatmap] if heatmap is not None else [])], api_name="revoke",
            concurrency_id="model", concurrency_limit=1, trigger_mode="always_last",
        )
        gr.api(handlers.answers, api_name="answers", concurrency_id="model", concurrency_limit=1)
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    return app


class RejectUploads:
    """ASGI middleware that answers every request to gradio's upload routes with 403 Forbidden.

    gradio (6.31) writes any uploaded file, even an empty one that ``max_file_size=0`` lets
    through, into its cache folder. The page takes no files, so no upload reaches the disk.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].rstrip("/").endswith("/upload"):
            await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b"This app takes no file uploads."})
            return
        await self.app(scope, receive, send)


def launch_app(app: gr.Blocks, *, host: str | None = "127.0.0.1", port: int | None = None, block: bool = True, quiet: bool = False):
    """Start ``app`` with the Space's privacy settings; returns gradio's ``(app, local_url, share_url)``.

    ``host=None`` leaves the address to gradio (``GRADIO_SERVER_NAME``, which Spaces sets to
    0.0.0.0). Never shares through gradio's tunnel, keeps no run history, no monitoring page and
    no MCP server, and rejects uploads, since the page takes no files.
    """
    from starlette.middleware import Middleware

    return app.launch(
        server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=quiet,
        max_file_size=0, run_history=False, enable_monitoring=False, show_error=True, ssr_mode=False, mcp_server=False,
        app_kwargs={"middleware": [Middleware(RejectUploads)]},
    )
