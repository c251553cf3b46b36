"""One session behind the three front ends: the same conversation gives the same replies through
terminal chat (the REPL), the web UI's chat handler and the server's endpoint, for a text model
and for a composed model with an image, with seeded sampling; and the replies equal the
generation loop's own output for the rendered prompt."""

from __future__ import annotations

import base64

import pytest

from mmtune.data.templates import get_template
from mmtune.inference.generate import generate_text
from mmtune.inference.models import ComposedChatModel, TextChatModel
from mmtune.inference.repl import run_terminal_chat
from mmtune.inference.session import ChatSession
from mmtune.inference.turns import GenerationSettings
from mmtune.serve.web import reply_to

pytest.importorskip("fastapi")

SYSTEM = "Be brief."
QUESTIONS = ["What is 3 + 4?", "And 5 + 4?"]
SETTINGS = GenerationSettings(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)


def terminal(model, image=None) -> list[str]:
    session = ChatSession(model, system_prompt=SYSTEM, settings=SETTINGS)
    script = iter([*QUESTIONS, "/exit"])
    run_terminal_chat(session, input_fn=lambda _: next(script), print_fn=lambda *a, **k: None,
                      images=[str(image)] if image else ())
    return [t.text for t in session.history if t.role == "assistant"]


def web(model, image=None) -> list[str]:
    hist, out = [], []
    for i, q in enumerate(QUESTIONS):
        hist.append({"role": "user", "text": q, "images": [str(image)] if image and i == 0 else [], "audios": []})
        out.append(reply_to(model, hist, SYSTEM, SETTINGS).text())
        hist.append({"role": "assistant", "text": out[-1], "notes": []})
    return out


def server(model, image=None) -> list[str]:
    from starlette.testclient import TestClient

    from mmtune.serve.openai_server import create_app

    messages, out = [{"role": "system", "content": SYSTEM}], []
    with TestClient(create_app(model, "m")) as tc:
        for i, q in enumerate(QUESTIONS):
            content = q
            if image and i == 0:
                url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
                content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q}]
            messages.append({"role": "user", "content": content})
            r = tc.post("/v1/chat/completions", json={
                "model": "m", "messages": messages, "max_tokens": SETTINGS.max_new_tokens,
                "temperature": SETTINGS.temperature, "top_p": SETTINGS.top_p, "seed": SETTINGS.seed})
            assert r.status_code == 200, r.text
            out.append(r.json()["choices"][0]["message"]["content"])
            messages.append({"role": "assistant", "content": out[-1]})
    return out


def test_text_model_same_replies_everywhere(tiny_lm):
    model = TextChatModel(*tiny_lm, get_template("chatml", tiny_lm[1]))
    replies = terminal(model)
    assert web(model) == replies and server(model) == replies
    assert all(replies) and replies[0] != replies[1]
    # the reference: the loop itself on the rendered second prompt
    tpl = model.template
    ids = tpl.prompt_ids([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]},
                          {"role": "assistant", "content": replies[0]}, {"role": "user", "content": QUESTIONS[1]}])
    assert generate_text(model.model, model.tokenizer, ids, 12, 0.9, 0.95, tpl.stop_token_ids, 7) == replies[1]


def test_composed_model_same_replies_everywhere(composed, image_file):
    model = ComposedChatModel(composed, get_template("auto", composed.tokenizer))
    replies = terminal(model, image_file)
    assert web(model, image_file) == replies and server(model, image_file) == replies
    assert all(replies)
    # the image mattered: without it the first reply differs
    assert terminal(model)[0] != replies[0]
