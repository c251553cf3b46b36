"""The ``distributed`` recipe section and the one-process behaviour of mmtune.distributed."""

from __future__ import annotations

import logging

import pytest
import torch

from mmtune.config import Recipe, validate_recipe
from mmtune.distributed import (
    DistContext,
    DistributedConfig,
    RankZeroFilter,
    decoder_layers,
    init_distributed,
    resolve_strategy,
    train_in_bf16,
    wrap_model,
)
from mmtune.errors import ConfigError, MMTuneError


def test_recipe_has_a_distributed_section():
    assert Recipe().distributed == DistributedConfig()
    r = validate_recipe({"distributed": {"strategy": "fsdp", "cpu_offload": True, "mixed_precision": "bf16"}})
    assert r.distributed.strategy == "fsdp" and r.distributed.cpu_offload
    with pytest.raises(ConfigError, match=r"'distributed.strategy' = 'fdsp' is not allowed.*Did you mean 'fsdp'"):
        validate_recipe({"distributed": {"strategy": "fdsp"}})
    with pytest.raises(ConfigError, match=r"unknown key 'distributed.zero'.*Did you mean 'zero_stage'"):
        validate_recipe({"distributed": {"zero": 3}})
    with pytest.raises(ConfigError, match="zero_stage"):
        validate_recipe({"distributed": {"zero_stage": 4}})


def test_every_field_is_documented():
    for name, f in DistributedConfig.model_fields.items():
        assert f.description and len(f.description) > 20, name


def test_resolve_strategy():
    assert resolve_strategy(DistributedConfig(), 1) == "none"
    assert resolve_strategy(DistributedConfig(), 2) == "ddp"
    assert resolve_strategy(DistributedConfig(strategy="fsdp"), 4) == "fsdp"
    with pytest.raises(ConfigError, match="strategy=none runs one process, but 2 were started"):
        resolve_strategy(DistributedConfig(strategy="none"), 2)


def test_one_process_without_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert not torch.distributed.is_initialized()
    model = torch.nn.Linear(2, 2)
    par = wrap_model(model, DistributedConfig(), ctx)
    assert par.strategy == "none" and par.model is model and par.train_module is model


def test_ddp_without_a_process_group_says_how_to_start():
    with pytest.raises(MMTuneError, match="--nproc N"):
        wrap_model(torch.nn.Linear(2, 2), DistributedConfig(strategy="ddp"), DistContext(world_size=2))


def test_attach_checks_the_trainer_runs_the_wrapper(tmp_path):
    from mmtune.config import TrainConfig
    from mmtune.distributed import Parallel
    from mmtune.train.loop import Trainer
    from mmtune.train.objectives import CausalLMObjective

    model, wrapper = torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2))
    rows = [{"x": torch.zeros(2)}]
    t = Trainer(model, CausalLMObjective(), rows, lambda r: {}, TrainConfig(output_dir=str(tmp_path)))
    with pytest.raises(MMTuneError, match="train_module=parallel.train_module"):
        Parallel("ddp", model, wrapper, DistContext(world_size=2)).attach(t)


def test_decoder_layers_are_the_no_split_blocks(worker):
    from peft import LoraConfig, get_peft_model

    model = worker.tiny_llama()
    layers = decoder_layers(model)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert decoder_layers(peft) == layers
    # Without _no_split_modules: the longest list of same-type blocks.
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)]))
    assert decoder_layers(plain) == list(plain[1])


def test_train_in_bf16_follows_the_trainer_rule():
    assert train_in_bf16("bf16", "cpu") and not train_in_bf16("auto", "cpu") and not train_in_bf16("fp32", "cpu")


def test_rank_zero_filter(monkeypatch):
    import mmtune.distributed as d

    rec = logging.LogRecord("mmtune", logging.INFO, __file__, 1, "hi", None, None)
    err = logging.LogRecord("mmtune", logging.ERROR, __file__, 1, "bad", None, None)
    assert RankZeroFilter().filter(rec)
    monkeypatch.setattr(d.ranks, "get_rank", lambda: 1)  # where RankZeroFilter looks it up
    assert not RankZeroFilter().filter(rec) and RankZeroFilter().filter(err)
