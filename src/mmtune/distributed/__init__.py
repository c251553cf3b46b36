"""Several processes and GPUs: process group, model wrapping per strategy, launch, rank utilities.

``mmtune train RECIPE --nproc N`` re-executes itself under ``torch.distributed.run`` with N
processes (:func:`launch`). Each process then joins the process group that torchrun describes
through its environment variables (:func:`init_distributed`), wraps the model for the recipe's
``distributed.strategy`` (:func:`wrap_model`) and hands the wrapper to the Trainer as
``train_module`` while checkpoints keep saving the unwrapped model::

    ctx = init_distributed(recipe.distributed)          # no-op in a plain one-process run
    model = build_model(...).to(ctx.device)
    par = wrap_model(model, recipe.distributed, ctx, train_cfg=recipe.train,
                     bf16=train_in_bf16(recipe.train.precision, ctx.device))
    trainer = Trainer(par.model, objective, rows, collate, recipe.train,
                      train_module=par.train_module, device=ctx.device, ...)
    par.attach(trainer)                                 # DeepSpeed builds its engine here
    trainer.fit(resume)
    cleanup()

Strategies (the same update as one process with the same global batch; the Trainer normalises
the loss by the item count of the whole step over all ranks, see train/loop.py):

- ``ddp``: every rank holds the whole model; gradients are averaged (DistributedDataParallel).
  The only strategy for QLoRA: a 4-bit bitsandbytes weight is not a tensor FSDP can shard.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on each decoder layer, then the
  root, as in torchtitan and torchtune: parameters, gradients and optimizer state are sharded
  over the ranks; one layer is gathered at a time. bf16 compute with fp32 gradient reduction
  via ``MixedPrecisionPolicy`` on GPUs; optional CPU offload.
- ``deepspeed``: ZeRO stage 2 (optimizer state and gradients partitioned) or 3 (parameters
  too), from a generated config or a user JSON. Needs the ``deepspeed`` extra.

Backends: NCCL for CUDA tensors (with gloo beside it for CPU objects), gloo on CPU.

One file per idea: :mod:`.launch` (torchrun relaunch, rank errors), :mod:`.process_group`
(join / leave), :mod:`.wrap` (DDP / FSDP2 / DeepSpeed), :mod:`.zero` (DeepSpeed config and
optimizer), :mod:`.ranks` (rank, world size, barrier, rank-0 log filter). Every name is
importable from ``mmtune.distributed``.
"""

from __future__ import annotations

from ..config import DistributedConfig  # noqa: F401 - the recipe section, defined with the schema
from .launch import first_failure, launch, report_error, strip_nproc  # noqa: F401
from .process_group import DistContext, cleanup, current_context, init_distributed  # noqa: F401
from .ranks import RankZeroFilter, barrier, get_rank, get_world_size, is_main_process  # noqa: F401
from .wrap import (  # noqa: F401
    EngineForward,
    Parallel,
    decoder_layers,
    is_quantized_4bit,
    resolve_strategy,
    shard_fsdp2,
    train_in_bf16,
    wrap_model,
)
from .zero import DeepSpeedOptimizer, deepspeed_config, import_deepspeed  # noqa: F401
