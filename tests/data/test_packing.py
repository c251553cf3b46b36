"""Packing: best-fit-decreasing invariants, collators, and packed == unpacked logits and loss on tiny
transformers models (the test that proves samples in a row do not attend to each other)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mmtune.data.packing import collate_packed, collate_padded, pack_examples, packing_efficiency
from mmtune.train.objectives import CausalLMObjective

VOCAB = 128


def _examples(lengths, seed=0, supervised_from=None):
    """Examples with random tokens; labels follow the data engine's convention (labels[0] = -100)."""
    g = random.Random(seed)
    out = []
    for n in lengths:
        ids = [g.randrange(1, VOCAB) for _ in range(n)]
        start = supervised_from(n) if supervised_from else 1
        labels = [-100 if i < max(start, 1) else t for i, t in enumerate(ids)]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_best_fit_decreasing_invariants_and_efficiency():
    g = random.Random(0)
    # log-normal lengths (median ~ e^5 = 148), like instruction data; capped at max_length
    L = 512
    lengths = [min(L, max(4, int(g.lognormvariate(5.0, 0.8)))) for _ in range(2000)]
    examples = _examples(lengths, seed=1)
    rows = pack_examples(examples, L)
    assert all(len(r["input_ids"]) <= L for r in rows)
    assert sorted(i for r in rows for i in r["indices"]) == list(range(len(examples)))  # each exactly once
    for r in rows:
        assert r["input_ids"] == [t for i in r["indices"] for t in examples[i]["input_ids"]]
        assert r["labels"] == [t for i in r["indices"] for t in examples[i]["labels"]]
        assert r["position_ids"] == [p for n in r["lengths"] for p in range(n)]
        assert r["lengths"] == [lengths[i] for i in r["indices"]]
    lower_bound = math.ceil(sum(lengths) / L)  # no packing can use fewer rows
    eff = packing_efficiency(rows, L)
    assert eff == pytest.approx(sum(lengths) / (len(rows) * L))
    assert len(rows) <= lower_bound + 2 and eff > 0.98, (len(rows), lower_bound, eff)
    # far better than one sample per row, and no worse than first-fit in arrival order
    assert eff > 2.5 * packing_efficiency([{"input_ids": e["input_ids"]} for e in examples], L)
    first_fit: list[int] = []
    for n in lengths:
        k = next((j for j, used in enumerate(first_fit) if used + n <= L), None)
        if k is None:
            first_fit.append(n)
        else:
            first_fit[k] += n
    assert len(rows) <= len(first_fit)


def test_pack_rejects_overlong_and_empty():
    with pytest.raises(ValueError, match="1..8"):
        pack_examples(_examples([9]), 8)
    with pytest.raises(ValueError, match="1..8"):
        pack_examples([{"input_ids": [], "labels": []}], 8)
    assert pack_examples([], 8) == [] and packing_efficiency([], 8) == 0.0


def test_collate_packed_pads_and_has_no_attention_mask():
    rows = pack_examples(_examples([5, 3, 4, 2]), 8)  # BFD: [5, 3], [4, 2]
    assert [r["lengths"] for r in rows] == [[5, 3], [4, 2]]
    batch = collate_packed(rows, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert all(v.dtype == torch.long and v.shape == (2, 8) for v in batch.values())
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["input_ids"][1, 6:].tolist() == [0, 0] and batch["labels"][1, 6:].tolist() == [-100, -100]
    rows = pack_examples(_examples([4, 3]), 4)
    assert collate_packed(rows, pad_id=0)["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_collate_padded():
    ex = _examples([3, 5])
    batch = collate_padded(ex, pad_id=7)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["input_ids"][0].tolist() == ex[0]["input_ids"] + [7, 7]
    assert batch["labels"][0].tolist() == ex[0]["labels"] + [-100, -100]


def _tiny(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  attn_implementation="sdpa")
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    return model.float().eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_equals_unpacked_logits_and_loss(kind):
    model = _tiny(kind)
    lengths = [23, 7, 31, 12, 5, 18, 40, 9]
    examples = _examples(lengths, seed=3, supervised_from=lambda n: n // 2)
    rows = pack_examples(examples, 64)
    assert len(rows) < len(examples) and max(len(r["lengths"]) for r in rows) >= 3
    batch = collate_packed(rows, pad_id=0)
    with torch.no_grad():
        packed = model(**batch_inputs(batch), use_cache=False).logits  # (B, T, V)
        worst = 0.0
        for b, row in enumerate(rows):
            start = 0
            for i, n in zip(row["indices"], row["lengths"]):
                alone = model(input_ids=torch.tensor([examples[i]["input_ids"]]), use_cache=False).logits[0]
                worst = max(worst, (packed[b, start:start + n] - alone).abs().max().item())
                start += n
        assert worst <= 1e-5, worst

        # the same loss (sum and count) through the objective, packed vs padded unpacked batches
        objective = CausalLMObjective()
        p = objective(model, batch)
        u = objective(model, collate_padded(examples, pad_id=0))
        assert int(p.count) == int(u.count) == objective.count(batch) == sum(
            sum(1 for x in e["labels"] if x != -100) for e in examples)
        assert abs(p.loss_sum.item() / int(p.count) - u.loss_sum.item() / int(u.count)) <= 1e-5  # mean loss
        assert abs(p.loss_sum.item() - u.loss_sum.item()) <= 1e-6 * abs(u.loss_sum.item())
        per_sample = sum(objective(model, collate_padded([e], 0)).loss_sum.item() for e in examples)
        assert abs(p.loss_sum.item() - per_sample) <= 1e-6 * per_sample

        # the test can fail: an attention_mask of ones lets packed samples see each other
        leaky = model(**batch_inputs(batch), attention_mask=torch.ones_like(batch["input_ids"]),
                      use_cache=False).logits
        first_len = rows[0]["lengths"][0]
        assert (leaky[0, :first_len] - packed[0, :first_len]).abs().max().item() <= 1e-5  # first sample unaffected
        assert (leaky[0, first_len:len(rows[0]["input_ids"])] - packed[0, first_len:len(rows[0]["input_ids"])]
                ).abs().max().item() > 1e-3


def batch_inputs(batch):
    from mmtune.train.objectives import model_inputs

    return model_inputs(batch)


def test_packed_equals_unpacked_in_fp64_and_rope_angles_are_fp32():
    """Without fp32 accumulation noise (fp64), packed == alone to ~1e-15, so the fp32 differences
    are rounding; a shift of absolute positions still shows in fp64 because transformers computes
    the RoPE angles in fp32, which is why positions restart at 0 per sample (issue 13 item 7;
    tests/models/test_real_model.py measures both on SmolLM2-135M)."""
    model = _tiny("llama").double()
    examples = _examples([23, 7, 31, 12], seed=5)
    rows = pack_examples(examples, 64)
    batch = collate_packed(rows, pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        worst = 0.0
        for b, row in enumerate(rows):
            start = 0
            for i, n in zip(row["indices"], row["lengths"]):
                alone = model(input_ids=torch.tensor([examples[i]["input_ids"]]), use_cache=False).logits[0]
                worst = max(worst, (packed[b, start:start + n] - alone).abs().max().item())
                start += n
        assert worst <= 1e-12, worst
        ids = torch.tensor([examples[2]["input_ids"]])
        at0 = model(input_ids=ids, position_ids=torch.arange(31)[None], use_cache=False).logits
        shifted = model(input_ids=ids, position_ids=torch.arange(200, 231)[None], use_cache=False).logits
        assert (shifted - at0).abs().max().item() > 1e-9
