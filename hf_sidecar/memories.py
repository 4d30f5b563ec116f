"""Several memories: one sidecar each, any subset revoked together.

A model contains K separate memories with updates ``delta_i`` (trained one after another, or as
separate adapters merged in turn), then goes through one safety process. The sidecar of memory
``i`` is built around the state with the other memories present:

    R_i = [S(theta_A + sum delta) - S(theta_A + sum delta - 2 delta_i)] / 2 - delta_i

which is the one-memory construction with ``theta_A`` replaced by ``theta_AM - delta_i``: one
extra trace per memory. Revoking a subset T applies ``theta_AMS - sum_{i in T} (lam delta_i +
gamma R_i)``, correct to first order. An oracle for every subset would cost ``2^K - 1`` safety
runs; the sidecars cost K traces.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from .adapters import build_adapter_sidecar
from .build import build_sidecar
from .data import TokenizedExample
from .process import ProcessRecord
from .sidecar import LowRank, Sidecar

logger = logging.getLogger(__name__)


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32, or float64 when it already is."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def sequential_updates(states: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Memory updates of phases trained one after another: ``states[i + 1] - states[i]``.

    ``states`` starts with ``theta_A`` and contains the parameter state after each memory phase.
    """
    if len(states) < 2:
        raise ValueError("Pass theta_A followed by the state after each memory phase (at least two states).")
    updates = []
    for before, after in zip(states[:-1], states[1:]):
        updates.append({name: _wide(after[name]) - _wide(before[name]) for name in after if not torch.equal(after[name], before[name])})
    return updates


def build_memory_sidecars(
    model: torch.nn.Module,
    record: ProcessRecord,
    examples: Mapping[str, TokenizedExample],
    *,
    theta_am: Mapping[str, torch.Tensor],
    theta_ams: Mapping[str, torch.Tensor],
    updates: Mapping[str, Mapping[str, torch.Tensor | LowRank]],
    estimator: str = "secant",
    **build_options,
) -> dict[str, Sidecar]:
    """Build one sidecar per named memory, each around the state with the other memories present.

    ``theta_am`` is the state with every memory trained in. ``updates`` maps each memory's name
    to its update: dense tensors for full fine-tuning, or ``LowRank`` factors for LoRA memories,
    which need an adapter safety process. Remaining keyword arguments go to
    :func:`build_sidecar` or :func:`build_adapter_sidecar`.
    """
    if not updates:
        raise ValueError("No memory given: pass at least one named memory update.")
    sidecars: dict[str, Sidecar] = {}
    for memory, update in updates.items():
        dense = {name: value.dense(torch.float32) if isinstance(value, LowRank) else _wide(value) for name, value in update.items()}
        # The start point without memory i: theta_AM - delta_i, in each tensor's own dtype.
        theta_without = {
            name: (_wide(value) - dense[name].to(_wide(value).dtype)).to(value.dtype) if name in dense else value
            for name, value in theta_am.items()
        }
        logger.info("Building the sidecar of memory %r (%d tensors)", memory, len(update))
        if record.adapter:
            if not all(isinstance(value, LowRank) for value in update.values()):
                raise ValueError(f"Memory {memory!r}: an adapter safety process needs LoRA (LowRank) memory updates.")
            options = {k: v for k, v in build_options.items() if k != "safety_factors"}
            built = build_adapter_sidecar(
                model, record, examples, theta_a=theta_without, memory_update=dict(update), theta_ams=theta_ams, memory=memory,
                safety_factors=build_options.get("safety_factors"), **{k: v for k, v in options.items() if k != "memory"},
            )
        else:
            built = build_sidecar(
                model, record, examples, theta_a=theta_without, theta_am=theta_am, theta_ams=theta_ams, memory=memory,
                estimator=estimator, **{k: v for k, v in build_options.items() if k != "memory"},
            )
        sidecars[memory] = built.sidecar
    return sidecars


