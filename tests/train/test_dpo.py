"""DPO: loss and rewards against a hand computation; the LoRA-disabled reference equals a frozen copy."""

import copy
import math

import pytest
import torch

from mmtune.config import AdapterConfig, validate_recipe
from mmtune.data.preference import collate_pairs, encode_pair, parse_pair
from mmtune.data.templates import get_template
from mmtune.errors import DataError
from mmtune.train.dpo import DPOObjective, dpo_loss, reference_logps, sequence_logps


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM

    from mmtune.models.loading import load_tokenizer
    from mmtune.models.tiny import ensure_tiny

    path = ensure_tiny()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path), load_tokenizer(path)


def pairs_batch(tok):
    tpl = get_template("auto", tok)
    recs = [{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
            {"prompt": "Reverse the words: red cat sun", "chosen": "sun cat red", "rejected": "red cat sun"}]
    exs = [encode_pair(tpl, *parse_pair(r), max_length=64) for r in recs]
    return collate_pairs(exs, tok.pad_token_id), exs


def manual_logp(model, ids, labels):
    """log p of the supervised tokens, one position at a time, in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    total = 0.0
    for t in range(1, len(ids)):
        if labels[t] != -100:
            total += float(torch.log_softmax(logits[t - 1], -1)[labels[t]])
    return total


def lora(model, seed=1):
    from mmtune.models.adapters import apply_adapter

    m = apply_adapter(copy.deepcopy(model), AdapterConfig(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return m


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_loss_matches_hand_computation(tiny, loss_type, ls):
    base, tok = tiny
    base = copy.deepcopy(base).double()  # float64 end to end: the comparison is exact to ~1e-12
    policy = lora(base)
    batch, exs = pairs_batch(tok)
    beta = 0.3
    out = DPOObjective(beta, loss_type, ls)(policy, batch)
    expected, chosen_r, rejected_r = 0.0, [], []
    for ex in exs:
        pc = manual_logp(policy, ex["chosen_ids"], ex["chosen_labels"])
        pr = manual_logp(policy, ex["rejected_ids"], ex["rejected_labels"])
        rc = manual_logp(base, ex["chosen_ids"], ex["chosen_labels"])
        rr = manual_logp(base, ex["rejected_ids"], ex["rejected_labels"])
        h = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":
            sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
            expected += -(1 - ls) * math.log(sig(beta * h)) - ls * math.log(sig(-beta * h))
        else:
            expected += (h - 1 / (2 * beta)) ** 2
        chosen_r.append(beta * (pc - rc))
        rejected_r.append(beta * (pr - rr))
    assert abs(float(out.loss_sum.detach()) - expected) <= 1e-6
    assert abs(out.metrics["rewards/chosen"] - sum(chosen_r) / 2) <= 1e-6
    assert abs(out.metrics["rewards/rejected"] - sum(rejected_r) / 2) <= 1e-6
    acc = sum(c > r for c, r in zip(chosen_r, rejected_r)) / 2
    assert out.metrics["rewards/accuracy"] == acc
    assert out.count == 2


def test_sft_weight_adds_per_token_nll_of_chosen(tiny):
    base, tok = tiny
    base = copy.deepcopy(base).double()
    policy = lora(base)
    batch, exs = pairs_batch(tok)
    plain = DPOObjective(0.3)(policy, batch)
    rpo = DPOObjective(0.3, sft_weight=0.7)(policy, batch)
    nll = [-manual_logp(policy, ex["chosen_ids"], ex["chosen_labels"])
           / sum(x != -100 for x in ex["chosen_labels"][1:]) for ex in exs]
    assert abs(float(rpo.loss_sum.detach()) - float(plain.loss_sum.detach()) - 0.7 * sum(nll)) <= 1e-6
    assert abs(rpo.metrics["nll/chosen"] - sum(nll) / 2) <= 1e-6


def test_disabled_adapter_reference_equals_frozen_copy(tiny):
    base, tok = tiny
    frozen = copy.deepcopy(base).eval()
    policy = lora(base)
    batch, _ = pairs_batch(tok)
    ref = reference_logps(policy, batch)
    with torch.no_grad():
        copy_ref = sequence_logps(frozen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                  batch["labels"])
        pol = sequence_logps(policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                             batch["labels"])
    assert torch.allclose(ref, copy_ref, atol=1e-6)
    assert (pol - ref).abs().max() > 1e-3  # the adapter does change the policy: the check can fail


def test_precomputed_reference_gives_same_loss(tiny):
    from mmtune.train.dpo import precompute_reference_logps

    base, tok = tiny
    policy = lora(base)
    batch, exs = pairs_batch(tok)
    live = DPOObjective(0.1)(policy, batch)
    precompute_reference_logps(policy, exs, lambda rows: collate_pairs(rows, tok.pad_token_id), progress=False)
    cached = collate_pairs(exs, tok.pad_token_id)
    assert "ref_logps" in cached
    out = DPOObjective(0.1)(policy, cached)
    assert abs(float(out.loss_sum) - float(live.loss_sum)) <= 1e-5


def test_formula_edge():
    z = torch.zeros(3)
    losses, m = dpo_loss(z, z, z, z, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2.0)))
    assert m["rewards/margin"] == 0.0


def test_pair_parsing_and_errors():
    msgs, c, r = parse_pair({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                             "chosen": {"role": "assistant", "content": "a"}, "rejected": "b"})
    assert [m["role"] for m in msgs] == ["system", "user"] and (c, r) == ("a", "b")
    with pytest.raises(DataError, match="missing field 'rejected'"):
        parse_pair({"prompt": "q", "chosen": "a"})
    with pytest.raises(DataError, match="empty"):
        parse_pair({"prompt": "q", "chosen": "a", "rejected": "  "})


def test_labels_only_on_response(tiny):
    _, tok = tiny
    batch, exs = pairs_batch(tok)
    ex = exs[0]
    sup = [t for t, lab in zip(ex["chosen_ids"], ex["chosen_labels"]) if lab != -100]
    assert tok.decode(sup).replace(" ", "").startswith("5")
    assert tok.decode(sup).endswith("<|im_end|>")


def test_dpo_recipe_validates():
    from mmtune.config import load_recipe

    r = load_recipe("dpo")
    assert r.objective == "dpo" and r.dpo.precompute_ref
    with pytest.raises(Exception, match="loss_type"):
        validate_recipe({"objective": "dpo", "dpo": {"loss_type": "hinge"}})


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_precomputed_reference_covers_eval_pairs(tmp_path, adapter):
    """Full fine-tuning drops its frozen copy after precomputing: eval pairs need their own
    reference log-probs (this crashed at the first eval before). `mmtune eval` then reports the
    same held-out preference accuracy as a direct computation on the trained model."""
    from transformers import AutoModelForCausalLM

    from mmtune.config import load_recipe
    from mmtune.models.loading import resolve_model_path
    from mmtune.train.run import run_recipe

    recipe = load_recipe("dpo", [f"train.output_dir={tmp_path}", "train.progress=false", "model.path=builtin:tiny",
                                 f"adapter.type={adapter}", "train.max_steps=2", "train.eval_every=1",
                                 "train.batch_size=4", "data.sources.0.max_records=8",
                                 "data.eval_sources.0.max_records=4", "train.tensorboard=false"])
    res = run_recipe(recipe, log=lambda *a: None)
    assert res["steps"] == 2 and math.isfinite(res["eval_loss"])
    # `mmtune eval` on the run: held-out preference accuracy against the starting model + exact match
    from mmtune.evaluation import eval_recipe

    metrics = eval_recipe(recipe, max_new_tokens=4)
    assert metrics["pairs/n"] == metrics["n"] == 4
    from mmtune.data.preference import load_eval_pairs, preference_accuracy
    from mmtune.data.templates import get_template
    from mmtune.models.loading import load_tokenizer

    tok = load_tokenizer(resolve_model_path("builtin:tiny"))
    ref = None if adapter == "lora" else AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny"))
    pairs = load_eval_pairs(recipe.data, get_template("auto", tok), recipe.train.seed)
    direct = preference_accuracy(res["trainer"].model, pairs,
                                 tok.pad_token_id, recipe.dpo.beta, ref_model=ref)
    for key in ("preference_accuracy", "logp_preference_accuracy"):
        assert metrics[f"pairs/{key}"] == direct[key]
    assert abs(metrics["pairs/reward_margin"] - direct["reward_margin"]) <= 1e-5
    assert 0 <= metrics["exact_match"] <= 1
