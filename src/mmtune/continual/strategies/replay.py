"""Rehearsal strategies: experience replay, DER++, A-GEM.

All keep a memory of past examples (:mod:`mmtune.continual.buffer`: reservoir or
class-balanced, in memory or on disk). After each task its examples are offered to the memory
in a seeded random order.

- ``replay``: experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual
  Learning"): every micro-batch, a batch drawn from the memory adds its mean loss (term
  ``replay``). Equivalent up to the weighting to concatenating the two batches.
- ``derpp``: Dark Experience Replay++ (Buzzega et al. 2020, eq. 6): the memory also stores the
  logits the model gave each example; a memory batch adds alpha * MSE(logits, stored logits)
  and a second one beta * cross-entropy. Logits are recorded with the model at the end of the
  example's task (the original records them during training, when they are less trained).
  A language model's logits are one vocabulary-sized row per supervised token (152k floats =
  608 KB per token at fp32 for Qwen2), so only the ``logits_top_k`` largest of each row are kept
  (values and unit indices) and the MSE is taken over those units (the rest are far below them
  and carry little of the distribution); with ``logits_dtype: float16`` the values take half the
  bytes. A classifier with at most ``logits_top_k`` outputs (digits: 10) keeps every logit, the
  original DER++. The report states the memory in bytes per example.
- ``agem``: Averaged GEM (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM", eq.
  11): in ``after_backward``, if the step's gradient g conflicts with the gradient g_ref of a
  memory batch (g . g_ref < 0), g is projected to g - (g . g_ref / g_ref . g_ref) g_ref.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..buffer import build_buffer
from .base import STRATEGIES, Strategy, StrategySettings, TaskInfo, eval_mode, isolated_rng


class MemorySettings(StrategySettings):
    buffer_size: int = Field(200, gt=0, description="Examples kept in the memory.")
    buffer: Literal["reservoir", "class_balanced"] = Field(
        "reservoir", description="`reservoir`: a uniform sample of everything seen (Vitter's algorithm R). "
        "`class_balanced`: about the same number of examples per class (per task for text).")
    on_disk: bool = Field(False, description="Keep the memory in OUTPUT/continual/buffer, one file per example, "
                          "instead of in RAM.")
    batch_size: int | None = Field(None, gt=0, description="Memory examples per micro-batch (default: "
                                   "train.batch_size).")


class ReplaySettings(MemorySettings):
    weight: float = Field(1.0, ge=0, description="Weight of the replay loss.")


class DERSettings(MemorySettings):
    alpha: float = Field(0.3, ge=0, description="Weight of the logit-matching MSE (Buzzega et al. 2020).")
    beta: float = Field(0.5, ge=0, description="Weight of the cross-entropy on a second memory batch.")
    logits_top_k: int | None = Field(64, gt=0, description="Keep the k largest logits of each supervised item "
                                     "(and their indices); the MSE is over those. Outputs with at most k units "
                                     "are kept whole. null: keep every logit (a full vocabulary row per token).")
    logits_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Precision of the stored logit values (float16 halves the memory).")


class AGEMSettings(MemorySettings):
    sample_size: int = Field(64, gt=0, description="Memory examples used for the reference gradient each step.")


def row_counts(batch: dict) -> list[int]:
    """Supervised items per row of a collated batch: 1 per example for a classifier, the number
    of supervised tokens per row for a language model (matching the objective's flattening)."""
    if "labels" in batch:
        return (batch["labels"][:, 1:] != -100).sum(dim=1).tolist()
    return [1] * int(batch["y"].shape[0])


class _Memory(Strategy):
    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        s = settings
        path = ctx.work_dir / "buffer" if s.on_disk else None
        self.buffer = build_buffer(s.buffer, s.buffer_size, seed=ctx.seed, path=path, label_fn=ctx.label_fn)

    def after_task(self, model, task: TaskInfo, rows: list) -> None:
        order = self.rng.sample(range(len(rows)), len(rows))
        touched = sorted({slot for i in order if (slot := self.buffer.add(rows[i])) is not None})
        self.on_inserted(model, touched)

    def on_inserted(self, model, slots: list[int]) -> None:
        return None

    def sample(self, k: int | None = None) -> list:
        return self.buffer.sample(k or self.settings.batch_size or self.ctx.batch_size, self.rng)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])


