"""Built-in downstream tasks, generated in code, whose answers can be checked.

- ``encoder-topics`` (classification, records ``{"text", "label"}``): "I was thinking about the
  tiger." -> ``animal``; four categories (animal, food, vehicle, profession). Training sentences
  use the first 10 words of each category of :data:`~mmtune.encoders.corpus.LEXICON`, the eval
  sentences only the 6 held-out words, in the same neutral sentences: the label is only
  recoverable from what the model knows about the word (a random-init model is at chance; one
  pretrained on ``builtin:encoder-corpus``, where every word appears in category contexts, or a
  real pretrained model is not).
- ``encoder-qa`` (extractive QA, SQuAD records ``{"question", "context", "answers": {"text",
  "answer_start"}}``): short passages of facts about two or three people ("Anna lives in Mexico
  City. Tom was born in 1984. ..."), one question about one fact.
- ``encoder-sts`` (similarity, ``{"sentence1", "sentence2", "score"}``): "The doctor buys the
  bread." vs "The bread was bought by the doctor." Each sentence is a (subject, verb, object)
  triple in active or passive voice; the score is 5 x (shared slots) / 3, so 5 for a paraphrase
  and 0 for nothing in common.

``NAME-eval`` gives the held-out split; train and eval never share an item.
"""

from __future__ import annotations

import random

from ..data.builtin import CAPITALS
from ..errors import ConfigError
from .corpus import LEXICON, TRAIN_WORDS

TOPIC_TEMPLATES = (
    "I was thinking about the {w}.",
    "She wrote a short story about the {w}.",
    "There is a picture of the {w} on the wall.",
    "Everyone was talking about the {w} today.",
    "He drew the {w} in his notebook.",
    "We saw a photo of a {w} in the newspaper.",
    "My friend asked me about the {w}.",
    "The book had a chapter about the {w}.",
)


def topic_items(split: str, seed: int = 0) -> list[dict]:
    words = {c: (ws[:TRAIN_WORDS] if split == "train" else ws[TRAIN_WORDS:]) for c, ws in LEXICON.items()}
    items = [{"text": t.format(w=w), "label": c} for c, ws in words.items() for w in ws for t in TOPIC_TEMPLATES]
    random.Random(f"topics-{seed}-{split}").shuffle(items)
    return items


NAMES = ("Anna", "Tom", "Maria", "Peter", "Lena", "Omar", "Sofia", "David", "Yuki", "Carlos", "Emma", "Ivan",
         "Nora", "Ahmed", "Julia", "Felix", "Grace", "Hugo", "Alice", "Samuel")
COLORS = ("red", "blue", "green", "white", "black", "yellow")
CITIES = tuple(sorted(set(CAPITALS.values())))

# (fact sentence, question, answer slot); {n} is the person.
QA_FACTS = (
    ("{n} lives in {city}.", "Where does {n} live?", "city"),
    ("{n} works as a {job}.", "What is the job of {n}?", "job"),
    ("{n} likes to eat {food}.", "What does {n} like to eat?", "food"),
    ("{n} drives a {color} {vehicle}.", "What color is the vehicle that {n} drives?", "color"),
    ("{n} was born in {year}.", "When was {n} born?", "year"),
)


def _fill(rng: random.Random) -> dict:
    return {"city": rng.choice(CITIES), "job": rng.choice(LEXICON["profession"]),
            "food": rng.choice(LEXICON["food"]), "color": rng.choice(COLORS),
            "vehicle": rng.choice(("car", "van", "truck", "jeep")), "year": str(rng.randint(1940, 2010))}


def _qa_item(rng: random.Random) -> dict:
    people = rng.sample(NAMES, rng.randint(2, 3))
    sentences = []  # (text, person, fact index, values)
    for person in people:
        for f in rng.sample(range(len(QA_FACTS)), rng.randint(1, 3)):
            values = _fill(rng)
            sentences.append((QA_FACTS[f][0].format(n=person, **values), person, f, values))
    rng.shuffle(sentences)
    target = rng.randrange(len(sentences))
    context = ""
    for i, (text, person, f, values) in enumerate(sentences):
        if context:
            context += " "
        if i == target:
            fact, question, slot = QA_FACTS[f]
            answer = values[slot]
            start = len(context) + len(fact.split("{" + slot + "}")[0].format(n=person))
            question = question.format(n=person)
        context += text
    return {"question": question, "context": context, "answers": {"text": [answer], "answer_start": [start]}}


def qa_items(split: str, n: int, seed: int = 0) -> list[dict]:
    """Eval items come from a fixed reserved stream of 200 passages; train items avoid them."""
    reserved_rng = random.Random(f"qa-reserved-{seed}")
    reserved = [_qa_item(reserved_rng) for _ in range(200)]
    if split == "eval":
        return reserved[:n]
    banned = {r["context"] for r in reserved}
    rng = random.Random(f"qa-{seed}-train")
    out = []
    while len(out) < n:
        item = _qa_item(rng)
        if item["context"] not in banned:
            out.append(item)
    return out


STS_VERBS = (("buys", "bought"), ("sees", "seen"), ("washes", "washed"), ("paints", "painted"),
             ("carries", "carried"), ("sells", "sold"))
STS_SUBJECTS = LEXICON["profession"]
STS_OBJECTS = LEXICON["food"] + LEXICON["vehicle"]


def _sts_sentence(s: str, v: int, o: str, passive: bool) -> str:
    if passive:
        return f"The {o} was {STS_VERBS[v][1]} by the {s}."
    return f"The {s} {STS_VERBS[v][0]} the {o}."


def sts_items(split: str, n: int, seed: int = 0) -> list[dict]:
    """Pairs whose score counts shared (subject, verb, object) slots; eval triples use subjects
    that training never pairs (the last 4 professions)."""
    rng = random.Random(f"sts-{seed}-{split}")
    subjects = STS_SUBJECTS[:12] if split == "train" else STS_SUBJECTS[12:]
    out = []
    for _ in range(n):
        base = (rng.choice(subjects), rng.randrange(len(STS_VERBS)), rng.choice(STS_OBJECTS))
        shared = rng.randint(0, 3)
        keep = set(rng.sample(range(3), shared))
        other = []
        for slot, pool in enumerate((subjects, range(len(STS_VERBS)), STS_OBJECTS)):
            if slot in keep:
                other.append(base[slot])
            else:
                other.append(rng.choice([x for x in pool if x != base[slot]]))
        out.append({"sentence1": _sts_sentence(*base, passive=rng.random() < 0.5),
                    "sentence2": _sts_sentence(*other, passive=rng.random() < 0.5),
                    "score": round(5 * shared / 3, 4)})
    return out


# name -> (task kind, records)
BUILTIN_TASKS = {
    "encoder-topics": ("classify", lambda: topic_items("train")),
    "encoder-topics-eval": ("classify", lambda: topic_items("eval")),
    "encoder-qa": ("qa", lambda: qa_items("train", 1200)),
    "encoder-qa-eval": ("qa", lambda: qa_items("eval", 200)),
    "encoder-sts": ("similarity", lambda: sts_items("train", 1500)),
    "encoder-sts-eval": ("similarity", lambda: sts_items("eval", 300)),
}


def builtin_task(name: str) -> list[dict]:
    if name not in BUILTIN_TASKS:
        raise ConfigError(f"no built-in encoder task '{name}'; valid: "
                          + ", ".join(f"builtin:{n}" for n in BUILTIN_TASKS))
    return BUILTIN_TASKS[name][1]()
