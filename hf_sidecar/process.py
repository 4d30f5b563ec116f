"""The recorded training process: one AdamW loop for every phase, and its replay.

A :class:`ProcessRecord` pins down a realized training run: the ordered global batches (example
ids and a fingerprint of their tokens), the AdamW and schedule settings, the seed, the dtype and
the trained parameters. :func:`run_process` executes a record from any start point with fresh
optimizer state, so the safety process ``S`` becomes a function ``theta_start -> theta_end``.

Replay invariants, which hold whatever the number of processes that later run the record:

- the loss of a step is the sum of token cross-entropies over the step's whole global batch,
  divided by the global count of answer tokens in that batch, never by a per-micro-batch count;
- random numbers (dropout) are keyed by ``(seed, step, example id)``, never by call order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__
from .data import IGNORE_INDEX, TokenizedExample, collate, fingerprint_examples
from .io import atomic_write_json

logger = logging.getLogger(__name__)

PROCESS_FORMAT_VERSION = "1.0"
SUPPORTED_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
# torch.optim.AdamW's three implementations. On CPU, "for-loop" and "foreach" give the same bits.
# "fused" rounds differently (about 1 ulp per step, torch 2.13), so a replay runs the recorded one.
ADAM_IMPLEMENTATIONS = ("for-loop", "foreach", "fused")
# Settings added after format 1.0, with the default that reproduces 1.0 behaviour. They are left
# out of the JSON form and the digest while they hold that default, so older records keep their
# digests, and readers without these fields reject records that use them.
_SETTINGS_SINCE_1_0 = {"no_decay_parameters": (), "schedule_steps": None, "adam_implementation": "for-loop"}


class ProcessMismatchError(ValueError):
    """Raised when a replay's inputs differ from the recorded process."""


@dataclass
class ProcessConfig:
    """Hyperparameters of one training phase.

    ``batch_size`` is the global batch of one optimizer step; ``micro_batch_size`` splits it for
    gradient accumulation without changing the arithmetic of the loss normalization.
    ``no_decay_parameters`` names trained parameters that get no weight decay (transformers'
    Trainer exempts biases and norm weights). ``schedule_steps`` is the step count the learning
    rate schedule spans when a run stopped before it (default: the number of recorded steps).
    ``adam_implementation`` selects torch's AdamW kernel: "for-loop", "foreach" or "fused".
    """

    learning_rate: float = 1e-3
    num_epochs: int = 1
    batch_size: int = 8
    micro_batch_size: int | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    seed: int = 0
    max_length: int = 128
    no_decay_parameters: tuple[str, ...] = ()
    schedule_steps: int | None = None
    adam_implementation: str = "for-loop"

    def __post_init__(self):
        if self.lr_scheduler not in SUPPORTED_SCHEDULERS:
            raise ValueError(f"lr_scheduler={self.lr_scheduler!r} is not supported; use one of {SUPPORTED_SCHEDULERS}.")
        if self.batch_size < 1 or self.num_epochs < 1:
            raise ValueError(f"batch_size and num_epochs must be at least 1, got {self.batch_size} and {self.num_epochs}.")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1, got {self.micro_batch_size}.")
        if self.learning_rate <= 0 or self.adam_epsilon <= 0:
            raise ValueError(f"learning_rate and adam_epsilon must be positive, got {self.learning_rate} and {self.adam_epsilon}.")
        self.no_decay_parameters = tuple(self.no_decay_parameters)
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ValueError(f"schedule_steps must be at least 1 or None, got {self.schedule_steps}.")
        if self.adam_implementation not in ADAM_IMPLEMENTATIONS:
            raise ValueError(f"adam_implementation={self.adam_implementation!r} is not supported; use one of {ADAM_IMPLEMENTATIONS}.")

    def to_dict(self) -> dict:
        """Return the JSON form: every setting, except settings added after format 1.0 that hold their default."""
        values = asdict(self)
        for name, default in _SETTINGS_SINCE_1_0.items():
            if values[name] == default:
                del values[name]
        if "no_decay_parameters" in values:
            values["no_decay_parameters"] = list(values["no_decay_parameters"])
        return values

    @property
    def effective_micro_batch_size(self) -> int:
        return self.micro_batch_size or self.batch_size

    @classmethod
    def from_dict(cls, values: Mapping) -> "ProcessConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown process setting {unknown[0]!r}; this version of hf-sidecar cannot replay it.")
        return cls(**values)


