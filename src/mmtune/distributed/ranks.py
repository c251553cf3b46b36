"""Rank utilities: this process's rank and the world size (0 of 1 without a process group), a
barrier, and the log filter that keeps every rank but 0 quiet below ERROR."""

from __future__ import annotations

import logging

import torch.distributed as dist


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class RankZeroFilter(logging.Filter):
    """Lets through every record of rank 0, and only errors from the other ranks."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process() or record.levelno >= logging.ERROR
