"""The real-model demo (`mmtune demo`, mmtune.real_demo): its generation and loss helpers against
the references they must equal (on the tiny model), and the full run's measured floors (slow)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmtune.data.templates import get_template
from mmtune.evaluation import greedy_answers
from mmtune.models.tiny import ensure_tiny
from mmtune.real_demo import answer_loss, greedy_ids
from mmtune.train.objectives import shifted_token_loss

PROMPTS = [[{"role": "user", "content": t}] for t in ("What is 7 + 12?", "Reverse the words: red cat sun",
                                                      "hello", "The capital of Peru is")]


@pytest.fixture(scope="module")
def tiny():
    path = ensure_tiny()
    model = AutoModelForCausalLM.from_pretrained(path)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # noise makes the random model's greedy output varied
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    tok = AutoTokenizer.from_pretrained(path)
    return model.eval(), tok, get_template("auto", tok)


def test_greedy_ids_decode_to_the_evaluation_answers(tiny):
    model, tok, template = tiny
    got = greedy_ids(model, template, PROMPTS, max_new_tokens=12, batch_size=3)
    ref = greedy_answers(model, tok, template, PROMPTS, max_new_tokens=12, batch_size=3)
    assert [tok.decode(ids, skip_special_tokens=True) for ids, _ in got] == ref
    stops = set(template.stop_token_ids)
    for ids, stopped in got:
        assert not stops & set(ids) and (stopped or len(ids) == 12)


def test_answer_loss_is_the_token_weighted_loss_of_the_answers(tiny):
    """Equal to the training objective's loss with labels on exactly the answer tokens (plus the
    terminator when the answer stopped), pooled over all answers."""
    model, tok, template = tiny
    answers = [(tok("red cat", add_special_tokens=False)["input_ids"], True),
               (tok("nineteen is the answer", add_special_tokens=False)["input_ids"], False),
               ([], True), (tok(" Lima", add_special_tokens=False)["input_ids"], False)]
    end = template.stop_token_ids[0]
    total, count = 0.0, 0
    for msgs, (ids, stopped) in zip(PROMPTS, answers):
        prompt = template.prompt_ids(msgs)
        target = ids + ([end] if stopped else [])
        x = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        with torch.no_grad():
            loss, n = shifted_token_loss(model(input_ids=x).logits, labels)
        total, count = total + float(loss), count + int(n)
    assert answer_loss(model, template, PROMPTS, answers) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # about 8 min on 2 idle threads, over 15 on one shared core
def test_real_demo_learns_the_skills_and_keeps_general_ability(tmp_path):
    """The full `mmtune demo` on SmolLM2-135M-Instruct. Floors from the measured run (README):
    held-out exact match <10% before and >=90% after over the skills' 120 items, general-chat loss
    up by at most 5%, and at most one general question lost. Run with -s to see the report."""
    from mmtune.real_demo import DEMO_SKILLS, N_EVAL, run_real_demo

    s = run_real_demo(str(tmp_path))
    before, after = s["before"], s["after"]
    assert s["skills"] == list(DEMO_SKILLS) and after["n"] == N_EVAL * len(DEMO_SKILLS)
    assert before["exact_match"] < 0.1
    assert after["exact_match"] >= 0.9
    assert s["general_chat_loss"]["ratio"] <= 1.05
    hits = [(g["hit_before"], g["hit_after"]) for g in s["general_questions"]]
    assert sum(a for _, a in hits) >= sum(b for b, _ in hits) - 1
    assert all(f"| {t} |" in (tmp_path / "report.md").read_text() for t in DEMO_SKILLS)
