"""The demo end to end on the test preset, and the command line on its output."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_sidecar.cli import main
from hf_sidecar.demo import run_demo
from hf_sidecar.sidecar import Sidecar


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    report = run_demo(out, preset="test", seed=11, progress=False)
    return out, report


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_report_has_every_key(demo):
    out, report = demo
    saved = json.loads((out / "report.json").read_text())
    assert saved["trials"][0]["seed"] == 11
    trial = saved["trials"][0]

    for key in ("no_edit", "task_arithmetic", "diagonal", "sidecar_2d", "sidecar_1_1"):
        assert _finite(trial["heldout_closure"][key]), key
    for key in ("task_arithmetic", "diagonal", "sidecar_2d"):
        assert _finite(trial["selected"][key]["lam"]), key
        assert _finite(trial["selected"][key]["gamma"]), key
    assert trial["selected"]["task_arithmetic"]["gamma"] == 0.0
    assert trial["selected"]["diagonal"]["lam"] == trial["selected"]["diagonal"]["gamma"]
    for key in ("task_arithmetic", "sidecar_1_1"):
        assert _finite(trial["param_error"][key]), key
        assert trial["param_error"][key] > 0, key
    for key in ("phase_a", "phase_m", "phase_s", "sidecar_trace", "oracle_trace", "grid"):
        assert _finite(trial["seconds"][key]), key
    assert trial["heldout_closure"]["no_edit"] == 0.0


def test_selected_edits_are_the_grid_maxima(demo):
    out, report = demo
    grid = json.loads((out / "trial-0" / "grid.json").read_text())
    trial = report["trials"][0]
    best = max(max(row) for row in grid["closure"])
    assert trial["validation_closure"]["sidecar_2d"] == pytest.approx(best)
    assert trial["validation_closure"]["sidecar_2d"] >= trial["validation_closure"]["task_arithmetic"]
    assert trial["validation_closure"]["sidecar_2d"] >= trial["validation_closure"]["diagonal"]


def test_output_folder_layout(demo):
    out, _ = demo
    trial = out / "trial-0"
    for name in ("theta_A", "theta_AM", "theta_AMS", "theta_AS"):
        assert (trial / name / "model.safetensors").is_file(), name
        assert (trial / name / "config.json").is_file(), name
    assert sorted(p.name for p in (trial / "sidecar").iterdir()) == ["README.md", "process.json", "sidecar.safetensors", "sidecar_config.json"]
    assert (trial / "validation_closure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Held-out refusal closure" in (out / "report.md").read_text()


def test_saved_sidecar_recommends_validation_point(demo):
    out, report = demo
    sidecar = Sidecar.from_pretrained(out / "trial-0" / "sidecar")
    selected = report["trials"][0]["selected"]["sidecar_2d"]
    assert sidecar.config["recommended"] == {"lam": selected["lam"], "gamma": selected["gamma"], "rule": "validation_closure"}


def test_reloaded_sidecar_gives_identical_edit(demo, tmp_path):
    out, _ = demo
    folder = out / "trial-0"
    assert main(["apply", "--model", str(folder / "theta_AMS"), "--sidecar", str(folder / "sidecar"), "--out", str(tmp_path / "a"), "--lam", "1", "--gamma", "1", "--no-progress"]) == 0
    sidecar = Sidecar.from_pretrained(folder / "sidecar")
    sidecar.save_pretrained(tmp_path / "copy")
    assert main(["apply", "--model", str(folder / "theta_AMS"), "--sidecar", str(tmp_path / "copy"), "--out", str(tmp_path / "b"), "--lam", "1", "--gamma", "1", "--no-progress"]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_resume_reuses_finished_trial(demo):
    out, report = demo
    before = (out / "trial-0" / "result.json").stat().st_mtime_ns
    again = run_demo(out, preset="test", seed=11, progress=False)
    assert (out / "trial-0" / "result.json").stat().st_mtime_ns == before
    assert again["trials"][0]["heldout_closure"] == report["trials"][0]["heldout_closure"]


def test_cli_build_reproduces_demo_sidecar(demo, tmp_path):
    out, _ = demo
    trial = out / "trial-0"
    code = main([
        "build", "--theta-a", str(trial / "theta_A"), "--theta-am", str(trial / "theta_AM"), "--theta-ams", str(trial / "theta_AMS"),
        "--process", str(trial / "safety_process.json"), "--data", str(trial / "safety_data.jsonl"), "--out", str(tmp_path / "rebuilt"),
        "--no-progress",
    ])
    assert code == 0
    rebuilt = Sidecar.from_pretrained(tmp_path / "rebuilt")
    original = Sidecar.from_pretrained(trial / "sidecar")
    assert rebuilt.content_digest == original.content_digest
    for name in original.transport:
        assert torch.equal(rebuilt.transport[name], original.transport[name]), name


def test_cli_inspect_verifies_checkpoint(demo, capsys):
    out, _ = demo
    trial = out / "trial-0"
    assert main(["inspect", str(trial / "sidecar"), "--model", str(trial / "theta_AMS")]) == 0
    printed = capsys.readouterr().out
    assert "matches by file sha256" in printed
    assert "recommended:" in printed


def test_cli_inspect_rejects_other_checkpoint(demo, capsys):
    out, _ = demo
    trial = out / "trial-0"
    assert main(["inspect", str(trial / "sidecar"), "--model", str(trial / "theta_AM")]) == 2
    assert "content digest" in capsys.readouterr().err


def test_cli_eval_reports_closure(demo, tmp_path, capsys):
    from hf_sidecar.data import load_data, make_splits, read_examples
    from hf_sidecar.demo import PRESETS

    out, report = demo
    trial = out / "trial-0"
    splits = make_splits(load_data(), PRESETS["test"].splits, 11)
    for name in ("validation", "test", "public_eval"):
        assert read_examples(trial / f"{name}.jsonl") == getattr(splits, name), name
    assert main([
        "eval", "--model", str(trial / "theta_AMS"), "--sidecar", str(trial / "sidecar"), "--prompts", str(trial / "test.jsonl"),
        "--oracle", str(trial / "theta_AS"), "--lam", "1", "--gamma", "1", "--max-new-tokens", "4", "--no-progress",
    ]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["closure"] == pytest.approx(report["trials"][0]["heldout_closure"]["sidecar_1_1"], abs=1e-6)
    assert 0.0 <= results["revoked"]["refusal_rate"] <= 1.0


def test_cli_eval_defaults_match_report(demo, capsys):
    from hf_sidecar.demo import PRESETS

    # Without --lam, --gamma and --max-new-tokens, eval scores the validation-selected edit with
    # the demo's decoding limit, so its closure and greedy metrics are the report's.
    out, report = demo
    trial = out / "trial-0"
    assert main([
        "eval", "--model", str(trial / "theta_AMS"), "--sidecar", str(trial / "sidecar"), "--prompts", str(trial / "test.jsonl"),
        "--public", str(trial / "public_eval.jsonl"), "--oracle", str(trial / "theta_AS"), "--no-progress",
    ]) == 0
    results = json.loads(capsys.readouterr().out)
    selected = report["trials"][0]["selected"]["sidecar_2d"]
    assert (results["lam"], results["gamma"]) == (selected["lam"], selected["gamma"])
    assert results["max_new_tokens"] == PRESETS["test"].max_new_tokens
    assert results["closure"] == pytest.approx(report["trials"][0]["heldout_closure"]["sidecar_2d"], abs=1e-6)
    behaviour = report["trials"][0]["behaviour"][f"sidecar 2D ({selected['lam']:g}, {selected['gamma']:g})"]
    assert results["revoked"] == pytest.approx(behaviour, abs=1e-9)
    assert results["unedited"] == pytest.approx(report["trials"][0]["behaviour"]["theta_AMS (no edit)"], abs=1e-9)


def test_cli_eval_missing_prompts_file(demo, tmp_path, capsys):
    out, _ = demo
    trial = out / "trial-0"
    missing = tmp_path / "heldout.jsonl"
    code = main(["eval", "--model", str(trial / "theta_AMS"), "--sidecar", str(trial / "sidecar"), "--prompts", str(missing), "--no-progress"])
    assert code == 2
    message = capsys.readouterr().err
    assert str(missing) in message
    assert "test.jsonl" in message
    assert "data folder" not in message


def test_report_counts_and_means_over_trials(demo):
    # Three copies of the fixture's trial: the 2D edit wins the first, falls below the diagonal in
    # the second and ties it in the third. The counts, the mean column and the seconds table follow.
    from hf_sidecar.report import render_markdown, summarize

    out, report = demo
    trial = report["trials"][0]
    trials = [json.loads(json.dumps(trial)) for _ in range(3)]
    for index, copy in enumerate(trials):
        copy["seed"] = 11 + index
        copy["heldout_closure"]["task_arithmetic"] = 0.5
        copy["heldout_closure"]["diagonal"] = 0.6
        copy["heldout_closure"]["sidecar_2d"] = 0.7
    trials[1]["heldout_closure"]["sidecar_2d"] = 0.55
    trials[2]["heldout_closure"]["sidecar_2d"] = 0.6
    summary = summarize(trials)
    assert summary["sidecar_2d_beats_task_arithmetic"] == 3
    assert summary["sidecar_2d_beats_diagonal"] == 1
    assert summary["sidecar_2d_ties_diagonal"] == 1
    assert summary["sidecar_2d_ties_task_arithmetic"] == 0
    assert summary["mean_heldout_closure"]["sidecar_2d"] == pytest.approx((0.7 + 0.55 + 0.6) / 3)

    text = render_markdown({**report, "trials": trials, "summary": summary})
    assert "in 3 of 3 trials and the diagonal in 1 of 3 (a tie in 1: the same closure)." in text
    assert "| Sidecar 2D, best (λ, γ) on validation | 0.700 | 0.550 | 0.600 | 0.617 |" in text
    seconds_row = next(line for line in text.splitlines() if line.startswith("| 0 | "))
    cells = [cell.strip() for cell in seconds_row.strip("|").split("|")]
    assert float(cells[-2]) == pytest.approx(trial["seconds"]["total"], abs=0.05)
    # The parts and "other" add up to the total.
    assert sum(float(c) for c in cells[1:-2]) == pytest.approx(trial["seconds"]["total"], abs=0.5)

    skipped = render_markdown({**report, "config": {**report["config"], "phase_a": None}})
    assert next(line for line in skipped.splitlines() if line.startswith("| 0 | ")).startswith("| 0 | – |")
