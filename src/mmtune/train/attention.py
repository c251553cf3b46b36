"""Which attention kernel runs packed batches, and the per-batch arguments it needs.

A packed row holds several samples; each must attend only to itself (block-diagonal causal
attention). The samples are marked by ``position_ids`` that restart at 0 (see
mmtune.data.packing); no attention mask is passed. transformers then isolates them, per kernel:

- ``flash_attention_2`` / ``flash_attention_3`` (flash-attn installed, CUDA, fp16/bf16): the
  variable-length kernel over the concatenated samples (``flash_attn_varlen_func`` with
  cumulative sequence lengths). No mask and no padding FLOPs; the fastest choice. The
  boundaries are given per batch (the collate's ``varlen`` mode, :func:`packed_attention_kwargs`):
  transformers derives them from ``position_ids`` only for a one-row batch, and then in every
  layer with a device sync. The speed plan (:mod:`mmtune.train.fast_path`) turns that mode on.
- ``sdpa``: PyTorch's scaled_dot_product_attention with the block-diagonal causal mask that
  transformers derives from ``position_ids`` (``masking_utils.find_packed_sequence_indices``).
  Runs everywhere (the CPU default); a mask rules out SDPA's flash backend on GPUs.
- ``flex_attention``: a block-sparse mask from the same sequence ids; fast only once compiled
  (docs/reference/performance.md#anchor-measurements: without torch.compile it was not faster than SDPA on an H100, and on
  CPU its first call compiles for minutes), so it is used only when asked for on a GPU.
- ``eager``: the reference implementation (same mask as sdpa).

Both mask-based paths need ``use_cache=False`` and no ``attention_mask`` in the forward, which
is what mmtune's objectives pass for packed batches.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

# VARLEN_KEYS: the batch keys of packed_attention_kwargs, which objectives forward to the model.
from ..data.packing import VARLEN_KEYS, varlen_kwargs  # noqa: F401

log = logging.getLogger("mmtune.train.attention")

KNOWN = ("auto", "flash_attention_2", "flash_attention_3", "flex_attention", "sdpa", "eager")
FLASH = ("flash_attention_3", "flash_attention_2")


@dataclass(frozen=True)
class AttentionChoice:
    """``implementation`` goes to ``from_pretrained(attn_implementation=...)`` (or
    ``config._attn_implementation``); ``reason`` says why (logged once by the caller).
    ``varlen``: the kernel takes packed batches as variable-length samples over the flattened
    batch, with their boundaries given per batch (default: the flash-attention kernels)."""

    implementation: str
    reason: str
    varlen: bool | None = None

    def __post_init__(self):
        if self.varlen is None:
            object.__setattr__(self, "varlen", self.implementation in FLASH)

    def forward_kwargs(self, position_ids: torch.Tensor | None) -> dict:
        """Extra forward arguments for a packed batch (see :func:`packed_attention_kwargs`)."""
        if not self.varlen or position_ids is None:
            return {}
        return varlen_kwargs(position_ids)


def flash_available(version: int = 2) -> bool:
    """flash-attn (2) or flash-attn-3 importable with a CUDA device, as transformers checks it."""
    if not torch.cuda.is_available():
        return False
    from transformers.utils import import_utils

    check = import_utils.is_flash_attn_3_available if version == 3 else import_utils.is_flash_attn_2_available
    try:
        return bool(check())
    except Exception:  # a broken flash-attn install must not stop training: fall back
        return False


def flex_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def choose_attention(requested: str = "auto", *, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> AttentionChoice:
    """The attention implementation for packed training on ``device`` with weights in ``dtype``.

    ``requested`` is the recipe's ``model.attn_implementation``: ``auto`` picks flash-attention
    (3, then 2) when it can run, else ``sdpa``. A kernel that was asked for but cannot run here
    falls back to ``sdpa`` with the reason, rather than failing the run.
    """
    if requested not in KNOWN:
        from ..errors import ConfigError
        from ..registry import did_you_mean

        raise ConfigError(f"model.attn_implementation={requested!r} is not known; valid: "
                          f"{', '.join(KNOWN)}.{did_you_mean(requested, KNOWN)}")
    device = torch.device(device)
    half = dtype in (torch.float16, torch.bfloat16)
    if requested in ("sdpa", "eager"):
        return AttentionChoice(requested, "as requested")
    if requested == "flex_attention":
        if device.type == "cuda" and flex_available():
            return AttentionChoice("flex_attention", "as requested")
        return AttentionChoice("sdpa", "flex_attention needs a CUDA device here (on CPU its kernel compiles for "
                               "minutes); using sdpa with the block-diagonal mask")
    wanted = FLASH if requested == "auto" else (requested,)
    for impl in wanted:
        version = 3 if impl == "flash_attention_3" else 2
        if device.type == "cuda" and half and flash_available(version):
            return AttentionChoice(impl, "flash-attention varlen kernel over the packed samples")
    if device.type != "cuda":
        why = "no CUDA device"
    elif not half:
        why = f"flash-attention needs fp16/bf16 weights, not {str(dtype).replace('torch.', '')}"
    else:
        why = "flash-attn is not installed (pip install flash-attn)"
    if requested != "auto":
        log.info("attention: %s asked for but %s; using sdpa", requested, why)
    return AttentionChoice("sdpa", f"{why}; sdpa with the block-diagonal mask from position_ids")


def packed_attention_kwargs(position_ids: torch.Tensor | None, implementation: str) -> dict:
    """Per-batch forward arguments for the flash varlen kernel (:func:`mmtune.data.packing.varlen_kwargs`:
    ``cu_seq_lens_q/k``, ``max_length_q/k``). Other kernels need nothing (the mask comes from
    ``position_ids``), so this returns {} for them and for unpacked batches."""
    if implementation not in FLASH or position_ids is None:
        return {}
    return varlen_kwargs(position_ids)
