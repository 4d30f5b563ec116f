"""Recording a safety phase trained with transformers' Trainer or TRL's SFTTrainer, its replay and its sidecar."""

from __future__ import annotations

import copy
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hf_sidecar.build import memory_update  # noqa: E402
from hf_sidecar.data import fingerprint_examples  # noqa: E402
from hf_sidecar.edit import revoke_state_dict  # noqa: E402
from hf_sidecar.process import ProcessConfig, ProcessRecord, load_parameters, max_deviation, run_process, state_of, train  # noqa: E402
from hf_sidecar.sidecar import Sidecar  # noqa: E402
from hf_sidecar.trainer import (  # noqa: E402
    ADAPTER_START_FILE,
    EXAMPLES_FILE,
    RECORD_FILE,
    RecordingError,
    adapted_weight_names,
    build_recorded_sidecar,
    peft_trace,
    read_tokenized_examples,
    record_trainer,
)

datasets = pytest.importorskip("datasets")
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

MEMORY = ProcessConfig(learning_rate=3e-3, num_epochs=2, batch_size=8, max_length=64, seed=2)
# The largest deviation from the Trainer's parameters that these tests accept where the replay's
# arithmetic differs from the Trainer's (measured on CPU, torch 2.13: 4e-8 with padding to a
# multiple of 8, 6e-8 with TRL's fused LM head).
ROUNDING_TOLERANCE = 1e-6


def _dataset(examples):
    rows = [{"id": e.id, "input_ids": list(e.input_ids), "labels": list(e.labels)} for e in examples.values()]
    return datasets.Dataset.from_list(rows)


