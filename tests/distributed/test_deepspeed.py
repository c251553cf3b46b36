"""DeepSpeed ZeRO through the Trainer: the generated / user config, the error without the extra,
and (when deepspeed is installed) ZeRO-2 LoRA and ZeRO-3 full fine-tuning in 2 processes giving
the loss curve of one process, with a checkpoint that resumes."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from mmtune.config import TrainConfig
from mmtune.distributed import DistContext, DistributedConfig, deepspeed_config, wrap_model
from mmtune.errors import ConfigError, MMTuneError

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def test_missing_deepspeed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now raises ImportError
    with pytest.raises(MMTuneError, match=r"pip install 'mmtune\[deepspeed\]'"):
        wrap_model(torch.nn.Linear(2, 2), DistributedConfig(strategy="deepspeed"), DistContext(world_size=2),
                   train_cfg=TrainConfig())


def test_generated_config():
    cfg = DistributedConfig(strategy="deepspeed", zero_stage=3, cpu_offload=True)
    conf = deepspeed_config(cfg, TrainConfig(batch_size=3, max_grad_norm=0.5), bf16=True)
    assert conf["train_micro_batch_size_per_gpu"] == 3
    # The Trainer accumulates and normalises; DeepSpeed steps once per engine.step().
    assert conf["gradient_accumulation_steps"] == 1 and conf["managed_gradient_accumulation"] is False
    assert conf["gradient_clipping"] == 0.5 and conf["bf16"] == {"enabled": True}
    zero = conf["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert "optimizer" not in conf and "scheduler" not in conf
    plain = deepspeed_config(DistributedConfig(strategy="deepspeed"), TrainConfig(max_grad_norm=None))
    assert plain["gradient_clipping"] == 0.0 and "offload_optimizer" not in plain["zero_optimization"]


def test_user_config_auto_values_are_filled(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
                                "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e7}}))
    cfg = DistributedConfig(strategy="deepspeed", deepspeed_config=str(path))
    conf = deepspeed_config(cfg, TrainConfig(batch_size=2, max_grad_norm=1.0), bf16=False)
    assert conf["train_micro_batch_size_per_gpu"] == 2 and conf["gradient_clipping"] == 1.0
    assert conf["bf16"] == {"enabled": False}
    assert conf["zero_optimization"]["reduce_bucket_size"] == 5e7 and conf["zero_optimization"]["stage"] == 2
    assert conf["managed_gradient_accumulation"] is False


@pytest.mark.parametrize("content,match", [
    ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' section"),
    ({"gradient_accumulation_steps": 4}, "use train.grad_accum"),
    ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, "`auto` but mmtune has no value"),
    ("{\n  \"bf16\": {\n  oops", r"ds.json:3: invalid JSON"),
])
def test_user_config_errors_name_the_problem(tmp_path, content, match):
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    cfg = DistributedConfig(strategy="deepspeed", deepspeed_config=str(path))
    with pytest.raises(ConfigError, match=match):
        deepspeed_config(cfg, TrainConfig())


STEPS, STOP = 6, 3
RUNS = [
    {"name": "ref_lora", "phase": "pre", "adapter": "lora", "max_steps": STEPS},
    {"name": "ref_full", "phase": "pre", "adapter": "full", "max_steps": STEPS},
    {"name": "zero2_lora", "phase": "dist", "adapter": "lora", "max_steps": STEPS, "stop_at": STOP,
     "distributed": {"strategy": "deepspeed", "zero_stage": 2}},
    {"name": "zero2_lora_resumed", "phase": "dist", "adapter": "lora", "max_steps": STEPS,
     "resume": ["zero2_lora", STOP], "distributed": {"strategy": "deepspeed", "zero_stage": 2}},
    {"name": "zero3_full", "phase": "dist", "adapter": "full", "max_steps": STEPS,
     "distributed": {"strategy": "deepspeed", "zero_stage": 3}},
]


@pytest.mark.distributed
@pytest.mark.slow  # DeepSpeed's import and its first JIT build of a CPU comm op take minutes
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (optional extra: "
                    "pip install 'mmtune[deepspeed]')")
def test_zero_matches_one_process_and_resumes(tmp_path, dist):
    res = dist.run_plan(tmp_path, RUNS, timeout=900)
    assert res["zero2_lora"]["strategy"] == "deepspeed" and res["zero2_lora"]["world"] == 2
    dist.assert_close_curves(res["ref_lora"]["losses"][:STOP], res["zero2_lora"]["losses"])
    dist.assert_close_curves(res["ref_lora"]["losses"], res["zero2_lora_resumed"]["losses"])
    # Full fine-tuning with the clip active (norms > 1): DeepSpeed clips the same global norm.
    dist.assert_close_curves(res["ref_full"]["losses"], res["zero3_full"]["losses"])
    assert max(res["ref_full"]["grad_norms"]) > 1.0
    a, b = dist.saved_weights(tmp_path / "ref_full"), dist.saved_weights(tmp_path / "zero3_full")
    assert a.keys() == b.keys()
    # Gathered from the ZeRO-3 partitions at save. Within 1e-3, a tenth of one Adam step (lr
    # 1e-2): Adam's 1/sqrt(v) magnifies summation-order differences of near-zero gradients
    # (measured max 2.2e-4 after 6 steps); a misplaced shard would be off by the init scale 2e-2.
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-3, rtol=0, msg=k)


def test_zero_checkpoint_into_a_torch_optimizer_says_how_to_resume():
    from mmtune.train.checkpoint import load_optimizer_state_dict

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(MMTuneError, match="distributed.strategy=deepspeed and --nproc 4"):
        load_optimizer_state_dict(model, opt, {"deepspeed_zero_partitions": [None] * 4, "world_size": 4})
