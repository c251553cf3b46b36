"""Downstream heads on an encoder: classification, extractive QA, sentence-pair similarity.

- Classification: a linear layer on the [CLS] vector or on the mean of the real tokens' vectors
  (``encoder.pooling``). A cross-encoder is the same head with one output over the pair
  ``[CLS] a [SEP] b [SEP]``, trained with binary cross-entropy on the score scaled to [0, 1]
  (sentence-transformers' ``CrossEncoder`` default for one label).
- Extractive QA (Devlin et al. 2019, section 4.2): start and end logits per token over
  ``[CLS] question [SEP] passage [SEP]``; a passage longer than the window is cut into windows
  overlapping by ``doc_stride`` tokens; a window that does not contain the answer points at
  [CLS] (as transformers' ``run_qa.py``). The predicted span is mapped back to passage text with
  the tokenizer's character offsets and scored with SQuAD's exact match and F1.
- Bi-encoder: both sentences pooled separately by the same encoder; the cosine of the two
  vectors is the similarity, trained with a contrastive loss on cosine distance (Hadsell et al.
  2006, as sentence-transformers' ``ContrastiveLoss``) or regressed onto the scaled score.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..errors import DataError
from . import metrics
from .models import NETS, EncoderModule, apply_adapter, build_from_config, new_modules


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, T, H) -> (B, H): the first token, or the mean over positions with attention_mask 1."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _encode(backbone, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    return backbone(**kwargs).last_hidden_state  # (B, T, H)


class SequenceClassifier(nn.Module):
    """Encoder + dropout + linear head on the pooled vector; ``num_labels=1`` for a cross-encoder."""

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str = "cls", dropout: float = 0.1):
        super().__init__()
        self.backbone, self.pooling = backbone, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=backbone.config.initializer_range)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        hidden = _encode(self.backbone, input_ids, attention_mask, token_type_ids)
        return self.head(self.dropout(pool(hidden, attention_mask, self.pooling)))  # (B, num_labels)


class SpanQA(nn.Module):
    """Encoder + a linear layer giving start and end logits per token."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.qa_outputs = nn.Linear(backbone.config.hidden_size, 2)
        nn.init.normal_(self.qa_outputs.weight, std=backbone.config.initializer_range)
        nn.init.zeros_(self.qa_outputs.bias)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = _encode(self.backbone, input_ids, attention_mask, token_type_ids)
        start, end = self.qa_outputs(hidden).unbind(-1)  # (B, T, 2) -> 2 x (B, T)
        return start, end


class BiEncoder(nn.Module):
    """One encoder for both sentences; similarity = cosine of the pooled vectors."""

    def __init__(self, backbone: nn.Module, pooling: str = "mean"):
        super().__init__()
        self.backbone, self.pooling = backbone, pooling

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        return pool(_encode(self.backbone, input_ids, attention_mask, token_type_ids), attention_mask, self.pooling)

    def forward(self, input_ids, attention_mask, b_input_ids, b_attention_mask) -> torch.Tensor:
        a = self.embed(input_ids, attention_mask)
        b = self.embed(b_input_ids, b_attention_mask)
        return F.cosine_similarity(a.float(), b.float(), dim=-1)  # (B,)


HEAD_PARAMS = {"classify": ["head.*"], "similarity_cross": ["head.*"], "qa": ["qa_outputs.*"],
               "similarity_bi": []}


def make_net(kind: str, backbone: nn.Module, spec: dict) -> nn.Module:
    if kind in ("classify", "similarity_cross"):
        return SequenceClassifier(backbone, spec["num_labels"], spec["pooling"], spec["dropout"])
    if kind == "qa":
        return SpanQA(backbone)
    return BiEncoder(backbone, spec["pooling"])


def _downstream_builder(kind: str):
    def build(spec: dict) -> EncoderModule:
        backbone = build_from_config(spec["backbone_class"], spec["configs"]["backbone"], base=True)
        net = apply_adapter(make_net(kind, backbone, spec), AdapterConfig(**spec["adapter"]), lora_attr="backbone",
                            always_train=spec["always_train"], freeze=spec.get("freeze", []),
                            new_modules=new_modules(spec.get("new_weights", [])))
        return EncoderModule(net, spec)
    return build


