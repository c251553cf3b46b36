"""Attention for packed batches: the choice falls back cleanly on CPU, the flash varlen
boundaries match transformers', and sdpa/eager with position_ids restarting per sample give
each sample the logits it has alone (block-diagonal attention)."""

from __future__ import annotations

import pytest
import torch

from mmtune.errors import ConfigError
from mmtune.train.attention import AttentionChoice, choose_attention, packed_attention_kwargs


def test_auto_on_cpu_is_sdpa_with_a_reason():
    c = choose_attention("auto", device="cpu", dtype=torch.float32)
    assert c.implementation == "sdpa" and "no CUDA device" in c.reason and not c.varlen
    assert c.forward_kwargs(torch.tensor([[0, 1, 0, 1]])) == {}


@pytest.mark.parametrize("requested", ["flash_attention_2", "flash_attention_3", "flex_attention"])
def test_unavailable_kernels_fall_back_to_sdpa(requested):
    c = choose_attention(requested, device="cpu", dtype=torch.bfloat16)
    assert c.implementation == "sdpa" and c.reason


def test_explicit_sdpa_and_eager_are_kept_and_unknown_names_fail():
    assert choose_attention("eager").implementation == "eager"
    assert choose_attention("sdpa").implementation == "sdpa"
    with pytest.raises(ConfigError, match="Did you mean 'flash_attention_2'"):
        choose_attention("flash_attention2")


def test_flash_fp32_reason(monkeypatch):
    import mmtune.train.attention as att

    monkeypatch.setattr(att.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(att, "flash_available", lambda version=2: True)
    assert choose_attention("auto", device="cuda", dtype=torch.bfloat16).implementation == "flash_attention_3"
    c = choose_attention("auto", device="cuda", dtype=torch.float32)
    assert c.implementation == "sdpa" and "fp16/bf16" in c.reason


def test_varlen_kwargs_match_transformers():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    kw = packed_attention_kwargs(pos, "flash_attention_2")
    (cu_q, cu_k), (mq, mk) = prepare_fa_kwargs_from_position_ids(pos)
    assert kw["cu_seq_lens_q"].tolist() == cu_q.tolist() == [0, 3, 5, 9, 15, 18]
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"]
    assert kw["max_length_q"] == kw["max_length_k"] == int(mq) == 6 and isinstance(kw["max_length_q"], int)
    again = AttentionChoice("flash_attention_2", "").forward_kwargs(pos)
    assert again.keys() == kw.keys() and torch.equal(again["cu_seq_lens_q"], kw["cu_seq_lens_q"])
    with pytest.raises(ValueError, match="start every row with 0"):
        packed_attention_kwargs(torch.tensor([[0, 1], [2, 3]]), "flash_attention_2")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_row_gives_each_sample_its_own_logits(impl):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = choose_attention(impl).implementation
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    lengths = [5, 3, 7]
    ids = torch.randint(0, 96, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, 15) restarting per sample
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits  # (1, 15, V)
        start = 0
        for n in lengths:
            alone = model(input_ids=ids[:, start:start + n], use_cache=False).logits  # (1, n, V)
            torch.testing.assert_close(packed[:, start:start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
        # Without the restart the samples would see each other: the test can fail.
        leaky = model(input_ids=ids, use_cache=False).logits
        assert (leaky[:, 5:8] - packed[:, 5:8]).abs().max() > 1e-3