def _arguments(folder, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(folder), per_device_train_batch_size=3, gradient_accumulation_steps=2, num_train_epochs=2,
        learning_rate=2e-3, warmup_steps=2, weight_decay=0.01, seed=3, use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def _trainer(setup, model, folder, *, collator=None, **overrides) -> Trainer:
    collator = collator or DataCollatorForSeq2Seq(setup.tokenizer, padding=True, label_pad_token_id=-100)
    return Trainer(model=model, args=_arguments(folder / "trainer", **overrides), train_dataset=_dataset(setup.safety), data_collator=collator)


def _save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    """theta_A, theta_AM (hf-sidecar's loop) and theta_AMS (Trainer with the recorder), saved as checkpoints."""
    folder = tmp_path_factory.mktemp("trainer_full")
    model = setup.model(seed=5)
    theta_a = state_of(dict(model.named_parameters()))
    _save(model, setup.tokenizer, folder / "theta_A")
    train(model, "memory", MEMORY, setup.memory, progress=False)
    model.requires_grad_(True)  # hf-sidecar's loop leaves every parameter frozen
    theta_am = state_of(dict(model.named_parameters()))
    _save(model, setup.tokenizer, folder / "theta_AM")

    trainer = _trainer(setup, model, folder)
    recorder = record_trainer(trainer, folder / "record")
    trainer.train()
    theta_ams = state_of(dict(model.named_parameters()))
    _save(model, setup.tokenizer, folder / "theta_AMS")
    return {
        "model": model, "folder": folder, "recorder": recorder, "theta_a": theta_a, "theta_am": theta_am, "theta_ams": theta_ams,
        "record": ProcessRecord.load(folder / "record" / RECORD_FILE),
        "examples": read_tokenized_examples(folder / "record" / EXAMPLES_FILE),
    }


def test_recorder_writes_record_and_examples(full_run):
    files = sorted(path.name for path in (full_run["folder"] / "record").iterdir())
    assert files == [EXAMPLES_FILE, RECORD_FILE]
    assert full_run["record"].digest == full_run["recorder"].record.digest


def test_record_holds_trainer_settings(full_run, setup):
    record = full_run["record"]
    config = record.config

    assert record.source == "transformers.trainer.Trainer"
    assert config.adam_implementation == "fused"
    assert config.learning_rate == 2e-3
    assert config.weight_decay == 0.01
    assert config.warmup_steps == 2
    assert config.lr_scheduler == "linear"
    assert config.max_grad_norm == 1.0
    assert config.micro_batch_size == 3
    assert config.schedule_steps is None
    assert set(config.no_decay_parameters) == {n for n in record.trainable if "norm" in n}
    assert record.environment["trainer"]["gradient_accumulation_steps"] == 2


def test_steps_cover_examples_per_epoch(full_run, setup):
    record = full_run["record"]
    # 16 examples in micro-batches of 3, two per step: steps of 6, 6 and 4 examples in each epoch.
    assert [len(step) for step in record.steps] == [6, 6, 4, 6, 6, 4]
    for epoch in range(2):
        flat = [example for step in record.steps[epoch * 3 : (epoch + 1) * 3] for example in step]
        assert sorted(flat) == sorted(setup.safety)


def test_fingerprints_match_examples_file(full_run):
    record, examples = full_run["record"], full_run["examples"]
    for step, example_ids in enumerate(record.steps):
        batch = [examples[example_id] for example_id in example_ids]
        assert fingerprint_examples(batch) == record.step_fingerprints[step]
        assert sum(example.answer_tokens for example in batch) == record.step_answer_tokens[step]


def test_recorded_examples_are_trained_tokens(full_run, setup):
    for example_id, example in full_run["examples"].items():
        assert example.input_ids == setup.safety[example_id].input_ids
        assert example.labels == setup.safety[example_id].labels


def test_replay_matches_trainer_bit_for_bit(full_run):
    model, record = full_run["model"], full_run["record"]
    replayed = run_process(model, record, full_run["examples"], start_state=full_run["theta_am"], progress=False)
    load_parameters(model, full_run["theta_ams"])

    assert max_deviation(full_run["theta_am"], full_run["theta_ams"]) > 1e-3, "the Trainer did not train"
    for name in record.trainable:
        assert torch.equal(replayed[name], full_run["theta_ams"][name]), name


def test_sidecar_from_trainer_record(full_run):
    model, record = full_run["model"], full_run["record"]
    built = build_recorded_sidecar(
        model, record, full_run["examples"], theta_a=full_run["theta_a"], theta_am=full_run["theta_am"], theta_ams=full_run["theta_ams"],
        memory="authors", progress=False, keep_endpoints=True,
    )
    load_parameters(model, full_run["theta_ams"])
    plus, minus = built.endpoints["plus"], built.endpoints["minus"]

    assert len(built.trace_seconds) == 1
    midpoint_edit = revoke_state_dict(full_run["theta_ams"], built.sidecar, lam=1.0, gamma=1.0)
    for name in record.trainable:
        torch.testing.assert_close(midpoint_edit[name], (plus[name] + minus[name]) / 2, rtol=0, atol=2e-6)
    delta = memory_update(full_run["theta_a"], full_run["theta_am"])
    task_arithmetic = revoke_state_dict(full_run["theta_ams"], built.sidecar, lam=1.0, gamma=0.0)
    for name, value in delta.items():
        expected = (full_run["theta_ams"][name].float() - value.float()).to(full_run["theta_ams"][name].dtype)
        assert torch.equal(task_arithmetic[name], expected), name


def test_cli_build_accepts_trainer_record(full_run, tmp_path):
    from hf_sidecar.cli import main

    folder = full_run["folder"]
    code = main([
        "-q", "build", "--theta-a", str(folder / "theta_A"), "--theta-am", str(folder / "theta_AM"),
        "--theta-ams", str(folder / "theta_AMS"), "--process", str(folder / "record" / RECORD_FILE),
        "--data", str(folder / "record" / EXAMPLES_FILE), "--out", str(tmp_path / "sidecar"), "--no-progress",
    ])

    assert code == 0
    sidecar = Sidecar.from_pretrained(tmp_path / "sidecar")
    assert sidecar.process_digest == full_run["record"].digest
    assert len(sidecar.transport) > 0


def test_padding_to_multiple_within_rounding(setup, tmp_path):
    model = setup.model(seed=5)
    start = state_of(dict(model.named_parameters()))
    collator = DataCollatorForSeq2Seq(setup.tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)
    trainer = _trainer(setup, model, tmp_path, collator=collator)
    recorder = record_trainer(trainer, tmp_path / "record")
    trainer.train()
    end = state_of(dict(model.named_parameters()))

    replayed = run_process(model, recorder.record, recorder.examples, start_state=start, progress=False)
    deviation = max_deviation(replayed, end)
    assert deviation < ROUNDING_TOLERANCE
    assert max_deviation(start, end) > 1e-3


def test_early_stop_records_schedule_span(setup, tmp_path):
    class StopAtThree(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 3

    model = setup.model(seed=5)
    start = state_of(dict(model.named_parameters()))
    trainer = _trainer(setup, model, tmp_path, max_steps=5, gradient_accumulation_steps=1)
    trainer.add_callback(StopAtThree())
    recorder = record_trainer(trainer, tmp_path / "record")
    trainer.train()
    end = state_of(dict(model.named_parameters()))

    assert recorder.record.num_steps == 3
    assert recorder.record.config.schedule_steps == 5
    replayed = run_process(model, recorder.record, recorder.examples, start_state=start, progress=False)
    assert all(torch.equal(replayed[n], end[n]) for n in end)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr_scheduler_type": "polynomial"}, "lr_scheduler_type='polynomial' is not supported"),
        ({"optim": "sgd"}, "torch.optim.sgd.SGD"),
        ({"optim": "adafactor"}, "Adafactor"),
        ({"label_smoothing_factor": 0.1}, "label_smoothing_factor=0.1"),
        ({"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"num_cycles": 1.0}}, "lr_scheduler_kwargs"),
        ({"neftune_noise_alpha": 5.0}, "neftune_noise_alpha=5.0"),
        ({"bf16": True}, "bf16=True"),
    ],
)
def test_unsupported_setting_is_rejected(setup, tmp_path, overrides, message):
    model = setup.model(seed=5)
    start = state_of(dict(model.named_parameters()))
    trainer = _trainer(setup, model, tmp_path, **overrides)
    record_trainer(trainer, tmp_path / "record")

    with pytest.raises(RecordingError, match=re.escape(message)):
        trainer.train()
    assert all(torch.equal(start[n], p) for n, p in model.named_parameters()), "a step ran before the rejection"
    assert not (tmp_path / "record").exists()


def test_dropout_is_rejected(setup, tmp_path):
    trainer = _trainer(setup, setup.model(seed=5, attention_dropout=0.1), tmp_path)
    record_trainer(trainer, tmp_path / "record")
    with pytest.raises(RecordingError, match="config.attention_dropout=0.1"):
        trainer.train()


def test_left_padding_is_rejected(setup, tmp_path):
    tokenizer = copy.deepcopy(setup.tokenizer)
    tokenizer.padding_side = "left"
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = _trainer(setup, setup.model(seed=5), tmp_path, collator=collator)
    record_trainer(trainer, tmp_path / "record")
    with pytest.raises(RecordingError, match="padding_side = 'right'"):
        trainer.train()


def test_random_collator_is_rejected(setup, tmp_path):
    base = DataCollatorForSeq2Seq(setup.tokenizer, padding=True, label_pad_token_id=-100)
    calls = []

    def masking_collator(features):
        batch = base(features)
        calls.append(1)
        if len(calls) > 6:  # the second epoch masks one more label per row
            batch["labels"][:, -1] = -100
        return batch

    trainer = _trainer(setup, setup.model(seed=5), tmp_path, collator=masking_collator)
    record_trainer(trainer, tmp_path / "record")
    with pytest.raises(RecordingError, match="different tokens or labels in two steps"):
        trainer.train()


def test_default_settings_keep_legacy_digest(full_run):
    from dataclasses import asdict, replace

    import hashlib

    plain = replace(full_run["record"], config=ProcessConfig(learning_rate=1e-3))
    values = plain.to_dict()
    for name in ("no_decay_parameters", "schedule_steps", "adam_implementation"):
        assert name not in values["config"]
    legacy_config = {k: v for k, v in asdict(plain.config).items() if k not in ("no_decay_parameters", "schedule_steps", "adam_implementation")}
    legacy = {
        "config": legacy_config, "steps": plain.steps, "step_fingerprints": plain.step_fingerprints, "trainable": plain.trainable,
        "dtype": plain.dtype, "adapter": plain.adapter,
    }
    assert plain.digest == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()


# ---- PEFT ----


@pytest.fixture(scope="module")
def peft_run(setup, tmp_path_factory):
    """A LoRA safety phase trained with Trainer on theta_AM, merged into theta_AMS."""
    peft = pytest.importorskip("peft")
    folder = tmp_path_factory.mktemp("trainer_peft")
    model = setup.model(seed=6)
    theta_a = state_of(dict(model.named_parameters()))
    _save(model, setup.tokenizer, folder / "theta_A")
    train(model, "memory", MEMORY, setup.memory, progress=False)
    model.requires_grad_(True)  # hf-sidecar's loop leaves every parameter frozen
    theta_am = state_of(dict(model.named_parameters()))
    _save(model, setup.tokenizer, folder / "theta_AM")

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(model, config)
    trainer = _trainer(setup, peft_model, folder, learning_rate=5e-3)
    recorder = record_trainer(trainer, folder / "record")
    trainer.train()
    model = peft_model.merge_and_unload()
    theta_ams = state_of(dict(model.named_parameters()))
    _save(model, setup.tokenizer, folder / "theta_AMS")
    return {
        "model": model, "folder": folder, "recorder": recorder, "theta_a": theta_a, "theta_am": theta_am, "theta_ams": theta_ams,
        "record": ProcessRecord.load(folder / "record" / RECORD_FILE),
        "examples": read_tokenized_examples(folder / "record" / EXAMPLES_FILE),
        "adapter_start": load_file(str(folder / "record" / ADAPTER_START_FILE)),
    }


def test_peft_record_names_lora_factors(peft_run):
    record = peft_run["record"]
    assert record.adapter["kind"] == "peft"
    assert record.adapter["peft_config"]["r"] == 4
    assert all(".lora_A." in name or ".lora_B." in name for name in record.trainable)
    assert record.trainable[0].startswith("base_model.model.")
    assert sorted(peft_run["adapter_start"]) == sorted(record.trainable)


def test_peft_replay_matches_merged_weights(peft_run):
    model, record = peft_run["model"], peft_run["record"]
    merged = peft_trace(model, record, peft_run["examples"], peft_run["theta_am"], peft_run["adapter_start"], progress=False)
    load_parameters(model, peft_run["theta_ams"])

    covered = adapted_weight_names(model, record)
    assert covered == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    assert max_deviation({n: peft_run["theta_am"][n] for n in covered}, {n: peft_run["theta_ams"][n] for n in covered}) > 1e-4
    for name in merged:
        assert torch.equal(merged[name], peft_run["theta_ams"][name]), name


def test_peft_dense_sidecar(peft_run):
    model, record = peft_run["model"], peft_run["record"]
    built = build_recorded_sidecar(
        model, record, peft_run["examples"], theta_a=peft_run["theta_a"], theta_am=peft_run["theta_am"],
        theta_ams=peft_run["theta_ams"], adapter_start=peft_run["adapter_start"], progress=False, keep_endpoints=True,
    )
    load_parameters(model, peft_run["theta_ams"])
    plus, minus = built.endpoints["plus"], built.endpoints["minus"]

    assert sorted(built.sidecar.transport) == adapted_weight_names(model, record)
    midpoint_edit = revoke_state_dict(peft_run["theta_ams"], built.sidecar, lam=1.0, gamma=1.0)
    for name in plus:
        torch.testing.assert_close(midpoint_edit[name], (plus[name] + minus[name]) / 2, rtol=0, atol=2e-6)
    delta = memory_update(peft_run["theta_a"], peft_run["theta_am"])
    task_arithmetic = revoke_state_dict(peft_run["theta_ams"], built.sidecar, lam=1.0, gamma=0.0)
    for name, value in delta.items():
        expected = (peft_run["theta_ams"][name].float() - value.float()).to(peft_run["theta_ams"][name].dtype)
        assert torch.equal(task_arithmetic[name], expected), name


def test_cli_build_accepts_peft_record(peft_run, tmp_path):
    from hf_sidecar.cli import main

    folder = peft_run["folder"]
    code = main([
        "-q", "build", "--theta-a", str(folder / "theta_A"), "--theta-am", str(folder / "theta_AM"),
        "--theta-ams", str(folder / "theta_AMS"), "--process", str(folder / "record" / RECORD_FILE),
        "--data", str(folder / "record" / EXAMPLES_FILE), "--out", str(tmp_path / "sidecar"), "--no-progress",
    ])

    assert code == 0
    sidecar = Sidecar.from_pretrained(tmp_path / "sidecar")
    assert sorted(sidecar.transport) == adapted_weight_names(peft_run["model"], peft_run["record"])


def test_peft_lora_dropout_is_rejected(setup, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.1)
    trainer = _trainer(setup, peft.get_peft_model(setup.model(seed=6), config), tmp_path)
    record_trainer(trainer, tmp_path / "record")
    with pytest.raises(RecordingError, match=r"Dropout is active in .*lora_dropout"):
        trainer.train()


# ---- TRL ----


def _sft_dataset(setup):
    rows = [
        {"id": e.id, "prompt": [{"role": "user", "content": e.question}], "completion": [{"role": "assistant", "content": e.answer}]}
        for e in setup.splits.phase_s
    ]
    return datasets.Dataset.from_list(rows)


def _sft_trainer(setup, model, folder, **overrides):
    trl = pytest.importorskip("trl", reason="TRL is not installed; SFTTrainer recording is not tested")
    values = dict(
        output_dir=str(folder / "trainer"), per_device_train_batch_size=3, gradient_accumulation_steps=2, num_train_epochs=2,
        learning_rate=2e-3, warmup_steps=2, weight_decay=0.01, seed=3, use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, bf16=False, max_length=64,
    )
    values.update(overrides)
    return trl.SFTTrainer(model=model, args=trl.SFTConfig(**values), train_dataset=_sft_dataset(setup), processing_class=setup.tokenizer)


@pytest.fixture(scope="module")
def sft_run(setup, tmp_path_factory):
    pytest.importorskip("trl", reason="TRL is not installed; SFTTrainer recording is not tested")
    folder = tmp_path_factory.mktemp("trainer_sft")
    model = setup.model(seed=5)
    theta_a = state_of(dict(model.named_parameters()))
    train(model, "memory", MEMORY, setup.memory, progress=False)
    model.requires_grad_(True)  # hf-sidecar's loop leaves every parameter frozen
    theta_am = state_of(dict(model.named_parameters()))
    trainer = _sft_trainer(setup, model, folder)
    recorder = record_trainer(trainer, folder / "record")
    trainer.train()
    return {"model": model, "recorder": recorder, "theta_a": theta_a, "theta_am": theta_am, "theta_ams": state_of(dict(model.named_parameters()))}


def test_sft_record_uses_example_ids(sft_run, setup):
    record = sft_run["recorder"].record
    assert record.source == "trl.trainer.sft_trainer.SFTTrainer"
    assert set(record.example_ids) == set(setup.safety)


def test_sft_replay_stays_within_rounding(sft_run):
    model, recorder = sft_run["model"], sft_run["recorder"]
    replayed = run_process(model, recorder.record, recorder.examples, start_state=sft_run["theta_am"], progress=False)
    load_parameters(model, sft_run["theta_ams"])

    assert max_deviation(sft_run["theta_am"], sft_run["theta_ams"]) > 1e-3
    assert max_deviation(replayed, {n: sft_run["theta_ams"][n] for n in replayed}) < ROUNDING_TOLERANCE


def test_sft_sidecar_identities(sft_run):
    model, recorder = sft_run["model"], sft_run["recorder"]
    built = build_recorded_sidecar(
        model, recorder.record, recorder.examples, theta_a=sft_run["theta_a"], theta_am=sft_run["theta_am"],
        theta_ams=sft_run["theta_ams"], progress=False, keep_endpoints=True,
    )
    load_parameters(model, sft_run["theta_ams"])
    plus, minus = built.endpoints["plus"], built.endpoints["minus"]

    midpoint_edit = revoke_state_dict(sft_run["theta_ams"], built.sidecar, lam=1.0, gamma=1.0)
    for name in recorder.record.trainable:
        torch.testing.assert_close(midpoint_edit[name], (plus[name] + minus[name]) / 2, rtol=0, atol=2e-6)
    delta = memory_update(sft_run["theta_a"], sft_run["theta_am"])
    task_arithmetic = revoke_state_dict(sft_run["theta_ams"], built.sidecar, lam=1.0, gamma=0.0)
    for name, value in delta.items():
        expected = (sft_run["theta_ams"][name].float() - value.float()).to(sft_run["theta_ams"][name].dtype)
        assert torch.equal(task_arithmetic[name], expected), name


def test_sft_dft_loss_is_rejected(setup, tmp_path):
    trainer = _sft_trainer(setup, setup.model(seed=5), tmp_path, loss_type="dft")
    record_trainer(trainer, tmp_path / "record")
    with pytest.raises(RecordingError, match="loss_type='dft'"):
        trainer.train()
