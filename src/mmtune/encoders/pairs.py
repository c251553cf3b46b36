"""Training sequences from tokenized documents: single segments (MLM) and segment pairs (NSP, SOP).

Pairs follow Google's BERT ``create_pretraining_data.py``: sentences of a document are gathered
into a chunk until the chunk fills the token budget, the chunk is cut at a random sentence
boundary into segments A and B, and then

- NSP (Devlin et al. 2019, section 3.1): with probability p (0.5) B is replaced by sentences from
  a random other document (label 1, "not next"; the unused sentences of the true B go back to the
  pool), else B is the true continuation (label 0);
- SOP (Lan et al. 2020, section 4.1): A and B are always consecutive; with probability p they are
  swapped (label 1), else kept in order (label 0).

A pair longer than the budget loses tokens from the start of A and the end of B, so the boundary
between the two segments (what NSP and SOP are about) survives. Single segments (RoBERTa's
DOC-SENTENCES, Liu et al. 2019 section 4.2) pack whole sentences of one document.

Every row records where its segments came from (``spans``: (document, first sentence, end)), which
the tests use to check that SOP pairs are consecutive and NSP negatives come from another document.
"""

from __future__ import annotations

import random

from ..errors import MMTuneError
from .corpus import CorpusReport
from .tokenizer import Layout

Sentence = tuple[list[int], list[bool]]  # token ids, word-start flags


def _row(layout: Layout, a: Sentence, b: Sentence | None) -> dict:
    ids, types, special, _ = layout.build(a[0], None if b is None else b[0])
    starts = list(a[1]) + (list(b[1]) if b is not None else [])
    if starts:
        starts[0] = True
        if b is not None and b[1]:
            starts[len(a[1])] = True
    word_ids, k, w = [], 0, -1
    for s in special:
        if s:
            word_ids.append(-1)
            continue
        w += starts[k]
        k += 1
        word_ids.append(w)
    return {"input_ids": ids, "token_type_ids": types, "special_mask": special, "word_ids": word_ids}


def _concat(doc: list[Sentence], idx: list[int]) -> Sentence:
    ids, starts = [], []
    for i in idx:
        ids.extend(doc[i][0])
        starts.extend(doc[i][1])
    return ids, starts


def _truncate(a: Sentence, b: Sentence, budget: int) -> tuple[Sentence, Sentence, bool]:
    """Drop tokens from the front of A and the back of B (the longer one first) until they fit."""
    la, lb = len(a[0]), len(b[0])
    if la + lb <= budget:
        return a, b, False
    while la + lb > budget:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    ca = len(a[0]) - la
    return (a[0][ca:], a[1][ca:]), (b[0][:lb], b[1][:lb]), True


def single_segments(docs: list[list[Sentence]], layout: Layout, max_length: int,
                    report: CorpusReport) -> list[dict]:
    """Sequences of whole consecutive sentences of one document, up to ``max_length`` tokens."""
    budget = max_length - layout.n_special(pair=False)
    rows = []
    for d, doc in enumerate(docs):
        chunk: list[int] = []
        length = 0
        for i, (ids, _) in enumerate(doc):
            if chunk and length + len(ids) > budget:
                rows.append((d, chunk))
                chunk, length = [], 0
            chunk.append(i)
            length += len(ids)
        if chunk:
            rows.append((d, chunk))
    out = []
    for d, chunk in rows:
        seg = _concat(docs[d], chunk)
        if len(seg[0]) > budget:
            report.add("truncated_sequences")
            seg = (seg[0][:budget], seg[1][:budget])
        if not seg[0]:
            continue
        row = _row(layout, seg, None)
        row.update(id=len(out), spans=((d, chunk[0], chunk[-1] + 1),))
        out.append(row)
    report.add("sequences", len(out))
    if not out:
        raise MMTuneError(f"the corpus yields no training sequence: {report.as_dict()}. Give documents with text.")
    return out


def segment_pairs(docs: list[list[Sentence]], layout: Layout, max_length: int, task: str, seed: int,
                  report: CorpusReport, probability: float = 0.5) -> list[dict]:
    """NSP (``task="nsp"``) or SOP (``task="sop"``) pairs with their 0/1 labels."""
    if task not in ("nsp", "sop"):
        raise ValueError(f"task must be nsp or sop, got {task!r}")
    budget = max_length - layout.n_special(pair=True)
    if budget < 2:
        raise MMTuneError(f"data.max_length {max_length} leaves no room for two segments after "
                          f"{layout.n_special(pair=True)} special tokens")
    rng = random.Random(f"{task}-{seed}")
    out = []
    for d, doc in enumerate(docs):
        if len(doc) < 2:
            report.add("too_short_for_pair")
            continue
        chunk: list[int] = []
        length, i = 0, 0
        while i < len(doc):
            chunk.append(i)
            length += len(doc[i][0])
            if i == len(doc) - 1 or length >= budget:
                if len(chunk) < 2:
                    report.add("unpaired_sentences")
                else:
                    a_end = rng.randint(1, len(chunk) - 1)
                    a_idx, b_idx = chunk[:a_end], chunk[a_end:]
                    a = _concat(doc, a_idx)
                    label, b_doc = 0, d
                    if task == "nsp" and len(docs) > 1 and rng.random() < probability:
                        label = 1
                        b_doc = rng.randrange(len(docs) - 1)
                        b_doc += b_doc >= d  # any document but this one
                        other = docs[b_doc]
                        start = rng.randrange(len(other))
                        b_idx, got = [], 0
                        for j in range(start, len(other)):
                            b_idx.append(j)
                            got += len(other[j][0])
                            if got >= budget - len(a[0]):
                                break
                        i -= len(chunk) - a_end  # the true continuation goes back to the pool
                    b = _concat(docs[b_doc], b_idx)
                    a, b, cut = _truncate(a, b, budget)
                    report.add("truncated_pairs", int(cut))
                    spans = ((d, a_idx[0], a_idx[-1] + 1), (b_doc, b_idx[0], b_idx[-1] + 1))
                    if task == "sop" and rng.random() < probability:
                        a, b, spans, label = b, a, spans[::-1], 1
                    row = _row(layout, a, b)
                    row.update(id=len(out), label=label, spans=spans)
                    out.append(row)
                chunk, length = [], 0
            i += 1
    report.add("pairs", len(out))
    if not out:
        raise MMTuneError(f"the corpus yields no training pair for {task.upper()}: {report.as_dict()}. A pair "
                          "needs a document of at least two sentences (one document per line, or blank-line "
                          "separated paragraphs; sentences end with . ! or ?).")
    return out
