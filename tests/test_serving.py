"""The server end to end: a real uvicorn server on 127.0.0.1, the official `openai` client, a real browser.

Every answer at temperature 0 is checked against an unbatched `generate` call with the same settings:
step-level batching must never change a row's tokens.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch

from conftest import ROOT
from dlm.modeling import build_from_scratch
from dlm.sampling import SamplerConfig, generate
from dlm.serving import Engine, create_app

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

GEN = 16  # the server's default canvas: 16 masks, one commit per step
PROMPTS = ["What is the sum of 12 and 30?", "Hi", "The king spoke to the people about bread and the sea."]


def diverse_model(tokenizer):
    """A tiny random ModernBERT with peaked, diverse predictions (no near-ties for argmax to flip on)
    that never ranks [MASK] first, as in test_sampling."""
    torch.manual_seed(0)
    model = build_from_scratch("tiny", tokenizer, max_position_embeddings=512, hidden_size=32,
                               intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               initializer_range=0.5).eval()
    with torch.no_grad():
        model.decoder.bias[tokenizer.mask_token_id] = -1e4
    return model


def start_server(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from the start: no race with other processes
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def served(tokenizer):
    model = diverse_model(tokenizer)
    defaults = SamplerConfig(gen_length=GEN)
    engine = Engine(model, tokenizer, max_batch_size=32, max_queue=64)
    server, thread, url = start_server(create_app(engine, defaults, "tiny-dlm", fps=1000))
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield SimpleNamespace(url=url, model=model, tokenizer=tokenizer, engine=engine, defaults=defaults,
                          client=client)
    server.should_exit = True
    thread.join(timeout=10)


def solo(served, prompt, **overrides) -> str:
    """The unbatched answer: one generate() call, one row."""
    seed = overrides.pop("seed", 0)
    cfg = SamplerConfig(**{"gen_length": GEN, **overrides})
    return generate(served.model, served.tokenizer, [prompt], cfg, seed=seed)[0]


def test_models_completion_and_chat_equal_unbatched_generation(served):
    client = served.client
    assert [m.id for m in client.models.list().data] == ["tiny-dlm"]
    out = client.completions.create(model="tiny-dlm", prompt=PROMPTS[0], temperature=0, max_tokens=GEN)
    expected = solo(served, PROMPTS[0])
    assert out.choices[0].text == expected.text and out.object == "text_completion"
    # The sampler's settings and the forward-pass count come back with usage.
    assert out.usage.nfe == out.choices[0].nfe == expected.nfe
    assert out.usage.prompt_tokens == len(expected.prompt_ids)
    assert out.sampler["max_tokens"] == GEN and out.sampler["strategy"] == "low_confidence"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[2]}]
    chat = client.chat.completions.create(model="tiny-dlm", messages=messages, temperature=0,
                                          extra_body={"threshold": 0.3, "block_length": 8})
    expected = generate(served.model, served.tokenizer, [messages],
                        SamplerConfig(gen_length=GEN, threshold=0.3, block_length=8))[0]
    assert chat.choices[0].message.content == expected.text and chat.choices[0].message.role == "assistant"
    assert chat.usage.nfe == expected.nfe < GEN  # threshold decoding: fewer passes than tokens
    assert chat.sampler["threshold"] == 0.3 and chat.sampler["block_length"] == 8

    # A request picks its own prompt cache (an extra field, echoed); approx on this non-isolated model.
    cached = client.completions.create(model="tiny-dlm", prompt=PROMPTS[2], temperature=0,
                                       extra_body={"prompt_cache": "approx", "block_length": 8})
    expected = solo(served, PROMPTS[2], prompt_cache="approx", block_length=8)
    assert cached.choices[0].text == expected.text and cached.sampler["prompt_cache"] == "approx"


def test_stream_is_the_settled_prefix_and_concatenates_to_the_answer(served):
    client = served.client
    for prompt in PROMPTS:
        plain = client.completions.create(model="tiny-dlm", prompt=prompt, temperature=0, max_tokens=24,
                                          extra_body={"block_length": 8})
        chunks = list(client.completions.create(model="tiny-dlm", prompt=prompt, temperature=0, max_tokens=24,
                                                extra_body={"block_length": 8}, stream=True))
        pieces = [c.choices[0].text for c in chunks]
        assert "".join(pieces) == plain.choices[0].text
        assert len([p for p in pieces if p]) > 1  # really streamed in several pieces
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    messages = [{"role": "user", "content": PROMPTS[1]}]
    plain = client.chat.completions.create(model="tiny-dlm", messages=messages, temperature=0)
    stream = client.chat.completions.create(model="tiny-dlm", messages=messages, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.nfe == plain.usage.nfe


def test_n_choices_draw_from_seed_plus_j(served):
    out = served.client.completions.create(model="tiny-dlm", prompt=PROMPTS[1], n=3, temperature=1.0, seed=7)
    expected = generate(served.model, served.tokenizer, [PROMPTS[1]] * 3,
                        SamplerConfig(gen_length=GEN, temperature=1.0), seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [r.text for r in expected]
    assert len({c.text for c in out.choices}) > 1


def test_stop_strings_cut_the_text_in_both_modes(served):
    client = served.client
    full = client.completions.create(model="tiny-dlm", prompt=PROMPTS[2], temperature=0, max_tokens=32).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop.strip()) >= 2, full
    cut = full[:full.find(stop)]
    out = client.completions.create(model="tiny-dlm", prompt=PROMPTS[2], temperature=0, max_tokens=32,
                                    stop=[stop, "never-there"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny-dlm", prompt=PROMPTS[2], temperature=0, max_tokens=32,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_32_concurrent_clients_get_their_unbatched_tokens(served):
    prompts = [f"{PROMPTS[i % 3]} {i}" for i in range(32)]
    # Mixed settings, prompt caches included: rows of different caches run in batches of their own.
    settings = [dict(block_length=8) if i % 2 else dict(threshold=0.4) for i in range(32)]
    for i in range(3, 32, 4):
        settings[i]["prompt_cache"] = "approx"
    expected = [solo(served, p, **s) for p, s in zip(prompts, settings)]

    def ask(i):
        out = served.client.completions.create(model="tiny-dlm", prompt=prompts[i], temperature=0,
                                               extra_body={**settings[i], "max_tokens": GEN})
        return out.choices[0].text

    steps_before = served.engine.steps_run
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert answers == [r.text for r in expected]
    # Rows shared forward passes: far fewer steps than 32 requests run one after another would take.
    solo_steps = sum(r.steps for r in expected)
    assert served.engine.steps_run - steps_before < solo_steps / 2, (served.engine.steps_run - steps_before,
                                                                      solo_steps)


@pytest.mark.parametrize("body,status,needle", [
    (b'{"prompt": "hi", ', 400, "not valid JSON"),
    (b'["prompt"]', 400, "body"),
    ({"prompt": "hi", "frobnicate": 1}, 400, "unknown field `frobnicate`"),
    ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "n": 0}, 400, "n"),
    ({"prompt": "hi", "seed": -1}, 400, "seed"),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "hi", "max_tokens": 5000}, 400, "exceeds the model's 512 positions"),
    ({"prompt": "hi", "steps": 3, "block_length": 8}, 400, "steps 3 does not divide over 2 blocks"),
    ({"prompt": "hi", "threshold": 0.9, "strategy": "random"}, 400, "threshold needs a confidence"),
    ({"prompt": "hi", "n": 40}, 400, "max_batch_size"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "does not exist"),
    ({"prompt": "hi", "prompt_cache": "exact"}, 400, "prompt_cache exact: the model was trained without"),
    ({"prompt": "hi", "prompt_cache": "sometimes"}, 400, "prompt_cache"),
    ({"prompt": []}, 400, "prompt"),
])
def test_bad_requests_get_their_status_and_the_server_keeps_answering(served, body, status, needle):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(served.url + "/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"] and r.json()["error"]["type"]
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


def test_queue_full_is_429_with_retry_after_and_bad_chat_is_400(served):
    engine = served.engine
    engine.max_queue, saved = 0, engine.max_queue
    try:
        r = httpx.post(served.url + "/v1/completions", json={"prompt": "hi"})
    finally:
        engine.max_queue = saved
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["type"]
    r = httpx.post(served.url + "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    assert served.client.completions.create(model="tiny-dlm", prompt="hi", max_tokens=4).choices[0].text is not None


def test_a_client_that_leaves_frees_its_row(served):
    engine = served.engine
    # 480 steps if nobody stopped it; short blocks so that the settled text grows from the start.
    body = {"prompt": PROMPTS[0], "max_tokens": 480, "block_length": 4, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())
        steps = engine.steps_run
    deadline = time.time() + 10
    while engine.health()["rows_in_flight"] and time.time() < deadline:
        time.sleep(0.02)
    assert (engine.health()["rows_in_flight"], engine.health()["queue_depth"]) == (0, 0)
    assert engine.steps_run - steps < 400  # the row left long before its canvas was full
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(served.url + "/v1/completions", json={"prompt": "x", "max_tokens": 480}, timeout=0.2)
    deadline = time.time() + 10
    while engine.health()["rows_in_flight"] and time.time() < deadline:
        time.sleep(0.02)
    assert engine.health()["rows_in_flight"] == 0


def test_denoise_streams_canvases_with_masks_then_the_answer(served):
    events = []
    with httpx.stream("POST", served.url + "/v1/denoise", json={"prompt": PROMPTS[2], "temperature": 0}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    first, last = events[0], events[-1]
    assert first["canvas"] == [None] * GEN and first["masks"] == GEN and first["step"] == 0
    masks = [e["masks"] for e in events]
    assert masks == sorted(masks, reverse=True) and last["done"] and last["masks"] == 0
    assert last["text"] == solo(served, PROMPTS[2]).text
    assert last["usage"]["nfe"] == last["nfe"] and len(events) <= GEN + 1


def test_serve_py_refuses_bad_flags_before_loading_anything():
    r = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--model", "/nonexistent/dir", "--max_batch_size",
                        "0"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --max_batch_size must be at least 1, got 0"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="no system Chromium (.ci/run installs Debian's `chromium`)")
def test_page_in_a_real_headless_chromium(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    api = [served.client.completions.create(model="tiny-dlm", prompt=p, temperature=0, max_tokens=48,
                                            extra_body={"block_length": 16}) for p in PROMPTS[:2]]
    api_answers, api_nfe = [a.choices[0].text for a in api], api[0].usage.nfe
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(served.url + "/")
        assert page.input_value("#max_tokens") == str(GEN)  # the server's defaults fill the controls
        # Record every mask block the page ever draws (the tiny model finishes in milliseconds).
        page.evaluate("""() => { window.maxMasks = 0; new MutationObserver(() => {
            window.maxMasks = Math.max(window.maxMasks, document.querySelectorAll('.run .mask').length);
        }).observe(document.body, {subtree: true, childList: true, attributes: true}); }""")
        page.fill("#max_tokens", "48")
        page.fill("#block_length", "16")
        page.fill("#temperature", "0")
        page.fill("#prompt", PROMPTS[0])
        page.click("#start")
        page.fill("#prompt", PROMPTS[1])  # a second prompt while the first runs: queued, then run
        page.click("#start")
        page.wait_for_function("document.querySelectorAll('.run[data-state=done]').length == 2", timeout=20000)
        assert page.evaluate("window.maxMasks") >= 16
        assert [page.text_content(f".run[data-run='{i}'] .answer") for i in (1, 2)] == api_answers
        assert int(page.text_content(".run[data-run='1'] .stat-nfe b")) == api_nfe
        assert page.text_content(".run[data-run='1'] .stat-time b").endswith(" s")
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000


def test_readme_serve_examples_run_against_the_server(served, capsys):
    """The README's curl and openai-client examples, pointed at this server, answer as shown there."""
    from test_readme import README, code_commands

    section = README.read_text(encoding="utf-8").split("\n## Serve")[1].split("\n## ")[0]
    curls = [shlex.split(c) for c in code_commands(section, "sh") if c.startswith("curl")]
    assert curls and any("python serve.py" in c for c in code_commands(section, "sh"))
    for argv in curls:
        body = json.loads(argv[argv.index("-d") + 1])
        url = argv[1].replace("http://127.0.0.1:8000", served.url)
        r = httpx.post(url, json={**body, "model": "tiny-dlm"}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["nfe"] >= 1, r.text
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)
    assert snippets
    for code in snippets:
        exec(code.replace("http://127.0.0.1:8000", served.url).replace('"final_model"', '"tiny-dlm"'), {})
    assert capsys.readouterr().out.strip()


def test_stable_prefix_never_sends_what_later_tokens_may_change():
    from dlm.serving.api import stable_prefix

    assert stable_prefix("They said I 'l", 0) == "They said I"  # " 'll" may still lose its space
    assert stable_prefix("caf\ufffd", 0) == "caf"                  # half a UTF-8 character
    assert stable_prefix("one two three", 4) == "one two"         # "t" may still grow into a 5-character stop
    assert stable_prefix("word", 0) == "word"
