"""``hf-sidecar bench load``: the cost of loading with revocation against a plain transformers load.

Each load runs in a fresh Python process and is timed from the ``from_pretrained`` call to the end
of the first forward pass, because a plain load only maps the weights and reads them during that
pass. The peak resident set size of the process (``VmHWM``) is recorded beside it. The kinds of
load, interleaved in every repeat so that drift in the machine's load spreads evenly:

- ``plain``: ``AutoModelForCausalLM.from_pretrained`` of the checkpoint;
- ``factored``: :class:`hf_sidecar.SidecarModelForCausalLM` with a LoRA-style factored sidecar
  on every attention and MLP projection;
- ``dense``: the same with a dense sidecar on every tensor, which reads three times the bytes of
  the checkpoint;
- ``read``: reading those bytes alone, for comparison with ``dense``.

The sidecars are synthetic (random factors, see :func:`synthetic_sidecar`): the cost of a load
does not depend on the values, so no training is needed. Every load reads from a warm page cache
and finds the checkpoint's file digests in a digest cache in the output folder. The one-time cost
of hashing the checkpoint is reported separately as ``checkpoint_hash_s``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .adapters import DEFAULT_TARGET_MODULES
from .file_digests import DIGEST_CACHE_ENV
from .io import ContentDigest, checkpoint_files, file_digests, sha256_file
from .sidecar import LowRank, Sidecar, make_config
from .streaming import SAFETENSORS_DTYPES, open_pread

logger = logging.getLogger(__name__)

LOAD_KINDS = ("plain", "factored", "dense")
ALL_KINDS = (*LOAD_KINDS, "read")
PROMPT_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]


# ------------------------------------------------------------------------------------------------
# Synthetic sidecars


def _checkpoint_tensors(folder: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Map each tensor name of a checkpoint folder to its file, torch dtype name and shape, from the headers."""
    tensors = {}
    for file in checkpoint_files(folder):
        with open_pread(file) as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                tensors[key] = (file, SAFETENSORS_DTYPES[piece.get_dtype()], tuple(piece.get_shape()))
    return tensors


def synthetic_sidecar(
    checkpoint: str | Path,
    *,
    storage: str = "factored",
    rank: int = 8,
    names: Sequence[str] | None = None,
    scale: float = 1e-3,
    seed: int = 0,
    memory: str = "synthetic",
) -> Sidecar:
    """Build a sidecar with random updates that is bound to ``checkpoint`` by its file and content digests.

    ``storage="factored"`` stores a rank-``rank`` memory update and a rank-``2 * rank`` transport
    as factors, by default on every weight of the attention and MLP projections (what a LoRA
    adapter on all of them produces). ``storage="dense"`` stores both as full tensors, by default
    on every floating-point tensor of the checkpoint (what full fine-tuning produces). The
    updates are about ``scale`` times the size of a typical weight. For benchmarks and tests
    only: the recorded process is a placeholder that cannot be replayed.
    """
    if storage not in ("factored", "dense"):
        raise ValueError(f"storage={storage!r} is not supported; use 'factored' or 'dense'.")
    folder = Path(checkpoint)
    tensors = _checkpoint_tensors(folder)
    if names is None:
        if storage == "factored":
            names = [n for n, (_, _, shape) in tensors.items() if len(shape) == 2 and n.rsplit(".", 2)[-2] in DEFAULT_TARGET_MODULES]
        else:
            names = [n for n, (_, dtype, _) in tensors.items() if dtype.startswith(("float", "bfloat"))]
    names = sorted(names)
    missing = [name for name in names if name not in tensors]
    if missing:
        raise KeyError(f"Checkpoint {folder} has no tensor {missing[0]!r}.")
    generator = torch.Generator().manual_seed(seed)
    delta, transport = {}, {}
    for name in names:
        shape = tensors[name][2]
        if storage == "factored":
            if len(shape) != 2:
                raise ValueError(f"Tensor {name!r} has shape {list(shape)}; factored updates need matrices.")
            out_features, in_features = shape
            delta[name] = LowRank(
                torch.randn(rank, in_features, generator=generator) / in_features**0.5,
                torch.randn(out_features, rank, generator=generator) * scale,
            )
            transport[name] = LowRank(
                torch.randn(2 * rank, in_features, generator=generator) / in_features**0.5,
                torch.randn(out_features, 2 * rank, generator=generator) * scale / 2,
            )
        else:
            delta[name] = torch.randn(shape, generator=generator) * scale
            transport[name] = torch.randn(shape, generator=generator) * scale / 2

    digest = ContentDigest(names)
    handles = {}
    try:
        for name in names:
            file = tensors[name][0]
            if file not in handles:
                handles[file] = open_pread(file)
            digest.update(name, handles[file].get_tensor(name))
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    placeholder = hashlib.sha256(f"synthetic {storage} {rank} {seed}".encode()).hexdigest()
    process = {"name": "synthetic", "digest": placeholder, "data_fingerprint": placeholder, "num_steps": 0, "source": None}
    config = make_config(
        memory=memory,
        delta=delta,
        transport=transport,
        shapes={name: tensors[name][2] for name in names},
        dtypes={name: getattr(torch, tensors[name][1]) for name in names},
        epsilon=1.0,
        estimator="synthetic",
        checkpoint={"base_model": str(folder), "files": file_digests(folder), "content_digest": digest.hexdigest()},
        process=process,
        mode="adapter" if storage == "factored" else "dense",
        build={"synthetic": True, "seed": seed},
    )
    return Sidecar(delta, transport, config, {"name": "synthetic", "synthetic": True})


