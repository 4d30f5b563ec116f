"""The Space: the live revocation behind it, its Gradio API through gradio_client, and the page in headless Chromium.

Everything runs against tiny demo artifacts built once per session, served on 127.0.0.1. The
module also records every connection or name lookup that this process or the browser starts
towards a non-loopback address, blocks it and fails the test that caused it.
"""

from __future__ import annotations

import os

# Before gradio or huggingface_hub is imported anywhere in this process.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import ipaddress  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import hf_sidecar.live as live_module  # noqa: E402
from hf_sidecar.demo import run_demo  # noqa: E402
from hf_sidecar.edit import revoke_state_dict  # noqa: E402
from hf_sidecar.io import load_checkpoint  # noqa: E402
from hf_sidecar.live import BEFORE, ORACLE, SIDECAR, TASK_ARITHMETIC, VARIANTS, LiveRevocation, PromptError, check_coefficient  # noqa: E402
from hf_sidecar.space import (  # noqa: E402
    ENV_ARTIFACTS,
    ENV_MODEL_REPO,
    ENV_ORACLE_REPO,
    ENV_SIDECAR_REPO,
    artifacts_source,
    build_app,
    example_prompts,
    launch_app,
    load_live,
    source_from_environment,
    strip_front_matter,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
MAX_NEW_TOKENS = 16
# Coefficients at which the test preset's revoked answer differs from the one at the sidecar's
# recommendation (checked in the browser test, so a moved slider visibly changes the answer).
MOVED = (2.0, 2.0)


# ------------------------------------------------------------------------------------------------
# Outgoing-connection audit


def _is_loopback(host) -> bool:
    if host is None or host in ("localhost", b"localhost"):
        return True
    try:
        return ipaddress.ip_address(host.decode() if isinstance(host, bytes) else str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


class OutgoingAudit:
    """Records and blocks every socket connection and name lookup this process aims off loopback."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original_connect = socket.socket.connect
        original_connect_ex = socket.socket.connect_ex
        original_getaddrinfo = socket.getaddrinfo
        audit = self

        def check(sock: socket.socket, address) -> None:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
                audit.attempts.append(f"connect {address}")
                raise ConnectionRefusedError(f"test audit: blocked a connection to {address}")

        def connect(sock, address):
            check(sock, address)
            return original_connect(sock, address)

        def connect_ex(sock, address):
            check(sock, address)
            return original_connect_ex(sock, address)

        def getaddrinfo(host, *args, **kwargs):
            if not _is_loopback(host):
                audit.attempts.append(f"getaddrinfo {host!r}")
                raise socket.gaierror(socket.EAI_NONAME, f"test audit: blocked a lookup of {host!r}")
            return original_getaddrinfo(host, *args, **kwargs)

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(scope="module", autouse=True)
def outgoing_audit():
    audit = OutgoingAudit()
    with pytest.MonkeyPatch.context() as patch:
        audit.install(patch)
        yield audit


@pytest.fixture(autouse=True)
def no_outgoing_connections(outgoing_audit):
    start = len(outgoing_audit.attempts)
    yield
    assert outgoing_audit.attempts[start:] == [], "the app or its client reached beyond 127.0.0.1"


# ------------------------------------------------------------------------------------------------
# Shared artifacts, model and server


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("space-artifacts")
    run_demo(out, preset="test", progress=False)
    return out


@pytest.fixture(scope="module")
def loaded(artifacts):
    source = artifacts_source(artifacts)
    live, card = load_live(source, max_new_tokens=MAX_NEW_TOKENS, device="cpu")
    return source, live, card


@pytest.fixture(scope="module")
def live(loaded) -> LiveRevocation:
    return loaded[1]


@pytest.fixture(scope="module")
def examples(loaded):
    source, live, _ = loaded
    return example_prompts(live.sidecar, safety_data=source.safety_data)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(loaded):
    source, live, card = loaded
    app = build_app(source=source, live=live, card=card, queue_size=8)
    _, url, share_url = launch_app(app, port=_free_port(), block=False, quiet=True)
    assert share_url is None
    assert urlsplit(url).hostname == "127.0.0.1"
    yield url
    app.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, analytics_enabled=False, verbose=False, download_files=False)


def _expected(live: LiveRevocation, prompt: str, lam: float, gamma: float) -> dict[str, dict]:
    answers = live.answer(prompt, lam, gamma)
    return {variant: {key: value for key, value in answer.to_dict().items() if key != "seconds"} for variant, answer in answers.items()}


def _without_seconds(answers: dict) -> dict:
    return {variant: {key: value for key, value in entry.items() if key != "seconds"} for variant, entry in answers.items()}


def _parameters_digest(model, names) -> str:
    digest = hashlib.sha256()
    parameters = dict(model.named_parameters())
    for name in sorted(names):
        digest.update(parameters[name].detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# The live revocation


def test_live_has_all_variants_with_oracle(live):
    assert live.has_oracle
    assert live.variants == VARIANTS


def test_edit_derived_from_stored_theta_ams(live, examples):
    prompt = examples[0].prompt
    for lam, gamma in [(1.0, 1.0), (0.35, 1.7), (2.0, 0.0), (1.0, 1.0)]:
        live.answer(prompt, lam, gamma, variants=[SIDECAR])
    expected = revoke_state_dict(dict(live.reference), live.sidecar, lam=1.0, gamma=1.0, verify=False)
    parameters = dict(live.model.named_parameters())
    for name in live.sidecar.names:
        assert torch.equal(parameters[name].detach(), expected[name]), name


def test_before_restores_theta_ams_exactly(live, examples):
    live.answer(examples[0].prompt, 1.5, 0.5, variants=[SIDECAR])
    live.answer(examples[0].prompt, 1.5, 0.5, variants=[BEFORE])
    parameters = dict(live.model.named_parameters())
    for name, value in live.reference.items():
        assert torch.equal(parameters[name].detach(), value), name


def test_oracle_loads_oracle_checkpoint(live, artifacts, examples):
    live.answer(examples[0].prompt, 1.0, 1.0, variants=[ORACLE])
    parameters = dict(live.model.named_parameters())
    oracle = load_checkpoint(artifacts / "trial-0" / "theta_AS", set(parameters))
    for name, value in parameters.items():
        assert torch.equal(value.detach(), oracle[name]), name


def test_task_arithmetic_uses_gamma_zero(live, examples):
    answers = live.answer(examples[1].prompt, *MOVED)
    assert answers[TASK_ARITHMETIC].gamma == 0.0
    assert answers[TASK_ARITHMETIC].lam == MOVED[0]
    alone = live.answer(examples[1].prompt, MOVED[0], 0.0, variants=[SIDECAR])
    assert answers[TASK_ARITHMETIC].text == alone[SIDECAR].text


def test_edits_never_interleave_with_generation(live, examples, monkeypatch):
    prompt = examples[0].prompt
    points = [(1.0, 1.0), (0.5, 0.0), (2.0, 2.0), (0.0, 1.5)]
    names = live.sidecar.names
    expected_digests = {}
    for lam, gamma in points:
        edited = revoke_state_dict(dict(live.reference), live.sidecar, lam=lam, gamma=gamma, verify=False)
        digest = hashlib.sha256()
        for name in sorted(names):
            digest.update(edited[name].contiguous().numpy().tobytes())
        expected_digests[(lam, gamma)] = digest.hexdigest()
    serial = {point: live.answer(prompt, *point, variants=[SIDECAR])[SIDECAR].text for point in points}

    current = threading.local()
    problems: list[str] = []
    real_greedy_answers = live_module.greedy_answers

    def slow_greedy_answers(model, tokenizer, questions, **options):
        at_start = _parameters_digest(model, names)
        time.sleep(0.02)
        result = real_greedy_answers(model, tokenizer, questions, **options)
        at_end = _parameters_digest(model, names)
        if at_start != at_end:
            problems.append(f"weights changed during a generation for {current.point}")
        if at_start != expected_digests[current.point]:
            problems.append(f"generation for {current.point} ran on other weights")
        return result

    monkeypatch.setattr(live_module, "greedy_answers", slow_greedy_answers)
    results: list[tuple[tuple[float, float], str]] = []

    def worker(point: tuple[float, float]) -> None:
        current.point = point
        for _ in range(3):
            results.append((point, live.answer(prompt, *point, variants=[SIDECAR])[SIDECAR].text))

    threads = [threading.Thread(target=worker, args=(point,)) for point in points]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert problems == []
    assert len(results) == 3 * len(points)
    for point, text in results:
        assert text == serial[point], point


@pytest.mark.parametrize("prompt", ["", "   \n\t", None])
def test_prompt_empty_rejected(live, prompt):
    with pytest.raises(PromptError, match="empty"):
        live.answer(prompt, 1.0, 1.0)


def test_prompt_over_character_limit_rejected(live):
    with pytest.raises(PromptError, match=f"limit is {live.max_prompt_chars}"):
        live.check_prompt("a" * (live.max_prompt_chars + 1))


def test_prompt_over_token_limit_rejected(live, artifacts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(artifacts / "trial-0" / "theta_AMS", local_files_only=True)
    short = LiveRevocation(model, live.tokenizer, live.sidecar, max_new_tokens=8, max_prompt_tokens=12)
    with pytest.raises(PromptError, match="tokens long"):
        short.check_prompt("Which genre is this author particularly known for writing in, and why?")


def test_prompt_tokens_capped_by_positions(live):
    positions = live.model.config.max_position_embeddings
    assert live.max_prompt_tokens <= positions - live.max_new_tokens


@pytest.mark.parametrize("value", [-0.1, 2.5, math.nan, math.inf, "abc", None])
def test_coefficient_out_of_range_rejected(value):
    with pytest.raises(PromptError, match="must be a number from 0 to 2"):
        check_coefficient("lam", value)


def test_coefficient_rounded_to_slider_value():
    assert check_coefficient("lam", 0.35000000000000003) == 0.35


def test_generation_stays_within_token_limit(live, examples):
    answers = live.answer(examples[0].prompt, *MOVED)
    for answer in answers.values():
        assert len(live.tokenizer(answer.text, add_special_tokens=False)["input_ids"]) <= MAX_NEW_TOKENS


def test_max_new_tokens_limits_checked(live):
    with pytest.raises(ValueError, match="max_new_tokens must be from 1"):
        LiveRevocation(live.model, live.tokenizer, live.sidecar, max_new_tokens=0, verify=False)


# ------------------------------------------------------------------------------------------------
# Sources, examples and card


def test_example_prompts_cover_three_kinds(examples, loaded):
    from hf_sidecar.data import read_examples

    source = loaded[0]
    safety = read_examples(source.safety_data)
    refused = {row.question for row in safety if row.kind == "refusal"}
    retained = {row.question for row in safety if row.kind == "retain"}
    labels = [example.label for example in examples]
    assert labels[0].startswith("Safety-trained question about ")
    assert labels[1].startswith("Held-out question about ")
    assert labels[2] == "Public question"
    assert examples[0].prompt in refused
    assert examples[1].prompt not in refused
    assert examples[2].prompt not in retained


def test_artifacts_source_accepts_trial_folder(artifacts):
    top = artifacts_source(artifacts)
    trial = artifacts_source(artifacts / "trial-0")
    assert top.model == trial.model
    assert top.oracle is not None
    assert top.grid is not None


def test_artifacts_source_missing_folder_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="theta_AMS"):
        artifacts_source(tmp_path)


def test_environment_selects_hub_repos():
    source = source_from_environment({ENV_MODEL_REPO: "user/model", ENV_ORACLE_REPO: "user/oracle"})
    assert not source.local
    assert source.model == "user/model"
    assert source.sidecar == "user/model"
    assert source.oracle == "user/oracle"


def test_environment_overrides_config_file(tmp_path):
    config = tmp_path / "space_config.json"
    config.write_text(json.dumps({"model_repo": "user/from-file", "sidecar_repo": "user/sidecars", "examples": [{"label": "A", "prompt": "B?"}]}))
    source = source_from_environment({ENV_MODEL_REPO: "user/from-env"}, config_file=config)
    assert source.model == "user/from-env"
    assert source.sidecar == "user/sidecars"
    assert [(example.label, example.prompt) for example in source.examples] == [("A", "B?")]


def test_environment_artifacts_is_local(artifacts):
    source = source_from_environment({ENV_ARTIFACTS: str(artifacts), ENV_SIDECAR_REPO: "user/ignored"})
    assert source.local
    assert source.oracle is not None


def test_environment_without_source_explains():
    with pytest.raises(ValueError, match=f"{ENV_ARTIFACTS}.*{ENV_MODEL_REPO}"):
        source_from_environment({})


def test_config_file_unknown_key_rejected(tmp_path):
    config = tmp_path / "space_config.json"
    config.write_text(json.dumps({"model": "user/model"}))
    with pytest.raises(ValueError, match="unknown key 'model'"):
        source_from_environment({}, config_file=config)


def test_card_front_matter_stripped(loaded):
    card = loaded[2]
    assert card.startswith("---")
    body = strip_front_matter(card)
    assert body.startswith("# Process sidecar for memory")


# ------------------------------------------------------------------------------------------------
# The app through gradio_client and HTTP


def test_client_answers_match_live(client, live, examples):
    prompt = examples[1].prompt
    expected = _expected(live, prompt, 1.0, 1.0)
    assert _without_seconds(client.predict(prompt, 1.0, 1.0, api_name="/answers")) == expected


def test_client_generate_shows_badges(client, live, examples):
    prompt = examples[1].prompt
    lam, gamma = live.sidecar.recommended
    expected = _expected(live, prompt, lam, gamma)
    result = client.predict(prompt, lam, gamma, api_name="/generate")
    status, columns = result[0], result[1:]
    assert status.startswith(f"Answered at λ = {lam:g}, γ = {gamma:g}.")
    assert len(columns) == 3 * len(live.variants)
    for index, variant in enumerate(live.variants):
        title, badge, text = columns[3 * index : 3 * index + 3]
        assert text == expected[variant]["text"], variant
        assert f'data-refusal="{str(expected[variant]["refusal"]).lower()}"' in badge, variant
    assert "λ = " in columns[3]


def test_client_revoke_uses_session_prompt(client, live, examples):
    from gradio_client import Client

    prompt = examples[0].prompt
    session = Client(client.src, analytics_enabled=False, verbose=False, download_files=False)
    session.predict(prompt, 1.0, 0.0, api_name="/generate")
    result = session.predict(*MOVED, api_name="/revoke")
    expected = _expected(live, prompt, *MOVED)
    assert result[0] == f"Revoked answers recomputed at λ = {MOVED[0]:g}, γ = {MOVED[1]:g}."
    assert result[3] == expected[SIDECAR]["text"]
    assert result[6] == expected[TASK_ARITHMETIC]["text"]


@pytest.mark.parametrize(
    ("prompt", "lam", "message"),
    [("", 1.0, "The prompt is empty"), ("x" * 1001, 1.0, "limit is 1000"), ("Who?", 5.0, "lam must be a number from 0 to 2")],
)
def test_client_invalid_input_rejected(client, prompt, lam, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(prompt, lam, 1.0, api_name="/answers")


def test_queue_serves_concurrent_users(client, live, examples):
    from gradio_client import Client

    prompt = examples[1].prompt
    points = [(1.0, 1.0), MOVED, (0.0, 0.0), (2.0, 0.5)]
    expected = {point: _expected(live, prompt, *point) for point in points}
    other = Client(client.src, analytics_enabled=False, verbose=False, download_files=False)
    jobs = [(point, (client if index % 2 else other).submit(prompt, *point, api_name="/answers")) for index, point in enumerate(points * 2)]
    for point, job in jobs:
        assert _without_seconds(job.result(timeout=120)) == expected[point], point


def test_upload_route_rejected(server):
    response = httpx.post(server + "gradio_api/upload", files={"files": ("empty.txt", b"")})
    assert response.status_code == 403


def test_config_disables_analytics(server):
    config = httpx.get(server + "config").json()
    assert config["analytics_enabled"] is False


# ------------------------------------------------------------------------------------------------
# The page in headless Chromium


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found; install Debian's chromium package (.ci/setup does) to run the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


def test_page_answers_and_recomputes(browser, server, live, examples, tmp_path):
    from playwright.sync_api import expect

    server_host = urlsplit(server).netloc
    requested: list[str] = []
    blocked: list[str] = []

    def guard(route) -> None:
        url = route.request.url
        requested.append(url)
        if urlsplit(url).scheme in ("data", "blob") or urlsplit(url).netloc == server_host:
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    context = browser.new_context(viewport={"width": 1400, "height": 1300})
    context.route("**/*", guard)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(server)

    example = examples[1]
    page.get_by_role("button", name=example.label).click()
    expect(page.locator("#prompt textarea")).to_have_value(example.prompt)
    lam, gamma = live.sidecar.recommended
    initial = _expected(live, example.prompt, lam, gamma)
    page.locator("#generate").click()
    for variant in live.variants:
        badge = page.locator(f"#badge-{variant} .refusal-badge")
        expect(badge).to_have_attribute("data-refusal", str(initial[variant]["refusal"]).lower())
        expect(page.locator(f"#answer-{variant} textarea")).to_have_value(initial[variant]["text"])
    expect(page.locator("#status")).to_contain_text(f"Answered at λ = {lam:g}, γ = {gamma:g}")

    heatmap = page.locator("#heatmap img")
    expect(heatmap).to_be_visible()
    heatmap_before = heatmap.get_attribute("src")
    moved = _expected(live, example.prompt, *MOVED)
    assert moved[SIDECAR]["text"] != initial[SIDECAR]["text"], "pick MOVED so the revoked answer changes"

    # Type lam into the slider's number box (release fires on blur), then drag gamma's range to its end.
    number = page.locator("#lam input[type=number]")
    number.fill(f"{MOVED[0]:g}")
    number.blur()
    expect(page.locator("#title-sidecar")).to_contain_text(f"λ = {MOVED[0]:g}")
    track = page.locator("#gamma input[type=range]").bounding_box()
    middle = track["y"] + track["height"] / 2
    page.mouse.move(track["x"] + 2, middle)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] + 40, middle, steps=5)
    page.mouse.up()
    expect(page.locator("#title-sidecar")).to_contain_text(f"λ = {MOVED[0]:g}, γ = {MOVED[1]:g}")
    expect(page.locator("#answer-sidecar textarea")).to_have_value(moved[SIDECAR]["text"])
    expect(page.locator("#answer-task_arithmetic textarea")).to_have_value(moved[TASK_ARITHMETIC]["text"])
    expect(page.locator("#badge-sidecar .refusal-badge")).to_have_attribute("data-refusal", str(moved[SIDECAR]["refusal"]).lower())
    expect(page.locator("#answer-before textarea")).to_have_value(initial[BEFORE]["text"])
    expect(page.locator("#status")).to_contain_text(f"recomputed at λ = {MOVED[0]:g}, γ = {MOVED[1]:g}")
    expect(heatmap).not_to_have_attribute("src", heatmap_before)

    card = page.locator("#card")
    expect(card).to_contain_text(live.sidecar.memory)
    expect(card).to_contain_text(live.sidecar.content_digest)
    expect(card).to_contain_text("ε (secant step)")

    screenshot = tmp_path / "space.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000

    page.locator("#prompt textarea").fill("   ")
    page.locator("#generate").click()
    expect(page.get_by_text("The prompt is empty").first).to_be_visible()
    context.close()

    assert blocked == []
    assert requested, "the guard saw no request"


# ------------------------------------------------------------------------------------------------
# Entry points


def test_cli_space_serves_on_loopback(artifacts, monkeypatch):
    import hf_sidecar.space as space_module
    from hf_sidecar.cli import main

    real_launch_app = space_module.launch_app
    launched = {}

    def launch_without_blocking(app, *, host, port, **options):
        launched["app"] = app
        launched["host"] = host
        launched["url"] = real_launch_app(app, host=host, port=port, block=False, quiet=True)[1]

    monkeypatch.setattr(space_module, "launch_app", launch_without_blocking)
    port = _free_port()
    try:
        assert main(["-q", "space", "--artifacts", str(artifacts), "--port", str(port), "--max-new-tokens", "8"]) == 0
        assert launched["host"] == "127.0.0.1"
        assert launched["url"] == f"http://127.0.0.1:{port}/"
        config = httpx.get(launched["url"] + "config").json()
        assert config["title"] == "hf-sidecar: revoke a memory, keep safety"
    finally:
        if "app" in launched:
            launched["app"].close()


def test_cli_space_missing_artifacts_explains(tmp_path, capsys):
    from hf_sidecar.cli import main

    assert main(["space", "--artifacts", str(tmp_path / "missing")]) == 2
    assert "Pass the folder that `hf-sidecar demo --out` wrote" in capsys.readouterr().err


def test_spaces_app_builds_from_environment(artifacts, monkeypatch):
    for name in ("GRADIO_ANALYTICS_ENABLED", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(ENV_ARTIFACTS, str(artifacts))
    monkeypatch.setenv("HF_SIDECAR_MAX_NEW_TOKENS", "8")
    spec = importlib.util.spec_from_file_location("hf_sidecar_space_app", REPO_ROOT / "spaces" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    app = module.build_app()
    names = {dependency.get("api_name") for dependency in app.config["dependencies"]}
    assert {"generate", "revoke", "answers"} <= names


def test_spaces_readme_has_space_header():
    text = (REPO_ROOT / "spaces" / "README.md").read_text(encoding="utf-8")
    header = text.split("---")[1]
    for field in ("sdk: gradio", "app_file: app.py", "title:", "short_description:"):
        assert re.search(rf"^{re.escape(field)}", header, re.MULTILINE), field
    description = re.search(r"^short_description: (.+)$", header, re.MULTILINE).group(1).strip().strip('"')
    assert len(description) <= 60
