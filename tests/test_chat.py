"""Streaming generation, chat sessions, the terminal REPL and loading models for chat."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmtune.config import AdapterConfig
from mmtune.errors import MMTuneError
from mmtune.export import export_checkpoint
from mmtune.inference.generate import generate_stream, generate_text, iter_token_ids
from mmtune.inference.models import TextChatModel
from mmtune.inference.repl import run_terminal_chat
from mmtune.inference.sampling import top_p_filter
from mmtune.inference.session import ChatSession
from mmtune.inference.turns import GenerationSettings
from mmtune.models.adapters import apply_adapter
from mmtune.models.tiny import build_tiny
from mmtune.models.trained import load_for_chat


class ChatML:
    """A minimal ChatML renderer with the chat-template interface a chat model expects."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_token_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
        self.rendered: list[list[dict]] = []

    def render_prompt(self, messages):
        self.rendered.append([dict(m) for m in messages])
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return self.tokenizer.encode(text + "<|im_start|>assistant\n", add_special_tokens=False)

    prompt_ids = render_prompt


def chat(model, tok, template=None, system_prompt=None, **settings) -> ChatSession:
    return ChatSession(TextChatModel(model, tok, template), system_prompt=system_prompt,
                       settings=GenerationSettings(**settings))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    """The random tiny model repeats one token; noise on the weights makes its greedy output
    varied, so that comparing token sequences means something."""
    m = AutoModelForCausalLM.from_pretrained(tiny_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def _prompt(tok, text="What is 7 + 12?"):
    return ChatML(tok).render_prompt([{"role": "user", "content": text}])


def test_greedy_stream_equals_model_generate(model, tok):
    for text in ("What is 7 + 12?", "Reverse the words: red cat sun"):
        prompt = _prompt(tok, text)
        ours = list(iter_token_ids(model, prompt, 32, temperature=0.0, stop_token_ids=[0, 2]))
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=[0, 2],
                             pad_token_id=0)[0, len(prompt):].tolist()
        if ref and ref[-1] in (0, 2):
            ref = ref[:-1]  # generate keeps the stop token; we do not
        assert ours == ref
        assert len(set(ours)) >= 5  # a varied sequence, not one repeated token
        pieces = list(generate_stream(model, tok, prompt, 32, temperature=0.0, stop_token_ids=[0, 2]))
        assert len(pieces) > 1
        assert "".join(pieces) == tok.decode(ours, skip_special_tokens=True)
    assert generate_text(model, tok, prompt, 8, stop_token_ids=[0, 2]) == tok.decode(ours[:8], skip_special_tokens=True)


def test_stop_token_ends_generation(model, tok):
    prompt = _prompt(tok)
    free = list(iter_token_ids(model, prompt, 20))
    stop = free[5]
    first = free.index(stop)
    assert list(iter_token_ids(model, prompt, 20, stop_token_ids=[stop])) == free[:first]


def test_seeded_sampling_is_reproducible(model, tok):
    prompt = _prompt(tok)
    a = list(iter_token_ids(model, prompt, 30, temperature=1.0, top_p=0.95, seed=1))
    b = list(iter_token_ids(model, prompt, 30, temperature=1.0, top_p=0.95, seed=1))
    c = list(iter_token_ids(model, prompt, 30, temperature=1.0, top_p=0.95, seed=2))
    assert a == b and a != c
    greedy = list(iter_token_ids(model, prompt, 30))
    # a nucleus smaller than the top token's probability leaves only the argmax
    assert list(iter_token_ids(model, prompt, 30, temperature=1.0, top_p=1e-6, seed=3)) == greedy


