"""Several processes and GPUs: process group, model wrapping per strategy, launch, rank-0 logging.

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
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .config import DistributedConfig  # noqa: F401 - the recipe section, defined with the schema
from .errors import ConfigError, MMTuneError

log = logging.getLogger("mmtune.distributed")



# ---------------------------------------------------------------------------------------------
# Process group


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True inside a process that torchrun (or :func:`launch`) started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(cfg: DistributedConfig | None = None) -> DistContext:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) and pick this rank's device.

    In a plain one-process run (no such variables, or WORLD_SIZE=1) nothing is started and the
    context says rank 0 of 1, on ``cuda:0`` when there is a GPU, else the CPU. Calling it again
    returns the current context.
    """
    cfg = cfg or DistributedConfig()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise MMTuneError(f"rank {rank} has local rank {local_rank} but this machine has "
                              f"{torch.cuda.device_count()} GPU(s); start at most that many processes per machine")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world <= 1:
        return DistContext(0, 1, 0, device, None)
    if cfg.backend == "nccl" and device.type != "cuda":
        raise ConfigError("distributed.backend=nccl needs CUDA GPUs; this machine has none. Use "
                          "distributed.backend=gloo (or auto).")
    if cfg.backend == "auto":
        # Collectives on CPU objects (gather_object, metrics) go through gloo beside NCCL.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    else:
        backend = cfg.backend
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=cfg.timeout_minutes), **kwargs)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def cleanup() -> None:
    """Leave the process group: wait for every rank, then destroy it (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Rank-0 logging


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only (every rank computes the same summaries; one copy is enough)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


class RankZeroFilter(logging.Filter):
    """Lets through every record of rank 0, and only errors from the other ranks."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process() or record.levelno >= logging.ERROR


