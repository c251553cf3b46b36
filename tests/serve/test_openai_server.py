"""`mmtune serve`: the OpenAI-compatible server, called with the `openai` client over loopback.

The server runs in a uvicorn thread on a free 127.0.0.1 port with the tiny built-in model
(weights perturbed so that greedy replies are varied text, not one repeated token).
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from mmtune.inference.generate import generate_text  # noqa: E402
from mmtune.serve.openai_server import create_app  # noqa: E402

MSG = [{"role": "user", "content": "What is 3 + 4?"}]


@pytest.fixture(scope="module")
def base_url(text_backend, run_server):
    with run_server(create_app(text_backend, "tiny")) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def png_data_url(size=(32, 32), color=(200, 30, 30)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found"


def test_greedy_stream_equals_non_stream_and_library(client, text_backend):
    kw = dict(model="tiny", messages=MSG, temperature=0, max_tokens=24)
    whole = client.chat.completions.create(**kw)
    text = whole.choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert len(text.strip()) > 0 and len({c for c in text}) > 3  # varied text, not one repeated token
    # the same reply as the library's own generation with the training template
    ids = text_backend.template.prompt_ids(MSG)
    assert text == generate_text(text_backend.model, text_backend.tokenizer, ids, 24, 0.0, 1.0,
                                 text_backend.template.stop_token_ids)
    # chunk protocol: the role first, content deltas, a finish reason, then usage
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    u = whole.usage
    assert u.prompt_tokens == len(ids) and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert whole.choices[0].finish_reason == ("length" if u.completion_tokens == 24 else "stop")


def test_sse_wire_format_ends_with_done(base_url):
    body = {"model": "tiny", "messages": MSG, "temperature": 0, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"}
    assert len({p["id"] for p in payloads}) == 1


def test_stop_string_cuts_the_reply(client):
    kw = dict(model="tiny", messages=MSG, temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    cut = full[: full.find(stop)]
    r = client.chat.completions.create(**kw, stop=[stop])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **kw, stop=stop, stream=True) if c.choices)
    assert streamed == cut


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny", messages=MSG, temperature=0.9, top_p=0.95, max_tokens=12)
    a = client.chat.completions.create(**kw, seed=7).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=7).choices[0].message.content
    c = client.chat.completions.create(**kw, seed=8).choices[0].message.content
    assert a == b and a != c


def test_system_and_developer_roles_are_the_same(client):
    kw = dict(model="tiny", temperature=0, max_tokens=8)
    a = client.chat.completions.create(messages=[{"role": "system", "content": "Be brief."}, *MSG], **kw)
    b = client.chat.completions.create(messages=[{"role": "developer", "content": "Be brief."}, *MSG], **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens > client.chat.completions.create(
        messages=MSG, **kw).usage.prompt_tokens


BAD = [
    # (request body, status, param, code)
    ({"model": "nope", "messages": MSG}, 404, "model", "model_not_found"),
    ({"model": "tiny"}, 400, "messages", "missing_required_parameter"),
    ({"model": "tiny", "messages": []}, 400, "messages", "invalid_value"),
    ({"model": "tiny", "messages": "hello"}, 400, "messages", "invalid_value"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
    ({"model": "tiny", "messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
    ({"model": "tiny", "messages": [{"content": "hi"}]}, 400, "messages[0].role", "missing_required_parameter"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages[0].content", "missing_required_parameter"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_value"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, 400,
     "messages[0].content[0]", "invalid_value"),
    ({"model": "tiny", "messages": MSG, "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ({"model": "tiny", "messages": MSG, "temperature": 3}, 400, "temperature", "invalid_value"),
    ({"model": "tiny", "messages": MSG, "max_tokens": 1.5}, 400, "max_tokens", "invalid_value"),
    ({"model": "tiny", "messages": MSG, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": "tiny", "messages": MSG, "stream": "yes"}, 400, "stream", "invalid_value"),
    ({"model": "tiny", "messages": MSG, "stop": [1]}, 400, "stop[0]", "invalid_value"),
    ({"model": "tiny", "messages": MSG, "n": 2}, 400, "n", "unsupported_value"),
    ({"model": 7, "messages": MSG}, 400, "model", "invalid_value"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 1500}]}, 400, "messages",
     "context_length_exceeded"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url()}}]}]}, 400, "messages[0].content[0]",
     "unsupported_image"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, 400,
     "messages[0].content[0]", "unsupported_audio"),
]


@pytest.mark.parametrize("body,status,param,code", BAD, ids=[f"{c}-{p}" for _, _, p, c in BAD])
def test_bad_requests_get_openai_errors(base_url, body, status, param, code):
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert len(err["message"]) > 20


def test_malformed_json_and_unknown_routes(base_url):
    r = httpx.post(f"{base_url}/v1/chat/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{base_url}/v1/chat/completions", content=b"[1, 2]", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] is None
    r = httpx.get(f"{base_url}/v1/completions", timeout=10)
    assert r.status_code == 404 and "/v1/chat/completions" in r.json()["error"]["message"]
    r = httpx.get(f"{base_url}/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_client_errors_surface_in_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 1500}])
    assert e.value.body["code"] == "context_length_exceeded" and "1024" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MSG, stream=True)


def test_configurable_limits_and_api_key(text_backend):
    from starlette.testclient import TestClient

    from mmtune.inference.models import TextChatModel

    small = TextChatModel(text_backend.model, text_backend.tokenizer, text_backend.template, "tiny",
                        max_prompt_tokens=16)
    app = create_app(small, "tiny", api_key="sekret", max_request_bytes=4096)
    with TestClient(app) as tc:
        auth = {"Authorization": "Bearer sekret"}
        assert tc.get("/v1/models").status_code == 401
        assert tc.get("/v1/models", headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] == \
            "invalid_api_key"
        assert tc.get("/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
        r = tc.post("/v1/chat/completions", headers=auth, json={"model": "tiny", "messages": [
            {"role": "user", "content": "one two three four five six seven eight nine ten"}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "limit of 16" in r.json()["error"]["message"]
        r = tc.post("/v1/chat/completions", headers=auth, json={"model": "tiny", "messages": [
            {"role": "user", "content": "x" * 5000}]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = tc.post("/v1/chat/completions", headers=auth, json={"model": "tiny", "max_tokens": 3,
                                                                 "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


@pytest.mark.slow
def test_image_and_audio_parts_reach_a_composed_model(composed_dir, tmp_path, run_server):
    """A composed model takes image_url and input_audio parts; the router's choice comes back."""
    import numpy as np
    import soundfile as sf

    from mmtune.inference.models import load_chat_model

    backend = load_chat_model(str(composed_dir))
    assert backend.modalities == {"text", "image", "audio"}
    wav = tmp_path / "tone.wav"
    sf.write(wav, (0.2 * np.sin(np.linspace(0, 2 * np.pi * 440, 16000))).astype("float32"), 16000)
    audio_b64 = base64.b64encode(wav.read_bytes()).decode()
    with run_server(create_app(backend, "mm")) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(*parts):
            content = [{"type": "text", "text": "What is this?"}, *parts]
            return c.chat.completions.create(model="mm", temperature=0, max_tokens=4,
                                             messages=[{"role": "user", "content": content}])

        text_only = ask()
        image = ask({"type": "image_url", "image_url": {"url": png_data_url((80, 48))}})
        audio = ask({"type": "input_audio", "input_audio": {"data": audio_b64, "format": "wav"}})
        assert (text_only.mmtune["route"], image.mmtune["route"], audio.mmtune["route"]) == \
            ("base model", "vision", "speech")
        # media become feature tokens: the prompt grows
        assert image.usage.prompt_tokens > text_only.usage.prompt_tokens
        assert audio.usage.prompt_tokens > text_only.usage.prompt_tokens
        for part, code in ((({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}),
                            "invalid_image_url"),
                           ({"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}, "invalid_base64"),
                           ({"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                + base64.b64encode(b"not a png").decode()}},
                            "invalid_image"),
                           ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF....").decode(),
                                                                    "format": "wav"}}, "invalid_audio")):
            with pytest.raises(openai.BadRequestError) as e:
                ask(part)
            assert e.value.body["code"] == code


@pytest.mark.slow
def test_serve_entry_point_in_a_subprocess(tiny_dir, tmp_path):
    """`python -m mmtune.serve.openai_server MODEL --port N` (what `mmtune serve` runs)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "mmtune.serve.openai_server", str(tiny_dir), "--port", str(port),
                             "--model-name", "tiny", "--max-tokens", "6"], cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="tiny", messages=MSG, temperature=0)
        assert r.usage.completion_tokens <= 6 and r.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(15)
