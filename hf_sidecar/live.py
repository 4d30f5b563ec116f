"""One loaded model that answers as the unedited, revoked, task-arithmetic and oracle model in turn.

The Space compares these models on a prompt without holding four copies of the weights. It keeps
the safety-trained tensors (theta_AMS) once, the sidecar's delta and R_hat, and the oracle tensors
that differ from theta_AMS, then writes each compared model's weights into the one model before
generating. Every edit is computed from the stored theta_AMS tensors, never by increments from the
current weights, and one lock covers each weight change together with the generation that reads
it, so one caller's edit never lands in another caller's generation.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from .data import encode_prompt
from .edit import revoke_model_
from .metrics import greedy_answers, is_refusal
from .sidecar import Sidecar

logger = logging.getLogger(__name__)

BEFORE = "before"
SIDECAR = "sidecar"
TASK_ARITHMETIC = "task_arithmetic"
ORACLE = "oracle"
VARIANTS = (BEFORE, SIDECAR, TASK_ARITHMETIC, ORACLE)
# Variants whose weights depend on the edit coefficients.
EDITED_VARIANTS = (SIDECAR, TASK_ARITHMETIC)

COEFFICIENT_MIN = 0.0
COEFFICIENT_MAX = 2.0
MAX_NEW_TOKENS_LIMIT = 512
DEFAULT_MAX_PROMPT_CHARS = 1000
DEFAULT_MAX_PROMPT_TOKENS = 512


class PromptError(ValueError):
    """Raised when a prompt or an edit coefficient is invalid; the message is meant for the user."""


@dataclass(frozen=True)
class Answer:
    """One compared model's greedy answer to a prompt.

    ``lam`` and ``gamma`` are the edit coefficients behind the weights, (0, 0) for the unedited
    model and None for the oracle, which is a separate checkpoint.
    """

    variant: str
    text: str
    refusal: bool
    lam: float | None
    gamma: float | None
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_coefficient(name: str, value: float | int | str | None) -> float:
    """Return ``value`` as a float inside the allowed coefficient range, or raise :class:`PromptError`."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PromptError(f"{name} must be a number from {COEFFICIENT_MIN:g} to {COEFFICIENT_MAX:g}, got {value!r}.") from None
    if not math.isfinite(number) or not COEFFICIENT_MIN <= number <= COEFFICIENT_MAX:
        raise PromptError(f"{name} must be a number from {COEFFICIENT_MIN:g} to {COEFFICIENT_MAX:g}, got {value!r}.")
    # Slider steps such as 0.35 arrive as 0.35000000000000003; rounding keeps the displayed value
    # and the applied value the same.
    return round(number, 6)