def setup_logging(level: int = logging.INFO, logger_name: str = "mmtune") -> logging.Logger:
    """Log ``logger_name`` (and its children) to stderr from rank 0 only; errors from any rank,
    prefixed with the rank when there are several. Idempotent."""
    logger = logging.getLogger(logger_name)
    logger.setLevel(level)
    if not any(getattr(h, "_mmtune_rank_zero", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler._mmtune_rank_zero = True
        handler.addFilter(RankZeroFilter())
        prefix = f"[rank {get_rank()}] " if get_world_size() > 1 else ""
        handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    return logger


# ---------------------------------------------------------------------------------------------
# Wrapping the model


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
        ds = _import_deepspeed()
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
    ctx = ctx or _current_context()
    strategy = resolve_strategy(cfg, ctx.world_size)
    mp_bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and bf16)
    if strategy == "none":
        return Parallel("none", model, model, ctx)
    if strategy in ("fsdp", "deepspeed") and is_quantized_4bit(model):
        raise ConfigError(f"distributed.strategy={strategy} cannot shard 4-bit bitsandbytes weights (QLoRA); use "
                          "distributed.strategy=ddp: each rank keeps the 4-bit base model and the LoRA gradients "
                          "are averaged.")
    if strategy == "deepspeed":
        _import_deepspeed()  # the missing extra first: it is the user's next step
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


def _current_context() -> DistContext:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return DistContext(get_rank(), get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device,
                       dist.get_backend() if get_world_size() > 1 else None)


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


# ---------------------------------------------------------------------------------------------
# DeepSpeed


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise MMTuneError(f"distributed.strategy=deepspeed needs DeepSpeed ({e}); install the extra: "
                          "pip install 'mmtune[deepspeed]'") from None
    return deepspeed


class DeepSpeedOptimizer:
    """What the Trainer sees as its optimizer under DeepSpeed.

    ``step()`` is ``engine.step()``: ZeRO finalises the partitioned gradients, clips them
    (``gradient_clipping``) and updates its fp32 partitions. ``param_groups`` are those of the
    Trainer's AdamW, which ZeRO steps on its partitions, so the Trainer's LR schedule drives it.
    ``state_dict()`` is collective: rank 0 receives every rank's partition (ZeRO's own
    ``load_state_dict`` takes that list and picks its rank's part).
    """

    def __init__(self, engine, base: torch.optim.Optimizer):
        self.engine, self.base = engine, base

    @property
    def param_groups(self):
        return self.base.param_groups

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        world = get_world_size()
        parts = [None] * world if get_rank() == 0 else None
        dist.gather_object(self.engine.optimizer.state_dict(), parts, dst=0)
        return {"deepspeed_zero_partitions": parts, "world_size": world}

    def load_state_dict(self, state: dict) -> None:
        parts = state.get("deepspeed_zero_partitions") if isinstance(state, dict) else None
        if parts is None:
            raise MMTuneError("this checkpoint was not written by a DeepSpeed run; resume it with "
                              "distributed.strategy=ddp or fsdp (or none)")
        if state["world_size"] != get_world_size():
            raise MMTuneError(f"this DeepSpeed ZeRO checkpoint holds {state['world_size']} optimizer partitions; "
                              f"resume it with --nproc {state['world_size']} (now {get_world_size()}), or use "
                              "distributed.strategy=fsdp, whose checkpoints resume on any number of processes")
        self.engine.optimizer.load_state_dict(parts, load_optimizer_states=True, load_from_fp32_weights=True)


def deepspeed_config(cfg: DistributedConfig, train_cfg, *, bf16: bool = False) -> dict:
    """The DeepSpeed config for a recipe: the user's JSON (``auto`` values filled in) or a
    generated one.

    The Trainer owns gradient accumulation, the loss normalisation, the optimizer (AdamW from
    the recipe) and the LR schedule, so DeepSpeed is told ``gradient_accumulation_steps: 1``
    and ``managed_gradient_accumulation: false`` (DeepSpeed 0.18+: every ``engine.step()`` is
    an accumulation boundary, micro-batches before it only accumulate), and it gets no
    optimizer or scheduler section. Clipping moves into DeepSpeed (``gradient_clipping``)
    because ZeRO keeps the gradients partitioned.
    """
    generated = {
        "train_micro_batch_size_per_gpu": train_cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(train_cfg.max_grad_norm or 0.0),
        "bf16": {"enabled": bool(bf16)},
        "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": False, "contiguous_gradients": True},
        # The optimizer is torch's AdamW built by the Trainer (not a DeepSpeed fused one).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.cpu_offload:
        generated["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if cfg.zero_stage == 3:
            generated["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    if cfg.deepspeed_config is None:
        return generated
    path = Path(cfg.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"distributed.deepspeed_config: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"distributed.deepspeed_config: {path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"distributed.deepspeed_config: {path} must hold a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(f"distributed.deepspeed_config: {path}: remove the '{key}' section; the recipe's "
                              "train section defines the optimizer (AdamW, lr, betas, weight_decay) and the schedule")
    gas = user.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", 1):
        raise ConfigError(f"distributed.deepspeed_config: {path}: gradient_accumulation_steps={gas}; set it to 1 "
                          "or auto and use train.grad_accum (the Trainer accumulates)")
    merged = _fill_auto(user, generated)
    merged["gradient_accumulation_steps"] = 1
    merged["managed_gradient_accumulation"] = False
    merged.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x world size
    return merged


def _fill_auto(user, generated):
    """Replace ``"auto"`` values of the user's config by the generated ones (recursively), and
    add generated keys the user left out."""
    if isinstance(user, dict):
        out = dict(generated) if isinstance(generated, dict) else {}
        for k, v in user.items():
            out[k] = _fill_auto(v, generated.get(k) if isinstance(generated, dict) else None)
        return out
    if user == "auto":
        if generated is None:
            raise ConfigError("distributed.deepspeed_config: a value is `auto` but mmtune has no value for it; "
                              "give it explicitly")
        return generated
    return user


# ---------------------------------------------------------------------------------------------
# Launch


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the children must not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def launch(nproc: int, argv: list[str], *, module: str = "mmtune.cli", env: dict | None = None) -> int:
    """Run ``python -m {module} {argv}`` in ``nproc`` processes under ``torch.distributed.run``
    on this machine and wait for them.

    Every rank prints to this terminal. When a rank fails, torchrun stops the others and this
    raises :class:`MMTuneError` with the failing rank's error (read from the error file torchrun
    gives each rank, see :func:`report_error`). Returns 0 on success.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1 (got {nproc})")
    argv = strip_nproc(list(argv))
    with tempfile.TemporaryDirectory(prefix="mmtune-launch-") as logs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--max_restarts=0", f"--log-dir={logs}", "-m", module, *argv]
        run_env = {**os.environ, **(env or {})}
        # One CPU thread per rank unless the user chose (torchrun's own default, without its warning).
        run_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        rc = subprocess.call(cmd, env=run_env)
        if rc == 0:
            return 0
        failure = first_failure(Path(logs))
    if failure is None:
        raise MMTuneError(f"{nproc}-process run failed (exit code {rc}); the failing rank's output is above")
    rank, message = failure
    raise MMTuneError(f"rank {rank} of {nproc} failed: {message}")


def first_failure(log_dir: Path) -> tuple[int, str] | None:
    """The earliest error any rank recorded under torchrun's ``--log-dir``: (rank, message)."""
    found = []
    for f in Path(log_dir).rglob("error.json"):
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        msg = data.get("message", {})
        if isinstance(msg, dict):
            text = msg.get("message", "")
            ts = int(msg.get("extraInfo", {}).get("timestamp", 0) or 0)
        else:
            text, ts = str(msg), 0
        try:
            rank = int(f.parent.name)
        except ValueError:
            rank = -1
        found.append((ts, rank, text.strip().splitlines()[-1] if text.strip() else "(no message)"))
    if not found:
        return None
    _, rank, text = min(found)
    return rank, text


def report_error(exc: BaseException) -> None:
    """Record ``exc`` as this rank's error for :func:`launch` (torchrun's per-rank error file).

    Call it where the CLI turns an exception into its one-line message. No-op outside torchrun.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import time
    import traceback

    text = str(exc) if isinstance(exc, MMTuneError) else f"{type(exc).__name__}: {exc}"
    data = {"message": {"message": text, "extraInfo": {
        "py_callstack": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "timestamp": str(int(time.time()))}}}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data))
    except OSError:
        pass
