"""Packing examples into rows of at most ``max_length`` tokens, and the batch collators.

Packing puts several samples in one row so that no compute is spent on padding. Samples in a
row must not see each other: each row carries ``position_ids`` that restart at 0 for every
sample, and transformers (5.x, ``masking_utils.find_packed_sequence_indices``) turns position ids
that restart into a block-diagonal causal mask, but only when no ``attention_mask`` is passed
and no cache is used (``use_cache=False``). Passing an attention mask of ones silently lets the
samples attend to each other. :func:`collate_packed` therefore returns no attention mask, and
``mmtune.train.objectives.model_inputs`` forwards only the keys present in the batch.

Because every example's first label is -100 (see :mod:`mmtune.data.tokenize`), the loss of a
packed row equals the sum of the losses of its samples run alone
(``tests/data/test_packing.py`` checks logits and loss against unpacked runs).

Numerics: packed and alone agree to rounding, not bit for bit. On SmolLM2-135M in fp32 they differ by
~1.4e-6 of the logits' scale (the same sample in an ordinary padded batch differs as much: kernels sum
in a shape-dependent order), in fp64 by ~1e-13. transformers computes the RoPE angles in fp32 even in
an fp64 model, so a sample at other absolute positions differs at ~1e-5 even in fp64: positions must
restart at 0 per sample, as here (``tests/models/test_real_model.py``).

Rows are built best-fit-decreasing: longest sample first, each into the row whose free space is
the smallest that still fits it. Its worst case is 11/9 of the optimal number of rows plus a
constant, like first-fit-decreasing (Johnson et al. 1974, "Worst-case performance bounds for
simple one-dimensional packing algorithms"); on instruction data it fills rows to within a few
percent of the token count (``packing_efficiency``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

IGNORE = -100
#: Batch keys of the flash-attention varlen boundaries (:func:`varlen_kwargs`), forwarded to the model.
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def pack_examples(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Best-fit-decreasing packing of ``examples`` (dicts with ``input_ids`` and ``labels``).

    Returns rows ``{"input_ids", "labels", "position_ids", "lengths", "indices"}`` (lists of
    ints): ``lengths`` are the sample lengths in order, ``indices`` the positions of the samples
    in ``examples``. Rows come longest-first; shuffle them for training.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    for i, n in enumerate(lengths):
        if n == 0 or n > max_length:
            raise ValueError(f"example {i} has {n} tokens; packing needs 1..{max_length} (max_length)")
        if n != len(examples[i]["labels"]):
            raise ValueError(f"example {i}: input_ids and labels differ in length")
    order = sorted(range(len(examples)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []  # sample indices per row
    free: list[tuple[int, int]] = []  # sorted (free space, row) of rows that can still take a sample
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))  # the tightest row with free space >= n
        if k < len(free):
            space, row = free.pop(k)
        else:
            space, row = max_length, len(bins)
            bins.append([])
        bins[row].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    rows = []
    for members in bins:
        ids, labels, pos = [], [], []
        for i in members:
            ids += examples[i]["input_ids"]
            labels += examples[i]["labels"]
            pos += range(lengths[i])
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos,
                     "lengths": [lengths[i] for i in members], "indices": list(members)})
    return rows


def packing_efficiency(rows: Sequence[dict], max_length: int) -> float:
    """Real tokens / (rows x max_length): the share of a fixed-size row budget that is not padding."""
    if not rows:
        return 0.0
    return sum(len(r["input_ids"]) for r in rows) / (len(rows) * max_length)


def _pad(seqs: Sequence[Sequence[int]], value: int, width: int) -> torch.Tensor:
    out = torch.full((len(seqs), width), value, dtype=torch.long)  # (B, T)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """The flash-attention varlen arguments of a packed batch: the cumulative sample lengths over
    the flattened batch (``cu_seq_lens_q/k``, int32, shape (n_samples + 1,)) and the longest
    sample (``max_length_q/k``, a Python int), as transformers'
    ``prepare_fa_kwargs_from_position_ids`` derives them from ``position_ids``.

    transformers' flash path derives them itself only for a batch of one row
    (``_is_packed_sequence`` needs batch size 1); for B > 1 packed rows without them it runs
    plain causal attention per row and the samples of a row see each other. Given per batch,
    the kernel runs over all B x T tokens at once and no layer re-derives them (a device sync)."""
    if not bool((position_ids.reshape(-1, position_ids.shape[-1])[:, 0] == 0).all()):
        raise ValueError("packed position_ids must start every row with 0 (a sample cannot span rows)")
    pos = position_ids.reshape(-1)  # (B*T,) samples never span rows, so the batch flattens
    starts = (pos == 0).nonzero().reshape(-1)  # (n_samples,)
    cu = torch.cat([starts, torch.tensor([pos.numel()], device=pos.device)]).to(torch.int32)  # (n_samples + 1,)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def collate_packed(rows: Sequence[dict], pad_id: int, varlen: bool = False) -> dict[str, torch.Tensor]:
    """Packed rows -> ``input_ids``, ``labels``, ``position_ids`` LongTensors of shape (B, T), T the
    longest row. Padding: ``pad_id`` inputs, -100 labels, and positions that keep counting from the
    row's last sample (so padding never starts a new sample and never reaches back into one).
    There is deliberately no ``attention_mask`` (see the module docstring). ``varlen``: also the
    flash-attention sample boundaries (:func:`varlen_kwargs`; padding counts with the row's last
    sample, which cannot see it under causal attention)."""
    width = max(len(r["input_ids"]) for r in rows)
    positions = []
    for r in rows:
        pos = list(r["position_ids"])
        nxt = pos[-1] + 1 if pos else 0
        positions.append(pos + list(range(nxt, nxt + width - len(pos))))
    batch = {
        "input_ids": _pad([r["input_ids"] for r in rows], pad_id, width),
        "labels": _pad([r["labels"] for r in rows], IGNORE, width),
        "position_ids": torch.tensor(positions, dtype=torch.long),  # (B, T)
    }
    if varlen:
        batch.update(varlen_kwargs(batch["position_ids"]))
    return batch


def collate_padded(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Unpacked examples -> right-padded ``input_ids``, ``attention_mask`` and ``labels`` (B, T)."""
    width = max(len(e["input_ids"]) for e in examples)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for b, e in enumerate(examples):
        mask[b, : len(e["input_ids"])] = 1
    return {
        "input_ids": _pad([e["input_ids"] for e in examples], pad_id, width),
        "attention_mask": mask,
        "labels": _pad([e["labels"] for e in examples], IGNORE, width),
    }
