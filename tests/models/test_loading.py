"""Loading local model directories: errors, dtypes, attention kernels, checkpointing, QLoRA."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from mmtune.config import AdapterConfig, ModelConfig
from mmtune.errors import ConfigError, MMTuneError
from mmtune.models.adapters import trainable_parameters
from mmtune.models.loading import load_model, load_tokenizer, resolve_dtype, resolve_model_path
from mmtune.models.tiny import build_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def _ids(n: int = 2, t: int = 16) -> torch.Tensor:
    return torch.randint(3, 1024, (n, t), generator=torch.Generator().manual_seed(0))


def test_missing_model_dir_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(MMTuneError, match="does not exist") as e:
        resolve_model_path(str(missing))
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MMTuneError, match="does not exist"):
        load_model(ModelConfig(path=str(missing)))


def test_non_model_dirs_say_what_is_missing(tmp_path, tiny_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MMTuneError, match=rf"'{empty}' has no config.json"):
        resolve_model_path(empty)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(MMTuneError, match="PEFT adapter directory"):
        resolve_model_path(adapter)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(MMTuneError, match="no weights"):
        resolve_model_path(no_weights)
    with pytest.raises(MMTuneError, match="a file, not a model directory"):
        resolve_model_path(tiny_dir / "config.json")
    with pytest.raises(MMTuneError, match="unknown built-in model; valid: builtin:tiny"):
        resolve_model_path("builtin:huge")
    assert resolve_model_path(str(tiny_dir)) == tiny_dir


def test_builtin_tiny_resolves_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMTUNE_CACHE", str(tmp_path))
    path = resolve_model_path("builtin:tiny")
    assert path == tmp_path / "builtin-tiny"
    tok = load_tokenizer("builtin:tiny")
    assert tok.pad_token == "<|endoftext|>"


def test_dtype_resolution_and_loading(tiny_dir):
    assert resolve_dtype("bfloat16") is torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_dtype("auto") is torch.float32
    model = load_model(ModelConfig(path=str(tiny_dir), dtype="bfloat16"), training=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training and trainable_parameters(model) == []


def test_eager_and_sdpa_attention_agree(tiny_dir):
    outs = []
    for attn in ("eager", "sdpa"):
        model = load_model(ModelConfig(path=str(tiny_dir), dtype="float32", attn_implementation=attn),
                           training=False)
        assert model.config._attn_implementation == attn
        with torch.no_grad():
            outs.append(model(input_ids=_ids()).logits)
    assert (outs[0] - outs[1]).abs().max() <= 1e-4


def test_unavailable_attention_kernel_is_a_config_error(tiny_dir):
    with pytest.raises(ConfigError, match="model.attn_implementation='flash_attention_2'"):
        load_model(ModelConfig(path=str(tiny_dir), attn_implementation="flash_attention_2"))


def test_lora_with_gradient_checkpointing_gives_the_same_gradients(tiny_dir):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = load_model(ModelConfig(path=str(tiny_dir), dtype="float32", gradient_checkpointing=ckpt),
                           AdapterConfig(r=4, dropout=0.0))
        assert model.training and model.base_model.model.is_activation_checkpointing is ckpt
        with torch.no_grad():  # nonzero B so that gradients reach every LoRA A
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        model(input_ids=_ids(), labels=_ids()).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * 7 * 2
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_full_finetune_with_freeze(tiny_dir):
    model = load_model(ModelConfig(path=str(tiny_dir), freeze=["model.embed_tokens.*"]), AdapterConfig(type="none"))
    names = trainable_parameters(model)
    assert "model.embed_tokens.weight" not in names and len(names) == 4 * 9 + 1


def test_quantization_needs_lora(tiny_dir):
    with pytest.raises(ConfigError, match="adapter.type=lora"):
        load_model(ModelConfig(path=str(tiny_dir), quantization="nf4"), AdapterConfig(type="none"))


def _bitsandbytes_reason() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure (missing lib, no backend) means skip
        return f"bitsandbytes cannot be imported ({type(e).__name__}: {e}); install mmtune[qlora]"
    return None


@pytest.mark.skipif(_bitsandbytes_reason() is not None, reason=str(_bitsandbytes_reason()))
def test_qlora_nf4_trains_on_a_repeated_batch(tiny_dir):
    torch.manual_seed(0)
    model = load_model(ModelConfig(path=str(tiny_dir), quantization="nf4", dtype="float32"),
                       AdapterConfig(r=8, alpha=16, dropout=0.0))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q.base_layer).__name__ == "Linear4bit" and q.base_layer.weight.quant_state.quant_type == "nf4"
    assert trainable_parameters(model) == sorted(n for n, _ in model.named_parameters() if "lora_" in n)
    # tokens from the tiny model's own vocabulary, repeated: LoRA must fit them
    tok = load_tokenizer(tiny_dir)
    x = torch.tensor([tok.encode("The capital of Peru is Lima. 3 plus 4 equals 7.")] * 2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0 and losses[-1] < losses[0] - 1.5, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 12, losses
    # the eval-mode forward (bitsandbytes' inference kernel) runs too
    model.eval()
    with torch.no_grad():
        assert model(input_ids=x).logits.shape == (2, x.shape[1], 1024)


def test_load_tokenizer_from_a_tokenizer_only_dir(tmp_path, tiny_dir):
    tok = load_tokenizer(tiny_dir)
    tok.save_pretrained(tmp_path / "tokenizer")
    again = load_tokenizer(tmp_path / "tokenizer")
    assert again.encode("What is 7 + 12?") == tok.encode("What is 7 + 12?")
    assert json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())


def test_loaded_model_matches_auto_class(tiny_dir):
    ours = load_model(ModelConfig(path=str(tiny_dir), dtype="float32"), training=False)
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=_ids()).logits, ref(input_ids=_ids()).logits)
