"""QLoRA in 2 processes: DDP over a bitsandbytes NF4 base model (4-bit layers run on CPU) trains
like one process with the same global batch; FSDP and DeepSpeed refuse 4-bit weights with an
error that names the strategy to use."""

from __future__ import annotations

import pytest
import torch

from mmtune.config import TrainConfig
from mmtune.distributed import DistContext, DistributedConfig, is_quantized_4bit, wrap_model
from mmtune.errors import ConfigError

RUNS = [
    {"name": "ref_qlora", "phase": "pre", "adapter": "qlora"},
    {"name": "ddp_qlora", "phase": "dist", "adapter": "qlora", "distributed": {"strategy": "auto"}},
]


@pytest.mark.distributed
def test_qlora_under_ddp_matches_one_process(tmp_path, dist):
    res = dist.run_plan(tmp_path, RUNS)
    run, ref = res["ddp_qlora"], res["ref_qlora"]
    assert run["strategy"] == "ddp" and run["world"] == 2  # strategy auto with 2 processes
    dist.assert_close_curves(ref["losses"], run["losses"])
    assert ref["losses"][-1] != ref["losses"][0]


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharding_4bit_weights_is_a_clear_error(strategy):
    bnb = pytest.importorskip("bitsandbytes")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), bnb.nn.Linear4bit(64, 64, quant_type="nf4"))
    assert is_quantized_4bit(model) and not is_quantized_4bit(torch.nn.Linear(64, 64))
    ctx = DistContext(rank=0, world_size=2)
    with pytest.raises(ConfigError, match=f"strategy={strategy} cannot shard 4-bit.*strategy=ddp"):
        wrap_model(model, DistributedConfig(strategy=strategy), ctx, train_cfg=TrainConfig())