class LiveRevocation:
    """A safety-trained model whose weights switch between the compared models on request.

    ``oracle`` maps parameter names to the oracle checkpoint's tensors (theta_AS), and only those
    that differ from the model's are kept. With ``verify`` the model's weights must be the exact
    checkpoint the sidecar was built for (its content digest).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        sidecar: Sidecar,
        *,
        oracle: Mapping[str, torch.Tensor] | None = None,
        max_new_tokens: int = 48,
        max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
        verify: bool = True,
    ) -> None:
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens must be from 1 to {MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens}.")
        if max_prompt_chars < 1 or max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_chars and max_prompt_tokens must be positive, got {max_prompt_chars} and {max_prompt_tokens}.")
        self.model = model
        self.tokenizer = tokenizer
        self.sidecar = sidecar
        self.max_new_tokens = max_new_tokens
        self.max_prompt_chars = max_prompt_chars
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if positions is not None and positions <= max_new_tokens:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {positions} positions; lower max_new_tokens."
            )
        self.max_prompt_tokens = min(max_prompt_tokens, positions - max_new_tokens) if positions else max_prompt_tokens

        parameters = dict(model.named_parameters())
        if verify:
            sidecar.check_state(parameters, where="the safety-trained model")
        self._oracle: dict[str, torch.Tensor] = {}
        for name, tensor in (oracle or {}).items():
            if name not in parameters:
                raise ValueError(f"The oracle checkpoint has tensor {name!r}, which is not a parameter of the model.")
            target = parameters[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"Oracle tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}.")
            value = tensor.detach().to(device=target.device, dtype=target.dtype)
            if not torch.equal(value, target.detach()):
                self._oracle[name] = value
        self._has_oracle = oracle is not None
        # theta_AMS for every tensor any compared model changes: the sidecar's and the oracle's.
        changed = set(sidecar.names) | set(self._oracle)
        self._reference = {name: parameters[name].detach().clone() for name in sorted(changed)}
        self._lock = threading.Lock()
        self._loaded: tuple = (BEFORE,)
        model.eval()
        logger.info(
            "Loaded the live revocation: sidecar %r covers %d tensors, oracle differs in %s",
            sidecar.memory, len(sidecar.names), f"{len(self._oracle)} tensors" if self._has_oracle else "none (no oracle)",
        )

    @property
    def has_oracle(self) -> bool:
        return self._has_oracle

    @property
    def variants(self) -> tuple[str, ...]:
        """The compared models, in display order; the oracle only when one was loaded."""
        return VARIANTS if self._has_oracle else VARIANTS[:-1]

    @property
    def reference(self) -> Mapping[str, torch.Tensor]:
        """The stored theta_AMS tensors that the edits start from (read-only by contract)."""
        return self._reference

    # ----------------------------------------------------------------------------------------
    # Input checks

    def check_prompt(self, prompt: str | None) -> str:
        """Return the stripped prompt, or raise :class:`PromptError` if it is empty or over a length limit."""
        if prompt is None or not str(prompt).strip():
            raise PromptError("The prompt is empty. Type a question or pick an example prompt.")
        text = str(prompt).strip()
        if len(text) > self.max_prompt_chars:
            raise PromptError(f"The prompt has {len(text)} characters; the limit is {self.max_prompt_chars}. Shorten it.")
        tokens = len(encode_prompt(self.tokenizer, text))
        if tokens > self.max_prompt_tokens:
            raise PromptError(
                f"The prompt is {tokens} tokens long with the chat template; the limit is {self.max_prompt_tokens}. Shorten it."
            )
        return text

    # ----------------------------------------------------------------------------------------
    # Weights

    def _key(self, variant: str, lam: float, gamma: float) -> tuple:
        if variant == SIDECAR:
            return (SIDECAR, lam, gamma)
        if variant == TASK_ARITHMETIC:
            return (SIDECAR, lam, 0.0)
        return (variant,)

    @torch.no_grad()
    def _load(self, key: tuple) -> None:
        """Write the weights of ``key`` into the model; the caller holds the lock."""
        if key == self._loaded:
            return
        parameters = dict(self.model.named_parameters())
        if key[0] == ORACLE:
            for name, value in self._reference.items():
                parameters[name].copy_(self._oracle.get(name, value))
        elif key[0] == BEFORE:
            for name, value in self._reference.items():
                parameters[name].copy_(value)
        else:
            covered = set(self.sidecar.names)
            for name, value in self._reference.items():
                if name not in covered:
                    parameters[name].copy_(value)
            revoke_model_(self.model, self.sidecar, lam=key[1], gamma=key[2], verify=False, reference=self._reference)
        self._loaded = key

    # ----------------------------------------------------------------------------------------
    # Answers

    def answer(self, prompt: str, lam: float, gamma: float, variants: Sequence[str] | None = None) -> dict[str, Answer]:
        """Greedy-decode ``prompt`` with each compared model; the sidecar edit uses ``(lam, gamma)``.

        Task arithmetic uses ``(lam, 0)``. ``variants`` defaults to all compared models. Raises
        :class:`PromptError` for an invalid prompt or coefficient.
        """
        text = self.check_prompt(prompt)
        lam = check_coefficient("lam", lam)
        gamma = check_coefficient("gamma", gamma)
        chosen = list(self.variants if variants is None else variants)
        unknown = [variant for variant in chosen if variant not in self.variants]
        if unknown:
            raise ValueError(f"Unknown variant {unknown[0]!r}; choose from {list(self.variants)}.")
        answers: dict[str, Answer] = {}
        with self._lock:
            for variant in chosen:
                began = time.perf_counter()
                self._load(self._key(variant, lam, gamma))
                generated = greedy_answers(self.model, self.tokenizer, [text], max_new_tokens=self.max_new_tokens)[0]
                coefficients = {BEFORE: (0.0, 0.0), SIDECAR: (lam, gamma), TASK_ARITHMETIC: (lam, 0.0), ORACLE: (None, None)}[variant]
                answers[variant] = Answer(variant, generated, is_refusal(generated), *coefficients, time.perf_counter() - began)
        logger.info("Answered a %d-character prompt with %s at lam=%g, gamma=%g", len(text), ", ".join(chosen), lam, gamma)
        return answers
