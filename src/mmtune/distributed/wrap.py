"""Wrapping the model for a strategy (:func:`wrap_model`): ``ddp`` (DistributedDataParallel),
``fsdp`` (FSDP2 ``fully_shard`` per decoder layer, then the root) or ``deepspeed`` (ZeRO 2/3, the
engine built once the Trainer has its optimizer, :meth:`Parallel.attach`); see the package
docstring for what each shards."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import DistributedConfig
from ..errors import ConfigError, MMTuneError
from .process_group import DistContext, current_context
from .zero import DeepSpeedOptimizer, deepspeed_config, import_deepspeed

log = logging.getLogger("mmtune.distributed")


def train_in_bf16(precision: str, device: torch.device | str) -> bool:
    """The Trainer's rule for bf16 autocast (``train.precision``), for the sharding policies."""
    device = torch.device(device)
    if precision == "bf16":
        return True
    return precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_strategy(cfg: DistributedConfig, world_size: int) -> str:
    if cfg.strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    if cfg.strategy == "none" and world_size > 1:
        raise ConfigError(f"distributed.strategy=none runs one process, but {world_size} were started; "
                          "choose distributed.strategy=ddp | fsdp | deepspeed (or auto).")
    return cfg.strategy


def _unwrap_peft(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_quantized_4bit(model) -> bool:
    """Whether the model holds bitsandbytes 4-bit weights (QLoRA)."""
    if getattr(_unwrap_peft(model), "is_loaded_in_4bit", False):
        return True
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one.

    transformers lists the block classes a model must not split across devices in
    ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``); those are the FSDP units. For other
    models, the blocks of the longest ``nn.ModuleList`` of same-type modules.
    """
    names = set(getattr(_unwrap_peft(model), "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        # A block nested in another listed block is sharded with its parent.
        inner = {id(c) for m in layers for c in m.modules() if c is not m}
        return [m for m in layers if id(m) not in inner]
    best: list[torch.nn.Module] = []
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > len(best) and len({type(c) for c in m}) == 1:
            best = list(m)
    return best


@dataclass
class Parallel:
    """A model prepared for a strategy.

    ``model`` is what checkpoints save and what the optimizer's parameters belong to (for FSDP2
    the sharded module itself: ``fully_shard`` changes the module in place). ``train_module`` is
    what the Trainer runs forward (a DDP wrapper, the FSDP2 module, a DeepSpeed engine after
    :meth:`attach`).
    """

    strategy: str
    model: torch.nn.Module
    train_module: torch.nn.Module
    ctx: DistContext
    deepspeed_config: dict | None = None
    engine: object = None

    def attach(self, trainer) -> None:
        """Finish wrapping once the Trainer has built its optimizer. Only DeepSpeed needs it (its
        engine takes the optimizer); for other strategies it only checks the Trainer uses this model."""
        if trainer.train_module is not self.train_module and self.strategy != "deepspeed":
            raise MMTuneError("Trainer(..., train_module=parallel.train_module) was not passed; the "
                              f"{self.strategy} wrapper would not run")
        if self.strategy != "deepspeed":
            return
        ds = import_deepspeed()
        engine, zero_opt, _, _ = ds.initialize(model=self.model, optimizer=trainer.optimizer,
                                               config=self.deepspeed_config, dist_init_required=False)
        self.engine = engine
        self.train_module = trainer.train_module = EngineForward(engine)
        trainer.optimizer = DeepSpeedOptimizer(engine, trainer.optimizer)


class EngineForward(torch.nn.Module):
    """A DeepSpeed engine as the Trainer's ``train_module``: its forward, without the engine's
    ``no_sync`` (ZeRO-2/3 reduce and partition each gradient as backward produces it, and
    refuse ``no_sync``; with ``managed_gradient_accumulation: false`` the micro-batches before
    ``engine.step()`` simply accumulate)."""

    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)


def wrap_model(model: torch.nn.Module, cfg: DistributedConfig, ctx: DistContext | None = None, *,
               bf16: bool = False, train_cfg=None) -> Parallel:
    """Wrap ``model`` (already on ``ctx.device``) for ``cfg.strategy``.

    Args:
        model: the model to train (transformers, PEFT or a plain module).
        cfg: the recipe's ``distributed`` section.
        ctx: from :func:`init_distributed` (default: the current process group).
        bf16: whether the run computes in bf16 (:func:`train_in_bf16`); with
            ``mixed_precision: auto`` the sharded parameters are then gathered in bf16.
        train_cfg: the recipe's ``train`` section; deepspeed needs it for batch size and clipping.
    """
    ctx = ctx or current_context()
    strategy = resolve_strategy(cfg, ctx.world_size)
    mp_bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and bf16)
    if strategy == "none":
        return Parallel("none", model, model, ctx)
    if strategy in ("fsdp", "deepspeed") and is_quantized_4bit(model):
        raise ConfigError(f"distributed.strategy={strategy} cannot shard 4-bit bitsandbytes weights (QLoRA); use "
                          "distributed.strategy=ddp: each rank keeps the 4-bit base model and the LoRA gradients "
                          "are averaged.")
    if strategy == "deepspeed":
        import_deepspeed()  # the missing extra first: it is the user's next step
    if not (dist.is_available() and dist.is_initialized()):
        raise MMTuneError(f"distributed.strategy={strategy} needs a process group: start the run with "
                          "`mmtune train RECIPE --nproc N` (or torchrun) and call init_distributed() first")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        wrapped = DDP(model, device_ids=ids, find_unused_parameters=cfg.find_unused_parameters)
        return Parallel("ddp", model, wrapped, ctx)
    if strategy == "fsdp":
        shard_fsdp2(model, ctx, bf16=mp_bf16, cpu_offload=cfg.cpu_offload,
                    reshard_after_forward=cfg.reshard_after_forward)
        return Parallel("fsdp", model, model, ctx)
    # deepspeed: the engine needs the Trainer's optimizer, so it is built in Parallel.attach.
    if train_cfg is None:
        raise MMTuneError("wrap_model(strategy=deepspeed) needs train_cfg (the recipe's train section)")
    conf = deepspeed_config(cfg, train_cfg, bf16=mp_bf16)
    return Parallel("deepspeed", model, model, ctx, deepspeed_config=conf)


def shard_fsdp2(model: torch.nn.Module, ctx: DistContext, *, bf16: bool = False, cpu_offload: bool = False,
                reshard_after_forward: bool = True) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the root (which takes the embeddings, the final
    norm and the head), over a 1-D mesh of all ranks.

    With ``bf16``, parameters are gathered in bf16 for compute and gradients are reduced in fp32
    (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, the torchtitan default):
    fp32 reduction keeps the sum over ranks as accurate as one process.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    kwargs = {"mesh": mesh}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        if ctx.device.type == "cuda":
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
        else:
            log.info("distributed.cpu_offload: the model already lives in CPU memory; nothing to offload")
            kwargs["offload_policy"] = OffloadPolicy()
    layers = decoder_layers(model)
    if not layers:
        log.info("fsdp: found no repeated blocks to shard one by one; sharding the model as one unit")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model
