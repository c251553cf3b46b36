"""Built-in skills for a real pretrained chat model: rules with checkable answers that
SmolLM2-135M-Instruct does not follow out of the box but learns from a few hundred examples.

Skills (``SKILLS``)
- ``iso-date``: "Write March 5, 2019 as an ISO date." -> "2019-03-05". The rule is ISO 8601's
  YYYY-MM-DD: copy the year, map the month name to its number, zero-pad month and day. The
  base model repeats the date or explains ISO 8601 instead.
- ``km-to-m``: "Convert 73.25 km to metres." -> "73250 m". Shift the decimal point three places
  (0, 1 or 2 decimals given; no leading zeros). The base model starts an explanation.
- ``glorp``: "Translate to Glorp: red cat sun" -> "ruk zamo tif". A made-up word-for-word
  language of 24 words (``GLORP``): the dictionary is taught by the training data only (every
  word occurs there many times), the held-out items are word sequences never seen in training,
  so they test applying the learnt table to new sentences, not recall of a sentence. Harder
  than the other two: in the demo's CPU budget (64 LoRA steps of 512 tokens with the other
  skills) SmolLM2-135M got 0% of it, so the demo teaches ``iso-date`` and ``km-to-m`` only
  (:data:`mmtune.real_demo.DEMO_SKILLS`); it is there for longer runs.

Train and held-out items never share a question: held-out questions are drawn from a reserved
set (its own seed) that the train generator skips. Everything is deterministic given the seed.
"""

from __future__ import annotations

import random

MONTHS = ("January February March April May June July August September October November "
          "December").split()
#: The made-up Glorp lexicon: English word -> Glorp word (no Glorp word is an English word).
GLORP = {
    "red": "ruk", "blue": "vesh", "green": "plom", "cat": "zamo", "dog": "kiv", "sun": "tif",
    "moon": "yarn", "tree": "bolu", "fish": "snee", "bird": "quap", "star": "dov", "rain": "mizo",
    "big": "grut", "small": "pim", "old": "hadu", "new": "jeel", "sees": "wom", "eats": "flak",
    "likes": "ozzi", "the": "ka", "a": "ti", "and": "ub", "river": "nalo", "house": "drem",
}
SKILLS = ("iso-date", "km-to-m", "glorp")
#: Size of each skill's reserved held-out set.
N_RESERVED = 300


def _iso_date(rng: random.Random) -> tuple[str, str]:
    y, m, d = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
    return f"Write {MONTHS[m - 1]} {d}, {y} as an ISO date.", f"{y}-{m:02d}-{d:02d}"


def _km_to_m(rng: random.Random) -> tuple[str, str]:
    places = rng.choice((0, 1, 2))
    whole, frac = rng.randint(1, 99), rng.randint(0, 10 ** places - 1)
    km = f"{whole}.{frac:0{places}d}" if places else str(whole)
    return f"Convert {km} km to metres.", f"{whole * 1000 + frac * 10 ** (3 - places)} m"


def _glorp(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(sorted(GLORP)) for _ in range(rng.randint(3, 5))]
    return f"Translate to Glorp: {' '.join(words)}", " ".join(GLORP[w] for w in words)


GENERATORS = {"iso-date": _iso_date, "km-to-m": _km_to_m, "glorp": _glorp}


def reserved_questions(skill: str) -> list[str]:
    """The held-out question pool of ``skill`` (distinct questions, fixed order)."""
    gen, rng = GENERATORS[skill], random.Random(f"reserved-skill-{skill}")
    seen: dict[str, None] = {}
    while len(seen) < N_RESERVED:
        seen.setdefault(gen(rng)[0])
    return list(seen)


def skill_items(skill: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` alpaca records {instruction, input, output, task} of ``skill``.

    ``split="eval"`` gives the first ``n`` (at most ``N_RESERVED``) questions of the held-out pool
    (the same for every seed); ``"train"`` gives questions outside that pool, drawn with ``seed``
    (repeats allowed, as in any sampled data set).
    """
    if skill not in GENERATORS:
        raise ValueError(f"unknown built-in skill {skill!r}; valid: {', '.join(SKILLS)}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    gen = GENERATORS[skill]
    if split == "eval":
        answers = {}
        rng = random.Random(f"reserved-skill-{skill}")
        while len(answers) < min(n, N_RESERVED):
            q, a = gen(rng)
            answers.setdefault(q, a)
        return [{"instruction": q, "input": "", "output": a, "task": skill} for q, a in answers.items()]
    reserved = set(reserved_questions(skill))
    rng = random.Random(f"{seed}-train-skill-{skill}")
    out = []
    while len(out) < n:
        q, a = gen(rng)
        if q not in reserved:
            out.append({"instruction": q, "input": "", "output": a, "task": skill})
    return out


def skill_mix(split: str, n_per_skill: int, seed: int = 0, skills=SKILLS) -> list[dict]:
    """Records of every skill, shuffled together (deterministic)."""
    rows = [r for s in skills for r in skill_items(s, split, n_per_skill, seed)]
    random.Random(f"skill-mix-{seed}-{split}").shuffle(rows)
    return rows
