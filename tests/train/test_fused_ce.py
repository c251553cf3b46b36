"""The chunked linear cross-entropy equals the plain one (values and gradients within 1e-5,
fp32), never holds the (tokens, vocab) logits, and as an objective trains like ``sft``."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmtune.train.fused_ce import (
    FusedCausalLMObjective,
    causal_lm_loss,
    default_chunk_size,
    linear_cross_entropy,
    supports_fused_head,
)
from mmtune.train.objectives import CausalLMObjective, shifted_token_loss

TOL = dict(atol=1e-5, rtol=1e-5)


def problem(n=53, h=32, v=97, bias=True, ignore_every=4, seed=0):
    """Hidden states and a head at LLM-like scales (unit hidden states, 0.02-std weights x 10
    for non-trivial softmaxes), some targets ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (0.2 * torch.randn(v, h, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(v, generator=g)).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::ignore_every] = -100
    return hidden, weight, b, targets


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, None])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_equals_plain_cross_entropy(chunk, bias, reduction):
    hidden, weight, b, targets = problem(bias=bias)
    ours = linear_cross_entropy(hidden, weight, targets, b, reduction=reduction, chunk_size=chunk, backend="chunked")
    ref = F.cross_entropy(F.linear(hidden, weight, b), targets, ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(ours, ref, **TOL)
    # A non-unit upstream gradient, as the Trainer's normalisation gives.
    for a, r in zip(grads(ours * 0.37, (hidden, weight, b)), grads(ref * 0.37, (hidden, weight, b))):
        torch.testing.assert_close(a, r, **TOL)


def test_rows_without_targets_give_zero_loss_and_gradient():
    hidden, weight, b, targets = problem(n=9)
    targets[:] = -100
    loss = linear_cross_entropy(hidden, weight, targets, b, chunk_size=4)
    assert float(loss.detach()) == 0.0
    for g in grads(loss, (hidden, weight, b)):
        assert torch.count_nonzero(g) == 0


def test_frozen_head_gets_no_weight_gradient_buffer():
    hidden, weight, _, targets = problem()
    loss = linear_cross_entropy(hidden, weight.detach(), targets, chunk_size=8)
    saved_h, saved_w, saved_b = loss.grad_fn.saved_tensors
    assert saved_h is not None and saved_w is None and saved_b is None
    ref = F.cross_entropy(hidden @ weight.detach().T, targets, reduction="sum")
    torch.testing.assert_close(grads(loss, (hidden,))[0], grads(ref, (hidden,))[0], **TOL)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_all_logits():
    n, h, v = 512, 32, 2048
    hidden, weight, b, targets = problem(n=n, h=h, v=v)
    chunk = default_chunk_size(n, h, v)
    assert chunk == 8  # 512 / ceil(2048 / 32) = 8 rows: a chunk's logits are the size of the hidden states
    with LargestTensor() as plain:
        F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum").backward()
    with LargestTensor() as fused:
        linear_cross_entropy(hidden, weight, targets, b, backend="chunked").backward()
    assert plain.largest == n * v
    assert fused.largest == v * h  # the weight gradient; the largest logits block is chunk x v = 16k
    assert fused.largest < n * v / 8


def test_auto_backend_on_cpu_is_chunked_and_liger_needs_the_extra():
    hidden, weight, _, targets = problem()
    loss = linear_cross_entropy(hidden, weight, targets)  # CPU: the chunked version
    assert type(loss.grad_fn).__name__.startswith("ChunkedLinearCrossEntropy")
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(ImportError, match=r"mmtune\[gpu\]"):
            linear_cross_entropy(hidden, weight, targets, backend="liger")


def tiny_llama(tie: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[2, 15:] = -100
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_causal_lm_loss_equals_the_shifted_logits_loss():
    model = tiny_llama(tie=False)
    b = batch()
    hidden = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    ours, n = causal_lm_loss(hidden, model.lm_head.weight, b["labels"], chunk_size=5)
    ref, n_ref = shifted_token_loss(model.lm_head(hidden), b["labels"])
    torch.testing.assert_close(ours, ref, **TOL)
    assert int(n) == int(n_ref) == int((b["labels"][:, 1:] != -100).sum())


@pytest.mark.parametrize("setup", ["lora", "full-tied", "full-untied"])
def test_fused_objective_gives_the_sft_loss_and_gradients(setup):
    def build():
        model = tiny_llama(tie=setup == "full-tied")
        if setup == "lora":
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(1)
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        return model

    b = batch()
    results = []
    for obj in (CausalLMObjective(), FusedCausalLMObjective(chunk_size=7)):
        model = build()
        out = obj(model, b)
        out.loss_sum.backward()
        results.append((out, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
        # The head is restored after the fused forward.
        assert type(model.get_output_embeddings()).__name__ == "Linear"
    (plain, g_plain), (fused, g_fused) = results
    torch.testing.assert_close(fused.loss_sum, plain.loss_sum, **TOL)
    assert int(fused.count) == int(plain.count) == CausalLMObjective().count(b)
    assert g_plain.keys() == g_fused.keys() and g_plain
    for k in g_plain:
        torch.testing.assert_close(g_fused[k], g_plain[k], **TOL, msg=k)


def test_wrapped_head_falls_back_to_the_plain_loss():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(tie=False), LoraConfig(r=2, target_modules=["q_proj"],
                                                            modules_to_save=["lm_head"]))
    assert "not a plain Linear" in supports_fused_head(model)
    assert supports_fused_head(tiny_llama(tie=True)) is None
    b = batch()
    torch.testing.assert_close(FusedCausalLMObjective()(model, b).loss_sum, CausalLMObjective()(model, b).loss_sum)
