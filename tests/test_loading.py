"""SidecarModelForCausalLM.from_pretrained: revocation applied while the checkpoint streams in."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import constants, snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_sidecar.file_digests as file_digests_module
import hf_sidecar.streaming as streaming
from hf_sidecar import SidecarModelForCausalLM
from hf_sidecar.adapters import PEFT_PREFIX, AdapterSpec, attach_lora, build_adapter_sidecar, factored_update, train_adapter_phase
from hf_sidecar.edit import REVOCATION_CONFIG_KEY, revoke_state_dict
from hf_sidecar.io import content_digest, file_digests, load_checkpoint
from hf_sidecar.process import ProcessConfig, load_parameters, state_of
from hf_sidecar.sidecar import TENSORS_FILE, Sidecar, SidecarError, SidecarMismatchError
from hf_sidecar.streaming import StreamingDigest

from hub_server import ALICE_TOKEN, hub_server  # noqa: F401 - fixture

MEMORY = ProcessConfig(learning_rate=3e-3, num_epochs=1, batch_size=8, max_length=64, seed=2)
SAFETY = ProcessConfig(learning_rate=1e-3, num_epochs=1, batch_size=6, max_length=64, seed=1)
ADAPTER_MEMORY = ProcessConfig(learning_rate=5e-3, num_epochs=1, batch_size=8, max_length=64, seed=1)
ADAPTER_SAFETY = ProcessConfig(learning_rate=3e-3, num_epochs=1, batch_size=6, max_length=64, seed=2)
MEMORY_SPEC = AdapterSpec(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), init_seed=10)
SAFETY_SPEC = AdapterSpec(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), init_seed=20)
SHARD_SIZE = "100KB"
EMBEDDING = "model.embed_tokens.weight"


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch) -> Path:
    """Keep the file digest cache of each test in its own folder, out of the user's HF_HOME."""
    path = tmp_path / "file-sha256.json"
    monkeypatch.setenv(file_digests_module.DIGEST_CACHE_ENV, str(path))
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _with_files(sidecar: Sidecar, folder: Path) -> Sidecar:
    """The same sidecar bound to the files of ``folder`` (which must hold the same tensors)."""
    config = copy.deepcopy(sidecar.config)
    config["checkpoint"]["files"] = file_digests(folder)
    return Sidecar(sidecar.delta, sidecar.transport, config, sidecar.process)


@pytest.fixture(scope="module")
def dense(setup, dense_run, tmp_path_factory):
    """A full fine-tuning run: theta_AMS saved whole and sharded, its dense sidecar, and another model."""
    import shutil

    folder = tmp_path_factory.mktemp("dense")
    shutil.copytree(dense_run.folder / "theta_AMS", folder / "theta_AMS")
    model = setup.model(seed=5)
    load_parameters(model, dense_run.theta_ams)
    model.save_pretrained(folder / "sharded", max_shard_size=SHARD_SIZE)
    sidecar, theta_ams = dense_run.sidecar, dense_run.theta_ams
    sidecar.save_pretrained(folder / "sidecar")
    other = setup.model(seed=99)
    other.save_pretrained(folder / "other")
    other.save_pretrained(folder / "other_sharded", max_shard_size=SHARD_SIZE)
    ids = torch.tensor([list(setup.safety.values())[0].input_ids])
    return SimpleNamespace(folder=folder, sidecar=sidecar, theta_ams=theta_ams, ids=ids)


def _save_adapter(setup, spec: AdapterSpec, factors, folder: Path, base: Path) -> None:
    """Write trained LoRA factors as the PEFT adapter folder a training run would have saved."""
    from peft.tuners.lora import LoraLayer

    peft_model = attach_lora(setup.model(seed=0), spec)
    for module_name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a, b, _ = factors[module_name.removeprefix(PEFT_PREFIX) + ".weight"]
            module.lora_A["default"].weight.data.copy_(a)
            module.lora_B["default"].weight.data.copy_(b)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    peft_model.save_pretrained(folder)


