"""The real-model demo's built-in skills (mmtune.data.skills) and general-ability probes
(mmtune.data.general): deterministic, answers that follow the stated rule, held-out items
disjoint from training, a table the training data teaches, and base rates that leave room."""

from __future__ import annotations

import datetime
import re
from collections import Counter

import pytest

from mmtune.data.builtin import builtin_names, builtin_records
from mmtune.data.general import (
    GENERAL_CHAT_PROMPTS,
    GENERAL_QUESTIONS,
    GENERAL_REPLAY_PROMPTS,
    general_chat_records,
    keyword_hit,
)
from mmtune.data.skills import GLORP, N_RESERVED, SKILLS, reserved_questions, skill_items, skill_mix


@pytest.mark.parametrize("skill", SKILLS)
def test_items_are_deterministic_and_seeded(skill):
    assert skill_items(skill, "train", 50) == skill_items(skill, "train", 50)
    assert skill_items(skill, "train", 50, seed=1) != skill_items(skill, "train", 50)
    assert skill_items(skill, "eval", 50) == skill_items(skill, "eval", 50)


def _check_answer(skill: str, question: str, answer: str) -> bool:
    """An independent implementation of each rule."""
    if skill == "iso-date":
        text = re.fullmatch(r"Write (.+) as an ISO date\.", question).group(1)
        return datetime.datetime.strptime(text, "%B %d, %Y").date().isoformat() == answer
    if skill == "km-to-m":
        km = re.fullmatch(r"Convert ([0-9.]+) km to metres\.", question).group(1)
        return answer == f"{round(float(km) * 1000)} m"
    words = question.removeprefix("Translate to Glorp: ").split()
    return answer.split() == [GLORP[w] for w in words]


@pytest.mark.parametrize("skill", SKILLS)
@pytest.mark.parametrize("split", ["train", "eval"])
def test_answers_follow_the_rule(skill, split):
    rows = skill_items(skill, split, 300)
    assert all(r["task"] == skill and r["input"] == "" for r in rows)
    bad = [r for r in rows if not _check_answer(skill, r["instruction"], r["output"])]
    assert not bad, bad[:3]


@pytest.mark.parametrize("skill", SKILLS)
def test_held_out_questions_are_disjoint_from_training(skill):
    train = {r["instruction"] for r in skill_items(skill, "train", 2000)}
    held = [r["instruction"] for r in skill_items(skill, "eval", N_RESERVED)]
    assert len(held) == len(set(held)) == N_RESERVED
    assert set(held) == set(reserved_questions(skill))
    assert not train & set(held)
    # the other seeds' training sets avoid the same held-out pool
    assert not {r["instruction"] for r in skill_items(skill, "train", 500, seed=3)} & set(held)


def test_glorp_table_is_taught_by_the_training_data():
    """Every Glorp word occurs often in the 400 training items, no Glorp word is one of the English
    words, and every held-out sentence is new: held-out exact match needs the table, applied to
    unseen combinations."""
    train = skill_items("glorp", "train", 400)
    counts = Counter(w for r in train for w in r["output"].split())
    assert set(counts) == set(GLORP.values()) and min(counts.values()) >= 40
    assert not set(GLORP) & set(GLORP.values())
    assert len(set(GLORP.values())) == len(GLORP)  # a bijection: the table can be read back


def test_base_rates_are_low():
    """Answers that need no skill score far below the demo's 10% "before" ceiling: the most
    common training answer, the question's own numbers copied, and the English words echoed."""
    for skill in SKILLS:
        train, held = skill_items(skill, "train", 400), skill_items(skill, "eval", 100)
        top = Counter(r["output"] for r in train).most_common(1)[0][0]
        assert sum(r["output"] == top for r in held) / len(held) < 0.02
        echo = [" ".join(re.findall(r"[0-9]+|[a-z]+", r["instruction"].split(":")[-1])) for r in held]
        assert sum(e == r["output"] for e, r in zip(echo, held)) == 0
    months = Counter(r["output"][5:7] for r in skill_items("iso-date", "eval", 300))
    assert len(months) == 12 and max(months.values()) / 300 < 0.15


def test_builtin_sources():
    train, held = builtin_records("skills"), builtin_records("skills-eval")
    assert len(train) == 1200 and len(held) == 300
    assert Counter(r["task"] for r in held) == {s: 100 for s in SKILLS}
    assert train == skill_mix("train", 400)
    assert builtin_records("glorp-eval") == skill_items("glorp", "eval", 100)
    for name in ("skills", "skills-eval", *SKILLS, *(f"{s}-eval" for s in SKILLS)):
        assert name in builtin_names()
    with pytest.raises(ValueError, match="valid: iso-date"):
        skill_items("morse", "train", 1)


def test_keyword_check():
    assert keyword_hit("The capital of France is Paris.", ("Paris",))
    assert keyword_hit("It freezes at 0 degrees.", ("0", "zero"))
    assert not keyword_hit("It freezes at 100 degrees.", ("0", "zero"))  # whole words only
    assert not keyword_hit("Parisian food", ("Paris",))
    assert keyword_hit("plants take in co2", ("carbon dioxide", "CO2"))


def test_general_sets_are_disjoint_from_each_other_and_from_the_skills():
    questions = [q for q, _ in GENERAL_QUESTIONS]
    assert len(set(questions)) == len(questions) and len(set(GENERAL_CHAT_PROMPTS)) == len(GENERAL_CHAT_PROMPTS)
    assert not set(questions) & set(GENERAL_CHAT_PROMPTS)
    # the replay prompts (trained on) share nothing with either held-out general set
    assert len(set(GENERAL_REPLAY_PROMPTS)) == len(GENERAL_REPLAY_PROMPTS)
    assert not set(GENERAL_REPLAY_PROMPTS) & (set(questions) | set(GENERAL_CHAT_PROMPTS))
    skill_words = ("ISO date", "km to metres", "Glorp")
    everything = (*questions, *GENERAL_CHAT_PROMPTS, *GENERAL_REPLAY_PROMPTS)
    assert not [p for p in everything if any(w in p for w in skill_words)]
    assert all(k for _, k in GENERAL_QUESTIONS)
    recs = general_chat_records([f"answer {i}" for i in range(len(GENERAL_CHAT_PROMPTS))])
    assert recs[3]["messages"] == [{"role": "user", "content": GENERAL_CHAT_PROMPTS[3]},
                                   {"role": "assistant", "content": "answer 3"}]
    with pytest.raises(ValueError, match="answers"):
        general_chat_records(["x"])
