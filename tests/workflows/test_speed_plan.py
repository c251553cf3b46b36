"""`mmtune train` builds its run from the speed plan (mmtune.train.fast_path): on this CUDA-less
machine the CPU fast path, with the plan's kernel in from_pretrained, its collate, its objective
and its compile choice (the varlen path end to end: tests/train/test_fast_path.py)."""

from __future__ import annotations

import pytest
import torch

import mmtune.workflows.causal as causal
from mmtune.cli import main
from mmtune.data.packing import VARLEN_KEYS

OVERRIDES = ["model.path=builtin:tiny", "adapter.type=lora", "adapter.dropout=0.0", "data.max_length=128",
             "train.max_steps=3", "train.batch_size=2", "train.progress=false", "train.eval_prompts=[]",
             "data.eval_sources=[]", "train.tensorboard=false", "train.eval_every=null", "train.save_every=null"]


@pytest.fixture
def built(monkeypatch):
    """The Trainer that `mmtune train` builds (the real build_causal_trainer, recorded)."""
    seen = {}
    real = causal.build_causal_trainer

    def spy(recipe, plan, *args, **kwargs):
        seen["plan"], seen["trainer"] = plan, real(recipe, plan, *args, **kwargs)
        return seen["trainer"]

    monkeypatch.setattr(causal, "build_causal_trainer", spy)
    return seen


def test_mmtune_train_on_cpu_takes_the_cpu_fast_path(tmp_path, built, monkeypatch, capsys):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))  # no real compile
    assert main(["train", "quickstart", *OVERRIDES, f"train.output_dir={tmp_path / 'a'}", "train.compile=true"]) == 0
    plan, trainer = built["plan"], built["trainer"]
    assert (plan.device.type, plan.attention.implementation, plan.packing, plan.loss) == (
        "cpu", "sdpa", "position_ids", "chunked")
    assert trainer.speed_plan.compile  # train.compile=true, kept when the plan is settled
    assert "speed plan on cpu:" in capsys.readouterr().out  # logged once at the start
    base = trainer.model.get_base_model()
    assert base.config._attn_implementation == "sdpa" and base.dtype == torch.float32
    batch = trainer.collate_fn(trainer.train_rows[:2])
    assert "position_ids" in batch and "attention_mask" not in batch and not set(VARLEN_KEYS) & set(batch)
    assert type(trainer.objective).__name__ == "FusedCausalLMObjective" and trainer.objective.backend == "chunked"
    # train.compile=true compiled the decoder stack (in place: the checkpoint names are the usual ones).
    assert compiled == [base.model] and plan.compile
    assert any(k.startswith("model.layers.0.") for k in base.state_dict())

    # The recipe's kernel reaches from_pretrained; train.fused_loss=false gives the plain objective.
    assert main(["train", "quickstart", *OVERRIDES, f"train.output_dir={tmp_path / 'b'}",
                 "model.attn_implementation=eager", "train.fused_loss=false", "train.max_steps=1"]) == 0
    trainer = built["trainer"]
    assert trainer.model.get_base_model().config._attn_implementation == "eager"
    assert type(trainer.objective).__name__ == "CausalLMObjective" and trainer.speed_plan.loss == "plain"
    assert not trainer.speed_plan.compile and "short run" in trainer.speed_plan.reasons["compile"]
