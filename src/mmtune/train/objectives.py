"""Training objectives: what a batch's loss is.

An objective returns the *sum* of its per-item losses and the number of items (tokens for a
language model), so the loop can normalise by the number of items in the whole optimizer
step, across micro-batches and processes. That makes gradient accumulation and data
parallelism give the same update as one large batch (the same fix as transformers'
``num_items_in_batch``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch

from ..data.packing import VARLEN_KEYS
from ..models.losses import shifted_token_loss  # noqa: F401 - defined with the models
from ..registry import OBJECTIVES


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar, sum over items
    count: torch.Tensor | int  # items the sum is over
    outputs: object = None  # the model outputs, for continual-learning plugins
    metrics: dict[str, float] = field(default_factory=dict)


#: What an objective trains on (:attr:`Objective.data`); a workflow builds its rows accordingly.
DATA_KINDS = ("sequences", "pairs", "masked", "segments", "task")


class Objective(abc.ABC):
    """Interface of every objective. ``count(batch)`` must be computable before the forward
    pass (the loop normalises by the step's total before calling the objective).

    ``data`` declares the rows it needs, so a workflow asks the objective instead of testing its
    name: ``sequences`` (token ids + labels, packable), ``pairs`` (chosen/rejected answers to
    one prompt, never packed), ``masked`` (masked-LM rows), ``segments`` (sentence pairs with a
    pair label), ``task`` (downstream records: labels, spans or scores)."""

    name = "base"
    data: str = "sequences"

    @classmethod
    def from_recipe(cls, recipe, model=None, rows=(), collate=None, log=print, eval_rows=()) -> Objective:
        """The objective a causal-LM recipe trains with (``model``/``rows``: for objectives that
        need the starting model, e.g. DPO's reference)."""
        return cls()

    @abc.abstractmethod
    def count(self, batch: dict) -> int:
        """Items (e.g. supervised tokens) the batch's loss sums over."""

    @abc.abstractmethod
    def __call__(self, model, batch: dict) -> LossOutput:
        """Forward ``batch`` through ``model`` and return the summed loss."""




def model_inputs(batch: dict) -> dict:
    """The keys a causal LM forward takes. Packed batches carry position_ids and no attention
    mask: transformers then isolates the samples of a row (block-diagonal attention) only when
    no attention_mask is passed and use_cache is False. A batch collated for the flash varlen
    kernel also carries the sample boundaries (``cu_seq_lens_q`` ..., see
    :func:`mmtune.data.packing.varlen_kwargs`), which the model passes to its attention layers."""
    keys = ("input_ids", "attention_mask", "position_ids", *VARLEN_KEYS)
    return {k: batch[k] for k in keys if k in batch and batch[k] is not None}


@OBJECTIVES.register("sft")
class CausalLMObjective(Objective):
    """Next-token cross-entropy on the positions whose label is not -100. Used for instruction
    SFT (labels only on answers) and continued pretraining (labels on every token)."""

    name = "sft"

    def count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def __call__(self, model, batch: dict) -> LossOutput:
        out = model(**model_inputs(batch), use_cache=False)
        loss_sum, n = shifted_token_loss(out.logits, batch["labels"])
        return LossOutput(loss_sum, n, out)


OBJECTIVES.register("pretrain")(CausalLMObjective)


def objective_data(name: str) -> str:
    """What objective ``name`` trains on (:attr:`Objective.data`)."""
    return OBJECTIVES.get(name).data


def register_all() -> None:
    """Import every module that registers objectives (DPO, fused CE, encoder objectives); each is
    also imported on first :meth:`OBJECTIVES.get <mmtune.registry.Registry.get>` of its names."""
    OBJECTIVES.load_all()
