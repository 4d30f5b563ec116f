"""The main job: train the three phases on bundled data, build the sidecar and evaluate it.

``run_demo`` writes to its output folder, per trial, the checkpoints (``theta_A``, ``theta_AM``,
``theta_AMS`` and the oracle ``theta_AS``), the sidecar folder, the safety data and process,
the cached validation grid and a heatmap, and at the top ``report.json`` and ``report.md``.
A trial whose ``result.json`` exists with the same settings is reused, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import __version__
from .build import build_sidecar, run_oracle
from .data import SplitSizes, load_data, make_splits, tokenize_examples, write_jsonl
from .edit import revoke_model_, revoke_state_dict
from .evaluation import DEFAULT_GRID, evaluate_grid, scores_at
from .io import atomic_directory, atomic_write_json, file_digests
from .metrics import RefusalScorer, behaviour_metrics, closure, parameter_error
from .adapters import AdapterSpec, adapter_trace, build_adapter_sidecar, factored_update, train_adapter_phase
from .models import TinyLlamaSpec, load_base_model, load_tiny_tokenizer, tiny_llama
from .process import ProcessConfig, load_parameters, state_of, train
from .report import save_heatmap, summarize, write_report

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Everything a demo trial depends on; its hash keys the resumable per-trial results."""

    preset: str
    model: TinyLlamaSpec = field(default_factory=TinyLlamaSpec)
    splits: SplitSizes = field(default_factory=lambda: SplitSizes(refusal_pool=8))
    phase_a: ProcessConfig | None = field(default_factory=lambda: ProcessConfig(learning_rate=3e-3, num_epochs=40, batch_size=8, warmup_steps=20))
    phase_m: ProcessConfig = field(default_factory=lambda: ProcessConfig(learning_rate=2e-3, num_epochs=30, batch_size=8, warmup_steps=10))
    phase_s: ProcessConfig = field(default_factory=lambda: ProcessConfig(learning_rate=1e-3, num_epochs=3, batch_size=8))
    grid: tuple[float, ...] = DEFAULT_GRID
    epsilon: float = 1.0
    max_new_tokens: int = 40
    dtype: str = "float32"
    # A pretrained causal LM ("smollm2", a local folder or a Hub id) instead of the tiny model
    # trained from scratch; phase_a = None then keeps the pretrained model as theta_A.
    base_model: str | None = None
    # LoRA settings for the memory and safety phases; None trains them as full fine-tuning.
    adapter: AdapterSpec | None = None
    eval_batch_size: int = 16

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:16]


PRESETS: dict[str, DemoConfig] = {
    "tiny": DemoConfig(preset="tiny"),
    # A still smaller configuration for the test suite: one layer, few steps, a 3x3 grid.
    "test": DemoConfig(
        preset="test",
        model=TinyLlamaSpec(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
        splits=SplitSizes(
            memorized_authors=2, safety_per_author=6, validation_per_author=3, test_per_author=3, public_retain=10, public_eval=8, refusal_pool=8
        ),
        phase_a=ProcessConfig(learning_rate=3e-3, num_epochs=2, batch_size=16),
        phase_m=ProcessConfig(learning_rate=3e-3, num_epochs=4, batch_size=8),
        phase_s=ProcessConfig(learning_rate=1e-3, num_epochs=1, batch_size=8),
        grid=(0.0, 0.5, 1.0),
        max_new_tokens=8,
    ),
    # SmolLM2-135M-Instruct with LoRA r = 8 on every attention and MLP projection; one trial
    # took 14 minutes on 2 idle CPU cores (docs/benchmarks.md).
    "smollm2": DemoConfig(
        preset="smollm2",
        base_model="smollm2",
        adapter=AdapterSpec(r=8, lora_alpha=16),
        splits=SplitSizes(),
        phase_a=None,
        phase_m=ProcessConfig(learning_rate=2e-3, num_epochs=3, batch_size=8, warmup_steps=5, max_length=128),
        phase_s=ProcessConfig(learning_rate=1e-3, num_epochs=2, batch_size=8, max_length=128),
        max_new_tokens=40,
    ),
    # The smollm2 path end to end in about a minute: one author, one epoch each, a 2x2 grid.
    "smollm2-smoke": DemoConfig(
        preset="smollm2-smoke",
        base_model="smollm2",
        adapter=AdapterSpec(r=8, lora_alpha=16),
        splits=SplitSizes(memorized_authors=1, safety_per_author=4, validation_per_author=2, test_per_author=2, public_retain=4, public_eval=4),
        phase_a=None,
        phase_m=ProcessConfig(learning_rate=2e-3, num_epochs=1, batch_size=8, max_length=128),
        phase_s=ProcessConfig(learning_rate=1e-3, num_epochs=1, batch_size=8, max_length=128),
        grid=(0.0, 1.0),
        max_new_tokens=12,
    ),
}


def preset_for_model(preset: str, model: str) -> DemoConfig:
    """``preset``'s settings applied to another pretrained model (adapter settings of smollm2 for from-scratch presets)."""
    config = get_preset(preset)
    if config.base_model is None:
        config = get_preset("smollm2")
    return replace(config, preset=f"{config.preset}@{model}", base_model=model)


def get_preset(name: str) -> DemoConfig:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]


