"""Export trainer checkpoints to Hugging Face directories and merge LoRA adapters."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmtune.config import AdapterConfig
from mmtune.errors import MMTuneError
from mmtune.export import export_checkpoint, find_checkpoint, merge_adapter
from mmtune.models.adapters import apply_adapter
from mmtune.models.tiny import build_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def _ids() -> torch.Tensor:
    return torch.randint(3, 1024, (2, 20), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=_ids()).logits.float()


def _write_checkpoint(ckpt, model, tiny_dir, adapter: str, step: int = 10):
    """The layout the trainer writes (see mmtune.export)."""
    model.save_pretrained(ckpt / "model")
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(ckpt / "tokenizer")
    (ckpt / "recipe.yaml").write_text("model:\n  path: builtin:tiny\n")
    torch.save({"step": step}, ckpt / "trainer_state.pt")
    (ckpt / "meta.json").write_text(json.dumps({"step": step, "adapter": adapter, "base_model": str(tiny_dir)}))
    return ckpt


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_dir):
    """A run directory with a LoRA checkpoint (nonzero B, so the adapter matters), and its logits."""
    run = tmp_path_factory.mktemp("run")
    model = apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir),
                          AdapterConfig(r=8, alpha=16, dropout=0.0, modules_to_save=["norm"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    _write_checkpoint(run / "checkpoints" / "step-00000010", model, tiny_dir, "lora")
    return run, _logits(model), _logits(AutoModelForCausalLM.from_pretrained(tiny_dir))


def test_find_checkpoint_prefers_final_then_latest_step(tmp_path):
    for name in ("checkpoints/step-00000002", "checkpoints/step-00000010", "checkpoints/step-00000009"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "meta.json").write_text("{}")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000010"
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "meta.json").write_text("{}")
    assert find_checkpoint(tmp_path) == tmp_path / "final"
    assert find_checkpoint(tmp_path / "checkpoints" / "step-00000002") == tmp_path / "checkpoints" / "step-00000002"
    assert find_checkpoint(tmp_path / "checkpoints") is None


def test_export_lora_checkpoint_loads_with_peft(tmp_path, tiny_dir, lora_run):
    run, expected, base_logits = lora_run
    out = export_checkpoint(run, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_dir)
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "mmtune_recipe.yaml").is_file() and not (out / "trainer_state.pt").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]), out)
    logits = _logits(model)
    assert torch.equal(logits, expected)
    assert (logits - base_logits).abs().max() > 1e-2
    assert AutoTokenizer.from_pretrained(out).encode("What is 7 + 12?")
    # an occupied output directory is refused unless overwrite is asked for
    with pytest.raises(MMTuneError, match="exists and is not empty"):
        export_checkpoint(run, out)
    assert export_checkpoint(run, out, overwrite=True) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary dirs left


@pytest.mark.parametrize("source", ["checkpoint", "exported"])
def test_merge_adapter_reloads_to_the_same_logits(tmp_path, lora_run, source):
    run, expected, _ = lora_run
    src = run if source == "checkpoint" else export_checkpoint(run, tmp_path / "adapter")
    out = merge_adapter(None, src, tmp_path / "merged", max_shard_size="1MB")
    assert not (out / "adapter_config.json").exists()
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert (_logits(merged) - expected).abs().max() <= 1e-5
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_merge_in_bfloat16(tmp_path, tiny_dir, lora_run):
    run, expected, _ = lora_run
    out = merge_adapter(tiny_dir, run / "checkpoints" / "step-00000010", tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert (_logits(model) - expected).abs().max() < 0.1  # bf16 rounding of the merged weights only


def test_full_finetune_checkpoint_exports_and_merges(tmp_path, tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    ckpt = _write_checkpoint(tmp_path / "final", model, tiny_dir, "none")
    expected = _logits(model)
    out = export_checkpoint(ckpt, tmp_path / "export")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out)), expected)
    out = merge_adapter(None, ckpt, tmp_path / "merged")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out)), expected)


def test_export_errors_name_the_missing_file(tmp_path, tiny_dir, lora_run):
    run, _, _ = lora_run
    with pytest.raises(MMTuneError, match="no .*meta.json"):
        export_checkpoint(tmp_path, tmp_path / "out")
    with pytest.raises(MMTuneError, match="does not exist"):
        export_checkpoint(tmp_path / "missing", tmp_path / "out")
    broken = tmp_path / "broken"
    model = apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), AdapterConfig(r=4))
    _write_checkpoint(broken, model, tiny_dir, "lora")
    (broken / "model" / "adapter_model.safetensors").unlink()
    with pytest.raises(MMTuneError, match=r"missing .*model/adapter_model\.safetensors"):
        export_checkpoint(broken, tmp_path / "out")
    with pytest.raises(MMTuneError, match=r"missing .*model/adapter_model\.safetensors"):
        merge_adapter(None, broken, tmp_path / "out")
    (broken / "meta.json").write_text(json.dumps({"step": 1, "adapter": "lora"}))
    with pytest.raises(MMTuneError, match="meta.json: missing key 'base_model'"):
        export_checkpoint(broken, tmp_path / "out")
    with pytest.raises(MMTuneError, match="merge dtype 'int8'"):
        merge_adapter(None, run, tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out").exists()
