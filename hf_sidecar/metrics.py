"""Evaluation metrics: refusal score and closure, parameter error, refusal rate, leakage, retention.

Every metric is deterministic: refusal scores use teacher forcing, answers use greedy decoding.
"""

from __future__ import annotations

import copy
import inspect
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


def _cache_keyword(model) -> str:
    """Return the keyword that passes a key-value cache to ``model``'s forward.

    transformers 5.25 names it ``cache`` and warns that ``past_key_values`` goes away in 5.40.
    Forwards without a ``cache`` parameter get the old name.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class RefusalScorer:
    """Teacher-forced refusal scores ``r(theta, x)`` for a fixed prompt set.

    ``r`` is the mean over the scoring refusals of their mean-token log-probability given the
    prompt, minus the mean-token log-probability of the ground-truth answer. Each prompt runs
    through the model once: its key-value cache is repeated for its continuations, so a batch
    costs one prompt pass plus the continuation tokens. Tokenization is done up front.
    """

    def __init__(self, tokenizer, prompts: Sequence[Example], scoring_refusals: Sequence[str], *, batch_size: int = 16, max_length: int = 256):
        if not scoring_refusals:
            raise ValueError("RefusalScorer needs at least one scoring refusal sentence.")
        self.prompts = list(prompts)
        self.num_refusals = len(scoring_refusals)
        self.batch_size = batch_size
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        refusal_ids = [encode_continuation(tokenizer, text) for text in scoring_refusals]
        self.prompt_ids: list[list[int]] = []
        self.continuations: list[list[list[int]]] = []
        for example in self.prompts:
            prompt = encode_prompt(tokenizer, example.question)[: max_length - 1]
            room = max_length - len(prompt)
            self.prompt_ids.append(prompt)
            self.continuations.append([ids[:room] for ids in [*refusal_ids, encode_continuation(tokenizer, example.ground_truth)]])

    def _batch_scores(self, model, indices: Sequence[int], device) -> np.ndarray:
        from transformers import DynamicCache

        prompts = [self.prompt_ids[i] for i in indices]
        width = max(len(ids) for ids in prompts)
        # Left-pad the prompts so every prompt ends at the same position and its last logit
        # predicts the first continuation token.
        prompt_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            prompt_ids[row, width - len(ids) :] = torch.tensor(ids)
            prompt_mask[row, width - len(ids) :] = 1
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        cache_keyword = _cache_keyword(model)
        output = model(
            input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device), position_ids=positions.to(device),
            use_cache=True, **{cache_keyword: cache},
        )
        last_logits = output.logits[:, -1].float()
        # The ground-truth answers (long, one per prompt) and the scoring refusals (short, shared)
        # run as two groups, each padded to its own longest member. On TOFU, where ground-truth
        # answers reach 60 tokens and refusals 9, one padded group would cost about three times the tokens.
        # Each group extends its own copy of the prompts' cache.
        answer_groups = [[self.continuations[i][-1]] for i in indices]
        refusal_groups = [self.continuations[i][:-1] for i in indices]
        answers = self._continuation_means(model, cache_keyword, copy.deepcopy(cache), last_logits, prompt_mask, answer_groups, device)
        refusals = self._continuation_means(model, cache_keyword, cache, last_logits, prompt_mask, refusal_groups, device)
        return np.concatenate([refusals, answers], axis=1)

    def _continuation_means(self, model, cache_keyword: str, cache, last_logits, prompt_mask, groups: list[list[list[int]]], device) -> np.ndarray:
        """Compute the mean-token log-probabilities of each prompt's continuations, shape ``(prompts, per_prompt)``.

        ``cache`` contains the prompts' keys and values. It is repeated for the continuations and
        extended in place.
        """
        per_prompt = len(groups[0])
        if per_prompt > 1:
            cache.batch_repeat_interleave(per_prompt)
        continuations = [ids for group in groups for ids in group]
        length = max(len(ids) for ids in continuations)
        cont_ids = torch.full((len(continuations), length), self.pad_token_id, dtype=torch.long)
        cont_mask = torch.zeros((len(continuations), length), dtype=torch.bool)
        for row, ids in enumerate(continuations):
            cont_ids[row, : len(ids)] = torch.tensor(ids)
            cont_mask[row, : len(ids)] = True
        start = prompt_mask.sum(-1).repeat_interleave(per_prompt)
        cont_positions = start.unsqueeze(-1) + torch.arange(length).unsqueeze(0)
        mask = torch.cat([prompt_mask.repeat_interleave(per_prompt, dim=0), cont_mask.long()], dim=-1)
        logits = model(
            input_ids=cont_ids.to(device), attention_mask=mask.to(device), position_ids=cont_positions.to(device),
            use_cache=True, **{cache_keyword: cache},
        ).logits
        # Token t of a continuation is predicted by the logit before it: the prompt's last logit
        # for t = 0, the continuation's own logit t - 1 afterwards. Only real tokens are
        # normalized over the vocabulary.
        predictors = torch.cat([last_logits.repeat_interleave(per_prompt, dim=0).unsqueeze(1), logits[:, :-1].float()], dim=1)
        valid = cont_mask.to(device)
        picked = predictors[valid]
        token_log_probs = picked.gather(-1, cont_ids.to(device)[valid].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, dim=-1)
        rows = torch.arange(len(continuations), device=device).repeat_interleave(cont_mask.sum(-1).to(device))
        sums = torch.zeros(len(continuations), dtype=token_log_probs.dtype, device=device).index_add_(0, rows, token_log_probs)
        means = (sums / cont_mask.sum(-1).to(device).clamp(min=1)).cpu().double().numpy()
        return means.reshape(len(groups), per_prompt)

    @torch.no_grad()
    def scores(self, model) -> np.ndarray:
        """Return ``r(theta, x)`` for every prompt, shape ``(num_prompts,)``."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        order = sorted(range(len(self.prompts)), key=lambda i: (len(self.continuations[i][-1]), len(self.prompt_ids[i])))
        values = np.zeros((len(self.prompts), self.num_refusals + 1))
        try:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                values[chunk] = self._batch_scores(model, chunk, device)
        finally:
            model.train(was_training)
        return values[:, : self.num_refusals].mean(axis=1) - values[:, self.num_refusals]


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
