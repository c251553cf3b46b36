"""NSP / SOP pair construction, corpus reading and bad input."""

import random

import pytest

from mmtune.config import SourceConfig
from mmtune.encoders.corpus import CorpusReport, builtin_corpus, read_documents, split_sentences
from mmtune.encoders.pairs import segment_pairs, single_segments
from mmtune.encoders.tokenizer import Layout
from mmtune.errors import MMTuneError

BERT_LAYOUT = Layout(pre=(2,), post_single=(3,), mid=(3,), post_pair=(3,), types_pair=(0, 0, 0, 1, 1),
                     uses_token_types=True)


def synthetic_docs(n_docs=5000, seed=0):
    """Documents of 1-8 sentences; every token is unique to its (document, sentence, position)."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        doc = []
        for s in range(rng.randint(1, 8)):
            length = rng.randint(3, 14)
            doc.append(([100_000 * d + 100 * s + k + 10 for k in range(length)], [True] * length))
        docs.append(doc)
    return docs


def _segments(row):
    """Segments A and B of ``[CLS] A [SEP] B [SEP]`` (synthetic tokens are >= 10, [SEP] is 3)."""
    ids = row["input_ids"]
    sep = [i for i, t in enumerate(ids) if t == 3]
    return ids[1:sep[0]], ids[sep[0] + 1:sep[1]]


def _concat(doc, span):
    return [t for ids, _ in doc[span[1]:span[2]] for t in ids]


@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_pairs_balanced_and_well_formed(task):
    docs = synthetic_docs()
    report = CorpusReport()
    rows = segment_pairs(docs, BERT_LAYOUT, 40, task, seed=1, report=report)
    assert len(rows) >= 5000
    frac = sum(r["label"] for r in rows) / len(rows)
    assert abs(frac - 0.5) <= 0.02, frac
    assert report.counts["too_short_for_pair"] == sum(len(d) < 2 for d in docs)
    for r in rows:
        assert len(r["input_ids"]) <= 40
        a, b = _segments(r)
        (da, a0, a1), (db, b0, b1) = r["spans"]
        # Before any swap, the first segment keeps its end (front-truncated) and the second its start.
        full_a, full_b = _concat(docs[da], r["spans"][0]), _concat(docs[db], r["spans"][1])
        if task == "sop" and r["label"] == 1:
            assert a and b and full_a[:len(a)] == a and full_b[len(full_b) - len(b):] == b
        else:
            assert a and b and full_a[len(full_a) - len(a):] == a and full_b[:len(b)] == b
        assert r["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
        if task == "sop":
            assert da == db
            if r["label"] == 0:
                assert a1 == b0  # in order: B follows A
            else:
                assert b1 == a0  # swapped: A follows B in the document
        else:
            if r["label"] == 0:
                assert da == db and a1 == b0
            else:
                assert db != da


def test_bad_input_is_skipped_and_counted(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("One sentence only.\n   \nFirst sentence here. Second one follows.\n\t\nA. B. C.\n")
    docs, report = read_documents([SourceConfig(path=str(f))], "lines")
    assert report.counts["whitespace_lines"] == 2
    assert len(docs) == 3 and docs[1] == ["First sentence here.", "Second one follows."]
    layout_rows = segment_pairs([[([5, 6], [True, True])] * len(d) for d in docs], BERT_LAYOUT, 32, "sop", 0, report)
    assert report.counts["too_short_for_pair"] == 1
    assert len(layout_rows) == 2

    g = tmp_path / "empty.jsonl"
    g.write_text('{"text": ""}\n{"text": "   "}\n{"text": "Just one."}\n')
    docs, report = read_documents([SourceConfig(path=str(g))])
    assert report.counts["empty_documents"] == 2 and len(docs) == 1
    with pytest.raises(MMTuneError, match="no training pair.*too_short_for_pair"):
        segment_pairs([[([5], [True])]], BERT_LAYOUT, 32, "nsp", 0, report)


def test_paragraph_corpus_detected(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Doc one line one.\nDoc one line two.\n\nDoc two. Still doc two!\n")
    docs, _ = read_documents([SourceConfig(path=str(f))])
    assert docs == [["Doc one line one.", "Doc one line two."], ["Doc two.", "Still doc two!"]]


def test_single_segments_pack_whole_sentences_of_one_document():
    docs = synthetic_docs(300, seed=4)
    rows = single_segments(docs, BERT_LAYOUT, 48, CorpusReport())
    for r in rows:
        assert len(r["input_ids"]) <= 48
        (d, s0, s1), = r["spans"]
        full = _concat(docs[d], (d, s0, s1))
        assert r["input_ids"][1:-1] == full[:46]


def test_builtin_corpus_documents_have_several_sentences():
    docs = builtin_corpus(60)
    lengths = [len(split_sentences(d)) for d in docs]
    assert min(lengths) >= 4 and len(set(docs)) >= 55  # country facts can repeat
