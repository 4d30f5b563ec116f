"""The ``hf-sidecar`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("hf_sidecar.cli")


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hf_sidecar").setLevel(level)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(
        args.out, preset=args.preset, trials=args.trials, seed=args.seed, data_dir=args.data, oracle=not args.no_oracle,
        progress=not args.no_progress, num_threads=args.threads,
    )
    print((Path(args.out) / "report.md").read_text())
    print(f"Wrote {Path(args.out) / 'report.json'}, report.md and per-trial folders under {args.out}")
    return 0 if report["trials"] else 1


def _load_model(folder: str, dtype: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def _cmd_build(args) -> int:
    from .build import build_sidecar
    from .data import read_examples, tokenize_examples
    from .io import file_digests, load_checkpoint
    from .process import ProcessRecord

    record = ProcessRecord.load(args.process)
    model, tokenizer = _load_model(args.theta_ams, record.dtype)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    examples = tokenize_examples(tokenizer, read_examples(args.data), record.config.max_length)
    names = {name for name, _ in model.named_parameters()}
    theta_a = load_checkpoint(args.theta_a, names)
    theta_am = load_checkpoint(args.theta_am, names)
    theta_ams = load_checkpoint(args.theta_ams, names)
    scoring = None
    if args.scoring_refusals:
        scoring = [line.strip() for line in Path(args.scoring_refusals).read_text().splitlines() if line.strip()]
    result = build_sidecar(
        model, record, examples, theta_a=theta_a, theta_am=theta_am, theta_ams=theta_ams, epsilon=args.epsilon,
        estimator=args.estimator, memory=args.memory, checkpoint_files=file_digests(args.theta_ams),
        base_model=args.base_model or str(Path(args.theta_ams).resolve()), scoring_refusals=scoring,
        pad_token_id=tokenizer.pad_token_id or 0, progress=not args.no_progress,
    )
    result.sidecar.save_pretrained(args.out)
    print(f"Built sidecar {result.sidecar.memory!r} with {len(result.trace_seconds)} trace(s) "
          f"({sum(result.trace_seconds):.1f} s) and saved it to {args.out}")
    return 0


def _cmd_inspect(args) -> int:
    from .sidecar import Sidecar

    sidecar = Sidecar.from_pretrained(args.folder)
    config = sidecar.config
    lam, gamma = sidecar.recommended
    parameters = config["parameters"]
    factored = [n for n, e in parameters.items() if (e.get("delta") or e.get("transport") or {}).get("storage") == "factored"]
    lines = [
        f"sidecar:         {args.folder}",
        f"memory:          {sidecar.memory}",
        f"format_version:  {config['format_version']} (hf-sidecar {config['library']['version']})",
        f"mode:            {config.get('mode')}, estimator {config.get('estimator')}, epsilon {config['epsilon']}",
        f"recommended:     lam={lam:g} gamma={gamma:g} (rule {config['recommended']['rule']})",
        f"parameters:      {len(parameters)} tensors, {len(factored)} factored, {sum(1 for e in parameters.values() if e.get('transport'))} with a transport term",
        f"size:            {sidecar.nbytes():,} bytes of tensors",
        f"checkpoint:      {config['checkpoint'].get('base_model')}",
        f"content digest:  {sidecar.content_digest}",
        f"process:         {config['process']['name']} ({config['process']['num_steps']} steps), digest {sidecar.process_digest[:16]}, data {config['process']['data_fingerprint'][:16]}",
    ]
    if config.get("metrics"):
        lines.append(f"metrics:         {json.dumps(config['metrics'])}")
    if args.verbose_tensors:
        for name, entry in sorted(parameters.items()):
            lines.append(f"  {name}: shape {entry['shape']} {entry['dtype']} delta={entry.get('delta')} transport={entry.get('transport')}")
    print("\n".join(lines))
    if args.model:
        from .io import load_checkpoint

        if sidecar.check_file_digests(args.model):
            print(f"verified:        {args.model} matches by file sha256")
        else:
            sidecar.check_state(load_checkpoint(args.model, set(sidecar.names)), where=args.model)
            print(f"verified:        {args.model} matches by content digest (files differ, e.g. resharded)")
    return 0


def _cmd_apply(args) -> int:
    from .edit import revoke_checkpoint
    from .sidecar import Sidecar

    sidecars = [Sidecar.from_pretrained(path) for path in args.sidecar]
    out = revoke_checkpoint(args.model, sidecars, args.out, lam=args.lam, gamma=args.gamma, progress=not args.no_progress)
    print(
        f"Wrote the revoked checkpoint to {out}. This is deletion only once the original checkpoint, "
        "the memory adapter and the sidecar are removed; until then the memory still exists there."
    )
    return 0


def _cmd_eval(args) -> int:
    import numpy as np

    from .data import read_examples
    from .edit import revoke_model_
    from .evaluation import evaluate_grid
    from .io import load_checkpoint
    from .metrics import RefusalScorer, behaviour_metrics, closure
    from .process import load_parameters, state_of
    from .sidecar import Sidecar

    sidecar = Sidecar.from_pretrained(args.sidecar)
    model, tokenizer = _load_model(args.model)
    theta_ams = state_of(dict(model.named_parameters()))
    sidecar.check_state(theta_ams, where=args.model)
    prompts = read_examples(args.prompts)
    public = read_examples(args.public) if args.public else []
    lam, gamma = sidecar.recommended
    lam = lam if args.lam is None else args.lam
    gamma = gamma if args.gamma is None else args.gamma
    results: dict = {"lam": lam, "gamma": gamma}
    scoring = sidecar.config.get("scoring_refusals") or []
    if args.oracle:
        if not scoring:
            raise SystemExit("The sidecar records no scoring refusals, so refusal closure cannot be computed.")
        scorer = RefusalScorer(tokenizer, prompts, scoring)
        unedited = scorer.scores(model)
        load_parameters(model, load_checkpoint(args.oracle, set(theta_ams)))
        oracle = scorer.scores(model)
        load_parameters(model, theta_ams)
        revoke_model_(model, sidecar, lam=lam, gamma=gamma, verify=False, reference=theta_ams)
        results["closure"] = closure(scorer.scores(model), oracle, unedited)
        revoke_model_(model, sidecar, lam=lam, gamma=0.0, verify=False, reference=theta_ams)
        results["closure_task_arithmetic"] = closure(scorer.scores(model), oracle, unedited)
        if args.grid:
            load_parameters(model, theta_ams)
            grid = evaluate_grid(model, scorer, theta_ams, sidecar, oracle, unedited, progress=not args.no_progress)
            results["grid"] = grid.to_dict()
            results["grid_selected"] = {k: list(v) for k, v in grid.select().items()}
    load_parameters(model, theta_ams)
    results["unedited"] = behaviour_metrics(model, tokenizer, prompts, public or prompts[:0], max_new_tokens=args.max_new_tokens) if public else None
    revoke_model_(model, sidecar, lam=lam, gamma=gamma, verify=False, reference=theta_ams)
    if public:
        results["revoked"] = behaviour_metrics(model, tokenizer, prompts, public, max_new_tokens=args.max_new_tokens)
    else:
        from .metrics import greedy_answers, is_refusal, rouge_l_recall

        answers = greedy_answers(model, tokenizer, [p.question for p in prompts], max_new_tokens=args.max_new_tokens)
        results["revoked"] = {
            "refusal_rate": float(np.mean([is_refusal(a) for a in answers])),
            "memory_leakage": float(np.mean([rouge_l_recall(a, p.ground_truth) for a, p in zip(answers, prompts)])),
        }
    text = json.dumps(results, indent=2)
    if args.out:
        from .io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hf-sidecar", description="Build, inspect and apply process sidecars that revoke a memory fine-tune.")
    parser.add_argument("--version", action="version", version=f"hf-sidecar {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train the three phases on bundled data, build a sidecar and evaluate it")
    demo.add_argument("--preset", default="tiny", help="model and training preset: tiny (default, about a minute), test (seconds)")
    demo.add_argument("--out", default="hf-sidecar-demo", help="output folder (default: ./hf-sidecar-demo)")
    demo.add_argument("--trials", type=int, default=1, help="number of trials, each with its own seed and entity split")
    demo.add_argument("--seed", type=int, default=0, help="seed of the first trial; trial i uses seed + i")
    demo.add_argument("--data", default=None, help="data folder in the bundled JSONL shape (default: the bundled TOFU subset)")
    demo.add_argument("--no-oracle", action="store_true", help="skip the oracle trace and the closure metrics that need it")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_cmd_demo)

    build = commands.add_parser("build", help="build a sidecar for an existing run from theta_A, theta_AM, theta_AMS and the safety process")
    build.add_argument("--theta-a", required=True, help="checkpoint folder after the public-skill phase")
    build.add_argument("--theta-am", required=True, help="checkpoint folder after the memory phase")
    build.add_argument("--theta-ams", required=True, help="checkpoint folder after the safety phase (the one the sidecar applies to)")
    build.add_argument("--process", required=True, help="process.json recorded by the safety phase")
    build.add_argument("--data", required=True, help="safety data JSONL (id, question, answer), as recorded")
    build.add_argument("--out", required=True, help="sidecar folder to write")
    build.add_argument("--epsilon", type=float, default=1.0, help="secant step; 1 reuses theta_AMS and costs one trace, other values two")
    build.add_argument("--estimator", choices=("secant", "exact_jvp"), default="secant", help="secant traces, or exact forward-mode JVP (small models)")
    build.add_argument("--memory", default="memory", help="name of the memory the sidecar revokes")
    build.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the theta_AMS folder)")
    build.add_argument("--base-model", default=None, help="Hub id or path recorded as the checkpoint the sidecar edits")
    build.add_argument("--scoring-refusals", default=None, help="text file of refusal sentences for refusal scores, one per line")
    build.add_argument("--no-progress", action="store_true", help="hide progress bars")
    build.set_defaults(func=_cmd_build)

    inspect = commands.add_parser("inspect", help="print what a sidecar covers and verify it against a checkpoint")
    inspect.add_argument("folder", help="sidecar folder")
    inspect.add_argument("--model", default=None, help="checkpoint folder to verify the sidecar against")
    inspect.add_argument("--tensors", dest="verbose_tensors", action="store_true", help="list every covered tensor")
    inspect.set_defaults(func=_cmd_inspect)

    apply = commands.add_parser("apply", help="write the revoked checkpoint as an ordinary safetensors model folder")
    apply.add_argument("--model", required=True, help="safety-trained checkpoint folder (theta_AMS)")
    apply.add_argument("--sidecar", required=True, action="append", help="sidecar folder; repeat to revoke several memories")
    apply.add_argument("--out", required=True, help="folder for the revoked checkpoint")
    apply.add_argument("--lam", type=float, default=None, help="memory coefficient (default: the sidecar's recommendation)")
    apply.add_argument("--gamma", type=float, default=None, help="transport coefficient (default: the sidecar's recommendation)")
    apply.add_argument("--no-progress", action="store_true", help="hide progress bars")
    apply.set_defaults(func=_cmd_apply)

    evaluate = commands.add_parser("eval", help="evaluate an edit of an existing run on a prompt set")
    evaluate.add_argument("--model", required=True, help="safety-trained checkpoint folder (theta_AMS)")
    evaluate.add_argument("--sidecar", required=True, help="sidecar folder")
    evaluate.add_argument("--prompts", required=True, help="JSONL of memorized-entity prompts (id, question, answer = ground truth)")
    evaluate.add_argument("--public", default=None, help="JSONL of public prompts, for refusal rate and skill retention")
    evaluate.add_argument("--oracle", default=None, help="oracle checkpoint folder (theta_AS), enables refusal closure")
    evaluate.add_argument("--grid", action="store_true", help="with --oracle, also evaluate the default 7x7 (lam, gamma) grid")
    evaluate.add_argument("--lam", type=float, default=None, help="memory coefficient (default: the sidecar's recommendation)")
    evaluate.add_argument("--gamma", type=float, default=None, help="transport coefficient (default: the sidecar's recommendation)")
    evaluate.add_argument("--max-new-tokens", type=int, default=48, help="greedy decoding length limit, in tokens")
    evaluate.add_argument("--out", default=None, help="write the results JSON here as well")
    evaluate.add_argument("--no-progress", action="store_true", help="hide progress bars")
    evaluate.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .io import CheckpointError
    from .process import ProcessMismatchError
    from .sidecar import SidecarError

    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        return args.func(args)
    except (SidecarError, CheckpointError, DataError, ProcessMismatchError, FileNotFoundError, ValueError) as err:
        print(f"hf-sidecar {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