for _kind in HEAD_PARAMS:
    NETS.register(_kind)(_downstream_builder(_kind))


# ---------------------------------------------------------------------------------------------
# Rows (tokenized examples) and batches


def _field(rec: dict, key: str, where: tuple[str, int | None], kind=str):
    value = rec.get(key)
    if value is None or (kind is str and not isinstance(value, str)):
        raise DataError(where[0], where[1], f"missing or non-text field '{key}'", reason="missing_field", field=key)
    return value


def classification_rows(tokenizer, records: list[tuple[str, int | None, dict]], max_length: int,
                        label_names: list[str], text_field: str = "text") -> list[dict]:
    """Rows of ``{"input_ids", "token_type_ids", "label"}``; labels index ``label_names``."""
    index = {name: i for i, name in enumerate(label_names)}
    texts, pairs, labels = [], [], []
    for path, line, rec in records:
        texts.append(_field(rec, text_field, (path, line)))
        pairs.append(rec.get("text_pair"))
        label = str(rec.get("label"))
        if label not in index:
            raise DataError(path, line, f"label '{label}' is not one of the training labels {label_names}",
                            reason="unknown_label", field="label")
        labels.append(index[label])
    has_pair = any(p is not None for p in pairs)
    enc = tokenizer(texts, pairs if has_pair else None, truncation=True, max_length=max_length)
    return [{"input_ids": ids, "token_type_ids": _types(enc, i), "label": y}
            for i, (ids, y) in enumerate(zip(enc["input_ids"], labels))]


def _types(enc, i) -> list[int]:
    return enc["token_type_ids"][i] if "token_type_ids" in enc else [0] * len(enc["input_ids"][i])


def similarity_rows(tokenizer, records, max_length: int, score_range: tuple[float, float], bi: bool) -> list[dict]:
    """Cross-encoder rows (the pair as one sequence) or bi-encoder rows (``b_input_ids`` apart);
    ``score`` is the gold score scaled to [0, 1], ``raw_score`` the original."""
    lo, hi = score_range
    a, b, scores = [], [], []
    for path, line, rec in records:
        a.append(_field(rec, "sentence1", (path, line)))
        b.append(_field(rec, "sentence2", (path, line)))
        s = rec.get("score")
        if not isinstance(s, (int, float)) or not lo <= s <= hi:
            raise DataError(path, line, f"'score' must be a number in [{lo}, {hi}] (encoder.score_range), got {s!r}",
                            reason="bad_score", field="score")
        scores.append(float(s))
    if bi:
        ea = tokenizer(a, truncation=True, max_length=max_length)
        eb = tokenizer(b, truncation=True, max_length=max_length)
        return [{"input_ids": x, "b_input_ids": y, "score": (s - lo) / (hi - lo), "raw_score": s}
                for x, y, s in zip(ea["input_ids"], eb["input_ids"], scores)]
    enc = tokenizer(a, b, truncation=True, max_length=max_length)
    return [{"input_ids": ids, "token_type_ids": _types(enc, i), "score": (s - lo) / (hi - lo), "raw_score": s}
            for i, (ids, s) in enumerate(zip(enc["input_ids"], scores))]