@pytest.fixture(scope="module")
def adapter(setup, tmp_path_factory):
    """A LoRA run: theta_A, the memory and safety adapters, the merged theta_AMS and its factored sidecar."""
    folder = tmp_path_factory.mktemp("adapter")
    model = setup.model(seed=7)
    model.save_pretrained(folder / "theta_A")
    theta_a = state_of(dict(model.named_parameters()))
    model, _, memory_factors = train_adapter_phase(model, "memory", ADAPTER_MEMORY, setup.memory, MEMORY_SPEC, progress=False)
    model, record, safety_factors = train_adapter_phase(model, "safety", ADAPTER_SAFETY, setup.safety, SAFETY_SPEC, progress=False)
    theta_ams = state_of(dict(model.named_parameters()))
    model.save_pretrained(folder / "theta_AMS")
    sidecar = build_adapter_sidecar(
        model, record, setup.safety, theta_a=theta_a, memory_update=factored_update(memory_factors), theta_ams=theta_ams,
        safety_factors=safety_factors, checkpoint_files=file_digests(folder / "theta_AMS"), memory="authors", progress=False,
    ).sidecar
    sidecar.save_pretrained(folder / "sidecar")
    _save_adapter(setup, MEMORY_SPEC, memory_factors, folder / "memory_adapter", folder / "theta_A")
    _save_adapter(setup, SAFETY_SPEC, safety_factors, folder / "safety_adapter", folder / "theta_A")
    ids = torch.tensor([list(setup.safety.values())[0].input_ids])
    return SimpleNamespace(folder=folder, sidecar=sidecar, theta_ams=theta_ams, ids=ids)


