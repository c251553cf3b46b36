"""Rehearsal memories: reservoir uniformity (chi-square), class balance, disk storage, resume."""

import random

import pytest
import torch
from scipy.stats import chisquare

from mmtune.continual.buffer import ClassBalancedBuffer, ReservoirBuffer, build_buffer
from mmtune.errors import ConfigError


def inclusion_counts(make, n_items: int, streams: int) -> list[int]:
    counts = [0] * n_items
    for s in range(streams):
        buf = make(s)
        buf.extend(range(n_items))
        for item in buf.items():
            counts[item] += 1
    return counts


def test_reservoir_keeps_every_item_with_equal_probability():
    # Algorithm R: after n offers each item is kept with probability k/n. Over 3000 streams each
    # of 100 items should be kept 3000 * 10 / 100 = 300 times; chi-square over the 100 items.
    counts = inclusion_counts(lambda s: ReservoirBuffer(10, seed=s), 100, 3000)
    assert sum(counts) == 3000 * 10
    assert chisquare(counts).pvalue > 1e-3
    # The test has power: a biased memory (keep the first half twice as often) is rejected.
    biased = [400 if i < 50 else 200 for i in range(100)]
    assert chisquare(biased).pvalue < 1e-6


def test_reservoir_fills_then_stays_at_capacity():
    buf = ReservoirBuffer(5, seed=0)
    assert buf.extend(range(5)) == [0, 1, 2, 3, 4]
    buf.extend(range(5, 1000))
    assert len(buf) == 5 and buf.seen == 1000
    assert len(set(buf.items())) == 5


def _imbalanced_stream(seed: int) -> list[dict]:
    rows = [{"y": 0, "i": i} for i in range(180)] + [{"y": 1, "i": 180 + i} for i in range(20)]
    random.Random(seed).shuffle(rows)
    return rows


def test_class_balanced_buffer_balances_an_imbalanced_stream():
    cb, plain = [], []
    for s in range(200):
        stream = _imbalanced_stream(s)
        b = ClassBalancedBuffer(20, label_fn=lambda r: r["y"], seed=s)
        b.extend(stream)
        cb.append(b.counts().get(1, 0))
        r = ReservoirBuffer(20, seed=s)
        r.extend(stream)
        plain.append(sum(it["y"] for it in r.items()))
    # 10% of the stream is class 1: a reservoir keeps ~2 of 20, the balanced memory ~10.
    assert sum(plain) / len(plain) == pytest.approx(2.0, abs=0.5)
    assert sum(cb) / len(cb) == pytest.approx(10.0, abs=1.0)


def test_class_balanced_buffer_is_uniform_within_a_class():
    # Within the majority class, CBRS is a reservoir: every class-0 item is kept equally often.
    counts = [0] * 180
    for s in range(1000):
        b = ClassBalancedBuffer(20, label_fn=lambda r: r["y"], seed=s)
        b.extend(_imbalanced_stream(10_000 + s))
        for it in b.items():
            if it["y"] == 0:
                counts[it["i"]] += 1
    assert chisquare(counts).pvalue > 1e-3


def test_disk_buffer_matches_memory_buffer(tmp_path):
    items = [{"x": torch.full((3,), float(i)), "y": i} for i in range(60)]
    mem, disk = ReservoirBuffer(8, seed=3), ReservoirBuffer(8, seed=3, path=tmp_path / "buf")
    mem.extend(items)
    disk.extend(items)
    assert [it["y"] for it in mem.items()] == [it["y"] for it in disk.items()]
    assert torch.equal(disk[0]["x"], mem[0]["x"])
    assert len(list((tmp_path / "buf").glob("slot-*.pt"))) >= 8


def test_disk_buffer_resumes_from_a_saved_state_after_later_writes(tmp_path):
    """A crash after changing the memory but before saving must resume from the saved state."""
    items = [{"y": i} for i in range(100)]
    ref = ReservoirBuffer(8, seed=5)
    ref.extend(items)

    a = ReservoirBuffer(8, seed=5, path=tmp_path / "buf")
    a.extend(items[:50])
    saved = a.state_dict()
    at_save = [it["y"] for it in a.items()]
    a.extend(items[50:80])  # progress that is never saved (the "crash")

    b = ReservoirBuffer(8, seed=5, path=tmp_path / "buf")
    b.load_state_dict(saved)
    assert [it["y"] for it in b.items()] == at_save
    b.extend(items[50:])
    assert [it["y"] for it in b.items()] == [it["y"] for it in ref.items()]


def test_memory_buffer_state_round_trip():
    a = ClassBalancedBuffer(6, label_fn=lambda r: r % 3, seed=1)
    a.extend(range(40))
    b = ClassBalancedBuffer(6, label_fn=lambda r: r % 3, seed=99)
    b.load_state_dict(a.state_dict())
    a.extend(range(40, 80))
    b.extend(range(40, 80))
    assert a.items() == b.items() and a.counts() == b.counts()


def test_sample_is_without_replacement_and_seeded():
    buf = ReservoirBuffer(50, seed=0)
    buf.extend(range(50))
    s1 = buf.sample(20, random.Random(7))
    assert len(set(s1)) == 20 and s1 == buf.sample(20, random.Random(7))
    assert sorted(buf.sample(500, random.Random(1))) == list(range(50))


def test_build_buffer_validates():
    with pytest.raises(ConfigError, match="valid: reservoir, class_balanced"):
        build_buffer("fifo", 10)
    with pytest.raises(ConfigError, match="positive"):
        ReservoirBuffer(0)
