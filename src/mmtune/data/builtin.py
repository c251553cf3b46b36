"""Built-in data, generated in code (no downloads): a small corpus for continued pretraining
and instruction tasks whose answers can be checked by exact match.

Tasks
- ``add``: "What is 7 + 12?" -> "19" (operands 0..30).
- ``reverse``: "Reverse the words: red cat sun" -> "sun cat red" (3-4 words).
- ``capital``: "What is the capital of Peru?" -> "Lima". The facts appear in the pretraining
  corpus; SFT only teaches the question format on some countries, the held-out countries
  test whether the model can use what it read during pretraining.

Everything is deterministic given the seed. Train and held-out eval items never overlap.
"""

from __future__ import annotations

import random

from .skills import SKILLS, skill_items, skill_mix

CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Peru": "Lima",
    "Japan": "Tokyo", "Egypt": "Cairo", "Kenya": "Nairobi", "Chile": "Santiago", "Cuba": "Havana",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Turkey": "Ankara", "Russia": "Moscow", "China": "Beijing", "India": "Delhi", "Iran": "Tehran",
    "Iraq": "Baghdad", "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Ghana": "Accra",
    "Austria": "Vienna", "Hungary": "Budapest", "Portugal": "Lisbon", "Ireland": "Dublin", "Denmark": "Copenhagen",
    "Belgium": "Brussels", "Nepal": "Kathmandu", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Qatar": "Doha",
    "Oman": "Muscat", "Mali": "Bamako", "Chad": "Ndjamena", "Fiji": "Suva", "Latvia": "Riga",
}
WORDS = ("red blue green cat dog sun moon tree fish bird star rain snow wind fire rock lake hill road ship "
         "king queen book door cake milk bell coin lamp rose").split()
TASKS = ("add", "reverse", "capital")


def _add_item(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 30), rng.randint(0, 30)
    return f"What is {a} + {b}?", str(a + b)


def _reverse_item(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 4))
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def _split_countries(seed: int = 0) -> tuple[list[str], list[str]]:
    names = sorted(CAPITALS)
    random.Random(seed).shuffle(names)
    k = len(names) * 3 // 4
    return names[:k], names[k:]


