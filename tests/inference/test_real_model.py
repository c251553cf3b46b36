"""The generation loop and the session on a real pretrained model, builtin:smollm2-135m-instruct
(SmolLM2-135M-Instruct, chatml with a default system prompt), fp32: greedy tokens equal
``model.generate(do_sample=False)``, the KV-cache logits equal a full forward's, and terminal chat
and the server give the same reply. Slow (about 15 s on one thread, 1.0 GB peak RSS)."""

from __future__ import annotations

import pytest
import torch

from mmtune.inference.generate import decoder_for, iter_token_ids
from mmtune.inference.models import TextChatModel
from mmtune.inference.repl import run_terminal_chat
from mmtune.inference.session import ChatSession
from mmtune.inference.turns import GenerationSettings

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France? Answer in one sentence."


def test_smollm2_generation_and_session_parity():
    from starlette.testclient import TestClient

    from mmtune.serve.openai_server import create_app

    chat = TextChatModel.from_dir("builtin:smollm2-135m-instruct", name="smollm2")
    model, tpl = chat.model.float(), chat.template
    ids = tpl.prompt_ids([{"role": "user", "content": QUESTION}])
    stops = tpl.stop_token_ids
    ours = list(iter_token_ids(model, ids, 32, stop_token_ids=stops))
    ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=32, do_sample=False, eos_token_id=stops,
                         pad_token_id=stops[-1])[0, len(ids):].tolist()
    assert ours == (ref[:-1] if ref and ref[-1] in stops else ref)
    assert "paris" in chat.tokenizer.decode(ours).lower()
    seq = list(ids)
    with decoder_for(model) as dec, torch.no_grad():
        logits = dec.prefill(ids)
        for tok in ours[:4]:
            full = model(input_ids=torch.tensor([seq])).logits[0, -1]
            assert torch.allclose(logits, full, atol=2e-4, rtol=0)  # measured 2.7e-5..4.2e-5, max |logit| ~30
            seq.append(tok)
            logits = dec.step(tok)
    settings = GenerationSettings(24, 0.0, 1.0)
    session = ChatSession(chat, settings=settings)
    script = iter([QUESTION, "/exit"])
    run_terminal_chat(session, input_fn=lambda _: next(script), print_fn=lambda *a, **k: None)
    with TestClient(create_app(chat)) as tc:
        r = tc.post("/v1/chat/completions", json={"model": "smollm2", "temperature": 0, "max_tokens": 24,
                                                  "messages": [{"role": "user", "content": QUESTION}]})
    assert r.json()["choices"][0]["message"]["content"] == session.history[-1].text
    assert session.history[-1].text == chat.tokenizer.decode(ours[:24], skip_special_tokens=True)
