"""The process group: join the one torchrun describes (:func:`init_distributed`), know where this
process stands (:class:`DistContext`), and leave it (:func:`cleanup`: a barrier, then destroy, so no
rank tears the group down while another still talks to it). NCCL for CUDA tensors (with gloo
beside it for CPU objects), gloo on CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import DistributedConfig
from ..errors import ConfigError, MMTuneError
from .ranks import get_rank, get_world_size


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


def current_context() -> DistContext:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return DistContext(get_rank(), get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device,
                       dist.get_backend() if get_world_size() > 1 else None)
