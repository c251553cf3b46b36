"""LoRA / DoRA / rsLoRA through PEFT, full fine-tuning, freezing: parity and exact trainable sets."""

from __future__ import annotations

import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from mmtune.config import AdapterConfig
from mmtune.errors import ConfigError
from mmtune.models.adapters import apply_adapter, apply_freeze, trainable_parameters, trainable_summary
from mmtune.models.tiny import build_tiny

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def _base(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


def _randomize_lora(model, seed: int = 0, std: float = 0.05) -> None:
    """LoRA B starts at zero (the adapter is a no-op); give A and B values so merging matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _ids() -> torch.Tensor:
    return torch.randint(3, 1024, (2, 20), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _lora_names(layers=range(4), modules=LINEARS, prefix="base_model.model.model.layers"):
    return sorted(f"{prefix}.{i}.{m}.lora_{ab}.default.weight" for i in layers for m in modules for ab in "AB")


def test_merged_equals_unmerged_lora(tiny_dir):
    base_logits = _logits(_base(tiny_dir))
    model = apply_adapter(_base(tiny_dir), AdapterConfig(r=8, alpha=16, dropout=0.0))
    _randomize_lora(model)
    unmerged = _logits(model)
    # the adapter changes the output, so the comparison below can fail
    assert (unmerged - base_logits).abs().max() > 1e-2
    merged_model = model.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged_model.named_parameters())
    merged = _logits(merged_model)
    assert (merged - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize("rslora", [False, True])
def test_rslora_scaling(tiny_dir, rslora):
    cfg = AdapterConfig(r=16, alpha=8, rslora=rslora, dropout=0.0)
    model = apply_adapter(_base(tiny_dir), cfg)
    assert model.peft_config["default"].use_rslora is rslora
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = 8 / math.sqrt(16) if rslora else 8 / 16
    assert q.scaling["default"] == pytest.approx(expected)
    # the scaling is what the forward uses: delta = scaling * B A x
    _randomize_lora(model)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        delta = q(x) - q.base_layer(x)
        ref = expected * (x @ q.lora_A["default"].weight.T @ q.lora_B["default"].weight.T)
    assert torch.allclose(delta, ref, atol=1e-6)


def test_dora_builds_magnitude_vectors_and_runs(tiny_dir):
    model = apply_adapter(_base(tiny_dir), AdapterConfig(r=4, alpha=8, dora=True, dropout=0.0,
                                                         targets=["q_proj", "v_proj"]))
    assert model.peft_config["default"].use_dora is True
    names = trainable_parameters(model)
    mags = [n for n in names if "lora_magnitude_vector" in n]
    assert len(mags) == 4 * 2
    # DoRA initialises the magnitude to the weight column norms: the model starts as the base
    assert (_logits(model) - _logits(_base(tiny_dir))).abs().max() <= 1e-5
    _randomize_lora(model)
    out = model(input_ids=_ids(), labels=_ids())
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    merged = _logits(model)
    assert (_logits(model.merge_and_unload()) - merged).abs().max() <= 1e-5


def test_trainable_names_lora_all_linear(tiny_dir):
    model = apply_adapter(_base(tiny_dir), AdapterConfig())
    assert trainable_parameters(model) == _lora_names()


def test_trainable_names_lora_explicit_targets_and_string(tiny_dir):
    model = apply_adapter(_base(tiny_dir), AdapterConfig(targets=["q_proj", "v_proj"]))
    assert trainable_parameters(model) == _lora_names(modules=("self_attn.q_proj", "self_attn.v_proj"))
    # a single name as a string means that module, not a regex over the full path
    model = apply_adapter(_base(tiny_dir), AdapterConfig(targets="down_proj"))
    assert trainable_parameters(model) == _lora_names(modules=("mlp.down_proj",))


def test_trainable_names_lora_with_freeze_and_modules_to_save(tiny_dir):
    model = apply_adapter(_base(tiny_dir), AdapterConfig(targets=["q_proj"], modules_to_save=["model.norm"]))
    frozen = apply_freeze(model, ["model.layers.0.*"])  # written without the PEFT prefix
    assert frozen and all(".layers.0." in n for n in frozen)
    expected = _lora_names(layers=(1, 2, 3), modules=("self_attn.q_proj",))
    expected += ["base_model.model.model.norm.modules_to_save.default.weight"]
    assert trainable_parameters(model) == sorted(expected)


def test_trainable_names_full_and_freeze(tiny_dir):
    model = apply_adapter(_base(tiny_dir), AdapterConfig(type="none"))
    every = sorted(n for n, _ in model.named_parameters())
    assert trainable_parameters(model) == every
    assert len(every) == 1 + 4 * 9 + 1  # embeddings (tied head), 4 x (7 linears + 2 norms), final norm
    frozen = apply_freeze(model, ["model.embed_tokens.*", "model.layers.[01].*"])
    expected = sorted(["model.norm.weight"] + [f"model.layers.{i}.{m}.weight" for i in (2, 3)
                                               for m in LINEARS + ("input_layernorm", "post_attention_layernorm")])
    assert trainable_parameters(model) == expected
    assert sorted(frozen) == sorted(set(every) - set(expected))


def test_freeze_pattern_matching_nothing_is_an_error(tiny_dir):
    model = _base(tiny_dir)
    with pytest.raises(ConfigError, match=r"model\.freeze pattern 'model\.embeddings\.\*' matches no parameter"):
        apply_freeze(model, ["model.embeddings.*"])


def test_unknown_target_is_a_config_error(tiny_dir):
    with pytest.raises(ConfigError, match=r"adapter\.targets=\['query'\].*q_proj"):
        apply_adapter(_base(tiny_dir), AdapterConfig(targets=["query"]))


def test_trainable_summary_counts(tiny_dir):
    model = apply_adapter(_base(tiny_dir), AdapterConfig(r=8, targets=["q_proj"]))
    lora = 4 * (8 * 128 + 128 * 8)
    total = 1_115_264 + lora
    text = trainable_summary(model)
    assert text == f"trainable {lora:,} / {total:,} params ({100 * lora / total:.1f}%) in 8 tensors"
    assert re.fullmatch(r"trainable [\d,]+ / [\d,]+ params \(\d+\.\d%\) in \d+ tensors", text)
