"""Shared fixtures: a tiny Llama, its tokenizer and tokenized phase data, built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_sidecar.data import SplitSizes, Splits, load_data, make_splits, tokenize_examples  # noqa: E402
from hf_sidecar.models import TinyLlamaSpec, load_tiny_tokenizer, tiny_llama  # noqa: E402

SMALL_SPEC = TinyLlamaSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
SMALL_SIZES = SplitSizes(memorized_authors=2, safety_per_author=4, validation_per_author=3, test_per_author=3, public_retain=8, public_eval=6)


@dataclass
class Setup:
    tokenizer: object
    splits: Splits
    safety: dict
    memory: dict
    public: dict

    def model(self, *, seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", spec: TinyLlamaSpec = SMALL_SPEC, attention_dropout: float = 0.0):
        return tiny_llama(
            spec, self.tokenizer, seed=seed, dtype=dtype, attn_implementation=attn_implementation, attention_dropout=attention_dropout
        )


@pytest.fixture(scope="session")
def setup() -> Setup:
    tokenizer = load_tiny_tokenizer()
    splits = make_splits(load_data(), SMALL_SIZES, seed=0)
    return Setup(
        tokenizer=tokenizer,
        splits=splits,
        safety=tokenize_examples(tokenizer, splits.phase_s, 64),
        memory=tokenize_examples(tokenizer, splits.phase_m, 64),
        public=tokenize_examples(tokenizer, splits.phase_a[:32], 64),
    )


@pytest.fixture(scope="session")
def dense_run(setup, tmp_path_factory):
    """A small full fine-tuning run shared by modules that only read it.

    ``folder/theta_AMS`` is the saved safety-trained checkpoint (with tokenizer) and ``sidecar``
    its dense sidecar for the memory "authors". Tests must not modify the states or the sidecar.
    """
    from types import SimpleNamespace

    from hf_sidecar.build import build_sidecar
    from hf_sidecar.io import file_digests
    from hf_sidecar.process import ProcessConfig, state_of, train

    memory = ProcessConfig(learning_rate=3e-3, num_epochs=1, batch_size=8, max_length=64, seed=2)
    safety = ProcessConfig(learning_rate=1e-3, num_epochs=1, batch_size=6, max_length=64, seed=1)
    folder = tmp_path_factory.mktemp("dense-run")
    model = setup.model(seed=5)
    theta_a = state_of(dict(model.named_parameters()))
    train(model, "memory", memory, setup.memory, progress=False)
    theta_am = state_of(dict(model.named_parameters()))
    record = train(model, "safety", safety, setup.safety, progress=False)
    theta_ams = state_of(dict(model.named_parameters()))
    model.save_pretrained(folder / "theta_AMS")
    setup.tokenizer.save_pretrained(folder / "theta_AMS")
    sidecar = build_sidecar(
        model, record, setup.safety, theta_a=theta_a, theta_am=theta_am, theta_ams=theta_ams,
        checkpoint_files=file_digests(folder / "theta_AMS"), memory="authors", progress=False,
    ).sidecar
    return SimpleNamespace(record=record, theta_a=theta_a, theta_am=theta_am, theta_ams=theta_ams, sidecar=sidecar, folder=folder)
