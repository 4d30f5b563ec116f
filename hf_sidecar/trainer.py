"""Record a phase trained with transformers' ``Trainer`` (or TRL's ``SFTTrainer``) as a process record.

Add two lines before ``trainer.train()``::

    from hf_sidecar.trainer import record_trainer
    record_trainer(trainer, "safety-record")

When training ends, the folder contains ``process.json`` (the record :func:`hf_sidecar.train`
writes for its own loop), ``examples.jsonl`` (the token ids and labels of every trained example,
keyed by example id) and, for a PEFT model, ``adapter_start.safetensors`` (the adapter's initial
parameters). :func:`hf_sidecar.run_process` replays the record from any start point.

The recorder has three parts. A callback checks the settings before the first step and notes the
learning rate of each optimizer step. A wrapper around the sampler of the Trainer's dataloader
stores the realized example order. A wrapper around ``trainer.training_step`` reads each
micro-batch as the model receives it, after the collator, so the recorded tokens are the trained
tokens. Settings that the replay cannot reproduce raise :class:`RecordingError`, which names the
setting: before the first step when the Trainer's arguments, model or optimizer show them,
otherwise at the batch or the end of training that reveals them.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback

from .data import IGNORE_INDEX, DataError, TokenizedExample, fingerprint_examples
from .io import atomic_save_safetensors, atomic_write_text, content_digest
from .process import (
    SUPPORTED_SCHEDULERS,
    ProcessConfig,
    ProcessMismatchError,
    ProcessRecord,
    environment,
    learning_rates,
    load_parameters,
    run_process,
    state_of,
)

logger = logging.getLogger(__name__)

RECORD_FILE = "process.json"
EXAMPLES_FILE = "examples.jsonl"
ADAPTER_START_FILE = "adapter_start.safetensors"
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")
LORA_PARAMETER_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


class RecordingError(ValueError):
    """Raised when a Trainer run uses a setting that the replay cannot reproduce."""


# ---- Tokenized examples on disk ----


def write_tokenized_examples(path: str | Path, examples: Iterable[TokenizedExample]) -> None:
    """Write ``examples`` as JSONL rows ``{"id", "input_ids", "labels"}``, atomically."""
    lines = [json.dumps({"id": e.id, "input_ids": list(e.input_ids), "labels": list(e.labels)}) for e in examples]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_tokenized_examples(path: str | Path) -> dict[str, TokenizedExample]:
    """Read a file written by :func:`write_tokenized_examples`, keyed by example id."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Tokenized examples file {path} not found.")
    examples: dict[str, TokenizedExample] = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                example = TokenizedExample(
                    id=str(row["id"]), input_ids=tuple(int(t) for t in row["input_ids"]), labels=tuple(int(t) for t in row["labels"])
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise DataError(
                    f"{path}:{line_number}: invalid tokenized example ({err!r}). "
                    'Each line must be a JSON object {"id": str, "input_ids": [int], "labels": [int]}.'
                ) from err
            if len(example.input_ids) != len(example.labels) or not example.input_ids:
                raise DataError(
                    f"{path}:{line_number}: example {example.id!r} has {len(example.input_ids)} input ids and "
                    f"{len(example.labels)} labels; both must have the same nonzero length."
                )
            if example.id in examples:
                raise DataError(f"{path}:{line_number}: duplicate example id {example.id!r}.")
            examples[example.id] = example
    return examples


def is_tokenized_examples_file(path: str | Path) -> bool:
    """Check whether the first row of a JSONL file has ``input_ids``, as :func:`write_tokenized_examples` writes."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(row, dict) and "input_ids" in row
    return False


# ---- The sampler wrapper ----


class _RecordingSampler(torch.utils.data.Sampler):
    """Yield the wrapped sampler's indices unchanged and keep one list of them per pass (epoch)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.epochs: list[list[int]] = []

    def __iter__(self) -> Iterator:
        order: list[int] = []
        self.epochs.append(order)
        for index in self.sampler:
            order.append(int(index))
            yield index

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name):
        # Forwards set_epoch, generator and the like, so accelerate treats the wrapper as the sampler.
        sampler = self.__dict__.get("sampler")
        if sampler is None:
            raise AttributeError(name)
        return getattr(sampler, name)


