"""The recorded training process and its replay."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from hf_sidecar.data import TokenizedExample
from hf_sidecar.process import (
    ProcessConfig,
    ProcessMismatchError,
    ProcessRecord,
    max_deviation,
    plan_steps,
    run_process,
    state_of,
    train,
)

CONFIG = ProcessConfig(learning_rate=2e-3, num_epochs=2, batch_size=6, warmup_steps=2, seed=3, max_length=64)


def _trained(setup, config=CONFIG, **model_kwargs):
    model = setup.model(**model_kwargs)
    start = state_of(dict(model.named_parameters()))
    record = train(model, "safety", config, setup.safety, progress=False)
    return model, start, record, state_of(dict(model.named_parameters()))


def test_replay_is_bit_exact(setup):
    model, start, record, end = _trained(setup)
    assert max_deviation(start, end) > 0, "training did not move the parameters"

    replayed = run_process(model, record, setup.safety, start_state=start, progress=False)

    for name in end:
        assert torch.equal(replayed[name], end[name]), name


def test_replay_from_saved_record_is_bit_exact(setup, tmp_path):
    model, start, record, end = _trained(setup)
    record.save(tmp_path / "process.json")

    loaded = ProcessRecord.load(tmp_path / "process.json")
    replayed = run_process(model, loaded, setup.safety, start_state=start, progress=False)

    assert loaded.digest == record.digest
    assert loaded.data_fingerprint == record.data_fingerprint
    assert all(torch.equal(replayed[n], end[n]) for n in end)


def test_replay_matches_end_digest(setup):
    from hf_sidecar.io import content_digest

    model, start, record, _ = _trained(setup)
    replayed = run_process(model, record, setup.safety, start_state=start, progress=False)
    assert content_digest(replayed) == record.end_digest


def test_accumulation_keeps_global_normalization(setup):
    # One step over 12 examples, as one batch or as micro-batches of 5, 5 and 2: the loss is
    # normalized by the global answer-token count either way, so only rounding differs.
    whole = replace(CONFIG, batch_size=12, num_epochs=1)
    split = replace(whole, micro_batch_size=5)
    _, _, _, end_whole = _trained(setup, whole)
    _, _, _, end_split = _trained(setup, split)

    deviation = max_deviation(end_whole, end_split)
    assert deviation < 1e-5
    assert deviation >= 0


def test_dropout_is_keyed_by_example(setup):
    # With dropout, each example draws its mask from (seed, step, example id); splitting the
    # batch differently must not change which masks are drawn.
    config = replace(CONFIG, num_epochs=1, batch_size=8)
    model = setup.model(seed=1, attention_dropout=0.3)
    start = state_of(dict(model.named_parameters()))
    record = train(model, "safety", config, setup.safety, progress=False)
    end = state_of(dict(model.named_parameters()))
    replayed = run_process(model, record, setup.safety, start_state=start, progress=False)
    assert all(torch.equal(replayed[n], end[n]) for n in end)

    micro = replace(record, config=replace(config, micro_batch_size=3))
    resplit = run_process(model, micro, setup.safety, start_state=start, progress=False)
    assert max_deviation(resplit, end) < 1e-5

    other_seed = replace(record, config=replace(config, seed=99))
    shifted = run_process(model, other_seed, setup.safety, start_state=start, progress=False)
    assert max_deviation(shifted, end) > 1e-4, "dropout masks did not depend on the seed"


def test_plan_steps_covers_every_example_once_per_epoch():
    ids = [f"e{i}" for i in range(17)]
    steps = plan_steps(ids, ProcessConfig(num_epochs=3, batch_size=5, seed=1))

    assert len(steps) == 3 * 4
    for epoch in range(3):
        flat = [example for step in steps[epoch * 4 : (epoch + 1) * 4] for example in step]
        assert sorted(flat) == sorted(ids)
    assert steps[:4] != steps[4:8], "epochs were not reshuffled"
    assert plan_steps(ids, ProcessConfig(num_epochs=3, batch_size=5, seed=1)) == steps


def test_changed_data_is_rejected(setup):
    model, start, record, _ = _trained(setup)
    first = record.steps[0][0]
    changed = dict(setup.safety)
    original = changed[first]
    changed[first] = TokenizedExample(first, original.input_ids[:-1] + (5,), original.labels[:-1] + (5,))

    with pytest.raises(ProcessMismatchError, match="Step 0: the tokenized batch differs"):
        run_process(model, record, changed, start_state=start, progress=False)


def test_missing_example_is_rejected(setup):
    model, start, record, _ = _trained(setup)
    missing = dict(setup.safety)
    del missing[record.steps[1][0]]

    with pytest.raises(ProcessMismatchError, match=f"Step 1 uses example '{record.steps[1][0]}'"):
        run_process(model, record, missing, start_state=start, progress=False)


def test_wrong_dtype_is_rejected(setup):
    model, start, record, _ = _trained(setup)
    model.to(torch.float64)
    with pytest.raises(ProcessMismatchError, match="recorded in float32"):
        run_process(model, record, setup.safety, progress=False)


def test_edited_record_is_rejected(setup, tmp_path):
    _, _, record, _ = _trained(setup)
    values = record.to_dict()
    values["config"]["learning_rate"] = 1.0
    (tmp_path / "process.json").write_text(json.dumps(values))

    with pytest.raises(ValueError, match="does not match its content"):
        ProcessRecord.load(tmp_path / "process.json")


def test_unknown_major_version_is_rejected(setup):
    _, _, record, _ = _trained(setup)
    values = record.to_dict()
    values["format_version"] = "2.0"
    with pytest.raises(ValueError, match="format_version '2.0' is not supported"):
        ProcessRecord.from_dict(values)


def test_truncated_record_is_rejected(setup, tmp_path):
    _, _, record, _ = _trained(setup)
    record.save(tmp_path / "process.json")
    text = (tmp_path / "process.json").read_text()
    (tmp_path / "process.json").write_text(text[: len(text) // 2])

    with pytest.raises(ValueError, match="truncated or corrupt"):
        ProcessRecord.load(tmp_path / "process.json")


def test_unsupported_scheduler_is_rejected():
    with pytest.raises(ValueError, match="lr_scheduler='polynomial' is not supported"):
        ProcessConfig(lr_scheduler="polynomial")


def test_learning_rates_follow_transformers_scheduler():
    from hf_sidecar.process import learning_rates

    rates = learning_rates(ProcessConfig(learning_rate=1.0, lr_scheduler="linear", warmup_steps=2), 6)
    assert rates == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])
