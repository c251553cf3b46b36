"""The built-in multimodal tasks of the demo and the continual multimodal sequence: their data
(shapes captions and VQA, OCR words, spoken digits; written as LLaVA-style JSONL with the media
beside it) and their scoring (exact match by greedy decoding, teacher-forced token accuracy), below
the demo and the continual benchmark that both use them."""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..data.builtin import WORDS
from ..inference.generate import iter_token_ids
from ..train.scoring import normalize_answer
from .data import LengthPolicy, collate_mm, encode_mm_sample, normalize_mm_record, prompt_ids
from .objective import token_accuracy
from .synthetic_audio import make_spoken_digits_dataset
from .synthetic_images import make_ocr_dataset, make_shapes_dataset, save_dataset

VQA_CHANCE = {"color": 1 / 5, "count": 1 / 4, "position": 1 / 4}
IMAGE_SIZE = 64


def _single_object(rec: dict) -> bool:
    """Shapes records whose question is about the only kind of object in the image."""
    words = rec["question"].rstrip("?").split()  # "How many circles are there" / "... the circle"
    kind = words[2][:-1] if rec["qtype"] == "count" else words[-1]
    return len(rec["shapes"]) == 1 or (rec["qtype"] == "count" and all(s["kind"] == kind for s in rec["shapes"]))


def make_demo_data(root: Path, n: tuple[int, ...], seed: int) -> dict[str, Path]:
    """JSONL files (LLaVA style, media beside them) of the demo's five tasks; see the module
    docstring for the subsets. Deterministic in ``seed``."""

    n_cap, n_vqa, n_ocr, n_wide, n_asr = n
    shapes = [r for r in make_shapes_dataset(8 * max(n_cap, n_vqa) + 40, seed=seed, size=IMAGE_SIZE)
              if _single_object(r)]
    by_type = {q: [r for r in shapes if r["qtype"] == q] for q in VQA_CHANCE}
    vqa = [by_type[q][i] for i in range(-(-n_vqa // 3)) for q in VQA_CHANCE][:n_vqa]
    captions = [r for r in shapes if len(r["shapes"]) == 1][-n_cap:]
    words = [r for r in make_ocr_dataset(6 * n_ocr + 40, seed=seed, size=IMAGE_SIZE) if r["text"] in WORDS][:n_ocr]
    paths = {"caption": save_dataset(captions, root, "caption", task="caption"),
             "vqa": save_dataset(vqa, root, "vqa"),
             "ocr": save_dataset(words, root, "ocr"),
             "ocr_wide": save_dataset(make_ocr_dataset(n_wide, seed=seed, size=IMAGE_SIZE, wide=True), root,
                                      "ocr_wide")}
    make_spoken_digits_dataset(n_asr, seed, root, engine="procedural", jsonl_name="asr.jsonl")
    paths["asr"] = root / "asr.jsonl"
    return paths



# ---------------------------------------------------------------------------------------------
# Evaluation


def load_eval_items(jsonl: Path, model, cache, task: str) -> list[dict]:
    """Normalised records of ``jsonl`` with their processed media and reference answer."""

    items = []
    for line in jsonl.read_text().splitlines():
        rec = json.loads(line)
        sample = normalize_mm_record(rec, "auto", jsonl.parent)
        images = [cache.get(m) for m in sample["images"]]
        audios = [cache.get(m) for m in sample["audios"]]
        items.append({"task": task, "sample": sample, "images": images, "audios": audios,
                      "reference": sample["messages"][-1]["content"], "qtype": _qtype(sample)})
    return items


def _qtype(sample: dict) -> str:
    q = sample["messages"][0]["content"]
    return "color" if "color" in q else "count" if "How many" in q else "position" if "Where" in q else ""


def shuffled(items: list[dict], seed: int = 0) -> list[dict]:
    """The same prompts with every sample's media replaced by another sample's (a derangement)."""
    n = len(items)
    order = list(range(n))
    rng = random.Random(seed)
    rng.shuffle(order)
    perm = order[1:] + order[:1]  # a cycle through a random order: nobody keeps its own media
    src = {order[i]: perm[i] for i in range(n)}
    return [{**it, "images": items[src[i]]["images"], "audios": items[src[i]]["audios"]} for i, it in enumerate(items)]


def exact_match_items(model, template, items: list[dict], max_new_tokens: int = 16) -> float:

    if not items:
        return 0.0
    hits = 0
    stops = template.stop_token_ids
    for it in items:
        ids = prompt_ids(model, template, it["sample"]["messages"][:-1], it["images"], it["audios"])
        out = list(iter_token_ids(model, ids, max_new_tokens, stop_token_ids=stops, images=it["images"],
                                  audios=it["audios"]))
        answer = model.tokenizer.decode(out, skip_special_tokens=True)
        hits += normalize_answer(answer) == normalize_answer(it["reference"])
    return hits / len(items)


def token_accuracy_items(model, template, items: list[dict], batch_size: int = 16) -> float:

    policy = LengthPolicy(max_length=10_000, truncation=False)
    examples = [encode_mm_sample(it["sample"], it["images"], it["audios"], model, template, policy) for it in items]
    pad = model.tokenizer.pad_token_id
    correct = total = 0
    for i in range(0, len(examples), batch_size):
        c, t = token_accuracy(model, collate_mm(examples[i:i + batch_size], pad))
        correct, total = correct + c, total + t
    return correct / max(total, 1)
