"""Preference pairs for DPO: records -> (prompt, chosen, rejected) -> tokenized pairs -> batches.

Accepted records (JSON / JSONL / Parquet / save_to_disk / ``builtin:prefs``):

- ``{"prompt": "...", "chosen": "...", "rejected": "...", "system": "..."?}``
- ``{"prompt": [messages ending with a user turn], "chosen": ..., "rejected": ...}``
- ``{"messages" | "conversations": [...ending with a user turn], "chosen": ..., "rejected": ...}``

``chosen``/``rejected`` are a string, an assistant message ``{"role": "assistant", "content"}``
or a one-message list. Both sides are rendered with the same chat template as SFT, and only the
final assistant turn (the response, with its turn terminator) carries labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import DataError, MMTuneError
from .formats import FORMATS
from .sources import BadRecordStats, iter_raw, locate, mix, split_eval

IGNORE = -100


def _problem(msg: str, reason: str, fld: str | None = None) -> DataError:
    return DataError(None, None, msg, reason, fld)


def _response(value, key: str) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            raise _problem(f"'{key}' must be an assistant message, got role {value.get('role')!r}", "unknown_role", key)
        value = value.get("content")
    if not isinstance(value, str):
        raise _problem(f"'{key}' must be a string or an assistant message", "wrong_type", key)
    if not value.strip():
        raise _problem(f"'{key}' is empty", "empty_assistant", key)
    return value


def parse_pair(raw) -> tuple[list[dict], str, str]:
    """``(prompt_messages, chosen, rejected)`` of one raw preference record."""
    if not isinstance(raw, dict):
        raise _problem(f"a preference record must be an object, got {type(raw).__name__}", "wrong_type")
    for key in ("chosen", "rejected"):
        if key not in raw:
            raise _problem(f"missing field '{key}' (keys present: {', '.join(sorted(raw))})", "missing_field", key)
    prompt = raw.get("prompt")
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
        if raw.get("system"):
            msgs.insert(0, {"role": "system", "content": raw["system"]})
    else:
        key = "prompt" if isinstance(prompt, list) else next((k for k in ("messages", "conversations") if k in raw), None)
        if key is None:
            raise _problem("missing field 'prompt' (or 'messages' / 'conversations')", "missing_field", "prompt")
        turns = raw[key]
        fmt = "sharegpt" if turns and isinstance(turns[0], dict) and "from" in turns[0] else "messages"
        # Reuse the conversation checks of the SFT formats by appending a placeholder answer.
        probe = FORMATS.get(fmt)({("conversations" if fmt == "sharegpt" else "messages"):
                                  [*turns, {"from": "gpt", "value": "."} if fmt == "sharegpt" else
                                   {"role": "assistant", "content": "."}]})
        msgs = probe["messages"][:-1]
    return msgs, _response(raw["chosen"], "chosen"), _response(raw["rejected"], "rejected")


def encode_pair(template, prompt: list[dict], chosen: str, rejected: str, max_length: int) -> dict:
    out = {}
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        ids, labels = template.encode([*prompt, {"role": "assistant", "content": text}], "last_turn")
        if len(ids) > max_length:
            raise _problem(f"{side} sample is {len(ids)} tokens, longer than data.max_length {max_length}", "too_long")
        out[f"{side}_ids"], out[f"{side}_labels"] = ids, labels
    return out


@dataclass
class PairReport:
    pairs: int = 0
    eval_pairs: int = 0
    skipped: BadRecordStats = field(default_factory=BadRecordStats)

    def lines(self) -> list[str]:
        return [f"preference data: {self.pairs} train pairs, {self.eval_pairs} eval pairs; {self.skipped.summary()}"]


def _load(sources, template, data_cfg, seed, stats) -> list[list[dict]]:
    groups = []
    for src in sources:
        rows = []
        for line, raw, err in iter_raw(src.path, seed):
            if err is None:
                try:
                    prompt, c, r = parse_pair(raw)
                    ex = encode_pair(template, prompt, c, r, data_cfg.max_length)
                    ex["task"] = raw.get("task") if isinstance(raw, dict) else None
                    ex["prompt"] = prompt
                    rows.append(ex)
                except DataError as e:
                    err = locate(e, src.path, line)
            if err is not None:
                if data_cfg.on_bad_record == "error":
                    raise err
                stats.add(err)
            if src.max_records is not None and len(rows) >= src.max_records:
                break
        if not rows:
            raise MMTuneError(f"preference source {src.path} has no usable pairs ({stats.summary()})")
        groups.append(rows)
    return groups


def load_eval_pairs(data_cfg, template, seed: int = 0, stats: BadRecordStats | None = None) -> list[dict]:
    """The encoded pairs of ``data_cfg.eval_sources`` (mixture applied)."""
    stats = stats if stats is not None else BadRecordStats()
    return mix(_load(data_cfg.eval_sources, template, data_cfg, seed, stats), data_cfg.eval_sources, seed)


def build_preference_datasets(data_cfg, template, seed: int = 0) -> tuple[list[dict], list[dict], PairReport]:
    report = PairReport()
    train_groups = _load(data_cfg.sources, template, data_cfg, seed, report.skipped)
    train = mix(train_groups, data_cfg.sources, seed)
    if data_cfg.eval_sources:
        ev = load_eval_pairs(data_cfg, template, seed, report.skipped)
    else:
        train, ev = split_eval(train, data_cfg.eval_fraction, seed)
    report.pairs, report.eval_pairs = len(train), len(ev)
    return train, ev, report


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """2B right-padded rows: the B chosen sequences, then the B rejected ones."""
    seqs = [(e["chosen_ids"], e["chosen_labels"]) for e in examples] + \
           [(e["rejected_ids"], e["rejected_labels"]) for e in examples]
    width = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (x, y) in enumerate(seqs):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if all("ref_chosen" in e for e in examples):
        batch["ref_logps"] = torch.tensor([e["ref_chosen"] for e in examples] +
                                          [e["ref_rejected"] for e in examples], dtype=torch.float32)
    return batch


def __getattr__(name: str):
    # Kept import path: preference_accuracy scores a model, so it lives with DPO in the train layer.
    if name == "preference_accuracy":
        from ..train.dpo import preference_accuracy

        return preference_accuracy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