# ------------------------------------------------------------------------------------------------
# One measured load, run in a fresh process


def _memory_mib(field: str) -> float:
    """Return ``VmHWM`` (peak) or ``VmRSS`` (current) resident memory of this process from ``/proc/self/status``, in MiB.

    ``ru_maxrss`` is not used because Linux carries it over from the parent process across
    ``fork`` and ``exec``, so a worker would report its parent's peak.
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line; the load benchmark measures memory on Linux only.")


def _measure(kind: str, checkpoint: str, sidecar: str | None, dtype: str) -> dict:
    """Load (or, for ``read``, read the files) once and return the timings and the peak RSS."""
    rss_start = _memory_mib("VmRSS")
    if kind == "read":
        # The dense sidecar's file contains the other two thirds of the bytes a dense load reads.
        files = [*checkpoint_files(checkpoint), Path(sidecar) / "sidecar.safetensors"]
        began = time.perf_counter()
        total = 0
        buffer = bytearray(1 << 24)
        for file in files:
            with open(file, "rb", buffering=0) as stream:
                while count := stream.readinto(buffer):
                    total += count
        return {"kind": kind, "wall_s": time.perf_counter() - began, "bytes": total}

    from transformers import AutoModelForCausalLM

    from .loading import SidecarModelForCausalLM

    options = {"dtype": getattr(torch, dtype)}
    began = time.perf_counter()
    if kind == "plain":
        model = AutoModelForCausalLM.from_pretrained(checkpoint, **options)
    else:
        model = SidecarModelForCausalLM.from_pretrained(checkpoint, sidecar=sidecar, **options)
    loaded = time.perf_counter()
    with torch.no_grad():
        model(input_ids=torch.tensor([PROMPT_IDS]))
    finished = time.perf_counter()
    return {
        "kind": kind,
        "wall_s": finished - began,
        "load_s": loaded - began,
        "forward_s": finished - loaded,
        "peak_rss_mib": _memory_mib("VmHWM"),
        "start_rss_mib": rss_start,
    }


def _run_worker(kind: str, checkpoint: Path, sidecar: Path | None, dtype: str, threads: int | None, digest_cache: Path) -> dict:
    request = json.dumps({"kind": kind, "checkpoint": str(checkpoint), "sidecar": str(sidecar) if sidecar else None, "dtype": dtype})
    environment = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1",
        **{DIGEST_CACHE_ENV: str(digest_cache)},
    )
    if threads:
        environment["OMP_NUM_THREADS"] = str(threads)
    completed = subprocess.run(
        [sys.executable, "-m", "hf_sidecar.bench", request], capture_output=True, text=True, env=environment, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"The {kind} load failed in its worker process (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# The benchmark


def prepare_sidecars(checkpoint: Path, out: Path, *, rank: int = 8, kinds: Sequence[str] = ("factored", "dense")) -> dict[str, Path]:
    """Write the synthetic sidecars for ``checkpoint`` under ``out`` once and return their folders."""
    folders = {}
    for kind in kinds:
        folder = out / f"sidecar-{kind}-r{rank}" if kind == "factored" else out / f"sidecar-{kind}"
        marker = folder / "sidecar_config.json"
        if not marker.is_file() or json.loads(marker.read_text())["checkpoint"]["files"] != file_digests(checkpoint):
            logger.info("Writing a synthetic %s sidecar for %s to %s", kind, checkpoint, folder)
            synthetic_sidecar(checkpoint, storage=kind, rank=rank).save_pretrained(folder)
        folders[kind] = folder
    return folders


def _warm_page_cache(paths: Sequence[Path]) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as stream:
            while stream.read(1 << 24):
                pass


def summarize(runs: Sequence[dict]) -> dict:
    """Return the median and minimum of each measurement per kind, and the ratios of medians to ``plain``."""
    summary: dict[str, dict] = {}
    for kind in ALL_KINDS:
        rows = [run for run in runs if run["kind"] == kind]
        if not rows:
            continue
        entry = {"runs": len(rows)}
        for key in ("wall_s", "load_s", "forward_s", "peak_rss_mib", "start_rss_mib", "bytes"):
            values = [row[key] for row in rows if key in row]
            if values:
                entry[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        summary[kind] = entry
    plain = summary.get("plain")
    if plain:
        for kind, entry in summary.items():
            if kind in ("plain", "read"):
                continue
            entry["wall_ratio"] = entry["wall_s"]["median"] / plain["wall_s"]["median"]
            entry["peak_rss_ratio"] = entry["peak_rss_mib"]["median"] / plain["peak_rss_mib"]["median"]
            entry["peak_rss_extra_mib"] = entry["peak_rss_mib"]["median"] - plain["peak_rss_mib"]["median"]
    return summary


def markdown_table(summary: dict) -> str:
    """Render :func:`summarize`'s result as a markdown table."""
    lines = [
        "| load | runs | wall s, median (min-max) | load s | first forward s | peak RSS MiB, median | wall ratio | peak RSS ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind in ALL_KINDS:
        entry = summary.get(kind)
        if entry is None:
            continue
        wall = entry["wall_s"]
        if kind == "read":
            gib = entry["bytes"]["median"] / 2**30
            lines.append(f"| read the dense load's {gib:.2f} GiB | {entry['runs']} | {wall['median']:.2f} ({wall['min']:.2f}-{wall['max']:.2f}) | | | | | |")
            continue
        ratio = f"{entry['wall_ratio']:.2f}" if "wall_ratio" in entry else "1"
        memory_ratio = f"{entry['peak_rss_ratio']:.2f} ({entry['peak_rss_extra_mib']:+.0f} MiB)" if "peak_rss_ratio" in entry else "1"
        lines.append(
            f"| {kind} | {entry['runs']} | {wall['median']:.2f} ({wall['min']:.2f}-{wall['max']:.2f}) | {entry['load_s']['median']:.2f} | "
            f"{entry['forward_s']['median']:.2f} | {entry['peak_rss_mib']['median']:.0f} | {ratio} | {memory_ratio} |"
        )
    return "\n".join(lines)


def bench_load(
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    repeats: int = 5,
    kinds: Sequence[str] = ALL_KINDS,
    rank: int = 8,
    dtype: str = "float32",
    threads: int | None = None,
) -> dict:
    """Run the load benchmark and write ``load.json`` and ``load.md`` to ``out``; return the report.

    ``checkpoint`` defaults to the converted SmolLM2-135M-Instruct folder
    (:func:`hf_sidecar.smollm2.prepare_smollm2`). ``threads`` sets ``OMP_NUM_THREADS`` in the
    load processes; on cores shared with other jobs, 1 avoids stalls at torch's thread barriers.
    """
    unknown = sorted(set(kinds) - set(ALL_KINDS))
    if unknown:
        raise ValueError(f"Unknown load kind {unknown[0]!r}; choose from {', '.join(ALL_KINDS)}.")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        from .smollm2 import prepare_smollm2

        checkpoint = prepare_smollm2()
    checkpoint = Path(checkpoint)
    sidecar_kinds = [kind for kind in ("factored", "dense") if kind in kinds or (kind == "dense" and "read" in kinds)]
    sidecars = prepare_sidecars(checkpoint, out, rank=rank, kinds=sidecar_kinds)
    _warm_page_cache(list(checkpoint_files(checkpoint)) + [folder / "sidecar.safetensors" for folder in sidecars.values()])
    # The first load with a sidecar hashes the checkpoint files once. The measured loads then find
    # the digests in this cache, as every later load of an unchanged checkpoint does.
    digest_cache = out / "file-sha256.json"
    digest_cache.unlink(missing_ok=True)
    began = time.perf_counter()
    for sidecar_kind in sidecars:
        if sidecar_kind in kinds:
            _run_worker(sidecar_kind, checkpoint, sidecars[sidecar_kind], dtype, threads, digest_cache)
            break
    first_load_s = time.perf_counter() - began
    began = time.perf_counter()
    for file in checkpoint_files(checkpoint):
        sha256_file(file)
    hash_s = time.perf_counter() - began

    runs = []
    for repeat in range(repeats):
        for kind in kinds:
            sidecar = sidecars.get("dense" if kind == "read" else kind)
            run = _run_worker(kind, checkpoint, sidecar, dtype, threads, digest_cache)
            run["repeat"] = repeat
            runs.append(run)
            logger.info("Repeat %d, %s: %.2f s", repeat, kind, run["wall_s"])
    summary = summarize(runs)
    report = {
        "checkpoint": str(checkpoint),
        "checkpoint_bytes": sum(file.stat().st_size for file in checkpoint_files(checkpoint)),
        "sidecars": {kind: {"path": str(folder), "bytes": (folder / "sidecar.safetensors").stat().st_size} for kind, folder in sidecars.items()},
        "dtype": dtype,
        "rank": rank,
        "checkpoint_hash_s": hash_s,
        "unmeasured_first_load_s": first_load_s,
        "repeats": repeats,
        "threads": threads,
        "load_average": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "runs": runs,
        "summary": summary,
        "table": markdown_table(summary),
    }
    import transformers

    report["machine"]["transformers"] = transformers.__version__
    (out / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "load.md").write_text(report["table"] + "\n")
    return report


def _worker_main(argv: Sequence[str]) -> None:
    request = json.loads(argv[0])
    logging.basicConfig(level=logging.WARNING)
    result = _measure(request["kind"], request["checkpoint"], request["sidecar"], request["dtype"])
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