@dataclass
class ProcessRecord:
    """A realized training run that can be replayed from any start point."""

    name: str
    config: ProcessConfig
    steps: list[list[str]]
    step_fingerprints: list[str]
    step_answer_tokens: list[int]
    trainable: list[str]
    dtype: str
    adapter: dict | None = None
    source: str = "hf-sidecar"
    environment: dict = field(default_factory=dict)
    start_digest: str | None = None
    end_digest: str | None = None
    format_version: str = PROCESS_FORMAT_VERSION

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def example_ids(self) -> list[str]:
        """Every example id the process uses, each once, in order of first use."""
        return list(dict.fromkeys(example for step in self.steps for example in step))

    @property
    def data_fingerprint(self) -> str:
        """Hash of every step's batch fingerprint: equal only for the same tokenized batch sequence."""
        return hashlib.sha256("".join(self.step_fingerprints).encode()).hexdigest()

    @property
    def digest(self) -> str:
        """Hash of everything that defines the process (not where or when it ran)."""
        defining = {
            "config": self.config.to_dict(),
            "steps": self.steps,
            "step_fingerprints": self.step_fingerprints,
            "trainable": self.trainable,
            "dtype": self.dtype,
            "adapter": self.adapter,
        }
        return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()

    def summary(self) -> dict:
        """Return the fields a sidecar config records to name its process."""
        return {
            "name": self.name,
            "digest": self.digest,
            "data_fingerprint": self.data_fingerprint,
            "num_steps": self.num_steps,
            "source": self.source,
        }

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "source": self.source,
            "digest": self.digest,
            "data_fingerprint": self.data_fingerprint,
            "dtype": self.dtype,
            "config": self.config.to_dict(),
            "trainable": self.trainable,
            "adapter": self.adapter,
            "num_steps": self.num_steps,
            "steps": [
                {"examples": examples, "answer_tokens": tokens, "fingerprint": fingerprint}
                for examples, tokens, fingerprint in zip(self.steps, self.step_answer_tokens, self.step_fingerprints)
            ],
            "start_digest": self.start_digest,
            "end_digest": self.end_digest,
            "environment": self.environment,
        }

    @classmethod
    def from_dict(cls, values: Mapping) -> "ProcessRecord":
        version = str(values.get("format_version", ""))
        if version.split(".")[0] != PROCESS_FORMAT_VERSION.split(".")[0]:
            raise ValueError(
                f"Process record format_version {version!r} is not supported by hf-sidecar {__version__} "
                f"(it reads {PROCESS_FORMAT_VERSION.split('.')[0]}.x). Upgrade hf-sidecar to replay it."
            )
        try:
            steps = values["steps"]
            record = cls(
                name=values["name"],
                config=ProcessConfig.from_dict(values["config"]),
                steps=[list(step["examples"]) for step in steps],
                step_fingerprints=[step["fingerprint"] for step in steps],
                step_answer_tokens=[int(step["answer_tokens"]) for step in steps],
                trainable=list(values["trainable"]),
                dtype=values["dtype"],
                adapter=values.get("adapter"),
                source=values.get("source", "unknown"),
                environment=values.get("environment", {}),
                start_digest=values.get("start_digest"),
                end_digest=values.get("end_digest"),
                format_version=version,
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"Process record is missing or has a malformed field ({err!r}); it cannot be replayed.") from err
        recorded = values.get("digest")
        if recorded is not None and recorded != record.digest:
            raise ValueError(
                f"Process record digest {recorded} does not match its content ({record.digest}): the file was edited or damaged."
            )
        return record

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ProcessRecord":
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"Process record {path} not found.") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"Process record {path} is not valid JSON ({err}); it is truncated or corrupt.") from err
        return cls.from_dict(values)


