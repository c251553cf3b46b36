"""Prompt-based strategy: an L2P-style prompt pool (Wang et al. 2022, "Learning to Prompt for
Continual Learning", sec. 4).

A pool of M prompts, each L tokens long, with one learnable key per prompt. For an input x the
*frozen* encoder (without prompts) gives a query q(x) (its CLS feature); the N prompts whose
keys are nearest to q(x) by cosine similarity are prepended to the input tokens, and the
classifier reads the prompted CLS feature. Training updates the prompts, the keys and the
head; a surrogate loss sum_i (1 - cos(q(x), k_si)) over the selected keys pulls the keys
towards the queries that chose them (L2P eq. 5). No task id is needed at test.

Scope: L2P prepends prompts to the token sequence of an encoder, so it needs a token-based
model. Here that is the digits transformer (``continual.digits_net.arch: transformer``, the
8 pixel rows as tokens): the MLP has no token sequence to prepend to. L2P assumes a pre-trained
backbone; the digits transformer is trained from scratch, so ``train_backbone`` (default false)
decides whether the encoder also learns (queries then come from a frozen copy made before the
first task, as L2P's queries come from the frozen pre-trained model). Defaults follow the paper's
M=10, L=5, N=5. In the class-incremental scenario the logits of classes outside the current task
are masked while training (``train_mask``, as L2P's released code does), so the shared head is not
pushed to predict only the newest classes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...errors import ConfigError
from ..nets import ClassifierOut, DigitsTransformer
from ..objectives import MASKED_LOGIT
from .base import STRATEGIES, Strategy, StrategySettings, TaskInfo, set_trainable


class L2PSettings(StrategySettings):
    pool_size: int = Field(10, gt=0, description="Prompts in the pool (M).")
    prompt_length: int = Field(5, gt=0, description="Tokens per prompt (L).")
    top_k: int = Field(5, gt=0, description="Prompts selected per input (N).")
    key_weight: float = Field(0.5, ge=0, description="Weight of the key-query matching loss.")
    train_backbone: bool = Field(False, description="Also train the encoder (queries still come from its "
                                 "frozen initial copy).")
    train_mask: bool = Field(True, description="During training, mask the logits of classes outside the current "
                             "task (class-incremental heads; L2P's released code does this, `train_mask`).")


class PromptPool(nn.Module):
    """Keys (M, D) and prompts (M, L, D), initialised uniformly in [-1, 1] like L2P's code."""

    def __init__(self, pool_size: int, length: int, dim: int, top_k: int):
        super().__init__()
        if top_k > pool_size:
            raise ConfigError(f"l2p: top_k ({top_k}) cannot exceed pool_size ({pool_size})")
        self.top_k = top_k
        self.keys = nn.Parameter(torch.empty(pool_size, dim).uniform_(-1, 1))
        self.prompts = nn.Parameter(torch.empty(pool_size, length, dim).uniform_(-1, 1))

    def forward(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``query`` (B, D) -> prefix (B, N*L, D), selected indices (B, N), matching loss (scalar)."""
        sim = F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T  # (B, M)
        idx = sim.topk(self.top_k, dim=-1).indices  # (B, N)
        B, N = idx.shape
        prefix = self.prompts[idx].reshape(B, N * self.prompts.shape[1], -1)  # (B, N*L, D)
        match = (1.0 - sim.gather(1, idx)).sum(dim=1).mean()
        return prefix, idx, match


class L2PModel(nn.Module):
    """A :class:`DigitsTransformer` with a prompt pool in front of its encoder."""

    def __init__(self, base: DigitsTransformer, pool: PromptPool, query_model: DigitsTransformer | None = None):
        super().__init__()
        self.base, self.pool = base, pool
        # A frozen copy for the queries when the backbone trains; otherwise the base itself.
        self.query_model = query_model
        #: classes the current task may predict while training (None: all); set by the strategy
        self.train_classes: list[int] | None = None

    def forward(self, x: torch.Tensor) -> ClassifierOut:
        qm = self.query_model if self.query_model is not None else self.base
        with torch.no_grad():
            query = qm.encode(qm.embed(x))  # (B, D), no prompts
        prefix, _, match = self.pool(query)
        feat = self.base.encode(self.base.embed(x), prefix)  # (B, D)
        logits = self.base.head(feat)  # (B, C)
        if self.training and self.train_classes is not None:
            keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            keep[self.train_classes] = True
            logits = logits.masked_fill(~keep, MASKED_LOGIT)
        return ClassifierOut(logits, feat, {"key_loss": match})


@STRATEGIES.register("l2p")
class L2P(Strategy):
    """Learning to Prompt: a key-query prompt pool for a token-based encoder.

    Meant for a pretrained, frozen encoder whose features already separate the tasks, and for task-
    or domain-incremental sequences. Measured on task-incremental Split-Digits with the transformer
    net (``continual.digits_net.arch: transformer``), 3 seeds: ACC 84.8 ± 2.0 vs naive 83.0 ± 7.1,
    max forgetting 4.1 vs 17.9. On class-incremental digits with a randomly initialised backbone it
    scores 18 ACC: the prompts cannot learn what the frozen random features do not hold."""

    name = "l2p"
    Settings = L2PSettings

    def setup(self, model):
        if not isinstance(model, DigitsTransformer):
            raise ConfigError("strategy l2p prepends prompts to an encoder's tokens: use the digits benchmark with "
                              "continual.digits_net.arch: transformer")
        s = self.settings
        pool = PromptPool(s.pool_size, s.prompt_length, model.hidden, s.top_k)
        query = None
        if s.train_backbone:
            query = copy.deepcopy(model)
            for p in query.parameters():
                p.requires_grad_(False)
        return L2PModel(model, pool, query)

    def before_task(self, model, task: TaskInfo) -> None:
        super().before_task(model, task)
        model.train_classes = task.classes if self.settings.train_mask and self.ctx.scenario == "class" else None
        if self.settings.train_backbone:
            set_trainable(model, lambda n: not n.startswith("query_model."))
        else:
            set_trainable(model, lambda n: n.startswith(("pool.", "base.head.")))

    def loss_terms(self, batch, outputs) -> dict[str, torch.Tensor]:
        return {"l2p_keys": self.settings.key_weight * outputs.outputs.aux["key_loss"]}
