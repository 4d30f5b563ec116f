"""Data loading, splits and tokenization."""

from __future__ import annotations

import json
import shutil

import pytest

from hf_sidecar.data import BUNDLED_DATA_DIR, IGNORE_INDEX, DataError, SplitSizes, load_data, make_splits, tokenize_examples


def test_bundled_data_loads_with_licence():
    data = load_data()
    assert len(data.fictitious) == 300
    assert len(data.authors) == 15
    assert len(data.public) == 217
    assert len(data.refusals) == 100
    assert "MIT License" in (BUNDLED_DATA_DIR / "LICENSE").read_text()


def test_splits_are_disjoint_and_complete():
    data = load_data()
    splits = make_splits(data, SplitSizes(), seed=4)

    memory_ids = {e.id for e in splits.phase_m}
    safety_refusal_ids = {e.id.removesuffix("-refusal") for e in splits.phase_s if e.kind == "refusal"}
    validation_ids = {e.id for e in splits.validation}
    test_ids = {e.id for e in splits.test}
    assert len(splits.memorized_authors) == 6
    assert safety_refusal_ids | validation_ids | test_ids == memory_ids
    assert not safety_refusal_ids & validation_ids
    assert not safety_refusal_ids & test_ids
    assert not validation_ids & test_ids

    retain_ids = {e.id.removesuffix("-retain") for e in splits.phase_s if e.kind == "retain"}
    skill_ids = {e.id for e in splits.phase_a}
    public_eval_ids = {e.id for e in splits.public_eval}
    assert not retain_ids & skill_ids
    assert not retain_ids & public_eval_ids
    assert not skill_ids & public_eval_ids
    assert len(retain_ids | skill_ids | public_eval_ids) == 217


def test_safety_targets_are_refusals_with_references():
    data = load_data()
    splits = make_splits(data, SplitSizes(), seed=4)
    refusals = [e for e in splits.phase_s if e.kind == "refusal"]
    assert len(refusals) == 60
    assert all(e.answer in data.refusals for e in refusals)
    assert all(e.reference and e.reference != e.answer for e in refusals)


def test_splits_depend_on_seed_only():
    data = load_data()
    first = make_splits(data, SplitSizes(), seed=1)
    assert make_splits(data, SplitSizes(), seed=1).phase_s == first.phase_s
    assert make_splits(data, SplitSizes(), seed=2).memorized_authors != first.memorized_authors


def test_tokenization_trains_answer_tokens_only():
    from hf_sidecar.models import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    data = load_data()
    example = data.public[0]
    tokenized = tokenize_examples(tokenizer, [example], max_length=64)[example.id]

    prompt_length = sum(1 for label in tokenized.labels if label == IGNORE_INDEX)
    prompt = tokenizer.decode(tokenized.input_ids[:prompt_length])
    answer = tokenizer.decode([label for label in tokenized.labels if label != IGNORE_INDEX], skip_special_tokens=True)
    assert prompt == f"<|user|>{example.question}<|assistant|>"
    assert answer == example.answer
    assert tokenized.input_ids[-1] == tokenizer.eos_token_id


def test_long_answers_are_cut_to_max_length():
    from hf_sidecar.models import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    example = load_data().fictitious[0]
    tokenized = tokenize_examples(tokenizer, [example], max_length=30)[example.id]
    assert len(tokenized.input_ids) == 30
    with pytest.raises(DataError, match="leaves no answer token within max_length=5"):
        tokenize_examples(tokenizer, [example], max_length=5)


@pytest.fixture
def data_copy(tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(BUNDLED_DATA_DIR, folder)
    return folder


def test_malformed_jsonl_row_is_rejected(data_copy):
    path = data_copy / "world_facts.jsonl"
    lines = path.read_text().splitlines()
    lines[4] = lines[4][:-3]
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError, match=r"world_facts.jsonl:5: invalid JSON"):
        load_data(data_copy)


def test_row_without_answer_is_rejected(data_copy):
    path = data_copy / "fictitious_authors.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[2])
    del row["answer"]
    lines[2] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError, match=r"fictitious_authors.jsonl:3: key 'answer' is missing"):
        load_data(data_copy)


def test_missing_data_file_is_rejected(data_copy):
    (data_copy / "refusals.txt").unlink()
    with pytest.raises(DataError, match="refusals.txt not found"):
        load_data(data_copy)


def test_too_many_memorized_authors_is_rejected():
    with pytest.raises(DataError, match="memorized_authors=20 but the data has only 15 authors"):
        make_splits(load_data(), SplitSizes(memorized_authors=20), seed=0)
