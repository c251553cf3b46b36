"""DeepSpeed ZeRO: the config a recipe gives (generated, or the user's JSON with ``auto`` filled
in) and the optimizer facade the Trainer steps (:class:`DeepSpeedOptimizer`). DeepSpeed itself is
the optional ``deepspeed`` extra, imported on use."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import DistributedConfig
from ..errors import ConfigError, MMTuneError
from .ranks import get_rank, get_world_size


def import_deepspeed():
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