def plan_steps(example_ids: Sequence[str], config: ProcessConfig) -> list[list[str]]:
    """Order ``example_ids`` into global batches: a seeded shuffle per epoch, the last batch kept whole."""
    steps = []
    for epoch in range(config.num_epochs):
        order = list(example_ids)
        random.Random(f"{config.seed}:epoch:{epoch}").shuffle(order)
        steps.extend(order[start : start + config.batch_size] for start in range(0, len(order), config.batch_size))
    return steps


def example_seed(seed: int, step: int, example_id: str) -> int:
    """Seed for one example's random numbers in one step, independent of rank and call order."""
    material = f"{seed}:{step}:{example_id}".encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "little") & ((1 << 63) - 1)


def has_active_dropout(model: torch.nn.Module) -> bool:
    """Check whether a forward pass in training mode would draw random numbers."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return True
    config = getattr(model, "config", None)
    return bool(config is not None and getattr(config, "attention_dropout", 0.0))


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over labelled positions, computed in float32 or wider."""
    shift_logits = logits[:, :-1, :]
    if shift_logits.dtype not in (torch.float32, torch.float64):
        shift_logits = shift_logits.float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def micro_batch_loss_sum(model, batch: Sequence[TokenizedExample], *, seed: int, step: int, pad_token_id: int) -> torch.Tensor:
    """Loss sum of one micro-batch; with dropout, each example runs alone under its own keyed seed."""
    device = next(model.parameters()).device
    if not has_active_dropout(model):
        inputs = {key: value.to(device) for key, value in collate(batch, pad_token_id).items()}
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return token_loss_sum(logits, inputs["labels"])
    total = None
    for example in batch:
        inputs = {key: value.to(device) for key, value in collate([example], pad_token_id).items()}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(example_seed(seed, step, example.id))
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        loss = token_loss_sum(logits, inputs["labels"])
        total = loss if total is None else total + loss
    return total