def qa_examples(records) -> list[dict]:
    """Validated QA examples ``{"question", "context", "answers": [text...], "start": char}``.

    Accepts SQuAD's ``answers: {"text": [...], "answer_start": [...]}`` or flat ``answer`` and
    ``answer_start``; the first answer is the training target.
    """
    out = []
    for path, line, rec in records:
        q, ctx = _field(rec, "question", (path, line)), _field(rec, "context", (path, line))
        if isinstance(rec.get("answers"), dict):
            texts, starts = list(rec["answers"].get("text", [])), list(rec["answers"].get("answer_start", []))
        else:
            texts, starts = [rec.get("answer")], [rec.get("answer_start")]
        if not texts or not isinstance(texts[0], str) or not isinstance(starts[0], int):
            raise DataError(path, line, "needs an answer text and its character start (answers.text and "
                            "answers.answer_start, or answer and answer_start)", reason="missing_field", field="answers")
        if ctx[starts[0]:starts[0] + len(texts[0])] != texts[0]:
            raise DataError(path, line, f"answer '{texts[0]}' is not at character {starts[0]} of the context",
                            reason="answer_not_in_context", field="answer_start")
        out.append({"question": q, "context": ctx, "answers": texts, "start": starts[0]})
    return out


def qa_token_span(offsets, seq_ids, start_char: int, end_char: int) -> tuple[int, int] | None:
    """Token indices (start, end) of the answer's characters [start_char, end_char) in one window,
    or None when the window does not hold the whole answer (transformers' run_qa.py logic)."""
    ctx = [i for i, s in enumerate(seq_ids) if s == 1]
    first, last = ctx[0], ctx[-1]
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return None
    i = first
    while i <= last and offsets[i][0] <= start_char:
        i += 1
    j = last
    while j >= first and offsets[j][1] >= end_char:
        j -= 1
    return i - 1, j + 1


def _trim(text: str, offset: tuple[int, int]) -> tuple[int, int]:
    """Drop leading whitespace from a token's character span. Byte-level BPE tokens carry their
    space ("Ġword"); ``trim_offsets`` removes it, except on the first token of an overflow window
    (tokenizers 0.23), which would otherwise put a space in front of an extracted answer."""
    s, e = offset
    while s < e and text[s].isspace():
        s += 1
    return s, e


def span_text(context: str, offsets, start: int, end: int) -> str:
    """The passage text of tokens start..end (inclusive) through the tokenizer's offsets."""
    return context[offsets[start][0]:offsets[end][1]]


def qa_features(tokenizer, examples: list[dict], max_length: int, doc_stride: int) -> list[dict]:
    """Windows of ``[CLS] question [SEP] passage [SEP]`` with start/end targets, offsets (None outside
    the passage) and the index of their example."""
    if tokenizer.padding_side != "right":
        tokenizer.padding_side = "right"
    enc = tokenizer([e["question"] for e in examples], [e["context"] for e in examples], truncation="only_second",
                    max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True)
    feats = []
    for i, ids in enumerate(enc["input_ids"]):
        ex = enc["overflow_to_sample_mapping"][i]
        e = examples[ex]
        seq = enc.sequence_ids(i)
        all_offsets = [_trim(e["context"], o) if s == 1 else o for o, s in zip(enc["offset_mapping"][i], seq)]
        offsets = [o if s == 1 else None for o, s in zip(all_offsets, seq)]
        span = qa_token_span(all_offsets, seq, e["start"], e["start"] + len(e["answers"][0]))
        start, end = span if span is not None else (0, 0)
        feats.append({"input_ids": ids, "token_type_ids": _types(enc, i), "start": start, "end": end,
                      "example": ex, "offsets": offsets})
    return feats


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, offsets, max_answer_tokens: int,
               top_k: int = 20) -> tuple[float, int, int] | None:
    """(score, start token, end token) of the best passage span of one window, or None."""
    valid = np.array([o is not None for o in offsets] + [False] * (len(start_logits) - len(offsets)))
    s_logits = np.where(valid, start_logits, -np.inf)
    e_logits = np.where(valid, end_logits, -np.inf)
    best = None
    for s in np.argsort(-s_logits)[:top_k]:
        if not valid[s]:
            continue
        for e in np.argsort(-e_logits)[:top_k]:
            if not valid[e] or e < s or e - s + 1 > max_answer_tokens:
                continue
            score = float(s_logits[s] + e_logits[e])
            if best is None or score > best[0]:
                best = (score, int(s), int(e))
    return best