@STRATEGIES.register("replay")
class Replay(_Memory):
    """Experience replay from a reservoir or class-balanced memory."""

    name = "replay"
    Settings = ReplaySettings

    def loss_terms(self, batch, outputs) -> dict[str, torch.Tensor]:
        if len(self.buffer) == 0:
            return {}
        with isolated_rng(self.draw_seed()):
            loss, _ = self.mean_loss(self.model, self.sample())
        return {"replay": self.settings.weight * loss}


@STRATEGIES.register("derpp")
class DERpp(_Memory):
    """Dark Experience Replay++: replay with stored logits."""

    name = "derpp"
    Settings = DERSettings

    def stored_logits(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fields kept for logits (N, C): ``_logits`` (N, k) values, and ``_logit_idx`` (N, k)
        int32 unit indices when only the top k of C > k units are kept."""
        s = self.settings
        dtype = getattr(torch, s.logits_dtype)
        if s.logits_top_k is None or logits.shape[-1] <= s.logits_top_k:
            return {"_logits": logits.to(dtype).cpu()}
        top = logits.topk(s.logits_top_k, dim=-1)  # (N, k) each
        return {"_logits": top.values.to(dtype).cpu(), "_logit_idx": top.indices.to(torch.int32).cpu()}

    def on_inserted(self, model, slots: list[int]) -> None:
        chunk = 256
        with torch.no_grad(), eval_mode(model), isolated_rng(self.draw_seed()):
            for i in range(0, len(slots), chunk):
                part = slots[i:i + chunk]
                items = [self.buffer[j] for j in part]
                batch = self.to_device(self.ctx.collate(items))
                logits = self.ctx.objective(model, batch).outputs.logits  # (N, C)
                for j, item, lg in zip(part, items, logits.split(row_counts(batch))):
                    clean = {k: v for k, v in item.items() if k not in ("_logits", "_logit_idx")}
                    self.buffer.update(j, {**clean, **self.stored_logits(lg.float())})

    def loss_terms(self, batch, outputs) -> dict[str, torch.Tensor]:
        if len(self.buffer) == 0:
            return {}
        s = self.settings
        with isolated_rng(self.draw_seed()):
            items = self.sample()
            _, out = self.mean_loss(self.model, items)
            logits = out.outputs.logits.float()  # (N, C)
            target = torch.cat([it["_logits"] for it in items]).to(logits.device).float()  # (N, k)
            if "_logit_idx" in items[0]:
                idx = torch.cat([it["_logit_idx"] for it in items]).to(logits.device).long()  # (N, k)
                logits = logits.gather(1, idx)  # (N, k): the stored units only
            mse = F.mse_loss(logits, target)
            ce, _ = self.mean_loss(self.model, self.sample())
        return {"der_logits": s.alpha * mse, "der_ce": s.beta * ce}


@STRATEGIES.register("agem")
class AGEM(_Memory):
    """Averaged Gradient Episodic Memory: project conflicting gradients."""

    name = "agem"
    Settings = AGEMSettings

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        self.projections = 0
        self.steps = 0

    def after_backward(self, model) -> None:
        if len(self.buffer) == 0:
            return
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        with isolated_rng(self.draw_seed()):
            loss, _ = self.mean_loss(model, self.sample(self.settings.sample_size))
            ref = torch.autograd.grad(loss, params, allow_unused=True)
        ref = [torch.zeros_like(p) if r is None else r for p, r in zip(params, ref)]
        dot = sum((p.grad.float() * r.float()).sum() for p, r in zip(params, ref))
        self.steps += 1
        if dot < 0:
            norm2 = sum((r.float() ** 2).sum() for r in ref)
            coef = dot / norm2.clamp_min(1e-12)
            for p, r in zip(params, ref):
                p.grad.sub_((coef * r).to(p.grad.dtype))
            self.projections += 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "projections": self.projections, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.projections, self.steps = state["projections"], state["steps"]