def test_top_p_filter_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    out = top_p_filter(probs, 0.8)
    assert torch.allclose(out, torch.tensor([0.0, 0.625, 0.0, 0.375]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    # sampling frequencies follow the filtered distribution
    draws = torch.multinomial(out, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert torch.allclose(freq, out, atol=0.015)


def test_generation_restores_training_mode(model, tok):
    model.train()
    list(iter_token_ids(model, _prompt(tok), 3))
    assert model.training
    model.eval()


def test_chat_session_keeps_history(model, tok):
    template = ChatML(tok)
    session = chat(model, tok, template, system_prompt="Be brief.", temperature=0.0, max_new_tokens=8)
    reply1 = "".join(session.send("hi"))
    reply2 = "".join(session.send("again"))
    assert [m.role for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert [session.history[1].text, session.history[3].text] == [reply1, reply2]
    assert template.rendered[-1] == [{"role": "system", "content": "Be brief."}] + [
        t.as_message() for t in session.history[:3]]
    # the second turn saw the first reply: its prompt is the full conversation
    expected = ChatML(tok).render_prompt(template.rendered[-1])
    assert generate_text(model, tok, expected, 8, stop_token_ids=template.stop_token_ids) == reply2
    session.reset()
    assert session.history == [] and session.system_prompt == "Be brief."
    session.set_system(None)
    assert session.messages() == []


def test_chat_session_drops_oldest_turns_when_context_is_full(model, tok):
    session = chat(model, tok, ChatML(tok), temperature=0.0, max_new_tokens=4)
    session.model.context_length = 60
    for i in range(6):
        "".join(session.send(f"message number {i} with some words"))
    assert session.history[0].text.startswith("message number") and len(session.history) < 12
    assert session.history[-2].text == "message number 5 with some words"
    before = [copy.deepcopy(m) for m in session.history]
    with pytest.raises(MMTuneError, match="too long"):
        session.send("word " * 100)
    assert session.history == before  # the rejected message is not kept and nothing is dropped for it


def test_terminal_chat_reset_system_and_exit(model, tok):
    session = chat(model, tok, ChatML(tok), temperature=0.0, max_new_tokens=6)
    script = iter(["hello", "/reset", "", "/system Answer in one word.", "what?", "/bogus", "/exit", "never read"])
    asked, printed = [], []

    def input_fn(prompt):
        asked.append(prompt)
        return next(script)

    def print_fn(*args, end="\n", flush=False):
        printed.append(" ".join(str(a) for a in args) + end)

    run_terminal_chat(session, input_fn=input_fn, print_fn=print_fn)
    assert len(asked) == 7  # stopped at /exit
    out = "".join(printed)
    assert "[conversation reset]" in out and "unknown command /bogus" in out
    assert session.system_prompt == "Answer in one word."
    assert [m.text for m in session.history if m.role == "user"] == ["what?"]  # hello was reset
    reply = session.history[-1].text
    assert reply and f"assistant> {reply}\n" in out  # streamed pieces, then a newline


def test_terminal_chat_ends_on_eof(model, tok):
    session = chat(model, tok, ChatML(tok), temperature=0.0, max_new_tokens=2)

    def input_fn(prompt):
        raise EOFError

    run_terminal_chat(session, input_fn=input_fn, print_fn=lambda *a, **k: None)
    assert session.history == []


def test_default_template_is_the_tokenizers_chatml(model, tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 1 + 2?"},
                {"role": "assistant", "content": "3"}, {"role": "user", "content": "And 2 + 2?"}]
    session = chat(model, tok)
    assert session.model.template.render_prompt(messages) == ChatML(tok).render_prompt(messages)
    assert set(session.model.template.stop_token_ids) == {0, 2}


def test_load_for_chat_from_checkpoint_adapter_and_base(tmp_path, tiny_dir, tok):
    peft_model = apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), AdapterConfig(r=4, dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.02)
    ckpt = tmp_path / "run" / "final"
    peft_model.save_pretrained(ckpt / "model")
    tok.save_pretrained(ckpt / "tokenizer")
    (ckpt / "meta.json").write_text(json.dumps({"step": 3, "adapter": "lora", "base_model": str(tiny_dir)}))
    exported = export_checkpoint(ckpt, tmp_path / "exported")
    ids = torch.tensor([_prompt(tok)])
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
    for args in ((tmp_path / "run",), (exported,), (tiny_dir, ckpt), (tiny_dir, exported)):
        m, t = load_for_chat(*args, device="cpu")
        assert not m.training and t.encode("hi") == tok.encode("hi")
        with torch.no_grad():
            assert torch.equal(m(input_ids=ids).logits, expected), args
    # generation through the PEFT wrapper (KV cache, logits_to_keep) matches transformers' greedy
    prompt = _prompt(tok)
    ref = m.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                     pad_token_id=0)[0, len(prompt):].tolist()
    assert list(iter_token_ids(m, prompt, 6)) == ref
    base, _ = load_for_chat(tiny_dir, device="cpu")
    assert not hasattr(base, "peft_config")
    with pytest.raises(MMTuneError, match="has no adapter_config.json"):
        load_for_chat(tiny_dir, adapter_dir=tmp_path)
    with pytest.raises(MMTuneError, match="does not exist"):
        load_for_chat(tmp_path / "nothing")