class PadCollator:
    """Pads token-id lists to the longest in the batch and adds attention masks.

    ``input_ids`` and ``b_input_ids`` (bi-encoder) are padded with ``pad_id`` and get an attention
    mask each, ``token_type_ids`` with 0; ``scalars`` maps row keys to batch keys of per-row
    numbers (``{"label": "labels"}``).
    """

    def __init__(self, pad_id: int, scalars: dict[str, str] | None = None):
        self.pad_id, self.scalars = pad_id, dict(scalars or {})

    @staticmethod
    def _pad(seqs, value) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs])  # (B, T)

    def __call__(self, rows: list[dict]) -> dict:
        batch = {}
        for prefix in ("", "b_"):
            key = f"{prefix}input_ids"
            if key not in rows[0]:
                continue
            batch[key] = self._pad([r[key] for r in rows], self.pad_id)
            batch[f"{prefix}attention_mask"] = self._pad([[1] * len(r[key]) for r in rows], 0)
        if "token_type_ids" in rows[0]:
            batch["token_type_ids"] = self._pad([r["token_type_ids"] for r in rows], 0)
        for row_key, batch_key in self.scalars.items():
            if row_key in rows[0]:
                batch[batch_key] = torch.tensor([r[row_key] for r in rows])
        return batch


COLLATE_SCALARS = {"classify": {"label": "labels"}, "qa": {"start": "start_positions", "end": "end_positions"},
                   "similarity_cross": {"score": "scores"}, "similarity_bi": {"score": "scores"}}


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def predict(module, rows: list[dict], collate, kind: str, batch_size: int = 64, device=None) -> list:
    """Raw predictions per row: class logits, (start, end) logits, or a similarity score."""
    module.eval()
    device = device or next(module.parameters()).device
    out = []
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size]).items()}
        if kind == "similarity_bi":
            scores = module(batch["input_ids"], batch["attention_mask"], batch["b_input_ids"],
                            batch["b_attention_mask"])
            out.extend(scores.float().cpu().tolist())
            continue
        res = module(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        if kind == "qa":
            s, e = (t.float().cpu().numpy() for t in res)
            out.extend(zip(s, e))
        elif kind == "similarity_cross":
            out.extend(torch.sigmoid(res.squeeze(-1).float()).cpu().tolist())
        else:
            out.extend(res.float().cpu().numpy())
    return out


def evaluate(module, rows: list[dict], collate, kind: str, *, examples: list[dict] | None = None,
             max_answer_tokens: int = 30, batch_size: int = 64) -> dict:
    """Task metrics: accuracy + macro F1 (classify), EM + F1 (qa), Spearman + Pearson (similarity)."""
    preds = predict(module, rows, collate, kind, batch_size)
    if kind == "classify":
        labels = [r["label"] for r in rows]
        guess = [int(np.argmax(p)) for p in preds]
        return {"accuracy": metrics.accuracy(guess, labels), "macro_f1": metrics.macro_f1(guess, labels),
                "n": len(rows)}
    if kind in ("similarity_cross", "similarity_bi"):
        gold = [r["raw_score"] for r in rows]
        return {"spearman": metrics.spearman(preds, gold), "pearson": metrics.pearson(preds, gold), "n": len(rows)}
    best: dict[int, tuple[float, str]] = {}
    for feat, (s, e) in zip(rows, preds):
        span = best_spans(s, e, feat["offsets"], max_answer_tokens)
        if span is None:
            continue
        ex = feat["example"]
        if ex not in best or span[0] > best[ex][0]:
            best[ex] = (span[0], span_text(examples[ex]["context"], feat["offsets"], span[1], span[2]))
    em = [metrics.exact_match(best.get(i, (0, ""))[1], ex["answers"]) for i, ex in enumerate(examples)]
    f1 = [metrics.token_f1(best.get(i, (0, ""))[1], ex["answers"]) for i, ex in enumerate(examples)]
    return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1)), "n": len(examples),
            "predictions": [best.get(i, (0, ""))[1] for i in range(min(5, len(examples)))]}