def _save_checkpoint(model, tokenizer, folder: Path) -> dict[str, str]:
    with atomic_directory(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return file_digests(folder)


def _point(lam: float, gamma: float) -> dict[str, float]:
    return {"lam": float(lam), "gamma": float(gamma)}


def _merged(theta: dict[str, torch.Tensor], factors) -> dict[str, torch.Tensor]:
    merged = dict(theta)
    for name, (a, b, scaling) in factors.items():
        merged[name] = (theta[name].float() + scaling * (b.float() @ a.float())).to(theta[name].dtype)
    return merged


def run_trial(config: DemoConfig, data, seed: int, trial_dir: Path, *, oracle: bool = True, progress: bool = True) -> dict:
    """Run one trial end to end and return its result (also written to ``trial_dir/result.json``)."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, config.dtype)
    if config.base_model is None:
        tokenizer = load_tiny_tokenizer()
        model = tiny_llama(config.model, tokenizer, seed=seed, dtype=dtype)
    else:
        model, tokenizer = load_base_model(config.base_model, dtype=dtype)
    pad = tokenizer.pad_token_id
    splits = make_splits(data, config.splits, seed)
    logger.info("Trial seed %d: memorized authors %s; split sizes %s", seed, splits.memorized_authors, splits.summary())
    seconds: dict[str, float | None] = {}

    def phase(name: str, process_config: ProcessConfig, examples, init_offset: int):
        nonlocal model
        tokenized = tokenize_examples(tokenizer, examples, process_config.max_length)
        began = time.perf_counter()
        process_config = replace(process_config, seed=seed)
        factors = None
        if config.adapter is not None:
            spec = replace(config.adapter, init_seed=seed * 100 + init_offset)
            model, record, factors = train_adapter_phase(model, name, process_config, tokenized, spec, pad_token_id=pad, progress=progress)
        else:
            record = train(model, name, process_config, tokenized, pad_token_id=pad, progress=progress)
        return record, tokenized, factors, time.perf_counter() - began

    if config.phase_a is not None:
        _, _, _, seconds["phase_a"] = phase("public_skill", config.phase_a, splits.phase_a, 1)
    else:
        seconds["phase_a"] = None
    theta_a = state_of(dict(model.named_parameters()))
    _save_checkpoint(model, tokenizer, trial_dir / "theta_A")
    _, _, memory_factors, seconds["phase_m"] = phase("memory", config.phase_m, splits.phase_m, 2)
    theta_am = state_of(dict(model.named_parameters()))
    _save_checkpoint(model, tokenizer, trial_dir / "theta_AM")
    record, safety_examples, safety_factors, seconds["phase_s"] = phase("safety", config.phase_s, splits.phase_s, 3)
    theta_ams = state_of(dict(model.named_parameters()))
    ams_files = _save_checkpoint(model, tokenizer, trial_dir / "theta_AMS")
    write_jsonl(trial_dir / "safety_data.jsonl", splits.phase_s)
    # Write the evaluation prompt sets so that `hf-sidecar eval --prompts` can score other edits of this trial.
    for name, examples in (("validation", splits.validation), ("test", splits.test), ("public_eval", splits.public_eval)):
        write_jsonl(trial_dir / f"{name}.jsonl", examples)
    record.save(trial_dir / "safety_process.json")

    common = dict(
        memory="+".join(splits.memorized_authors),
        checkpoint_files=ams_files,
        base_model=str((trial_dir / "theta_AMS").resolve()),
        scoring_refusals=splits.scoring_refusals,
        pad_token_id=pad,
        progress=progress,
    )
    if config.adapter is not None:
        built = build_adapter_sidecar(
            model, record, safety_examples, theta_a=theta_a, memory_update=factored_update(memory_factors), theta_ams=theta_ams,
            safety_factors=safety_factors, epsilon=config.epsilon, **common,
        )
    else:
        built = build_sidecar(
            model, record, safety_examples, theta_a=theta_a, theta_am=theta_am, theta_ams=theta_ams, epsilon=config.epsilon, **common
        )
    sidecar = built.sidecar
    seconds["sidecar_trace"] = float(sum(built.trace_seconds))
    del theta_am

    result: dict = {
        "seed": seed,
        "memorized_authors": splits.memorized_authors,
        "split_sizes": splits.summary(),
        "heldout_closure": None,
        "validation_closure": None,
        "selected": None,
        "param_error": None,
        "behaviour": {},
        "seconds": seconds,
    }
    load_parameters(model, theta_ams)
    behaviour_models = {"theta_AMS (no edit)": None}
    if oracle:
        began = time.perf_counter()
        if config.adapter is not None:
            oracle_factors = adapter_trace(model, record, safety_examples, theta_a, pad_token_id=pad, description="oracle trace", progress=progress)
            theta_as = _merged(theta_a, oracle_factors)
            load_parameters(model, theta_as)
        else:
            theta_as = run_oracle(model, record, safety_examples, theta_a, pad_token_id=pad, progress=progress)
        seconds["oracle_trace"] = time.perf_counter() - began
        _save_checkpoint(model, tokenizer, trial_dir / "theta_AS")
        load_parameters(model, theta_ams)

        began = time.perf_counter()
        validation = RefusalScorer(tokenizer, splits.validation, splits.scoring_refusals, batch_size=config.eval_batch_size)
        test = RefusalScorer(tokenizer, splits.test, splits.scoring_refusals, batch_size=config.eval_batch_size)
        load_parameters(model, theta_as)
        oracle_val, oracle_test = validation.scores(model), test.scores(model)
        load_parameters(model, theta_ams)
        unedited_val, unedited_test = validation.scores(model), test.scores(model)
        grid = evaluate_grid(
            model, validation, theta_ams, sidecar, oracle_val, unedited_val, lams=config.grid, gammas=config.grid, progress=progress
        )
        selected = grid.select()
        selected["sidecar_1_1"] = (1.0, 1.0)
        heldout = {"no_edit": closure(unedited_test, oracle_test, unedited_test)}
        for kind, (lam, gamma) in selected.items():
            heldout[kind] = closure(scores_at(model, test, theta_ams, sidecar, lam, gamma), oracle_test, unedited_test)
        seconds["grid"] = time.perf_counter() - began
        atomic_write_json(trial_dir / "grid.json", grid.to_dict())
        save_heatmap(grid, {k: v for k, v in selected.items() if k != "sidecar_1_1"}, trial_dir / "validation_closure.png", title=f"Validation closure, seed {seed}")

        def edited(lam: float, gamma: float) -> dict[str, torch.Tensor]:
            return revoke_state_dict(theta_ams, sidecar, lam=lam, gamma=gamma, verify=False)

        result["param_error"] = {
            "task_arithmetic": parameter_error(edited(1.0, 0.0), theta_as, theta_ams),
            "sidecar_1_1": parameter_error(edited(1.0, 1.0), theta_as, theta_ams),
        }
        result["heldout_closure"] = heldout
        result["validation_closure"] = {kind: grid.value(*point) for kind, point in selected.items()}
        result["selected"] = {kind: _point(*selected[kind]) for kind in ("task_arithmetic", "diagonal", "sidecar_2d")}
        lam, gamma = selected["sidecar_2d"]
        sidecar.config["recommended"] = {"lam": lam, "gamma": gamma, "rule": "validation_closure"}
        sidecar.config["metrics"] = {
            "heldout_closure": heldout,
            "param_error": result["param_error"],
            "validation_selected": result["selected"],
        }
        behaviour_models["oracle theta_AS"] = theta_as
        behaviour_models[f"task arithmetic ({selected['task_arithmetic'][0]:g}, 0)"] = ("edit", selected["task_arithmetic"])
        behaviour_models[f"sidecar 2D ({lam:g}, {gamma:g})"] = ("edit", selected["sidecar_2d"])
    else:
        seconds["oracle_trace"] = None
        seconds["grid"] = None
        behaviour_models["sidecar (1, 1)"] = ("edit", (1.0, 1.0))

    for name, how in behaviour_models.items():
        if how is None:
            load_parameters(model, theta_ams)
        elif isinstance(how, tuple):
            revoke_model_(model, sidecar, lam=how[1][0], gamma=how[1][1], verify=False, reference=theta_ams)
        else:
            load_parameters(model, how)
        result["behaviour"][name] = behaviour_metrics(model, tokenizer, splits.test, splits.public_eval, max_new_tokens=config.max_new_tokens)
    load_parameters(model, theta_ams)

    # `hf-sidecar eval` decodes with the same limit by default, so its greedy metrics match the report.
    sidecar.config["evaluation"] = {"max_new_tokens": config.max_new_tokens}
    sidecar.save_pretrained(trial_dir / "sidecar")
    result["sizes"] = {
        "sidecar_bytes": sum(f.stat().st_size for f in (trial_dir / "sidecar").iterdir()),
        "checkpoint_bytes": sum(f.stat().st_size for f in (trial_dir / "theta_AMS").glob("*.safetensors")),
    }
    return result


def run_demo(
    out: str | Path,
    *,
    preset: str | DemoConfig = "tiny",
    trials: int = 1,
    seed: int = 0,
    data_dir: str | Path | None = None,
    oracle: bool = True,
    progress: bool = True,
    num_threads: int | None = None,
) -> dict:
    """Run ``trials`` demo trials (seeds ``seed``, ``seed + 1``, ...) and write the report to ``out``."""
    config = preset if isinstance(preset, DemoConfig) else get_preset(preset)
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}.")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(data_dir)
    key = {"config": config.digest(), "data": data.source, "oracle": oracle, "version": __version__}
    results = []
    for index in range(trials):
        trial_seed = seed + index
        trial_dir = out / f"trial-{index}"
        result_path = trial_dir / "result.json"
        if result_path.is_file():
            saved = json.loads(result_path.read_text())
            if saved.get("key") == key and saved.get("seed") == trial_seed:
                logger.info("Trial %d (seed %d) already finished; reusing %s", index, trial_seed, result_path)
                results.append(saved)
                continue
        began = time.perf_counter()
        result = run_trial(config, data, trial_seed, trial_dir, oracle=oracle, progress=progress)
        result["seconds"]["total"] = time.perf_counter() - began
        result["key"] = key
        atomic_write_json(result_path, result)
        results.append(result)
        logger.info("Trial %d finished in %.1f s", index, result["seconds"]["total"])
        _write(out, config, results, oracle)
    return _write(out, config, results, oracle)


def _report_config(config: DemoConfig) -> dict:
    values = json.loads(json.dumps(asdict(config), default=str))
    if config.base_model is not None:
        # The tiny-model shape is unused when a pretrained model runs; its own config.json is in each trial folder.
        values["model"] = None
    return values


def _write(out: Path, config: DemoConfig, results: list[dict], oracle: bool) -> dict:
    report = {
        "version": __version__,
        "preset": config.preset,
        "config": _report_config(config),
        "oracle": oracle,
        "trials": results,
        "summary": summarize(results),
    }
    write_report(out, report)
    return report
