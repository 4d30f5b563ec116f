"""Exact JVP mode: forward-mode differentiation of the whole recorded process.

``process_jvp`` returns ``S(theta)`` and ``J_S v`` for a tangent ``v``, by running the recorded
AdamW steps as a pure function of the parameters under ``torch.func.jvp`` (forward over
reverse: each step's gradient is a ``torch.func.grad``). It is the reference that the secant
estimate is tested against, and it is practical only for small models, since the tangent
doubles the memory of every step.

Two numerical traps shape the code:

- Forward mode is not implemented for the CPU flash attention kernel of
  ``scaled_dot_product_attention`` (seen on torch 2.13), so the model runs with eager attention.
- The derivative of ``sqrt(v)`` at ``v = 0`` is infinite, and ``0 * inf`` makes the tangent NaN
  wherever a gradient is exactly zero (embedding rows no token uses). The second moment is
  square-rooted through a guard that gives those entries a zero tangent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch.func import functional_call, grad, jvp
from tqdm.auto import tqdm

from .data import TokenizedExample, collate
from .process import ProcessMismatchError, ProcessRecord, has_active_dropout, learning_rates, token_loss_sum

logger = logging.getLogger(__name__)


def _safe_sqrt(value: torch.Tensor) -> torch.Tensor:
    positive = value > 0
    return torch.where(positive, torch.where(positive, value, torch.ones_like(value)).sqrt(), torch.zeros_like(value))


def _set_eager_attention(model) -> str | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    previous = getattr(config, "_attn_implementation", None)
    if previous not in (None, "eager"):
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            config._attn_implementation = "eager"
    return previous


def process_jvp(
    model: torch.nn.Module,
    record: ProcessRecord,
    examples: Mapping[str, TokenizedExample],
    start_state: Mapping[str, torch.Tensor],
    tangent: Mapping[str, torch.Tensor],
    *,
    pad_token_id: int = 0,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return ``(S(start_state), J_S tangent)`` for the recorded process, exactly.

    ``tangent`` maps parameter names to directions. Trained parameters it omits get a zero
    direction. Its entries for parameters the process does not train pass through unchanged,
    because ``J_S`` is the identity there.
    """
    if has_active_dropout(model):
        raise ValueError("Exact JVP mode needs a model without dropout; set the dropout probabilities to 0.")
    config = record.config
    names = list(record.trainable)
    named = dict(model.named_parameters())
    missing = [name for name in names if name not in named or name not in start_state]
    if missing:
        raise ProcessMismatchError(f"Exact JVP: parameter {missing[0]!r} is missing from the model or the start state.")
    frozen = {name: tensor.detach() for name, tensor in named.items() if name not in set(names)}
    frozen.update({name: buffer for name, buffer in model.named_buffers()})
    rates = learning_rates(config, record.num_steps)
    beta1, beta2 = config.adam_beta1, config.adam_beta2
    no_decay = set(config.no_decay_parameters)
    micro = config.effective_micro_batch_size

    batches = []
    for step, example_ids in enumerate(record.steps):
        batch = [examples[example_id] for example_id in example_ids]
        chunks = [collate(batch[start : start + micro], pad_token_id) for start in range(0, len(batch), micro)]
        batches.append((chunks, sum(example.answer_tokens for example in batch)))

    def loss_sum(params, inputs):
        logits = functional_call(model, {**frozen, **params}, (), {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}).logits
        return token_loss_sum(logits, inputs["labels"])

    gradient_of = grad(loss_sum)

    def process(start):
        params = dict(start)
        exp_avg = {name: torch.zeros_like(value) for name, value in params.items()}
        exp_avg_sq = {name: torch.zeros_like(value) for name, value in params.items()}
        bar = tqdm(total=record.num_steps, desc=f"{record.name} (exact JVP)", disable=not progress, leave=False)
        for step, (chunks, answer_tokens) in enumerate(batches):
            grads = None
            for inputs in chunks:
                partial = gradient_of(params, inputs)
                partial = {name: value / answer_tokens for name, value in partial.items()}
                grads = partial if grads is None else {name: grads[name] + partial[name] for name in grads}
            if config.max_grad_norm is not None:
                # Same arithmetic as torch.nn.utils.clip_grad_norm_: the norm of per-tensor norms.
                total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
                scale = torch.clamp(config.max_grad_norm / (total + 1e-6), max=1.0)
                grads = {name: value * scale for name, value in grads.items()}
            lr = rates[step]
            count = step + 1
            bias1 = 1 - beta1**count
            bias2_sqrt = math.sqrt(1 - beta2**count)
            updated = {}
            for name, value in params.items():
                g = grads[name]
                decay = 0.0 if name in no_decay else config.weight_decay
                value = value * (1 - lr * decay)
                exp_avg[name] = exp_avg[name] + (g - exp_avg[name]) * (1 - beta1)
                exp_avg_sq[name] = exp_avg_sq[name] * beta2 + g * g * (1 - beta2)
                denom = _safe_sqrt(exp_avg_sq[name]) / bias2_sqrt + config.adam_epsilon
                updated[name] = value - (lr / bias1) * exp_avg[name] / denom
            params = updated
            bar.update(1)
        bar.close()
        return params

    previous = _set_eager_attention(model)
    was_training = model.training
    model.eval()
    try:
        primal_in = {name: start_state[name].detach().to(named[name].dtype) for name in names}
        tangent_in = {
            name: (tangent[name].detach().to(named[name].dtype) if name in tangent else torch.zeros_like(primal_in[name]))
            for name in names
        }
        end, direction = jvp(process, (primal_in,), (tangent_in,))
    finally:
        model.train(was_training)
        if previous not in (None, "eager"):
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(previous)
            else:
                model.config._attn_implementation = previous
    end = {name: value.detach() for name, value in end.items()}
    direction = {name: value.detach() for name, value in direction.items()}
    for name, value in tangent.items():
        if name not in direction:
            direction[name] = value.detach().clone()
    bad = [name for name, value in direction.items() if not torch.isfinite(value).all()]
    if bad:
        raise FloatingPointError(f"Exact JVP produced non-finite values in {bad[0]!r}; use adam_epsilon >= 1e-8 and finite inputs.")
    return end, direction
