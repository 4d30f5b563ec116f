"""Metrics: the refusal judge, ROUGE-L recall, closure, parameter error and refusal scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_sidecar.data import BUNDLED_DATA_DIR, encode_continuation, encode_prompt, load_data
from hf_sidecar.metrics import RefusalScorer, closure, greedy_answers, is_refusal, parameter_error, rouge_l_recall


def test_every_bundled_refusal_is_judged_a_refusal():
    refusals = (BUNDLED_DATA_DIR / "refusals.txt").read_text().splitlines()
    missed = [line for line in refusals if not is_refusal(line)]
    assert missed == []


def test_no_bundled_answer_is_judged_a_refusal():
    data = load_data()
    flagged = [e.answer for e in data.fictitious + data.public if is_refusal(e.answer)]
    assert flagged == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I DON'T KNOW.", True),
        ("I don\u2019t have that information.", True),
        ("Sorry, I am unable to answer that.", True),
        ("Paris", False),
        ("The author was born in 1958 in Santiago.", False),
        ("", False),
    ],
)
def test_is_refusal_cases(text, expected):
    assert is_refusal(text) is expected


def test_rouge_l_recall():
    assert rouge_l_recall("Jane Austen wrote it", "Jane Austen") == 1.0
    assert rouge_l_recall("nothing alike", "Jane Austen") == 0.0
    assert rouge_l_recall("Austen", "Jane Austen") == pytest.approx(0.5)


def test_closure_formula():
    oracle = np.array([1.0, 2.0])
    unedited = np.array([3.0, 0.0])
    assert closure(oracle, oracle, unedited) == 1.0
    assert closure(unedited, oracle, unedited) == 0.0
    assert closure(np.array([2.0, 1.0]), oracle, unedited) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="closure is undefined"):
        closure(oracle, oracle, oracle)


def test_parameter_error():
    oracle = {"w": torch.zeros(4)}
    unedited = {"w": torch.full((4,), 2.0)}
    edited = {"w": torch.full((4,), 0.5)}
    assert parameter_error(edited, oracle) == pytest.approx(1.0)
    assert parameter_error(edited, oracle, unedited) == pytest.approx(0.25)


def _mean_log_prob(model, prompt, continuation) -> float:
    ids = torch.tensor([prompt + continuation])
    logits = model(input_ids=ids).logits[0, :-1]
    log_probs = F.log_softmax(logits.float(), -1)[torch.arange(len(prompt) - 1, ids.shape[1] - 1), torch.tensor(continuation)]
    return log_probs.mean().item()


@pytest.mark.parametrize("num_prompts,num_refusals,batch_size", [(3, 2, 4), (6, 3, 4), (5, 1, 2)])
def test_refusal_score_matches_direct_computation(setup, num_prompts, num_refusals, batch_size):
    # Batches of prompts with answers of different lengths, a last batch of one prompt, and a
    # single scoring refusal (no cache repeat) all agree with scoring each sequence on its own.
    model = setup.model(seed=2)
    model.eval()
    prompts = setup.splits.validation[:num_prompts]
    scoring = setup.splits.scoring_refusals[:num_refusals]
    assert (len(prompts), len(scoring)) == (num_prompts, num_refusals)
    scores = RefusalScorer(setup.tokenizer, prompts, scoring, batch_size=batch_size).scores(model)

    for index, example in enumerate(prompts):
        prompt = encode_prompt(setup.tokenizer, example.question)
        with torch.no_grad():
            refusal = np.mean([_mean_log_prob(model, prompt, encode_continuation(setup.tokenizer, text)) for text in scoring])
            answer = _mean_log_prob(model, prompt, encode_continuation(setup.tokenizer, example.ground_truth))
        assert scores[index] == pytest.approx(refusal - answer, abs=1e-4)


def test_greedy_answers_match_unbatched(setup):
    model = setup.model(seed=3)
    questions = [e.question for e in setup.splits.public_eval[:4]]
    batched = greedy_answers(model, setup.tokenizer, questions, max_new_tokens=6, batch_size=4)
    single = [greedy_answers(model, setup.tokenizer, [q], max_new_tokens=6)[0] for q in questions]
    assert batched == single