def _install_sampler(dataloader) -> _RecordingSampler:
    """Wrap the sampler inside the Trainer's prepared dataloader, keeping its order and seeding."""
    if dataloader is None:
        raise RecordingError("The Trainer passed no train dataloader to the callback; the recorder needs transformers >= 5.")
    if hasattr(dataloader, "get_sampler") and hasattr(dataloader, "set_sampler"):
        sampler = dataloader.get_sampler()
        if isinstance(sampler, _RecordingSampler):
            sampler = sampler.sampler
        recording = _RecordingSampler(sampler)
        dataloader.set_sampler(recording)
        return recording
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    if batch_sampler is None or not hasattr(batch_sampler, "sampler"):
        raise RecordingError(
            f"Cannot find the sampler of the train dataloader ({type(dataloader).__name__}); "
            "the recorder needs the Trainer's own dataloader over a dataset with __len__."
        )
    sampler = batch_sampler.sampler
    if isinstance(sampler, _RecordingSampler):
        sampler = sampler.sampler
    recording = _RecordingSampler(sampler)
    batch_sampler.sampler = recording
    return recording


# ---- Reading micro-batches ----


def _batch_rows(inputs: Mapping) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Split a collated micro-batch into per-example ``(input_ids, labels)``, without padding.

    The label at position 0 is stored as ``IGNORE_INDEX``: a causal LM never predicts the first
    token, and the Trainer counts ``labels[..., 1:]`` for ``num_items_in_batch``, so only then do
    the replay's and the Trainer's token counts agree.
    """
    extra = sorted(key for key in inputs if key not in BATCH_KEYS)
    if extra:
        raise RecordingError(
            f"The training batch has the input {extra[0]!r}, which the replay does not pass to the model. "
            "Only input_ids, attention_mask, labels and position_ids 0, 1, 2, ... can be replayed, so packing "
            "and padding-free batches (padding_free=True) are not supported."
        )
    if "labels" not in inputs:
        raise RecordingError("The training batch has no labels; the replay computes the loss from labels. Use a collator that sets them.")
    input_ids = inputs["input_ids"].detach().cpu()
    labels = inputs["labels"].detach().cpu()
    mask = inputs["attention_mask"].detach().cpu() if "attention_mask" in inputs else torch.ones_like(input_ids)
    positions = inputs["position_ids"].detach().cpu() if "position_ids" in inputs else None
    if input_ids.dim() != 2 or labels.shape != input_ids.shape or mask.shape != input_ids.shape:
        raise RecordingError(
            f"Expected input_ids, labels and attention_mask of one shape (batch, length); got {tuple(input_ids.shape)}, "
            f"{tuple(labels.shape)} and {tuple(mask.shape)}."
        )
    rows = []
    for row in range(input_ids.size(0)):
        length = int(mask[row].sum())
        if length == 0 or not bool(mask[row, :length].all()):
            raise RecordingError(
                "The attention mask of a training row does not start with its tokens: the batch is left-padded or has "
                "holes. The replay right-pads, so set tokenizer.padding_side = 'right' (or pad right in the collator)."
            )
        if positions is not None and not torch.equal(positions[row, :length], torch.arange(length, dtype=positions.dtype)):
            raise RecordingError(
                "position_ids of a training row are not 0, 1, 2, ...: the batch is packed. Set packing=False and padding_free=False."
            )
        if bool((labels[row, length:] != IGNORE_INDEX).any()):
            raise RecordingError(
                f"A training row has labels other than {IGNORE_INDEX} on padded positions, so the Trainer trains on padding, "
                f"which the replay cannot reproduce. Pad labels with {IGNORE_INDEX} in the collator."
            )
        row_labels = [int(t) for t in labels[row, :length]]
        row_labels[0] = IGNORE_INDEX
        rows.append((tuple(int(t) for t in input_ids[row, :length]), tuple(row_labels)))
    return rows


def _row_input_ids(row) -> list[int] | None:
    """``input_ids`` of one dataset row, or None where rows carry no token ids (a tokenizing collator)."""
    if isinstance(row, Mapping) and "input_ids" in row:
        try:
            return [int(t) for t in torch.as_tensor(row["input_ids"]).reshape(-1).tolist()]
        except (TypeError, ValueError):
            return None
    return None


# ---- Settings ----


def _unwrap_optimizer(optimizer):
    """Return the torch optimizer inside accelerate's ``AcceleratedOptimizer``, which is itself an ``Optimizer``."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _activation_checkpointing(args) -> bool:
    # transformers 5.x renamed gradient_checkpointing to activation_checkpointing; the old name warns.
    value = getattr(args, "activation_checkpointing", None)
    return bool(value if value is not None else getattr(args, "gradient_checkpointing", False))


def _scheduler_name(args) -> str:
    value = args.lr_scheduler_type
    return str(getattr(value, "value", value))


def _adam_implementation(group: Mapping, parameters: Sequence[torch.Tensor]) -> str:
    """Name the AdamW kernel torch runs for ``group``. Without a flag, torch uses foreach on accelerators, for-loop on CPU."""
    if group.get("fused"):
        return "fused"
    if group.get("foreach"):
        return "foreach"
    if group.get("foreach") is None and any(p.device.type != "cpu" for p in parameters):
        return "foreach"
    return "for-loop"