def run_memories_benchmark(
    out,
    *,
    preset: str = "tiny",
    num_memories: int = 3,
    seed: int = 0,
    data_dir=None,
    progress: bool = True,
) -> dict:
    """Compare combined sidecar edits with task arithmetic on every non-empty subset of K memories.

    Trains the preset's public-skill phase, then K memory phases in turn (each on its own group
    of authors), then one safety phase over all of them. Builds K sidecars (K traces). For each
    of the ``2^K - 1`` subsets it runs the subset's own oracle (only for this benchmark). It then
    measures held-out closure and parameter error of the combined edit at (1, 1) and at the best
    validation point of the grid, and of task arithmetic. Writes ``memories.json`` and
    ``memories.md`` to ``out``.
    """
    import itertools
    import time
    from dataclasses import replace
    from pathlib import Path

    import numpy as np

    from .data import load_data, make_splits, tokenize_examples
    from .demo import get_preset
    from .edit import revoke_state_dict
    from .evaluation import evaluate_grid, scores_at
    from .io import atomic_write_json, atomic_write_text
    from .metrics import RefusalScorer, closure, parameter_error
    from .models import tiny_llama, load_tiny_tokenizer
    from .process import train, state_of, load_parameters, run_process

    config = get_preset(preset)
    if config.base_model is not None or config.adapter is not None:
        raise ValueError(f"The memories benchmark runs full fine-tuning presets; {preset!r} uses a pretrained model or adapters.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(data_dir)
    splits = make_splits(data, config.splits, seed)
    if len(splits.memorized_authors) < num_memories:
        raise ValueError(f"The preset memorizes {len(splits.memorized_authors)} authors, fewer than the {num_memories} memories requested.")
    groups = [splits.memorized_authors[index::num_memories] for index in range(num_memories)]
    names = ["+".join(group) for group in groups]
    tokenizer = load_tiny_tokenizer()
    pad = tokenizer.pad_token_id
    model = tiny_llama(config.model, tokenizer, seed=seed)
    seconds: dict[str, float] = {}

    def timed_train(name, process_config, examples):
        began = time.perf_counter()
        record = train(model, name, replace(process_config, seed=seed), tokenize_examples(tokenizer, examples, process_config.max_length), pad_token_id=pad, progress=progress)
        seconds[name] = time.perf_counter() - began
        return record

    if config.phase_a is not None:
        timed_train("public_skill", config.phase_a, splits.phase_a)
    states = [state_of(dict(model.named_parameters()))]
    for index, group in enumerate(groups):
        examples = [example for author in group for example in splits.memories[author]]
        timed_train(f"memory_{index}", config.phase_m, examples)
        states.append(state_of(dict(model.named_parameters())))
    theta_a, theta_am = states[0], states[-1]
    updates = dict(zip(names, sequential_updates(states)))
    safety_examples = tokenize_examples(tokenizer, splits.phase_s, config.phase_s.max_length)
    began = time.perf_counter()
    record = train(model, "safety", replace(config.phase_s, seed=seed), safety_examples, pad_token_id=pad, progress=progress)
    seconds["safety"] = time.perf_counter() - began
    theta_ams = state_of(dict(model.named_parameters()))

    began = time.perf_counter()
    sidecars = build_memory_sidecars(model, record, safety_examples, theta_am=theta_am, theta_ams=theta_ams, updates=updates, pad_token_id=pad, progress=progress)
    seconds["sidecar_traces"] = time.perf_counter() - began

    subsets = [subset for size in range(1, num_memories + 1) for subset in itertools.combinations(range(num_memories), size)]
    rows = []
    oracle_seconds = 0.0
    for subset in subsets:
        kept = dict(theta_a)
        for index in set(range(num_memories)) - set(subset):
            for name, value in updates[names[index]].items():
                kept[name] = (kept[name].float() + value).to(kept[name].dtype)
        began = time.perf_counter()
        oracle = run_process(model, record, safety_examples, start_state=kept, pad_token_id=pad, description="subset oracle", progress=progress)
        oracle_seconds += time.perf_counter() - began
        revoked_authors = {author for index in subset for author in groups[index]}
        validation = RefusalScorer(tokenizer, [e for e in splits.validation if e.author in revoked_authors], splits.scoring_refusals)
        test = RefusalScorer(tokenizer, [e for e in splits.test if e.author in revoked_authors], splits.scoring_refusals)
        load_parameters(model, oracle)
        oracle_val, oracle_test = validation.scores(model), test.scores(model)
        load_parameters(model, theta_ams)
        unedited_val, unedited_test = validation.scores(model), test.scores(model)
        chosen = [sidecars[names[index]] for index in subset]
        grid = evaluate_grid(model, validation, theta_ams, chosen, oracle_val, unedited_val, lams=config.grid, gammas=config.grid, progress=False)
        selected = grid.select()
        row = {"subset": [names[index] for index in subset], "selected": {k: list(v) for k, v in selected.items()}, "heldout_closure": {}, "param_error": {}}
        for label, (lam, gamma) in {"task_arithmetic_1_0": (1.0, 0.0), "sidecar_1_1": (1.0, 1.0), "task_arithmetic": selected["task_arithmetic"], "sidecar_2d": selected["sidecar_2d"]}.items():
            row["heldout_closure"][label] = closure(scores_at(model, test, theta_ams, chosen, lam, gamma), oracle_test, unedited_test)
            if label in ("task_arithmetic_1_0", "sidecar_1_1"):
                row["param_error"][label] = parameter_error(revoke_state_dict(theta_ams, chosen, lam=lam, gamma=gamma, verify=False), oracle, theta_ams)
        load_parameters(model, theta_ams)
        rows.append(row)
        logger.info("Subset %s: held-out closure %s", row["subset"], {k: round(v, 3) for k, v in row["heldout_closure"].items()})
    seconds["subset_oracles"] = oracle_seconds

    report = {
        "preset": preset,
        "seed": seed,
        "memories": names,
        "subsets": rows,
        "seconds": seconds,
        "cost": {
            "sidecar_traces": num_memories,
            "oracle_runs_for_every_subset": len(subsets),
            "sidecar_trace_seconds": seconds["sidecar_traces"],
            "oracle_seconds_for_every_subset": oracle_seconds,
        },
        "summary": {
            "sidecar_1_1_beats_task_arithmetic_1_0": int(sum(r["heldout_closure"]["sidecar_1_1"] > r["heldout_closure"]["task_arithmetic_1_0"] for r in rows)),
            "sidecar_2d_beats_task_arithmetic": int(sum(r["heldout_closure"]["sidecar_2d"] > r["heldout_closure"]["task_arithmetic"] for r in rows)),
            "subsets": len(rows),
            "mean_param_error": {k: float(np.mean([r["param_error"][k] for r in rows])) for k in ("task_arithmetic_1_0", "sidecar_1_1")},
        },
    }
    atomic_write_json(out / "memories.json", report)
    lines = [
        f"# Several memories: preset `{preset}`, K = {num_memories}, seed {seed}",
        "",
        "| revoked subset | closure TA (1, 0) | closure sidecar (1, 1) | closure TA best lam | closure sidecar 2D | param error TA (1, 0) | param error sidecar (1, 1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c, p = row["heldout_closure"], row["param_error"]
        lines.append(
            f"| {' & '.join(row['subset'])} | {c['task_arithmetic_1_0']:.3f} | {c['sidecar_1_1']:.3f} | {c['task_arithmetic']:.3f} | "
            f"{c['sidecar_2d']:.3f} | {p['task_arithmetic_1_0']:.3f} | {p['sidecar_1_1']:.3f} |"
        )
    lines += [
        "",
        f"Compute: {num_memories} sidecar traces took {seconds['sidecar_traces']:.1f} s in all; an oracle for each of the "
        f"{len(subsets)} subsets took {oracle_seconds:.1f} s in all (safety phase: {seconds['safety']:.1f} s).",
        "",
    ]
    atomic_write_text(out / "memories.md", "\n".join(lines))
    return report