def task_items(task: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` items of ``task`` as alpaca records {instruction, input, output, task}.

    ``split`` is "train" or "eval"; the two never share a question.
    """
    if task not in TASKS:
        raise ValueError(f"unknown built-in task {task!r}; valid: {', '.join(TASKS)}")
    if task == "capital":
        train_c, eval_c = _split_countries()
        pool = train_c if split == "train" else eval_c
        rng = random.Random(f"{seed}-{split}-capital")
        out = [dict(instruction=f"What is the capital of {c}?", input="", output=CAPITALS[c], task=task)
               for c in (rng.choice(pool) for _ in range(n))]
        return out
    gen = _add_item if task == "add" else _reverse_item
    # Eval questions come from a fixed reserved set; train questions avoid it.
    reserved_rng = random.Random(f"reserved-{task}")
    reserved = {gen(reserved_rng)[0] for _ in range(200)}
    rng = random.Random(f"{seed}-{split}-{task}")
    out, seen = [], set()
    while len(out) < n:
        q, a = gen(rng)
        if (q in reserved) != (split == "eval"):
            continue
        if split == "eval" and q in seen:
            continue
        seen.add(q)
        out.append(dict(instruction=q, input="", output=a, task=task))
        if split == "eval" and len(seen) == len(reserved):
            break
    return out


def instruction_mix(split: str, n_per_task: int, seed: int = 0, tasks=TASKS) -> list[dict]:
    rows = [r for t in tasks for r in task_items(t, split, n_per_task, seed)]
    random.Random(f"mix-{seed}-{split}").shuffle(rows)
    return rows


def _wrong_answer(item: dict, rng: random.Random) -> str:
    """A plausible wrong answer for a built-in item (the rejected side of a preference pair)."""
    task, right = item["task"], item["output"]
    if task == "add":
        return str(max(0, int(right) + rng.choice([-10, -2, -1, 1, 2, 10])))
    if task == "reverse":
        words = right.split()
        wrong = list(reversed(words))  # the original order: a typical mistake
        return " ".join(wrong if wrong != words else words[1:] + words[:1])
    return rng.choice([c for c in CAPITALS.values() if c != right])


def preference_pairs(split: str, n_per_task: int, seed: int = 0, tasks=TASKS) -> list[dict]:
    """Preference records {prompt, chosen, rejected, task}: the correct answer is preferred over a
    wrong one (the Phi-4 recipe's "corrected output preferred over the wrong one")."""
    rng = random.Random(f"pairs-{seed}-{split}")
    rows = []
    for item in instruction_mix(split, n_per_task, seed + 1, tasks):
        rows.append({"prompt": item["instruction"], "chosen": item["output"],
                     "rejected": _wrong_answer(item, rng), "task": item["task"]})
    return rows


def cot_items(split: str, n: int, seed: int = 0) -> list[dict]:
    """Addition with a chain-of-thought rationale before the final answer ("Answer: X")."""
    rows = []
    for item in task_items("add", split, n, seed):
        a, b = (int(x) for x in item["instruction"][len("What is "):-1].split(" + "))
        ta, tb, oa, ob = a // 10 * 10, b // 10 * 10, a % 10, b % 10
        rationale = f"Tens: {ta} + {tb} = {ta + tb}. Ones: {oa} + {ob} = {oa + ob}. {ta + tb} + {oa + ob} = {a + b}."
        rows.append({**item, "output": f"{rationale} Answer: {a + b}", "answer": str(a + b), "task": "cot-add"})
    return rows


def corpus(n_docs: int = 600, seed: int = 0) -> list[str]:
    """Short documents for continued pretraining: capital facts, counting, simple sentences."""
    rng = random.Random(f"corpus-{seed}")
    templates = [
        "The capital of {c} is {k}.",
        "{k} is the capital city of {c}.",
        "People in {c} call {k} their capital.",
    ]
    docs = []
    for i in range(n_docs):
        kind = i % 4
        if kind == 0:
            c = rng.choice(sorted(CAPITALS))
            docs.append(" ".join(rng.choice(templates).format(c=c, k=CAPITALS[c]) for _ in range(2)))
        elif kind == 1:
            a, b = rng.randint(0, 30), rng.randint(0, 30)
            docs.append(f"{a} plus {b} equals {a + b}. The sum of {a} and {b} is {a + b}.")
        elif kind == 2:
            w = rng.sample(WORDS, 4)
            docs.append(f"The {w[0]} and the {w[1]} saw a {w[2]} near the {w[3]}.")
        else:
            start = rng.randint(0, 20)
            docs.append("Counting: " + " ".join(str(start + j) for j in range(8)) + ".")
    return docs


def builtin_records(name: str, seed: int = 0) -> list[dict]:
    """Records for ``builtin:NAME`` sources.

    Names: ``corpus`` (text documents), ``instruct-text`` (the training questions and answers
    as plain text), ``instruct`` / ``instruct-eval`` (all tasks),
    ``TASK`` / ``TASK-eval`` for one task (add, reverse, capital), ``prefs`` / ``prefs-eval``
    (preference pairs), ``cot-add`` / ``cot-add-eval`` (addition with a rationale),
    ``instruct-cot`` / ``instruct-cot-eval`` (all tasks, addition with a rationale),
    ``skills`` / ``skills-eval`` and ``SKILL`` / ``SKILL-eval`` (the real-model demo's skills,
    :mod:`mmtune.data.skills`: 400 train / 100 held-out items per skill).
    """
    if name == "corpus":
        return [{"text": d} for d in corpus(seed=seed)]
    if name == "instruct-text":  # the training questions as plain text, for continued pretraining
        return [{"text": f"Question: {r['instruction']} Answer: {r['output']}"}
                for r in instruction_mix("train", 400, seed)]
    split = "eval" if name.endswith("-eval") else "train"
    base = name[: -len("-eval")] if split == "eval" else name
    n = 60 if split == "eval" else 400
    if base == "prefs":
        return preference_pairs(split, n, seed)
    if base == "cot-add":
        return cot_items(split, n, seed)
    if base == "instruct-cot":  # the instruct mix with addition answered step by step
        rows = [r for t in TASKS if t != "add" for r in task_items(t, split, n, seed)] + cot_items(split, n, seed)
        random.Random(f"mix-cot-{seed}-{split}").shuffle(rows)
        return rows
    if base == "instruct":
        return instruction_mix(split, n, seed)
    if base in TASKS:
        return task_items(base, split, n, seed)

    if base == "skills":
        return skill_mix(split, 400 if split == "train" else 100, seed)
    if base in SKILLS:
        return skill_items(base, split, 400 if split == "train" else 100, seed)
    raise ValueError(f"unknown built-in dataset {name!r}; valid: {', '.join(builtin_names())}")


def builtin_names() -> list[str]:

    names = ["instruct", "instruct-cot", "prefs", "cot-add", *TASKS, "skills", *SKILLS]
    return ["corpus", "instruct-text"] + [v for n in names for v in (n, f"{n}-eval")]
