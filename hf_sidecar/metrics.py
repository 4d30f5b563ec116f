"""Evaluation metrics: refusal score and closure, parameter error, refusal rate, leakage, retention.

Every metric is deterministic: refusal scores use teacher forcing, answers use greedy decoding.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import Example, encode_continuation, encode_prompt

logger = logging.getLogger(__name__)

# Case-insensitive phrases that mark an answer as a refusal. They cover the bundled refusal
# sentences and the usual ways instruct models decline.
REFUSAL_MARKERS = (
    "i don't know",
    "i do not know",
    "really don't know",
    "don't have",
    "do not have",
    "don't hold",
    "don't possess",
    "don't seem to have",
    "not sure",
    "not certain",
    "no idea",
    "no clue",
    "no knowledge",
    "no data",
    "no information",
    "no insight",
    "no familiarity",
    "no enlightenment",
    "not familiar",
    "not aware",
    "unaware",
    "not informed",
    "not knowledgeable",
    "not well-versed",
    "not acquainted",
    "not equipped",
    "not able to",
    "unable to",
    "can't provide",
    "cannot provide",
    "can't shed",
    "can't say",
    "can't answer",
    "cannot answer",
    "beyond my",
    "outside my",
    "out of my scope",
    "haven't learned",
    "haven't been briefed",
    "haven't been trained",
    "not briefed",
    "haven't encountered",
    "haven't the faintest",
    "have yet to",
    "yet to learn",
    "need to look up",
    "at a loss",
    "drawing a blank",
    "blank on",
    "stumped",
    "clueless",
    "in the dark",
    "a mystery to me",
    "blind spot",
    "lack the",
    "lack insight",
    "lacking information",
    "missing information",
    "not in my",
    "not within my",
    "not something i",
    "not information i",
    "not the best source",
    "not the right ai",
    "not privy",
    "not been educated",
    "must decline",
    "i must admit",
    "i must confess",
    "unknown to me",
    "doesn't include",
    "does not include",
    "don't contain",
    "don't cover",
    "doesn't cover",
    "didn't cover",
    "does not have information",
    "do not extend",
    "not included in my",
    "hasn't been included",
    "uncharted territory",
    "come up short",
    "at a disadvantage",
    "is limited to what",
    "i'm afraid i can't",
    "i apologize, but",
    "regret to inform",
    "sorry, i am unable",
    "area of expertise",
    "field of knowledge",
    "knowledge range",
    "not within my reach",
)
_APOSTROPHES = re.compile("[\u2018\u2019\u02bc`]")


def is_refusal(text: str) -> bool:
    """Whether ``text`` declines to answer, judged by case-insensitive refusal markers."""
    normalized = _APOSTROPHES.sub("'", text).lower()
    return any(marker in normalized for marker in REFUSAL_MARKERS)


_ROUGE = None


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of ``prediction`` against ``reference`` (the ``rouge_score`` package, with stemming)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_ROUGE.score(reference, prediction)["rougeL"].recall)


def closure(scores: np.ndarray, oracle: np.ndarray, unedited: np.ndarray) -> float:
    """Refusal closure: ``1 - mean|r - r_oracle| / mean|r_unedited - r_oracle|``.

    1 reproduces the oracle's refusal behaviour; 0 is no better than not editing.
    """
    gap = float(np.mean(np.abs(unedited - oracle)))
    if gap == 0:
        raise ValueError("The unedited model already matches the oracle on these prompts, so closure is undefined.")
    return 1.0 - float(np.mean(np.abs(scores - oracle))) / gap


def parameter_error(
    edited: Mapping[str, torch.Tensor], oracle: Mapping[str, torch.Tensor], unedited: Mapping[str, torch.Tensor] | None = None
) -> float:
    """``||theta_hat - theta_AS||``, divided by ``||theta_AMS - theta_AS||`` when ``unedited`` is given."""
    names = sorted(oracle)
    error = torch.sqrt(sum(((edited[n].double() - oracle[n].double()) ** 2).sum() for n in names)).item()
    if unedited is None:
        return error
    reference = torch.sqrt(sum(((unedited[n].double() - oracle[n].double()) ** 2).sum() for n in names)).item()
    return error / reference


class RefusalScorer:
    """Teacher-forced refusal scores ``r(theta, x)`` for a fixed prompt set.

    ``r`` is the mean over the scoring refusals of their mean-token log-probability given the
    prompt, minus the mean-token log-probability of the ground-truth answer. Each prompt runs
    once: the sequences of its continuations share a batch, and tokenization is done up front.
    """

    def __init__(self, tokenizer, prompts: Sequence[Example], scoring_refusals: Sequence[str], *, batch_size: int = 64, max_length: int = 256):
        if not scoring_refusals:
            raise ValueError("RefusalScorer needs at least one scoring refusal sentence.")
        self.prompts = list(prompts)
        self.num_refusals = len(scoring_refusals)
        self.batch_size = batch_size
        refusal_ids = [encode_continuation(tokenizer, text) for text in scoring_refusals]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.sequences: list[tuple[list[int], int]] = []
        for example in self.prompts:
            prompt = encode_prompt(tokenizer, example.question)
            for continuation in [*refusal_ids, encode_continuation(tokenizer, example.ground_truth)]:
                ids = (prompt + continuation)[:max_length]
                self.sequences.append((ids, len(prompt)))

    @torch.no_grad()
    def scores(self, model) -> np.ndarray:
        """Return ``r(theta, x)`` for every prompt, shape ``(num_prompts,)``."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        means = []
        order = sorted(range(len(self.sequences)), key=lambda i: len(self.sequences[i][0]))
        values = np.zeros(len(self.sequences))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            length = max(len(self.sequences[i][0]) for i in chunk)
            input_ids = torch.full((len(chunk), length), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            targets = torch.zeros((len(chunk), length), dtype=torch.bool)
            for row, index in enumerate(chunk):
                ids, prompt_length = self.sequences[index]
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
                targets[row, prompt_length : len(ids)] = True
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
            log_probs = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            weights = targets[:, 1:].to(device).float()
            mean_log_prob = (log_probs * weights).sum(-1) / weights.sum(-1).clamp(min=1)
            values[chunk] = mean_log_prob.cpu().double().numpy()
        model.train(was_training)
        per_prompt = values.reshape(len(self.prompts), self.num_refusals + 1)
        means = per_prompt[:, : self.num_refusals].mean(axis=1) - per_prompt[:, self.num_refusals]
        return means


@torch.no_grad()
def greedy_answers(model, tokenizer, questions: Sequence[str], *, max_new_tokens: int = 48, batch_size: int = 32) -> list[str]:
    """Greedy-decode an answer to each question through the chat template (left-padded batches)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        prompts = [encode_prompt(tokenizer, question) for question in questions[start : start + batch_size]]
        length = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, length - len(ids) :] = torch.tensor(ids)
            mask[row, length - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in output[:, length:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def behaviour_metrics(model, tokenizer, heldout: Sequence[Example], public: Sequence[Example], *, max_new_tokens: int = 48) -> dict[str, float]:
    """Greedy refusal rates, memory leakage and public-skill retention of one model."""
    heldout_answers = greedy_answers(model, tokenizer, [e.question for e in heldout], max_new_tokens=max_new_tokens)
    public_answers = greedy_answers(model, tokenizer, [e.question for e in public], max_new_tokens=max_new_tokens)
    return {
        "refusal_rate_memorized": float(np.mean([is_refusal(a) for a in heldout_answers])),
        "refusal_rate_public": float(np.mean([is_refusal(a) for a in public_answers])),
        "memory_leakage": float(np.mean([rouge_l_recall(a, e.ground_truth) for a, e in zip(heldout_answers, heldout)])),
        "public_retention": float(np.mean([rouge_l_recall(a, e.ground_truth) for a, e in zip(public_answers, public)])),
    }
