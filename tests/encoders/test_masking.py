"""MLM masking: the 15% / 80-10-10 statistics, special tokens, whole words, static vs dynamic masks."""

import torch

from mmtune.config import TrainConfig
from mmtune.encoders.masking import IGNORE, MLMCollator, mask_tokens, static_generator
from mmtune.train.loop import Trainer
from mmtune.train.objectives import LossOutput, Objective

V = 5000
SPECIAL = (0, 1, 2, 3, 4)  # pad, unk, cls, sep, mask
PAD, CLS, SEP, MASK = 0, 2, 3, 4
RANDOM_IDS = [i for i in range(V) if i not in SPECIAL]


def synthetic_rows(n, seed=0, min_len=20, max_len=60):
    """Rows shaped like pairs.py output: [CLS] a [SEP] b [SEP] with multi-token words."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        la, lb = (int(x) for x in torch.randint(min_len // 2, max_len // 2, (2,), generator=g))
        a = torch.randint(5, V, (la,), generator=g).tolist()
        b = torch.randint(5, V, (lb,), generator=g).tolist()
        ids = [CLS] + a + [SEP] + b + [SEP]
        special = [True] + [False] * la + [True] + [False] * lb + [True]
        # words of 1-3 tokens
        word_ids, w, left = [], -1, 0
        for s in special:
            if s:
                word_ids.append(-1)
                continue
            if left == 0:
                w += 1
                left = int(torch.randint(1, 4, (1,), generator=g))
            left -= 1
            word_ids.append(w)
        rows.append({"id": i, "input_ids": ids, "token_type_ids": [0] * (la + 2) + [1] * (lb + 1),
                     "special_mask": special, "word_ids": word_ids})
    return rows


def collator(**kw):
    return MLMCollator(pad_id=PAD, mask_id=MASK, random_ids=RANDOM_IDS, **kw)


def test_mlm_fractions_over_100k_tokens():
    rows = synthetic_rows(3000)
    batch = collator()(rows, rng=torch.Generator().manual_seed(1))
    orig, masked, labels = batch["original_ids"], batch["input_ids"], batch["labels"]
    real = batch["attention_mask"].bool() & ~batch["special_mask"]
    assert int(real.sum()) >= 100_000
    selected = labels != IGNORE
    frac = float(selected.sum()) / float(real.sum())
    assert abs(frac - 0.15) <= 0.005, frac
    # special tokens and padding are never selected, never changed
    assert not (selected & ~real).any()
    assert torch.equal(masked[~real], orig[~real])
    assert torch.equal(labels[selected], orig[selected])
    n = float(selected.sum())
    to_mask = float((masked[selected] == MASK).sum()) / n
    to_random = float(((masked[selected] != MASK) & (masked[selected] != orig[selected])).sum()) / n
    kept = float((masked[selected] == orig[selected]).sum()) / n
    assert abs(to_mask - 0.8) <= 0.01, to_mask
    assert abs(to_random - 0.1) <= 0.01, to_random
    assert abs(kept - 0.1) <= 0.01, kept
    # random replacements are never special tokens
    replaced = selected & (masked != MASK) & (masked != orig)
    assert not torch.isin(masked[replaced], torch.tensor(SPECIAL)).any()
    # unselected real tokens are untouched
    assert torch.equal(masked[real & ~selected], orig[real & ~selected])


def test_whole_word_masking_selects_whole_words():
    rows = synthetic_rows(2000, seed=3)
    batch = collator(whole_word=True)(rows, rng=torch.Generator().manual_seed(2))
    words = collator()._pad(rows, "word_ids", -1)  # (B, T)
    selected = batch["labels"] != IGNORE
    # key = row * 1000 + word: a word is selected iff all its tokens are
    key = (torch.arange(words.shape[0]).unsqueeze(1) * 1000 + words)[words >= 0]
    sel = selected[words >= 0].long()
    uniq, inv = key.unique(return_inverse=True)
    tokens_per_word = torch.zeros(len(uniq), dtype=torch.long).index_add_(0, inv, torch.ones_like(sel))
    selected_per_word = torch.zeros(len(uniq), dtype=torch.long).index_add_(0, inv, sel)
    assert bool(((selected_per_word == 0) | (selected_per_word == tokens_per_word)).all()), "a word is partly selected"
    picked = float((selected_per_word > 0).float().mean())
    assert abs(picked - 0.15) <= 0.01, picked
    real = batch["attention_mask"].bool() & ~batch["special_mask"]
    assert not (selected & ~real).any()


def test_static_mask_is_a_function_of_row_and_copy():
    row = synthetic_rows(1)[0]
    c = collator()
    a = c.mask_row(row, static_generator(42, 7, 0))
    b = c.mask_row(row, static_generator(42, 7, 0))
    other = c.mask_row(row, static_generator(42, 7, 1))
    assert a["masked_ids"] == b["masked_ids"] and a["labels"] == b["labels"]
    assert a["labels"] != other["labels"]


class _Noop(Objective):
    def count(self, batch):
        return 1

    def __call__(self, model, batch):
        return LossOutput(model.weight.sum() * 0, 1)


def _masks_by_epoch(rows, coll, tmp_path, epochs=2):
    """{epoch: {row id: (masked ids, labels)}} as the training loop would batch them."""
    cfg = TrainConfig(output_dir=str(tmp_path), batch_size=16, max_steps=1, progress=False, tensorboard=False,
                      seed=5)
    t = Trainer(torch.nn.Linear(1, 1), _Noop(), rows, coll, cfg)
    out = {}
    for micro in range(epochs * t.batches_per_epoch):
        epoch = micro // t.batches_per_epoch
        batch = t._micro_batch(micro)
        for rid, m, lab, att in zip(batch["row_id"], batch["input_ids"], batch["labels"], batch["attention_mask"]):
            n = int(att.sum())
            out.setdefault(epoch, {})[int(rid)] = (m[:n].tolist(), lab[:n].tolist())
    return out, t


def test_static_masks_identical_across_epochs_dynamic_masks_differ(tmp_path):
    rows = synthetic_rows(64, seed=9)
    c = collator()
    static_rows = [c.mask_row(r, static_generator(5, r["id"])) for r in rows]
    static, _ = _masks_by_epoch(static_rows, c, tmp_path / "s")
    assert static[0] == static[1] and len(static[0]) == 64

    dynamic, t = _masks_by_epoch(rows, c, tmp_path / "d")
    differ = sum(dynamic[0][i][1] != dynamic[1][i][1] for i in range(64))
    assert differ >= 60, differ  # essentially every sequence gets a new mask
    # ...and re-batching the same (epoch, batch) draws the same mask: reproducible on resume
    again = t._micro_batch(t.batches_per_epoch + 1)
    first = t._micro_batch(t.batches_per_epoch + 1)
    assert torch.equal(again["input_ids"], first["input_ids"])


def test_mask_tokens_never_selects_when_everything_is_special():
    ids = torch.randint(5, V, (4, 30))
    masked, labels = mask_tokens(ids, torch.ones_like(ids, dtype=torch.bool), mask_id=MASK,
                                 random_ids=torch.tensor(RANDOM_IDS), rng=torch.Generator().manual_seed(0),
                                 mlm_probability=0.99)
    assert (labels == IGNORE).all() and torch.equal(masked, ids)
