"""The ``hf-sidecar`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("hf_sidecar.cli")

# Greedy decoding limit of `hf-sidecar eval` when the sidecar records none (sidecars built outside the demo).
DEFAULT_MAX_NEW_TOKENS = 48


def _setup_logging(verbosity: int) -> None:
    if verbosity < 0:
        level = logging.WARNING
    elif verbosity == 0:
        level = logging.INFO
    else:
        level = logging.DEBUG
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hf_sidecar").setLevel(level)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _cmd_demo(args) -> int:
    from .demo import preset_for_model, run_demo

    preset = preset_for_model(args.preset, args.model) if args.model else args.preset
    report = run_demo(
        args.out, preset=preset, trials=args.trials, seed=args.seed, data_dir=args.data, oracle=not args.no_oracle,
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
    from .data import read_examples, tokenize_examples
    from .io import file_digests, load_checkpoint
    from .process import ProcessRecord
    from .trainer import ADAPTER_START_FILE, build_recorded_sidecar, is_peft_record, is_tokenized_examples_file, read_tokenized_examples

    memories = args.memory or ["memory"]
    if len(args.theta_am) != len(memories) and not (len(args.theta_am) == 1 and not args.memory):
        raise ValueError(
            f"{len(args.theta_am)} --theta-am checkpoints but {len(memories)} --memory names; "
            "give one name per memory, in the order the memories were trained."
        )
    record = ProcessRecord.load(args.process)
    model, tokenizer = _load_model(args.theta_ams, record.dtype)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if is_tokenized_examples_file(args.data):
        examples = read_tokenized_examples(args.data)
    else:
        examples = tokenize_examples(tokenizer, read_examples(args.data), record.config.max_length)
    adapter_start = None
    if is_peft_record(record):
        from safetensors.torch import load_file

        adapter_path = Path(args.adapter_start or Path(args.process).parent / ADAPTER_START_FILE)
        if not adapter_path.is_file():
            raise FileNotFoundError(
                f"Adapter start state {adapter_path} not found; process {record.name!r} trained a PEFT adapter, so pass the "
                f"{ADAPTER_START_FILE} recorded with it as --adapter-start."
            )
        adapter_start = load_file(str(adapter_path))
    names = {name for name, _ in model.named_parameters()}
    theta_a = load_checkpoint(args.theta_a, names)
    theta_ams = load_checkpoint(args.theta_ams, names)
    scoring = None
    if args.scoring_refusals:
        scoring = [line.strip() for line in Path(args.scoring_refusals).read_text().splitlines() if line.strip()]
    if len(args.theta_am) > 1:
        return _build_memory_sidecars(args, model, record, examples, theta_a, theta_ams, names, memories, scoring, adapter_start, tokenizer)
    theta_am = load_checkpoint(args.theta_am[0], names)
    result = build_recorded_sidecar(
        model, record, examples, theta_a=theta_a, theta_am=theta_am, theta_ams=theta_ams, adapter_start=adapter_start,
        epsilon=args.epsilon, estimator=args.estimator, memory=memories[0], checkpoint_files=file_digests(args.theta_ams),
        base_model=args.base_model or str(Path(args.theta_ams).resolve()), scoring_refusals=scoring,
        pad_token_id=tokenizer.pad_token_id or 0, progress=not args.no_progress,
    )
    from .process import distributed_context

    # Under torchrun or accelerate launch every process has the same sidecar; the main one saves it.
    if distributed_context()[0] != 0:
        return 0
    result.sidecar.save_pretrained(args.out)
    print(f"Built sidecar {result.sidecar.memory!r} with {len(result.trace_seconds)} trace(s) "
          f"({sum(result.trace_seconds):.1f} s) and saved it to {args.out}")
    return 0


def _build_memory_sidecars(args, model, record, examples, theta_a, theta_ams, names, memories, scoring, adapter_start, tokenizer) -> int:
    """Build one sidecar per memory from the checkpoints saved after each memory phase, in order."""
    from .io import file_digests, load_checkpoint
    from .memories import build_memory_sidecars, sequential_updates
    from .process import distributed_context

    if adapter_start is not None:
        raise ValueError("Several memories need a full fine-tuning safety process; this record trained a PEFT adapter.")
    if args.epsilon != 1.0:
        raise ValueError("Several memories are built with epsilon = 1 (one trace each); drop --epsilon.")
    states = [theta_a] + [load_checkpoint(folder, names) for folder in args.theta_am]
    updates = dict(zip(memories, sequential_updates(states)))
    sidecars = build_memory_sidecars(
        model, record, examples, theta_am=states[-1], theta_ams=theta_ams, updates=updates, estimator=args.estimator,
        checkpoint_files=file_digests(args.theta_ams), base_model=args.base_model or str(Path(args.theta_ams).resolve()),
        scoring_refusals=scoring, pad_token_id=tokenizer.pad_token_id or 0, progress=not args.no_progress,
    )
    if distributed_context()[0] != 0:
        return 0
    for memory, sidecar in sidecars.items():
        folder = Path(args.out) / _folder_name(memory)
        sidecar.save_pretrained(folder)
        print(f"Built sidecar {memory!r} and saved it to {folder}")
    return 0


def _folder_name(memory: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", memory).strip("-") or "memory"


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
    out = revoke_checkpoint(
        args.model, sidecars, args.out, lam=args.lam, gamma=args.gamma, progress=not args.no_progress, overwrite=args.overwrite
    )
    print(
        f"Wrote the revoked checkpoint to {out}. The memory is deleted only once {args.model}, the memory adapter "
        "and the sidecar are removed too; until then they still contain it."
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

    # Prompt files first: a wrong path fails before the model loads.
    prompts = read_examples(args.prompts)
    public = read_examples(args.public) if args.public else []
    sidecar = Sidecar.from_pretrained(args.sidecar)
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = int(sidecar.config.get("evaluation", {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    model, tokenizer = _load_model(args.model)
    theta_ams = state_of(dict(model.named_parameters()))
    sidecar.check_state(theta_ams, where=args.model)
    lam, gamma = sidecar.recommended
    lam = lam if args.lam is None else args.lam
    gamma = gamma if args.gamma is None else args.gamma
    results: dict = {"lam": lam, "gamma": gamma, "max_new_tokens": max_new_tokens}
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
    results["unedited"] = behaviour_metrics(model, tokenizer, prompts, public, max_new_tokens=max_new_tokens) if public else None
    revoke_model_(model, sidecar, lam=lam, gamma=gamma, verify=False, reference=theta_ams)
    if public:
        results["revoked"] = behaviour_metrics(model, tokenizer, prompts, public, max_new_tokens=max_new_tokens)
    else:
        from .metrics import greedy_answers, is_refusal, rouge_l_recall

        answers = greedy_answers(model, tokenizer, [p.question for p in prompts], max_new_tokens=max_new_tokens)
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


def _cmd_push(args) -> int:
    from .hub import default_subfolder, push_revoked_checkpoint
    from .sidecar import CONFIG_FILE, Sidecar

    folder = Path(args.folder)
    if (folder / CONFIG_FILE).is_file():
        sidecar = Sidecar.from_pretrained(folder)
        subfolder = args.subfolder if args.subfolder is not None else default_subfolder(sidecar.memory)
        commit = sidecar.push_to_hub(
            args.repo_id, subfolder=subfolder, revision=args.revision, private=args.private, token=args.token,
            commit_message=args.commit_message, create_pr=args.create_pr, update_root_card=not args.no_root_card,
        )
        print(f"Pushed sidecar {sidecar.memory!r} to {args.repo_id}, folder {subfolder.strip('/')}: {commit.pr_url or commit.commit_url}")
        print("The sidecar stores the memory update itself: keep the repository as private as the checkpoint it edits.")
    elif (folder / "config.json").is_file():
        commit = push_revoked_checkpoint(
            folder, args.repo_id, subfolder=args.subfolder or "", revision=args.revision, private=args.private,
            token=args.token, commit_message=args.commit_message, create_pr=args.create_pr,
        )
        print(f"Pushed the revoked checkpoint {folder} to {args.repo_id}: {commit.pr_url or commit.commit_url}")
        print(
            "This is deletion only once the original checkpoint, the memory adapter and the sidecars are removed, "
            "including from the history of every repository that held them."
        )
    else:
        raise FileNotFoundError(
            f"{folder} contains neither {CONFIG_FILE} (a sidecar folder) nor config.json (a revoked checkpoint written by "
            "hf-sidecar apply). Pass one of those folders."
        )
    return 0


def _cmd_pull(args) -> int:
    from .hub import pull_sidecar

    pulled = pull_sidecar(
        args.repo_id, out=args.out, subfolder=args.subfolder, revision=args.revision, token=args.token,
        cache_dir=args.cache_dir, force_download=args.force_download,
    )
    source = pulled.source
    print(
        f"Pulled sidecar {pulled.sidecar.memory!r} from {source['repo_id']}, folder {source['subfolder'] or '.'}, "
        f"revision {source['revision']}, commit {source['commit']}"
    )
    print(pulled.folder)
    return 0


def _cmd_bench_memories(args) -> int:
    from .memories import run_memories_benchmark

    run_memories_benchmark(args.out, preset=args.preset, num_memories=args.memories, seed=args.seed, progress=not args.no_progress)
    print((Path(args.out) / "memories.md").read_text())
    return 0


def _cmd_bench_load(args) -> int:
    from .bench import bench_load

    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    report = bench_load(
        args.out, checkpoint=args.checkpoint, repeats=args.repeats, kinds=kinds, rank=args.rank, dtype=args.dtype, threads=args.threads,
    )
    print(report["table"])
    load = ", ".join(f"{value:.2f}" for value in report["load_average"])
    print(f"Load average at the end: {load} on {report['machine']['cpus']} CPUs. Wrote {Path(args.out) / 'load.json'} and load.md")
    return 0


def _cmd_space(args) -> int:
    from .space import disable_telemetry, max_new_tokens_from_environment

    # Before gradio is imported: gradio reads GRADIO_ANALYTICS_ENABLED for its version check and analytics.
    disable_telemetry(offline=args.artifacts is not None)
    from .space import artifacts_source, build_app, launch_app, source_from_environment

    source = artifacts_source(args.artifacts, trial=args.trial) if args.artifacts else source_from_environment()
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else max_new_tokens_from_environment()
    app = build_app(source=source, max_new_tokens=max_new_tokens)
    launch_app(app, host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hf-sidecar", description="Build, inspect and apply process sidecars that revoke a memory fine-tune.")
    parser.add_argument("--version", action="version", version=f"hf-sidecar {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train the three phases on bundled data, build a sidecar and evaluate it")
    demo.add_argument(
        "--preset", default="tiny",
        help="model and training preset: tiny (default, a small Llama from scratch, under a minute on 2 idle cores), test (seconds), "
        "smollm2 (SmolLM2-135M-Instruct with LoRA phases, about 15 minutes a trial on 2 CPU cores), smollm2-smoke (about a minute)",
    )
    demo.add_argument(
        "--model", default=None,
        help="a pretrained causal LM (local folder or Hub id) to run instead of the preset's model; trained with LoRA phases",
    )
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
    build.add_argument(
        "--theta-am", required=True, action="append",
        help="checkpoint folder after the memory phase; for several memories trained in turn, repeat it once per memory, in order",
    )
    build.add_argument("--theta-ams", required=True, help="checkpoint folder after the safety phase (the one the sidecar applies to)")
    build.add_argument("--process", required=True, help="process.json recorded by the safety phase")
    build.add_argument(
        "--data", required=True,
        help="safety data JSONL as recorded: rows (id, question, answer), or (id, input_ids, labels) such as the "
        "examples.jsonl that hf_sidecar.trainer.record_trainer writes",
    )
    build.add_argument(
        "--adapter-start", default=None,
        help="for a PEFT process recorded from a Trainer: the adapter's start state "
        "(default: adapter_start.safetensors next to --process)",
    )
    build.add_argument("--out", required=True, help="sidecar folder to write")
    build.add_argument("--epsilon", type=float, default=1.0, help="secant step; 1 reuses theta_AMS and costs one trace, other values two")
    build.add_argument("--estimator", choices=("secant", "exact_jvp"), default="secant", help="secant traces, or exact forward-mode JVP (small models)")
    build.add_argument(
        "--memory", action="append", default=None,
        help="name of the memory the sidecar revokes (default: memory); repeat once per --theta-am for several memories, "
        "which writes one sidecar per memory into --out/<name>/",
    )
    build.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the theta_AMS folder)")
    build.add_argument("--base-model", default=None, help="Hub id or path recorded as the checkpoint the sidecar edits")
    build.add_argument("--scoring-refusals", default=None, help="text file of refusal sentences for refusal scores, one per line")
    build.add_argument("--no-progress", action="store_true", help="hide progress bars")
    build.set_defaults(func=_cmd_build)

    inspect = commands.add_parser("inspect", help="print what a sidecar covers and verify it against a checkpoint")
    inspect.add_argument("folder", help="sidecar folder, or Hub repo id with exactly one sidecar")
    inspect.add_argument("--model", default=None, help="checkpoint folder to verify the sidecar against")
    inspect.add_argument("--tensors", dest="verbose_tensors", action="store_true", help="list every covered tensor")
    inspect.set_defaults(func=_cmd_inspect)

    apply = commands.add_parser("apply", help="write the revoked checkpoint as an ordinary safetensors model folder")
    apply.add_argument("--model", required=True, help="safety-trained checkpoint folder (theta_AMS)")
    apply.add_argument(
        "--sidecar", required=True, action="append",
        help="sidecar folder, or Hub repo id with exactly one sidecar; repeat to revoke several memories",
    )
    apply.add_argument("--out", required=True, help="folder for the revoked checkpoint")
    apply.add_argument("--lam", type=float, default=None, help="memory coefficient (default: the sidecar's recommendation)")
    apply.add_argument("--gamma", type=float, default=None, help="transport coefficient (default: the sidecar's recommendation)")
    apply.add_argument("--no-progress", action="store_true", help="hide progress bars")
    apply.add_argument("--overwrite", action="store_true", help="replace --out if it already exists and is not empty")
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
    evaluate.add_argument(
        "--max-new-tokens", type=int, default=None,
        help=f"greedy decoding length limit, in tokens (default: the limit the demo recorded in the sidecar, else {DEFAULT_MAX_NEW_TOKENS})",
    )
    evaluate.add_argument("--out", default=None, help="write the results JSON here as well")
    evaluate.add_argument("--no-progress", action="store_true", help="hide progress bars")
    evaluate.set_defaults(func=_cmd_eval)

    token_help = "Hub access token (default: the HF_TOKEN variable or the token saved by `hf auth login`)"
    push = commands.add_parser(
        "push", help="push a sidecar folder, or a revoked checkpoint written by apply, to a Hub repository",
    )
    push.add_argument("folder", help="sidecar folder, or revoked checkpoint folder written by hf-sidecar apply")
    push.add_argument("repo_id", help="Hub repository, such as user/model; created if missing")
    push.add_argument(
        "--subfolder", default=None,
        help="folder in the repository (default: sidecars/<memory> for a sidecar, the root for a revoked checkpoint)",
    )
    push.add_argument("--revision", default=None, help="branch to push to (default: main); created from main if missing")
    push.add_argument(
        "--private", action=argparse.BooleanOptionalAction, default=None,
        help="visibility of a new repository (default: private); --no-private creates a public one, and a sidecar "
        "pushed to a public repository warns",
    )
    push.add_argument("--commit-message", default=None, help="commit message (default: one naming what was pushed)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    push.add_argument("--no-root-card", action="store_true", help="leave the root README.md as it is (default: list the sidecar there)")
    push.add_argument("--token", default=None, help=token_help)
    push.set_defaults(func=_cmd_push)

    pull = commands.add_parser("pull", help="download a sidecar from a Hub repository and check it")
    pull.add_argument("repo_id", help="Hub repository that contains the sidecar")
    pull.add_argument("--subfolder", default=None, help="sidecar folder in the repository (default: the only sidecar there)")
    pull.add_argument("--revision", default=None, help="branch, tag or commit sha (default: main); pin a sha to reproduce")
    pull.add_argument("--out", default=None, help="folder to copy the sidecar to (default: none; the cache folder is printed)")
    pull.add_argument("--cache-dir", default=None, help="huggingface_hub cache folder (default: HF_HUB_CACHE)")
    pull.add_argument("--force-download", action="store_true", help="download again even if the files are cached")
    pull.add_argument("--token", default=None, help=token_help)
    pull.set_defaults(func=_cmd_pull)

    space = commands.add_parser(
        "space", help="start the before-and-after Gradio page for demo artifacts or Hub repositories, on 127.0.0.1",
    )
    space.add_argument(
        "--artifacts", default=None,
        help="folder that `hf-sidecar demo` wrote, or one of its trial-N folders (default: read the HF_SIDECAR_* "
        "variables, as a Space does)",
    )
    space.add_argument("--trial", type=int, default=0, help="trial folder to serve from --artifacts (default: 0)")
    space.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    space.add_argument("--port", type=int, default=None, help="port to listen on (default: 7860, or the next free one)")
    space.add_argument(
        "--max-new-tokens", type=int, default=None,
        help="greedy decoding limit per answer, in tokens (default: HF_SIDECAR_MAX_NEW_TOKENS or 48)",
    )
    space.set_defaults(func=_cmd_space)

    bench = commands.add_parser("bench", help="measure the cost of hf-sidecar operations")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    bench_load = bench_commands.add_parser(
        "load", help="time loading with revocation against a plain from_pretrained, each load in a fresh process",
    )
    bench_load.add_argument(
        "--checkpoint", default=None,
        help="model folder to load (default: the SmolLM2-135M-Instruct checkpoint converted by hf_sidecar.smollm2)",
    )
    bench_load.add_argument("--out", default="hf-sidecar-bench", help="folder for the synthetic sidecars, load.json and load.md")
    bench_load.add_argument("--repeats", type=int, default=5, help="loads of each kind, interleaved (default: 5)")
    bench_load.add_argument(
        "--kinds", default="plain,factored,dense,read",
        help="comma-separated kinds: plain, factored (LoRA-style sidecar), dense, read (reading the dense load's bytes)",
    )
    bench_load.add_argument("--rank", type=int, default=8, help="rank of the factored sidecar's memory update (default: 8)")
    bench_load.add_argument("--dtype", default="float32", help="dtype to load in (default: float32)")
    bench_load.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the load processes (default: unset)")
    bench_load.set_defaults(func=_cmd_bench_load)

    bench_memories = bench_commands.add_parser(
        "memories", help="revoke every subset of K memories with their sidecars, against each subset's own oracle and task arithmetic",
    )
    bench_memories.add_argument("--preset", default="tiny", help="full fine-tuning preset: tiny (default) or test")
    bench_memories.add_argument("--memories", type=int, default=3, help="number of memories K, each a group of memorized authors (default: 3)")
    bench_memories.add_argument("--seed", type=int, default=0, help="seed of the run and the entity split")
    bench_memories.add_argument("--out", default="hf-sidecar-memories", help="folder for memories.json and memories.md")
    bench_memories.add_argument("--no-progress", action="store_true", help="hide progress bars")
    bench_memories.set_defaults(func=_cmd_bench_memories)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .hub import SidecarHubError
    from .io import CheckpointError
    from .process import ProcessMismatchError
    from .sidecar import SidecarError

    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        return args.func(args)
    except (SidecarError, CheckpointError, DataError, ProcessMismatchError, SidecarHubError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"hf-sidecar {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroy the process group a launcher run joined, so gloo's threads stop before exit."""
    import torch.distributed as dist

    # No barrier: after an error on one process the others may never arrive at it.
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