def learning_rates(config: ProcessConfig, num_steps: int) -> list[float]:
    """Return the learning rate of each step, as transformers' scheduler of the same name gives it."""
    from transformers import get_scheduler

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=config.learning_rate)
    span = config.schedule_steps if config.schedule_steps is not None else num_steps
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=span)
    rates = []
    for _ in range(num_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def trainable_parameters(model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """Look up ``names`` among the model's (deduplicated) parameters and freeze all others."""
    parameters = dict(model.named_parameters())
    missing = [name for name in names if name not in parameters]
    if missing:
        raise ProcessMismatchError(
            f"The model has no parameter {missing[0]!r} that the process trains ({len(missing)} missing). "
            "Replay the process on the same architecture (and adapter layout) it was recorded on."
        )
    selected = set(names)
    for name, parameter in parameters.items():
        parameter.requires_grad_(name in selected)
    return {name: parameters[name] for name in names}


@torch.no_grad()
def load_parameters(model: torch.nn.Module, state: Mapping[str, torch.Tensor], required: Sequence[str] = ()) -> None:
    """Copy ``state`` into the model's parameters (trained or frozen), checking names and shapes."""
    parameters = dict(model.named_parameters())
    missing = [name for name in required if name not in state]
    if missing:
        raise ProcessMismatchError(f"The start state has no tensor {missing[0]!r}, which the process trains.")
    for name, value in state.items():
        if name not in parameters:
            raise ProcessMismatchError(f"The start state has tensor {name!r}, which is not a parameter of the model.")
        if value.shape != parameters[name].shape:
            raise ProcessMismatchError(
                f"Start tensor {name!r} has shape {tuple(value.shape)}, the model expects {tuple(parameters[name].shape)}."
            )
        parameters[name].copy_(value)


def state_of(parameters: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies of ``parameters``."""
    return {name: parameter.detach().clone() for name, parameter in parameters.items()}


def environment() -> dict:
    import transformers

    return {
        "hf_sidecar": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "num_threads": torch.get_num_threads(),
        "world_size": distributed_context()[1],
    }


def adamw_optimizer(parameters: Mapping[str, torch.nn.Parameter], config: ProcessConfig) -> torch.optim.AdamW:
    """Create a fresh AdamW over ``parameters`` with the recorded settings, kernel and weight decay groups."""
    unknown = sorted(set(config.no_decay_parameters) - set(parameters))
    if unknown:
        raise ProcessMismatchError(f"no_decay_parameters names {unknown[0]!r}, which the process does not train.")
    exempt = set(config.no_decay_parameters)
    groups = [{"params": [p for n, p in parameters.items() if n not in exempt], "weight_decay": config.weight_decay}]
    if exempt:
        groups.append({"params": [p for n, p in parameters.items() if n in exempt], "weight_decay": 0.0})
    groups = [group for group in groups if group["params"]]
    implementation = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[config.adam_implementation]
    return torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon, **implementation
    )


def run_process(
    model: torch.nn.Module,
    record: ProcessRecord,
    examples: Mapping[str, TokenizedExample],
    *,
    start_state: Mapping[str, torch.Tensor] | None = None,
    pad_token_id: int = 0,
    description: str | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Run the recorded process on ``model`` and return the trained parameters.

    ``start_state`` (a parameter-name-to-tensor map covering ``record.trainable``) is copied
    into the model first; without it the process starts from the model's current parameters.
    The optimizer starts fresh (step 0, zero moments), so the result depends on the start point
    and the record only. Each step's batch is checked against its recorded fingerprint.
    """
    config = record.config
    if str(next(model.parameters()).dtype).removeprefix("torch.") != record.dtype:
        raise ProcessMismatchError(
            f"The model's dtype is {next(model.parameters()).dtype} but the process was recorded in {record.dtype}; "
            f"cast the model with model.to(torch.{record.dtype}) before replaying."
        )
    parameters = trainable_parameters(model, record.trainable)
    if start_state is not None:
        load_parameters(model, start_state, required=record.trainable)

    optimizer = adamw_optimizer(parameters, config)
    rates = learning_rates(config, record.num_steps)
    micro = config.effective_micro_batch_size
    rank, world_size = distributed_context()
    model.train()
    bar = tqdm(total=record.num_steps, desc=description or record.name, disable=not progress or rank != 0, leave=False)
    for step, example_ids in enumerate(record.steps):
        try:
            batch = [examples[example_id] for example_id in example_ids]
        except KeyError as err:
            raise ProcessMismatchError(
                f"Step {step} uses example {err.args[0]!r}, which is not in the data given to the replay. "
                "Pass the same dataset the process was recorded on."
            ) from None
        fingerprint = fingerprint_examples(batch)
        if fingerprint != record.step_fingerprints[step]:
            raise ProcessMismatchError(
                f"Step {step}: the tokenized batch differs from the recorded one (fingerprint {fingerprint[:12]} "
                f"instead of {record.step_fingerprints[step][:12]}). Replay with the same data, tokenizer and max_length."
            )
        answer_tokens = sum(example.answer_tokens for example in batch)
        for group in optimizer.param_groups:
            group["lr"] = rates[step]
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        # Each process takes a contiguous share of the global batch; the normalization stays
        # the global answer-token count, so the summed gradients equal the single-process ones.
        share = batch[rank * len(batch) // world_size : (rank + 1) * len(batch) // world_size]
        for start in range(0, len(share), micro):
            loss = micro_batch_loss_sum(model, share[start : start + micro], seed=config.seed, step=step, pad_token_id=pad_token_id)
            (loss / answer_tokens).backward()
            step_loss += loss.item()
        if world_size > 1:
            step_loss = all_reduce_gradients(list(parameters.values()), step_loss)
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(parameters.values()), config.max_grad_norm, foreach=False)
        optimizer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss / max(answer_tokens, 1):.3f}", refresh=False)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"{record.name}: the loss at step {step} is {step_loss}; lower the learning rate.")
    bar.close()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return state_of(parameters)


def distributed_context() -> tuple[int, int]:
    """Return ``(rank, world_size)``, joining the process group when a launcher started several processes.

    Under ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` > 1) the group is initialized
    through Accelerate: gloo on CPU, the accelerator's backend otherwise. Without a launcher the
    process runs alone.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        return state.process_index, state.num_processes
    return 0, 1


def all_reduce_gradients(parameters: Sequence[torch.nn.Parameter], loss_sum: float) -> float:
    """Sum the gradients (and the loss, for logging) over all processes.

    A parameter that got no gradient on any process keeps ``grad = None``, so AdamW skips it as
    it would in one process. One that got a gradient somewhere gets zeros where it got none.
    """
    import torch.distributed as dist

    device = parameters[0].device
    present = torch.tensor([parameter.grad is not None for parameter in parameters], dtype=torch.float32, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    reduced = []
    for parameter, flag in zip(parameters, present.tolist()):
        if flag:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            reduced.append(parameter)
    if reduced:
        flat = torch.cat([parameter.grad.reshape(-1) for parameter in reduced])
        dist.all_reduce(flat)
        offset = 0
        for parameter in reduced:
            size = parameter.grad.numel()
            parameter.grad.copy_(flat[offset : offset + size].view_as(parameter.grad))
            offset += size
    loss = torch.tensor([loss_sum], dtype=torch.float64, device=device)
    dist.all_reduce(loss)
    return float(loss.item())


def record_process(
    name: str,
    config: ProcessConfig,
    examples: Mapping[str, TokenizedExample],
    trainable: Sequence[str],
    dtype: torch.dtype,
    adapter: dict | None = None,
) -> ProcessRecord:
    """Plan a training run over ``examples`` into a replayable record, before running it."""
    steps = plan_steps(list(examples), config)
    fingerprints = [fingerprint_examples([examples[example] for example in step]) for step in steps]
    tokens = [sum(examples[example].answer_tokens for example in step) for step in steps]
    return ProcessRecord(
        name=name,
        config=config,
        steps=steps,
        step_fingerprints=fingerprints,
        step_answer_tokens=tokens,
        trainable=list(trainable),
        dtype=str(dtype).removeprefix("torch."),
        adapter=adapter,
        environment=environment(),
    )


def train(
    model: torch.nn.Module,
    name: str,
    config: ProcessConfig,
    examples: Mapping[str, TokenizedExample],
    *,
    trainable: Sequence[str] | None = None,
    pad_token_id: int = 0,
    progress: bool = True,
) -> ProcessRecord:
    """Train ``model`` in place for one phase and return the record that replays it.

    ``trainable`` defaults to every parameter of the model (full fine-tuning).
    """
    from .io import content_digest

    names = list(trainable) if trainable is not None else [n for n, _ in model.named_parameters()]
    dtype = next(model.parameters()).dtype
    record = record_process(name, config, examples, names, dtype)
    record.start_digest = content_digest(dict(model.named_parameters()), names)
    logger.info("Training phase %s: %d steps over %d examples", name, record.num_steps, len(examples))
    end_state = run_process(model, record, examples, pad_token_id=pad_token_id, progress=progress)
    record.end_digest = content_digest(end_state)
    return record


def max_deviation(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> float:
    """Largest absolute elementwise difference between two states with the same names."""
    if first.keys() != second.keys():
        raise ValueError(f"States cover different parameters: {sorted(first.keys() ^ second.keys())[:3]}")
    return max(((first[n].double() - second[n].double()).abs().max().item() for n in first), default=0.0)
