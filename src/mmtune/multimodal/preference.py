"""DPO for composed models: preference pairs whose prompt holds images / audio, trained through
the modality router.

A record is a multimodal record (``llava`` or ``openai`` format, see :mod:`mmtune.multimodal.data`)
whose conversation ends with a user turn, plus ``chosen`` and ``rejected`` answers::

    {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nWhat color is the circle?"}],
     "chosen": "red", "rejected": "blue"}

Both answers are encoded with the media of the prompt (placeholders expanded as in SFT) and
labels only on the final answer. Chosen and rejected of a pair have the same modality group, so
they run through the same route (the same LoRA adapter and audio projector) in one sub-batch:
rows ``[0, n)`` are the chosen answers and rows ``[n, 2n)`` the rejected ones, as in
:mod:`mmtune.train.dpo`.

The reference is the model at the start of the stage; its log-probs are computed once before
training (:func:`precompute_mm_reference`). That is exact whatever the stage trains (projector,
encoder or adapter) and keeps no second model in memory.

``builtin:shapes-vqa-prefs`` (and ``-eval``) derive pairs from the built-in shapes VQA data:
the correct answer is preferred over a wrong answer to the same question (another colour,
count or position).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data.packing import collate_padded
from ..data.preference import _response
from ..data.sources import BadRecordStats, take
from ..errors import DataError, MMTuneError
from ..train.dpo import DPOObjective, chosen_token_counts, sequence_logps
from ..train.objectives import LossOutput
from .data import (
    LengthPolicy,
    MediaCache,
    builtin_source,
    detect_mm_format,
    encode_mm_sample,
    encode_records,
    normalize_mm_record,
)
from .objective import model_batch
from .router import split_by_group

PREFS_SUFFIX = "-prefs"


# ---------------------------------------------------------------------------------------------
# Built-in pairs


def builtin_pairs_source(name: str, n: int | None = None, seed: int = 0) -> Path:
    """``NAME-prefs[-eval]``: pairs from built-in source ``NAME`` (written next to its data so the
    media paths resolve); the rejected answer is another answer given to the same question."""
    held_out = name.endswith("-eval")
    base = name[: -len("-eval")] if held_out else name
    if not base.endswith(PREFS_SUFFIX):
        raise MMTuneError(f"'builtin:{name}' is not a built-in preference source (NAME{PREFS_SUFFIX}[-eval])")
    data = builtin_source(base[: -len(PREFS_SUFFIX)] + ("-eval" if held_out else ""), n, seed)
    target = data.parent / f"pairs-{seed}.jsonl"
    if target.is_file():
        return target
    records = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    answers: dict[str, list[str]] = {}
    for rec in records:
        answers.setdefault(rec["conversations"][0]["value"], []).append(rec["conversations"][-1]["value"])
    every = sorted({a for pool in answers.values() for a in pool})
    rng = random.Random(f"mm-pairs-{seed}-{name}")
    lines = []
    for rec in records:
        question, right = rec["conversations"][0]["value"], rec["conversations"][-1]["value"]
        wrong = sorted(set(answers[question]) - {right}) or sorted(set(every) - {right})
        lines.append(json.dumps({**rec, "conversations": rec["conversations"][:-1], "chosen": right,
                                 "rejected": rng.choice(wrong)}))
    tmp = target.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(target)
    return target


# ---------------------------------------------------------------------------------------------
# Records -> pairs


def _with_answer(record: dict, fmt: str, answer: str) -> dict:
    if fmt == "llava":
        key = "conversations" if "conversations" in record else "messages"
        return {**record, key: [*record[key], {"from": "gpt", "value": answer}]}
    return {**record, "messages": [*record["messages"], {"role": "assistant", "content": answer}]}


def encode_mm_pair(raw, fmt: str, root: Path, model, template, policy: LengthPolicy, cache: MediaCache) -> dict | str:
    """``{"chosen": example, "rejected": example, "group"}`` of one record, or a drop reason."""
    if not isinstance(raw, dict):
        raise DataError(None, None, f"a record must be a JSON object, got {type(raw).__name__}", "not_an_object")
    for key in ("chosen", "rejected"):
        if key not in raw:
            raise DataError(None, None, f"missing field '{key}' (keys present: {', '.join(sorted(raw))})",
                            "missing_field", key)
    chosen, rejected = _response(raw["chosen"], "chosen"), _response(raw["rejected"], "rejected")
    prompt = {k: v for k, v in raw.items() if k not in ("chosen", "rejected")}
    fmt = detect_mm_format(prompt) if fmt == "auto" else fmt
    pair = {}
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        sample = normalize_mm_record(_with_answer(prompt, fmt, answer), fmt, root)
        images = [cache.get(m) for m in sample["images"]]
        audios = [cache.get(m) for m in sample["audios"]]
        ex = encode_mm_sample(sample, images, audios, model, template, LengthPolicy(policy.max_length,
                                                                                     policy.truncation, "last_turn"))
        if isinstance(ex, str):
            return ex
        pair[side] = ex
    return {**pair, "group": pair["chosen"]["group"], "id": pair["chosen"]["id"]}


def build_mm_pairs(sources: Sequence, model, template, policy: LengthPolicy, on_bad_record: str = "error",
                   seed: int = 0, cache: MediaCache | None = None, log=print) -> list[dict]:
    """Pairs of every source (``repeat`` applied), shuffled with ``seed``."""
    cache = cache or MediaCache(model)
    stats, dropped, pairs = BadRecordStats(), 0, []
    for i, src in enumerate(sources):
        path = src.path
        if path.startswith("builtin:"):
            path = str(builtin_pairs_source(path[len("builtin:"):], src.max_records, seed))
        root = Path(src.data_root) if src.data_root else Path(path).parent
        kept = []
        for pair in encode_records(path, seed, src.max_records,
                                   lambda raw, root=root, fmt=src.format: encode_mm_pair(
                                       raw, fmt, root, model, template, policy, cache), on_bad_record, stats):
            if isinstance(pair, str):
                dropped += 1
            elif pair is not None:
                kept.append(pair)
        pairs += take(kept, int(round(src.repeat * len(kept))), random.Random(f"{seed}-mm-pairs-{i}"))
    random.Random(f"{seed}-mm-pairs-shuffle").shuffle(pairs)
    groups: dict[str, int] = {}
    for p in pairs:
        groups[p["group"]] = groups.get(p["group"], 0) + 1
    log(f"preference pairs: {len(pairs)} (" + ", ".join(f"{g} {n}" for g, n in sorted(groups.items())) + ")"
        + (f"; dropped {dropped + sum(stats.counts.values())}" if dropped or stats.counts else ""))
    if sources and not pairs:
        raise MMTuneError("no multimodal preference pairs left to train on")
    return pairs


def collate_mm_pairs(pairs: Sequence[dict], pad_id: int) -> dict:
    """Pairs -> ``{"groups": [sub-batch per modality group], "input_ids": flat real tokens}``; in
    a sub-batch rows ``[0, n)`` are chosen, ``[n, 2n)`` rejected, padded (with attention mask),
    and ``ref_logps`` (2n,) when the pairs carry precomputed reference log-probs."""

    groups = []
    for group, idx in split_by_group([p["group"] for p in pairs]).items():
        sub = [pairs[i] for i in idx]
        rows = [p["chosen"] for p in sub] + [p["rejected"] for p in sub]
        batch = collate_padded(rows, pad_id)
        batch["images"] = [im for r in rows for im in r["images"]]
        batch["audios"] = [a for r in rows for a in r["audios"]]
        batch["group"] = group
        if all("ref_chosen" in p for p in sub):
            batch["ref_logps"] = torch.tensor([p["ref_chosen"] for p in sub] + [p["ref_rejected"] for p in sub],
                                              dtype=torch.float32)
        groups.append(batch)
    flat = torch.tensor([t for p in pairs for s in ("chosen", "rejected") for t in p[s]["input_ids"]], dtype=torch.long)
    return {"groups": groups, "input_ids": flat}


# ---------------------------------------------------------------------------------------------
# Reference and objective


def _group_logps(model, batch: dict) -> tuple[list[torch.Tensor], list]:
    logps, outs = [], []
    for g in batch["groups"]:
        out = model(**model_batch(g))
        logps.append(sequence_logps(out.logits, g["labels"].to(out.logits.device)))
        outs.append(out)
    return logps, outs


@torch.no_grad()
def precompute_mm_reference(model, pairs: Sequence[dict], collate_fn, batch_size: int = 8,
                            progress: bool = True) -> None:
    """Store the current model's log-probs of each pair's answers (``ref_chosen``/``ref_rejected``)."""
    from tqdm.auto import tqdm

    was = model.training
    model.eval()
    for i in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", disable=not progress):
        chunk = list(pairs[i:i + batch_size])
        logps, _ = _group_logps(model, collate_fn(chunk))
        for idx, lp in zip(split_by_group([p["group"] for p in chunk]).values(), logps):
            n = len(idx)
            for j, k in enumerate(idx):
                chunk[k]["ref_chosen"], chunk[k]["ref_rejected"] = float(lp[j]), float(lp[n + j])
    model.train(was)


class MultimodalDPOObjective(DPOObjective):
    """DPO / IPO (+ optional NLL on the chosen answer, as :class:`~mmtune.train.dpo.DPOObjective`)
    over the modality groups of a batch of pairs; needs precomputed reference log-probs.
    ``count`` is the number of pairs."""

    name = "multimodal_dpo"

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 sft_weight: float = 0.0):
        super().__init__(beta, loss_type, label_smoothing, None, sft_weight)

    def count(self, batch: dict) -> int:
        return sum(g["input_ids"].shape[0] // 2 for g in batch["groups"])

    def __call__(self, model, batch: dict) -> LossOutput:
        if not all("ref_logps" in g for g in batch["groups"]):
            raise MMTuneError("multimodal DPO needs reference log-probs: run precompute_mm_reference first")
        logps, outs = _group_logps(model, batch)
        parts: list[list[torch.Tensor]] = [[], [], [], [], []]  # pc, pr, rc, rr, chosen tokens
        for g, lp in zip(batch["groups"], logps):
            n = g["input_ids"].shape[0] // 2
            ref = g["ref_logps"].to(lp.device)
            for part, x in zip(parts, (lp[:n], lp[n:], ref[:n], ref[n:], chosen_token_counts(g["labels"]))):
                part.append(x.to(lp.device))
        losses, metrics = self.pair_losses(*(torch.cat(p) for p in parts))
        for out in outs:
            key = f"pairs/{out.route.group}->{out.route.adapter or 'base'}"
            metrics[key] = metrics.get(key, 0.0) + float(out.logits.shape[0] // 2)
        return LossOutput(losses.sum(), len(losses), outs, metrics)


@torch.no_grad()
def mm_preference_accuracy(model, pairs: Sequence[dict], pad_id: int, batch_size: int = 16) -> dict:
    """Held-out share of pairs whose chosen answer is more likely than the rejected one under the
    model (and, with reference log-probs present, whose implicit reward is higher)."""
    was = model.training
    model.eval()
    wins = reward_wins = n = 0
    for i in range(0, len(pairs), batch_size):
        chunk = list(pairs[i:i + batch_size])
        batch = collate_mm_pairs(chunk, pad_id)
        logps, _ = _group_logps(model, batch)
        for g, lp in zip(batch["groups"], logps):
            k = lp.shape[0] // 2
            wins += int((lp[:k] > lp[k:]).sum())
            if "ref_logps" in g:
                ref = g["ref_logps"]
                reward_wins += int(((lp[:k] - ref[:k]) > (lp[k:] - ref[k:])).sum())
            n += k
    model.train(was)
    return {"logp_preference_accuracy": wins / max(n, 1), "preference_accuracy": reward_wins / max(n, 1), "n": n}