def _first_dropout(model: torch.nn.Module) -> str | None:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return f"{name or type(module).__name__} (p={module.p})"
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "attention_dropout", 0.0):
        return f"config.attention_dropout={config.attention_dropout}"
    return None


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _json_safe(value):
    if isinstance(value, (set, frozenset)):
        return sorted(_json_safe(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if hasattr(value, "value") and isinstance(getattr(value, "value"), str):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def peft_adapter_info(model) -> dict:
    """Describe a PEFT LoRA model's adapter for a record, with the config that attaches it again."""
    names = list(model.peft_config)
    if len(names) != 1:
        raise RecordingError(f"The PEFT model has {len(names)} adapters ({names}); the recorder supports one trained adapter.")
    config = model.peft_config[names[0]]
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type != "LORA":
        raise RecordingError(f"PEFT peft_type={peft_type!r} is not supported; the replay merges LoRA adapters only.")
    return {"kind": "peft", "adapter_name": names[0], "peft_config": _json_safe(config.to_dict())}


def _uses_builtin_loss(trainer) -> bool:
    """Check whether ``trainer`` computes its loss with ``Trainer.compute_loss`` or ``SFTTrainer.compute_loss``."""
    from transformers import Trainer

    builtin = {Trainer.compute_loss}
    trl = sys.modules.get("trl")
    if trl is not None:
        builtin.add(trl.SFTTrainer.compute_loss)
    return type(trainer).compute_loss in builtin


def _settings_problems(trainer, args, state, model: torch.nn.Module) -> list[str]:
    """List the training arguments and model settings that the replay cannot reproduce, each with the fix."""
    problems = []

    # Arithmetic: the replay runs eager kernels in the model's dtype.
    if args.fp16 or args.bf16:
        problems.append(
            f"fp16={args.fp16}, bf16={args.bf16}: the Trainer runs the forward under autocast, which the replay does not. "
            "Set fp16=False and bf16=False. To train in bfloat16, load the model in bfloat16 instead."
        )
    if getattr(args, "tf32", None):
        problems.append("tf32=True: TF32 matmuls round differently from the replay's. Set tf32=False.")
    if getattr(args, "torch_compile", False):
        problems.append("torch_compile=True: compiled kernels round differently from the eager replay. Set torch_compile=False.")

    # Random numbers: the Trainer draws them in call order, which a replay cannot key by example.
    if getattr(args, "neftune_noise_alpha", None):
        problems.append(f"neftune_noise_alpha={args.neftune_noise_alpha}: the embedding noise is not keyed by example. Set it to None.")
    dropout = _first_dropout(model)
    if dropout is not None:
        problems.append(
            f"Dropout is active in {dropout}: the Trainer draws masks in call order, which a replay cannot key by example. "
            "Set every dropout probability (including lora_dropout) to 0."
        )

    # Loss: the replay sums token cross-entropies and divides by the step's answer tokens.
    if getattr(args, "label_smoothing_factor", 0.0):
        problems.append(f"label_smoothing_factor={args.label_smoothing_factor}: the replay uses plain cross-entropy. Set it to 0.")
    if getattr(args, "use_liger_kernel", False):
        problems.append("use_liger_kernel=True: Liger's fused loss is not the replay's loss. Set use_liger_kernel=False.")
    if getattr(args, "loss_type", "nll") != "nll":
        problems.append(f"loss_type={args.loss_type!r}: the replay implements the 'nll' loss only.")
    if getattr(trainer, "aux_loss_enabled", False):
        problems.append("The MoE router auxiliary loss is enabled: the replay computes cross-entropy only. Disable output_router_logits.")
    if not _uses_builtin_loss(trainer):
        problems.append(
            f"{type(trainer).__name__}.compute_loss overrides the loss of transformers' Trainer and TRL's SFTTrainer. The "
            "replay computes the token cross-entropy normalized by the step's answer tokens and cannot check another loss."
        )
    if getattr(trainer, "compute_loss_func", None) is not None:
        problems.append("compute_loss_func is set: the replay computes the token cross-entropy only. Remove compute_loss_func.")
    if not getattr(trainer, "_loss_shifts_labels", True):
        problems.append("The model's loss is not the causal LM loss over shifted labels, which is the loss the replay computes.")
    if args.gradient_accumulation_steps > 1 and not getattr(trainer, "model_accepts_loss_kwargs", True):
        problems.append(
            f"gradient_accumulation_steps={args.gradient_accumulation_steps} with a model whose forward does not accept "
            "num_items_in_batch: the Trainer averages each micro-batch's loss separately, while the replay normalizes by "
            "the answer tokens of the whole step. Use gradient_accumulation_steps=1."
        )

    # Data and devices: the recorder reads one per-example sampler on one device.
    if getattr(args, "train_sampling_strategy", None) == "batch_rebalance":
        problems.append("train_sampling_strategy='batch_rebalance': the recorder reads a per-example sampler. Use 'random' or 'group_by_length'.")
    if getattr(args, "packing", False) or getattr(args, "padding_free", False):
        problems.append("packing=True or padding_free=True: packed sequences cannot be replayed. Set both to False.")
    if args.world_size > 1 or args.n_gpu > 1:
        problems.append(
            f"world_size={args.world_size}, n_gpu={args.n_gpu}: the recorder supports one process on one device. "
            "Run the recorded phase on a single device."
        )
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        problems.append("DeepSpeed or FSDP is enabled: the recorder supports plain single-device training.")

    # Optimizer state and schedule: the replay starts fresh and computes transformers' schedules.
    if state.global_step != 0:
        problems.append(
            f"Training resumes at step {state.global_step} from a checkpoint, but the recorded process must start with fresh "
            "optimizer state. Record a run that starts at step 0."
        )
    scheduler = _scheduler_name(args)
    if scheduler not in SUPPORTED_SCHEDULERS:
        problems.append(f"lr_scheduler_type={scheduler!r} is not supported; use one of {SUPPORTED_SCHEDULERS}.")
    if args.lr_scheduler_kwargs:
        problems.append(f"lr_scheduler_kwargs={args.lr_scheduler_kwargs!r}: the replay uses each scheduler's defaults. Remove them.")
    return problems


def _optimizer_problems(args, model: torch.nn.Module, optimizer) -> list[str]:
    """List the optimizer settings that the replay's AdamW does not implement, each with the fix."""
    problems = []
    inner = _unwrap_optimizer(optimizer)
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        problems.append(
            f"The optimizer is {type(inner).__module__}.{type(inner).__name__} (optim={getattr(args, 'optim', None)!r}), "
            "but the replay implements torch.optim.AdamW only. Use optim='adamw_torch' or 'adamw_torch_fused'."
        )
        return problems
    groups = [group for group in inner.param_groups if group["params"]]
    if not groups or not any(p.requires_grad for p in model.parameters()):
        problems.append("No parameter requires gradients, so the Trainer would train nothing. Call requires_grad_(True) on the trained parameters.")
        return problems

    for flag in ("amsgrad", "maximize", "differentiable", "capturable"):
        if any(group.get(flag) for group in groups):
            problems.append(f"AdamW {flag}=True is not implemented by the replay. Set {flag}=False.")
    decoupled = type(inner) is torch.optim.AdamW or all(group.get("decoupled_weight_decay") for group in groups)
    if not decoupled and any(group["weight_decay"] for group in groups):
        problems.append("torch.optim.Adam with L2 weight decay is not AdamW, whose decoupled weight decay the replay applies. Use AdamW.")

    # The replay builds one group with weight decay and one without, sharing every other setting.
    for key in ("betas", "eps"):
        if len({tuple(g[key]) if isinstance(g[key], (tuple, list)) else g[key] for g in groups}) > 1:
            problems.append(f"The optimizer's parameter groups use different {key}, but the replay uses one value for all.")
    if len({g.get("initial_lr", g["lr"]) for g in groups}) > 1:
        problems.append("The optimizer's parameter groups use different learning rates, but the replay uses one schedule for all.")
    decays = {g["weight_decay"] for g in groups if g["weight_decay"]}
    if len(decays) > 1:
        problems.append(f"The optimizer's parameter groups use weight decays {sorted(decays)}, but the replay supports one value and 0.")
    implementations = {_adam_implementation(g, g["params"]) for g in groups}
    if len(implementations) > 1:
        problems.append(f"The optimizer's parameter groups use different AdamW kernels {sorted(implementations)}.")

    optimized = {id(p) for g in groups for p in g["params"]}
    unoptimized = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in optimized]
    if unoptimized:
        problems.append(
            f"Parameter {unoptimized[0]!r} requires gradients but is not in the optimizer ({len(unoptimized)} such), and "
            "its gradient still enters the clipping norm. Freeze it with requires_grad_(False)."
        )
    return problems


def _optimizer_settings(args, state, model: torch.nn.Module, optimizer, trainable: Sequence[str]) -> dict:
    """Read the ``ProcessConfig`` settings of the optimizer, scheduler and clipping as the Trainer applies them."""
    inner = _unwrap_optimizer(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [g for g in inner.param_groups if g["params"]]
    decay = max(g["weight_decay"] for g in groups)
    no_decay = {names[id(p)] for g in groups if decay and not g["weight_decay"] for p in g["params"]}
    group = groups[0]
    return {
        "learning_rate": float(group.get("initial_lr", group["lr"])),
        "adam_beta1": float(group["betas"][0]),
        "adam_beta2": float(group["betas"][1]),
        "adam_epsilon": float(group["eps"]),
        "weight_decay": float(decay),
        "no_decay_parameters": tuple(n for n in trainable if n in no_decay),
        "max_grad_norm": float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else None,
        "lr_scheduler": _scheduler_name(args),
        "warmup_steps": int(args.get_warmup_steps(state.max_steps)),
        "seed": int(args.seed),
        "adam_implementation": _adam_implementation(group, group["params"]),
    }


def _trainer_metadata(trainer, args, state) -> dict:
    """Collect the Trainer's class and arguments for ``environment.trainer`` in the record."""
    return {
        "class": f"{type(trainer).__module__}.{type(trainer).__qualname__}",
        "optim": str(getattr(args.optim, "value", args.optim)),
        "lr_scheduler_type": _scheduler_name(args),
        "max_steps": int(state.max_steps),
        "num_train_epochs": int(state.num_train_epochs),
        "per_device_train_batch_size": int(args.per_device_train_batch_size),
        "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
        "max_grad_norm": float(args.max_grad_norm or 0.0),
        "weight_decay": float(args.weight_decay),
        "seed": int(args.seed),
        "data_seed": args.data_seed,
        "activation_checkpointing": _activation_checkpointing(args),
        "dataloader_drop_last": bool(args.dataloader_drop_last),
        "train_sampling_strategy": str(getattr(args, "train_sampling_strategy", "random")),
        "loss_normalization": "num_items_in_batch",
    }


def _check_micro_batches(step_sizes: Sequence[Sequence[int]], micro: int | None) -> None:
    """Check that every step split into micro-batches the way ``run_process`` splits it: full ones, then the rest."""
    for step, sizes in enumerate(step_sizes):
        total = sum(sizes)
        chunk = micro or total
        expected = [min(chunk, total - start) for start in range(0, total, chunk)]
        if list(sizes) != expected:
            raise RecordingError(f"Step {step} used micro-batches of {list(sizes)} examples, but the replay splits it into {expected}.")


def _check_learning_rates(used: Sequence[float], config: ProcessConfig) -> None:
    """Check that the optimizer stepped with the learning rates the replay computes from ``config``."""
    planned = learning_rates(config, len(used))
    for step, (rate, expected) in enumerate(zip(used, planned)):
        if not math.isclose(rate, expected, rel_tol=1e-12, abs_tol=1e-15):
            raise RecordingError(
                f"Step {step}: the optimizer stepped with learning rate {rate!r}, but transformers' {config.lr_scheduler!r} "
                f"schedule over {config.schedule_steps or len(used)} steps with {config.warmup_steps} warmup steps gives "
                f"{expected!r}. A custom scheduler (optimizers=(..., scheduler)) cannot be replayed; let the Trainer create it."
            )


# ---- The recorder ----


class TrainerRecorder(TrainerCallback):
    """Record a ``Trainer`` run as a :class:`ProcessRecord`; attach it with :func:`record_trainer`.

    ``id_column`` names a dataset column that contains unique example ids. Without it, the example
    at dataset index ``i`` gets the id ``example-<i>``. After training, :attr:`record` contains the
    record and :attr:`examples` the trained examples, which are also written to ``output_dir``.
    """

    def __init__(self, output_dir: str | Path, *, name: str = "safety", id_column: str = "id"):
        self.output_dir = Path(output_dir)
        self.name = name
        self.id_column = id_column
        self.trainer = None
        self.record: ProcessRecord | None = None
        self.examples: dict[str, TokenizedExample] = {}
        self._reset()

    def _reset(self) -> None:
        self.record = None
        self.examples = {}
        self._sampler: _RecordingSampler | None = None
        self._epoch = -1
        self._cursor = 0
        self._ids_by_index: dict[int, str] = {}
        self._index_by_id: dict[str, int] = {}
        self._steps: list[list[str]] = []
        self._step_rates: list[float] = []
        self._pending: list[str] = []
        self._pending_sizes: list[int] = []
        self._pending_items: float | None = None
        self._step_sizes: list[list[int]] = []
        self._micro_batch_size = 0
        self._config_values: dict = {}
        self._trainable: list[str] = []
        self._adapter: dict | None = None
        self._adapter_start: dict[str, torch.Tensor] | None = None
        self._start_digest: str | None = None
        self._dtype = ""
        self._metadata: dict = {}

    def attach(self, trainer) -> "TrainerRecorder":
        """Add the callback to ``trainer`` and wrap its ``training_step`` to read each micro-batch."""
        if self.trainer is not None and self.trainer is not trainer:
            raise RecordingError("This recorder is already attached to another Trainer; create one recorder per Trainer.")
        original = trainer.training_step
        if getattr(original, "_hf_sidecar_recorder", None) is self:
            return self
        self.trainer = trainer
        trainer.add_callback(self)

        def training_step(model, inputs, *args, **kwargs):
            num_items = args[0] if args else kwargs.get("num_items_in_batch")
            self._add_micro_batch(inputs, num_items)
            return original(model, inputs, *args, **kwargs)

        training_step._hf_sidecar_recorder = self  # type: ignore[attr-defined]
        trainer.training_step = training_step
        return self

    # -- callback events --

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if self.trainer is None:
            raise RecordingError("TrainerRecorder was added as a callback only; attach it with record_trainer(trainer, folder).")
        self._reset()
        trainer = self.trainer
        model = model if model is not None else trainer.model
        optimizer = optimizer if optimizer is not None else trainer.optimizer
        if isinstance(trainer.train_dataset, torch.utils.data.IterableDataset):
            raise RecordingError("The train dataset is an IterableDataset; the recorder needs a dataset with __len__ to name examples.")
        problems = _settings_problems(trainer, args, state, model) + _optimizer_problems(args, model, optimizer)
        if problems:
            raise RecordingError("This Trainer run cannot be recorded for replay:\n- " + "\n- ".join(problems))

        self._trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if _is_peft_model(model):
            self._adapter = peft_adapter_info(model)
            other = [n for n in self._trainable if not any(part in n for part in LORA_PARAMETER_PARTS)]
            if other:
                raise RecordingError(
                    f"The PEFT model also trains {other[0]!r}, which is not a LoRA factor (modules_to_save, bias or trainable "
                    "tokens), but the replay merges LoRA factors only. Remove those options from the LoraConfig."
                )
            self._adapter_start = state_of(trainable)

        self._sampler = _install_sampler(train_dataloader)
        self._config_values = _optimizer_settings(args, state, model, optimizer, self._trainable)
        self._dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self._start_digest = content_digest(trainable, self._trainable)
        self._metadata = _trainer_metadata(trainer, args, state)
        logger.info(
            "Recording %s: %d trainable tensors, AdamW %s, %s schedule, %d steps",
            self.name, len(self._trainable), self._config_values["adam_implementation"], self._config_values["lr_scheduler"], state.max_steps,
        )

    def on_epoch_begin(self, args, state, control, **kwargs):
        # Each epoch iterates the dataloader once, so epoch k reads the sampler's k-th pass.
        self._epoch += 1
        self._cursor = 0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        inner = _unwrap_optimizer(optimizer if optimizer is not None else self.trainer.optimizer)
        rates = {float(g["lr"]) for g in inner.param_groups if g["params"]}
        if len(rates) != 1:
            raise RecordingError(f"Step {state.global_step}: the optimizer's groups stepped with different learning rates {sorted(rates)}.")
        self._step_rates.append(rates.pop())

    def on_step_end(self, args, state, control, **kwargs):
        self._close_step(state.global_step - 1)

    def on_train_end(self, args, state, control, **kwargs):
        if self._pending:
            raise RecordingError(f"Training ended with {len(self._pending)} examples after the last optimizer step; they were never applied.")
        self.record = self._make_record(state)
        self.save(self.output_dir)

    # -- micro-batches and steps --

    def _example_id(self, index: int, row) -> str:
        if index in self._ids_by_index:
            return self._ids_by_index[index]
        example_id = f"example-{index}"
        if isinstance(row, Mapping) and row.get(self.id_column) is not None:
            example_id = str(row[self.id_column])
        other = self._index_by_id.setdefault(example_id, index)
        if other != index:
            raise RecordingError(
                f"Dataset rows {other} and {index} share the id {example_id!r} in column {self.id_column!r}; ids must be unique."
            )
        self._ids_by_index[index] = example_id
        return example_id

    def _take_indices(self, count: int) -> list[int]:
        """Return the dataset indices of the next ``count`` rows: the sampler's order in the current epoch."""
        if self._epoch < 0 or self._epoch >= len(self._sampler.epochs):
            raise RecordingError("The training batches do not come from the sampler the recorder wrapped; was the dataloader replaced?")
        indices = self._sampler.epochs[self._epoch][self._cursor : self._cursor + count]
        if len(indices) != count:
            raise RecordingError(
                f"The micro-batch has {count} rows but the sampler yielded only {len(indices)} more indices this epoch, "
                "so the recorder cannot align examples with dataset rows."
            )
        self._cursor += count
        return indices

    def _add_micro_batch(self, inputs: Mapping, num_items) -> None:
        if self._sampler is None:
            raise RecordingError("The recorder saw a training batch before on_train_begin; attach it before trainer.train().")
        rows = _batch_rows(inputs)
        indices = self._take_indices(len(rows))

        dataset = self.trainer.train_dataset
        for index, (input_ids, labels) in zip(indices, rows):
            row = dataset[index]
            expected = _row_input_ids(row)
            if expected is not None and expected != list(input_ids):
                raise RecordingError(
                    f"A batch row does not match dataset row {index}: the collator changed its token ids or the batches are "
                    "not in sampler order. The recorder needs a collator that only pads (and sets labels)."
                )
            example = TokenizedExample(id=self._example_id(index, row), input_ids=input_ids, labels=labels)
            known = self.examples.setdefault(example.id, example)
            if known != example:
                raise RecordingError(
                    f"Example {example.id!r} reached the model with different tokens or labels in two steps; the collator "
                    "is random (for example masked-LM masking), which the replay cannot reproduce."
                )
            self._pending.append(example.id)

        self._pending_sizes.append(len(rows))
        self._micro_batch_size = max(self._micro_batch_size, len(rows))
        if num_items is not None:
            self._pending_items = float(num_items.item() if torch.is_tensor(num_items) else num_items)

    def _close_step(self, step: int) -> None:
        if not self._pending:
            raise RecordingError(f"Optimizer step {step} ran without a recorded micro-batch; was training_step replaced after attaching?")
        answer_tokens = sum(self.examples[example_id].answer_tokens for example_id in self._pending)
        if self._pending_items is not None and round(self._pending_items) != answer_tokens:
            raise RecordingError(
                f"Step {step}: the Trainer normalized the loss by num_items_in_batch={self._pending_items:g} label tokens, but the "
                f"recorded batch has {answer_tokens}. The replay cannot reproduce this loss normalization."
            )
        if self._pending_items is None and len(self._pending_sizes) > 1:
            raise RecordingError(
                f"Step {step}: the Trainer averaged each of {len(self._pending_sizes)} micro-batches separately (no num_items_in_batch), "
                "while the replay normalizes by the answer tokens of the whole step. Use gradient_accumulation_steps=1."
            )
        self._steps.append(self._pending)
        self._step_sizes.append(self._pending_sizes)
        self._pending, self._pending_sizes, self._pending_items = [], [], None

    def _make_record(self, state) -> ProcessRecord:
        if not self._steps:
            raise RecordingError("The Trainer ran no optimizer step, so there is nothing to record.")
        if len(self._steps) != len(self._step_rates):
            raise RecordingError(f"Recorded {len(self._steps)} steps but {len(self._step_rates)} learning rates; the callback missed events.")
        accumulating = any(len(sizes) > 1 for sizes in self._step_sizes)
        micro = self._micro_batch_size if accumulating else None
        _check_micro_batches(self._step_sizes, micro)

        num_steps = len(self._steps)
        config = ProcessConfig(
            num_epochs=max(1, math.ceil(state.num_train_epochs)),
            batch_size=max(len(step) for step in self._steps),
            micro_batch_size=micro,
            max_length=max(len(e.input_ids) for e in self.examples.values()),
            schedule_steps=int(state.max_steps) if state.max_steps != num_steps else None,
            **self._config_values,
        )
        _check_learning_rates(self._step_rates, config)

        trainable = {n: p for n, p in self.trainer.model.named_parameters() if n in set(self._trainable)}
        record = ProcessRecord(
            name=self.name,
            config=config,
            steps=self._steps,
            step_fingerprints=[fingerprint_examples([self.examples[e] for e in step]) for step in self._steps],
            step_answer_tokens=[sum(self.examples[e].answer_tokens for e in step) for step in self._steps],
            trainable=list(self._trainable),
            dtype=self._dtype,
            adapter=self._adapter,
            source=self._metadata["class"],
            start_digest=self._start_digest,
            end_digest=content_digest(trainable, self._trainable),
        )
        record.environment = {**environment(), "trainer": self._metadata}
        return record

    def save(self, output_dir: str | Path) -> Path:
        """Write ``process.json``, ``examples.jsonl`` and, for PEFT, the adapter's start state."""
        if self.record is None:
            raise RecordingError("Nothing recorded yet; call trainer.train() first.")
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_tokenized_examples(folder / EXAMPLES_FILE, (self.examples[e] for e in self.record.example_ids))
        if self._adapter_start is not None:
            atomic_save_safetensors(self._adapter_start, folder / ADAPTER_START_FILE)
        self.record.save(folder / RECORD_FILE)
        logger.info("Wrote the %s process (%d steps, %d examples) to %s", self.name, self.record.num_steps, len(self.examples), folder)
        return folder


def record_trainer(trainer, output_dir: str | Path, *, name: str = "safety", id_column: str = "id") -> TrainerRecorder:
    """Attach a :class:`TrainerRecorder` to ``trainer``; ``trainer.train()`` then writes the record to ``output_dir``."""
    return TrainerRecorder(output_dir, name=name, id_column=id_column).attach(trainer)


# ---- Replay and build for PEFT recordings ----


def is_peft_record(record: ProcessRecord) -> bool:
    """Check whether ``record`` trained a PEFT adapter recorded by :class:`TrainerRecorder`."""
    return isinstance(record.adapter, Mapping) and record.adapter.get("kind") == "peft"


def attach_recorded_adapter(model: torch.nn.Module, record: ProcessRecord, adapter_start: Mapping[str, torch.Tensor]):
    """Wrap the plain ``model`` in the recorded PEFT adapter, set to its recorded start state."""
    from peft import get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    values = dict(record.adapter["peft_config"])
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[values["peft_type"]]
    known = set(config_class.__dataclass_fields__)
    config = config_class(**{k: v for k, v in values.items() if k in known})
    peft_model = get_peft_model(model, config, adapter_name=record.adapter.get("adapter_name", "default"))
    found = content_digest(adapter_start, record.trainable) if set(record.trainable) <= set(adapter_start) else None
    if record.start_digest is not None and found != record.start_digest:
        peft_model.unload()
        raise ProcessMismatchError(
            "The adapter start state does not match the recorded start digest; pass the adapter_start.safetensors "
            "written with this process.json."
        )
    load_parameters(peft_model, {name: adapter_start[name] for name in record.trainable}, required=record.trainable)
    return peft_model


def peft_trace(
    model: torch.nn.Module,
    record: ProcessRecord,
    examples: Mapping[str, TokenizedExample],
    start: Mapping[str, torch.Tensor],
    adapter_start: Mapping[str, torch.Tensor],
    *,
    pad_token_id: int = 0,
    description: str | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Replay a PEFT recording from the plain weights ``start`` and return the merged weights.

    ``model`` is the plain model. It gets ``start`` and the recorded adapter at its start state,
    trains for the recorded steps and is merged with PEFT's ``merge_and_unload``, so it is plain
    again afterwards.
    """
    load_parameters(model, start)
    peft_model = attach_recorded_adapter(model, record, adapter_start)
    try:
        run_process(peft_model, record, examples, pad_token_id=pad_token_id, description=description, progress=progress)
    except BaseException:
        peft_model.unload()
        raise
    merged = peft_model.merge_and_unload()
    return state_of(dict(merged.named_parameters()))


def adapted_weight_names(model: torch.nn.Module, record: ProcessRecord) -> list[str]:
    """List the weights, under ``model``'s plain names, that the recorded adapter changes when merged."""
    modules = set()
    for name in record.trainable:
        for suffix in LORA_PARAMETER_PARTS:
            if suffix in name:
                modules.add(name.split(suffix)[0].removeprefix("base_model.model."))
    names = [f"{module}.weight" for module in sorted(modules)]
    plain = {n for n, _ in model.named_parameters()}
    missing = [n for n in names if n not in plain]
    if missing:
        raise ProcessMismatchError(f"The model has no weight {missing[0]!r}, which the recorded adapter changes.")
    return names


def build_recorded_sidecar(
    model: torch.nn.Module,
    record: ProcessRecord,
    examples: Mapping[str, TokenizedExample],
    *,
    theta_a: Mapping[str, torch.Tensor],
    theta_am: Mapping[str, torch.Tensor],
    theta_ams: Mapping[str, torch.Tensor],
    adapter_start: Mapping[str, torch.Tensor] | None = None,
    pad_token_id: int = 0,
    progress: bool = True,
    **kwargs,
):
    """Build a dense sidecar from a Trainer recording, full fine-tuning or a PEFT LoRA adapter.

    For full fine-tuning this is :func:`hf_sidecar.build_sidecar`. For a PEFT recording, ``model``
    is the plain model and the thetas are plain states, ``theta_ams`` with the adapter merged as
    ``merge_and_unload`` gives it. Each trace replays the adapter from ``adapter_start`` and
    merges it, and the sidecar stores the merged weights densely. Other keyword arguments go to
    :func:`hf_sidecar.build_sidecar`.
    """
    from .build import build_sidecar

    if not is_peft_record(record):
        return build_sidecar(
            model, record, examples, theta_a=theta_a, theta_am=theta_am, theta_ams=theta_ams, pad_token_id=pad_token_id,
            progress=progress, **kwargs,
        )
    if adapter_start is None:
        raise ValueError(f"Process {record.name!r} trained a PEFT adapter; pass its {ADAPTER_START_FILE} as adapter_start.")

    def replay(start: Mapping[str, torch.Tensor], description: str) -> dict[str, torch.Tensor]:
        return peft_trace(model, record, examples, start, adapter_start, pad_token_id=pad_token_id, description=description, progress=progress)

    return build_sidecar(
        model, record, examples, theta_a=theta_a, theta_am=theta_am, theta_ams=theta_ams, pad_token_id=pad_token_id,
        progress=progress, replay=replay, covered=adapted_weight_names(model, record), **kwargs,
    )