def _reference(folder: Path, theta_ams, sidecar, *, dtype=torch.float32, lam=None, gamma=None):
    """The dense reference: revoke_state_dict on theta_AMS, loaded into a plain model."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    revoked = revoke_state_dict(theta_ams, sidecar, lam=lam, gamma=gamma)
    load_parameters(model, {name: value.to(dtype) for name, value in revoked.items()})
    return model


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _assert_same_parameters(model, reference) -> None:
    loaded = dict(model.named_parameters())
    for name, value in reference.named_parameters():
        assert torch.equal(loaded[name].detach().cpu(), value.detach()), name


# ------------------------------------------------------------------------------------------------
# Revoked weights equal the dense reference


def test_dense_sidecar_matches_reference(dense, tmp_path):
    model = SidecarModelForCausalLM.from_pretrained(dense.folder / "theta_AMS", sidecar=dense.folder / "sidecar")
    reference = _reference(dense.folder / "theta_AMS", dense.theta_ams, dense.sidecar)
    unrevoked = AutoModelForCausalLM.from_pretrained(dense.folder / "theta_AMS")

    assert type(model) is type(unrevoked)
    _assert_same_parameters(model, reference)
    torch.testing.assert_close(_logits(model, dense.ids), _logits(reference, dense.ids), rtol=1e-5, atol=1e-5)
    assert (_logits(model, dense.ids) - _logits(unrevoked, dense.ids)).abs().max() > 1e-3, "the revocation changed nothing"
    assert EMBEDDING in dense.sidecar.names
    assert model.lm_head.weight is model.model.embed_tokens.weight, "tied embeddings came apart"
    record = getattr(model.config, REVOCATION_CONFIG_KEY)
    assert [(entry["memory"], entry["lam"], entry["gamma"]) for entry in record] == [("authors", 1.0, 1.0)]
    assert record[0]["content_digest"] == dense.sidecar.content_digest
    assert record[0]["verified_by"] == "file sha256"


def test_loaded_model_generates_and_takes_adapters(dense):
    from peft import LoraConfig, get_peft_model

    model = SidecarModelForCausalLM.from_pretrained(dense.folder / "theta_AMS", sidecar=dense.sidecar, lam=0.5, gamma=0.0)
    reference = _reference(dense.folder / "theta_AMS", dense.theta_ams, dense.sidecar, lam=0.5, gamma=0.0)
    generated = model.generate(dense.ids[:, :8], max_new_tokens=4, do_sample=False)
    expected = reference.generate(dense.ids[:, :8], max_new_tokens=4, do_sample=False)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))

    assert torch.equal(generated, expected)
    assert peft_model(input_ids=dense.ids).logits.shape == _logits(reference, dense.ids).shape
    assert getattr(model.config, REVOCATION_CONFIG_KEY)[0]["lam"] == 0.5


def test_factored_sidecar_matches_reference(adapter):
    model = SidecarModelForCausalLM.from_pretrained(adapter.folder / "theta_AMS", sidecar=adapter.folder / "sidecar")
    reference = _reference(adapter.folder / "theta_AMS", adapter.theta_ams, adapter.sidecar)

    assert adapter.sidecar.config["mode"] == "adapter"
    _assert_same_parameters(model, reference)
    torch.testing.assert_close(_logits(model, adapter.ids), _logits(reference, adapter.ids), rtol=1e-5, atol=1e-5)


def test_base_model_plus_adapters(adapter):
    # The first argument is the memory adapter folder: its base (theta_A) is loaded, then both merge.
    model = SidecarModelForCausalLM.from_pretrained(
        adapter.folder / "memory_adapter", adapters=[adapter.folder / "safety_adapter"], sidecar=adapter.folder / "sidecar",
    )
    reference = _reference(adapter.folder / "theta_AMS", adapter.theta_ams, adapter.sidecar)

    assert not hasattr(model, "peft_config"), "the adapters must be merged into a plain model"
    _assert_same_parameters(model, reference)
    torch.testing.assert_close(_logits(model, adapter.ids), _logits(reference, adapter.ids), rtol=1e-5, atol=1e-5)


def test_bfloat16_rounds_once(dense):
    model = SidecarModelForCausalLM.from_pretrained(dense.folder / "theta_AMS", sidecar=dense.sidecar, dtype=torch.bfloat16)
    alias = SidecarModelForCausalLM.from_pretrained(dense.folder / "theta_AMS", sidecar=dense.sidecar, torch_dtype="bfloat16")
    reference = _reference(dense.folder / "theta_AMS", dense.theta_ams, dense.sidecar, dtype=torch.bfloat16)
    reference32 = _reference(dense.folder / "theta_AMS", dense.theta_ams, dense.sidecar)

    assert model.dtype == torch.bfloat16
    # The float32 edit is cast to bfloat16 once, exactly as the reference casts revoked weights.
    _assert_same_parameters(model, reference)
    _assert_same_parameters(alias, reference)
    torch.testing.assert_close(_logits(model, dense.ids), _logits(reference32, dense.ids), rtol=0.05, atol=0.05)


def test_bfloat16_checkpoint_edits_in_float32(dense, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(dense.folder / "theta_AMS", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    theta = load_checkpoint(tmp_path / "bf16")
    sidecar = _with_files(dense.sidecar, tmp_path / "bf16")
    sidecar.config["checkpoint"]["content_digest"] = content_digest(theta, sidecar.names)
    for name in sidecar.names:
        sidecar.config["parameters"][name]["dtype"] = "bfloat16"

    loaded = SidecarModelForCausalLM.from_pretrained(tmp_path / "bf16", sidecar=sidecar)
    widened = SidecarModelForCausalLM.from_pretrained(tmp_path / "bf16", sidecar=sidecar, dtype=torch.float32)
    expected = revoke_state_dict(theta, sidecar)
    expected32 = revoke_state_dict({name: value.float() for name, value in theta.items()}, sidecar, verify=False)

    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, expected["model.layers.0.mlp.up_proj.weight"])
    # Loaded as float32, the edit of bfloat16 weights is not rounded back to bfloat16.
    assert torch.equal(widened.model.layers[0].mlp.up_proj.weight, expected32["model.layers.0.mlp.up_proj.weight"])


# ------------------------------------------------------------------------------------------------
# Device maps and disk offload


def test_disk_offload_reads_revoked_values(dense, tmp_path):
    checkpoint = dense.folder / "theta_AMS" / "model.safetensors"
    before = _sha256(checkpoint)
    model = SidecarModelForCausalLM.from_pretrained(
        dense.folder / "theta_AMS", sidecar=dense.sidecar, device_map="auto", max_memory={"cpu": 10_000}, offload_folder=tmp_path / "offload",
    )
    reference = _reference(dense.folder / "theta_AMS", dense.theta_ams, dense.sidecar)

    assert set(model.hf_device_map.values()) == {"disk"}
    torch.testing.assert_close(_logits(model, dense.ids), _logits(reference, dense.ids), rtol=1e-5, atol=1e-5)
    offloaded = load_file(tmp_path / "offload" / f"{EMBEDDING}.safetensors")[EMBEDDING]
    assert torch.equal(offloaded, dict(reference.named_parameters())[EMBEDDING])
    assert _sha256(checkpoint) == before, "the checkpoint file must stay unrevoked"


def test_explicit_map_with_cpu_and_disk(dense, tmp_path):
    device_map = {
        "model.embed_tokens": "cpu", "lm_head": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk", "model.norm": "disk",
    }
    model = SidecarModelForCausalLM.from_pretrained(
        dense.folder / "theta_AMS", sidecar=dense.sidecar, device_map=device_map, offload_folder=tmp_path / "offload",
    )
    reference = _reference(dense.folder / "theta_AMS", dense.theta_ams, dense.sidecar)
    written = sorted(path.name for path in (tmp_path / "offload").iterdir())

    torch.testing.assert_close(_logits(model, dense.ids), _logits(reference, dense.ids), rtol=1e-5, atol=1e-5)
    assert written and all(name.startswith(("model.layers.0.", "model.norm.")) for name in written), written


def test_disk_offload_needs_offload_folder(dense, monkeypatch):
    reads = _count_reads(monkeypatch)
    with pytest.raises(ValueError, match="offload_folder"):
        SidecarModelForCausalLM.from_pretrained(dense.folder / "theta_AMS", sidecar=dense.sidecar, device_map={"": "disk"})
    assert reads == []


# ------------------------------------------------------------------------------------------------
# Sharded checkpoints and verification


def test_sharded_checkpoint_verified_by_files(dense, caplog):
    sharded = dense.folder / "sharded"
    sidecar = _with_files(dense.sidecar, sharded)
    with caplog.at_level(logging.INFO, logger="hf_sidecar.streaming"):
        model = SidecarModelForCausalLM.from_pretrained(sharded, sidecar=sidecar)

    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(sidecar.config["checkpoint"]["files"]) >= 2
    assert "match sidecar 'authors' by sha256" in caplog.text
    _assert_same_parameters(model, _reference(sharded, dense.theta_ams, dense.sidecar))


def test_resharded_checkpoint_verified_by_content(dense, caplog):
    with caplog.at_level(logging.INFO, logger="hf_sidecar.streaming"):
        model = SidecarModelForCausalLM.from_pretrained(dense.folder / "sharded", sidecar=dense.sidecar)

    assert "Verifying the content digest" in caplog.text
    assert getattr(model.config, REVOCATION_CONFIG_KEY)[0]["verified_by"] == "content digest"
    _assert_same_parameters(model, _reference(dense.folder / "sharded", dense.theta_ams, dense.sidecar))


def test_resharded_other_weights_abort_while_streaming(dense, monkeypatch, tmp_path):
    reads = _count_reads(monkeypatch)
    with pytest.raises(SidecarMismatchError, match="load was aborted"):
        SidecarModelForCausalLM.from_pretrained(
            dense.folder / "other_sharded", sidecar=dense.sidecar, device_map={"": "disk"}, offload_folder=tmp_path / "offload",
        )
    assert len(reads) >= len(dense.sidecar.names), "the content digest is checked as tensors stream in"
    assert [path.name for path in (tmp_path / "offload").iterdir()] == [], "revoked tensors of an aborted load are deleted"


def test_verify_content_checks_same_file_names(dense, caplog):
    with caplog.at_level(logging.INFO, logger="hf_sidecar.streaming"):
        SidecarModelForCausalLM.from_pretrained(dense.folder / "theta_AMS", sidecar=dense.sidecar, verify="content")
    assert "Verifying the content digest" in caplog.text
    with pytest.raises(SidecarMismatchError, match="load was aborted"):
        SidecarModelForCausalLM.from_pretrained(dense.folder / "other", sidecar=dense.sidecar, verify="content")


class _CountingSlice:
    def __init__(self, piece, name: str, reads: list):
        self._piece, self._name, self._reads = piece, name, reads

    def __getitem__(self, index):
        self._reads.append(self._name)
        return self._piece[index]

    def __getattr__(self, attribute):
        return getattr(self._piece, attribute)


class _CountingHandle:
    def __init__(self, handle, reads: list):
        self._handle, self._reads = handle, reads

    def get_tensor(self, name):
        self._reads.append(name)
        return self._handle.get_tensor(name)

    def get_slice(self, name):
        return _CountingSlice(self._handle.get_slice(name), name, self._reads)

    def __getattr__(self, attribute):
        return getattr(self._handle, attribute)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return self._handle.__exit__(*exc_info)


def _count_reads(monkeypatch) -> list[str]:
    """Record the name of every tensor whose data transformers or hf-sidecar reads from a checkpoint."""
    import transformers.modeling_utils

    reads: list[str] = []

    def counting_open(*args, **kwargs):
        return _CountingHandle(safe_open(*args, **kwargs), reads)

    monkeypatch.setattr(transformers.modeling_utils, "safe_open", counting_open)
    monkeypatch.setattr(streaming, "safe_open", counting_open)
    return reads


def test_other_weights_refused_before_reading(dense, monkeypatch):
    reads = _count_reads(monkeypatch)
    with pytest.raises(SidecarMismatchError, match="no weight was read"):
        SidecarModelForCausalLM.from_pretrained(dense.folder / "other", sidecar=dense.sidecar)
    assert reads == []

    SidecarModelForCausalLM.from_pretrained(dense.folder / "theta_AMS", sidecar=dense.sidecar)
    assert EMBEDDING in reads, "the counter sees the reads of a load that goes ahead"


def test_other_architecture_refused_from_headers(dense, setup, monkeypatch, tmp_path):
    from hf_sidecar.models import TinyLlamaSpec, tiny_llama

    wider = tiny_llama(TinyLlamaSpec(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1), setup.tokenizer, seed=0)
    wider.save_pretrained(tmp_path / "wider")
    reads = _count_reads(monkeypatch)
    with pytest.raises(SidecarMismatchError, match="expects float32"):
        SidecarModelForCausalLM.from_pretrained(tmp_path / "wider", sidecar=dense.sidecar, verify="content")
    assert reads == []


def test_revoke_false_loads_unmodified(dense):
    model = SidecarModelForCausalLM.from_pretrained(dense.folder / "theta_AMS", sidecar=dense.sidecar, revoke=False)
    parameters = dict(model.named_parameters())

    assert all(torch.equal(parameters[name], value) for name, value in dense.theta_ams.items())
    assert getattr(model.config, REVOCATION_CONFIG_KEY) == []


def test_hooks_removed_after_loads(dense):
    import transformers.core_model_loading as core_model_loading
    import transformers.modeling_utils as modeling_utils

    originals = (
        modeling_utils.PreTrainedModel.__dict__["_load_pretrained_model"],
        modeling_utils.convert_and_load_state_dict_in_model,
        core_model_loading._materialize_copy,
    )
    SidecarModelForCausalLM.from_pretrained(dense.folder / "theta_AMS", sidecar=dense.sidecar)
    with pytest.raises(SidecarMismatchError):
        SidecarModelForCausalLM.from_pretrained(dense.folder / "other", sidecar=dense.sidecar)

    assert modeling_utils.PreTrainedModel.__dict__["_load_pretrained_model"] is originals[0]
    assert modeling_utils.convert_and_load_state_dict_in_model is originals[1]
    assert core_model_loading._materialize_copy is originals[2]


def test_unchanged_files_are_hashed_once(dense, digest_cache, monkeypatch, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(dense.folder / "theta_AMS", folder)
    real_hash = file_digests_module.sha256_file
    hashed = []
    monkeypatch.setattr(file_digests_module, "sha256_file", lambda path: hashed.append(Path(path).name) or real_hash(path))

    SidecarModelForCausalLM.from_pretrained(folder, sidecar=dense.sidecar)
    SidecarModelForCausalLM.from_pretrained(folder, sidecar=dense.sidecar)
    assert hashed == ["model.safetensors"]
    assert str(folder.resolve() / "model.safetensors") in json.loads(digest_cache.read_text())

    shutil.copyfile(dense.folder / "other" / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(SidecarMismatchError, match="no weight was read"):
        SidecarModelForCausalLM.from_pretrained(folder, sidecar=dense.sidecar)
    assert hashed == ["model.safetensors", "model.safetensors"], "a rewritten file is hashed again"


def test_streaming_digest_matches_content_digest(dense):
    names = dense.sidecar.names
    order = sorted(names, key=lambda name: (len(name), name[::-1]))
    digest = StreamingDigest(names, lambda name: dense.theta_ams[name])
    for name in order:
        digest.update(name, dense.theta_ams[name])

    assert order != sorted(names)
    assert digest.rereads > 0
    assert digest.hexdigest() == content_digest(dense.theta_ams, names)


# ------------------------------------------------------------------------------------------------
# Sidecar sources


def test_nan_in_sidecar_file_is_rejected(dense, tmp_path):
    folder = tmp_path / "sidecar"
    dense.sidecar.save_pretrained(folder)
    tensors = load_file(folder / TENSORS_FILE)
    tensors[f"delta.{EMBEDDING}"][0, 0] = math.nan
    save_file(tensors, folder / TENSORS_FILE, metadata={"format": "pt"})

    with pytest.raises(SidecarError, match="NaN"):
        SidecarModelForCausalLM.from_pretrained(dense.folder / "theta_AMS", sidecar=folder)


def test_options_are_checked(dense):
    with pytest.raises(ValueError, match="No sidecar given"):
        SidecarModelForCausalLM.from_pretrained(dense.folder / "theta_AMS")
    with pytest.raises(ValueError, match="state_dict= is not supported"):
        SidecarModelForCausalLM.from_pretrained(dense.folder / "theta_AMS", sidecar=dense.sidecar, state_dict={})
    with pytest.raises(ValueError, match="disagree"):
        SidecarModelForCausalLM.from_pretrained(dense.folder / "theta_AMS", sidecar=dense.sidecar, dtype=torch.float16, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="verify='files'"):
        SidecarModelForCausalLM.from_pretrained(dense.folder / "theta_AMS", sidecar=dense.sidecar, verify="files")


def test_hub_model_and_sidecar_from_cache(hub_server, dense, monkeypatch):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.url, token=ALICE_TOKEN)
    api.create_repo("alice/ams", private=True)
    api.upload_folder(folder_path=dense.folder / "theta_AMS", repo_id="alice/ams")
    dense.sidecar.push_to_hub("alice/ams", endpoint=hub_server.url, token=ALICE_TOKEN)
    cache = Path(constants.HF_HUB_CACHE)
    snapshot_download("alice/ams", endpoint=hub_server.url, token=ALICE_TOKEN, cache_dir=cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hashed = []
    monkeypatch.setattr(file_digests_module, "sha256_file", lambda path: hashed.append(path) or "0" * 64)

    model = SidecarModelForCausalLM.from_pretrained(
        "alice/ams", cache_dir=cache, local_files_only=True, sidecar="alice/ams", sidecar_subfolder="sidecars/authors",
        sidecar_kwargs={"cache_dir": cache},
    )

    assert hashed == [], "files in the Hub cache are identified by their blob names, not hashed again"
    _assert_same_parameters(model, _reference(dense.folder / "theta_AMS", dense.theta_ams, dense.sidecar))
    source = getattr(model.config, REVOCATION_CONFIG_KEY)[0]["source"]
    assert source["repo_id"] == "alice/ams"
    assert source["subfolder"] == "sidecars/authors"


def test_two_sidecars_revoke_both(dense):
    config = copy.deepcopy(dense.sidecar.config)
    config["memory"] = "publishers"
    second = Sidecar(
        {name: value * 0.5 for name, value in dense.sidecar.delta.items()}, dense.sidecar.transport, config, dense.sidecar.process,
    )
    model = SidecarModelForCausalLM.from_pretrained(dense.folder / "theta_AMS", sidecar=[dense.folder / "sidecar", second], lam=0.75)
    reference = AutoModelForCausalLM.from_pretrained(dense.folder / "theta_AMS")
    load_parameters(reference, revoke_state_dict(dense.theta_ams, [dense.sidecar, second], lam=0.75))

    _assert_same_parameters(model, reference)
    assert [entry["memory"] for entry in getattr(model.config, REVOCATION_CONFIG_KEY)] == ["authors", "publishers"]


# ------------------------------------------------------------------------------------------------
# The load benchmark's parts


def test_synthetic_sidecars_bind_to_checkpoint(dense, tmp_path):
    from hf_sidecar.bench import _measure, summarize, synthetic_sidecar

    factored = synthetic_sidecar(dense.folder / "theta_AMS", storage="factored", rank=2)
    dense_sidecar = synthetic_sidecar(dense.folder / "theta_AMS", storage="dense")
    factored.save_pretrained(tmp_path / "factored")
    run = _measure("factored", str(dense.folder / "theta_AMS"), str(tmp_path / "factored"), "float32")
    plain = _measure("plain", str(dense.folder / "theta_AMS"), None, "float32")
    summary = summarize([{**run, "kind": "factored"}, plain])

    assert "model.layers.0.self_attn.q_proj.weight" in factored.names
    assert "model.norm.weight" not in factored.names
    assert set(dense_sidecar.names) == set(dense.theta_ams)
    assert factored.content_digest == content_digest(dense.theta_ams, factored.names)
    assert run["wall_s"] >= run["load_s"] > 0
    assert run["peak_rss_mib"] >= run["start_rss_mib"] > 0
    assert summary["factored"]["wall_ratio"] == run["wall_s"] / plain["wall_s"]
