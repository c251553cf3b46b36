"""Encoder objectives, registered in :data:`mmtune.train.objectives.OBJECTIVES`.

=====================  ===============================================  ==========================
name                   loss                                             count (normaliser)
=====================  ===============================================  ==========================
``mlm``                cross-entropy at the selected tokens             selected tokens
``mlm_nsp``            MLM + next-sentence prediction (BERT)            selected tokens
``mlm_sop``            MLM + sentence-order prediction (ALBERT)         selected tokens
``electra``            generator MLM + lambda * replaced-token BCE      selected tokens
``classify``           cross-entropy of the class                       examples
``qa``                 (CE(start) + CE(end)) / 2                        QA windows
``similarity_cross``   BCE of the pair score scaled to [0, 1]           pairs
``similarity_bi``      contrastive (or MSE) on the cosine of the pair   pairs
=====================  ===============================================  ==========================

The loop divides the summed loss by the step's total count. For the two-term objectives the
second term is scaled inside each micro-batch so that one micro-batch gives exactly the papers'
``mean MLM + mean pair loss`` (BERT) and ``mean MLM + lambda * mean RTD`` (ELECTRA, averaged over
all real tokens), i.e. ``loss_sum = mlm_sum + w * term_sum * n_selected / n_term``.

Every objective also reports named parts (``mlm_loss``, ``mlm_acc``, ``pair_acc``, ``rtd_acc``...)
as ``(sum, count)`` through :meth:`parts`, so evaluation can aggregate them exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..train.objectives import OBJECTIVES, LossOutput, Objective
from .masking import IGNORE


class EncoderObjective(Objective):
    """``parts(model, batch) -> (loss_sum, count, outputs, {name: (sum, n)})`` is what subclasses
    define; ``__call__`` reports each part's mean as a metric."""

    def parts(self, model, batch: dict):
        raise TypeError(f"{type(self).__name__} must define parts()")

    def __call__(self, model, batch: dict) -> LossOutput:
        loss_sum, count, outputs, parts = self.parts(model, batch)
        metrics = {k: float(s) / max(float(n), 1.0) for k, (s, n) in parts.items()}
        return LossOutput(loss_sum, count, outputs, metrics)


def _mlm_parts(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Summed cross-entropy of the selected positions' logits (N, V) against their ids (N,)."""
    logits = logits.float()
    loss = F.cross_entropy(logits, target, reduction="sum")
    n = target.numel()
    correct = (logits.argmax(-1) == target).sum().detach()
    return loss, {"mlm_loss": (loss.detach(), n), "mlm_acc": (correct, n)}


def _pretraining_forward(model, batch: dict):
    """(MLM logits at the selected positions, their target ids, pair logits or None)."""
    labels = batch["labels"]
    logits, pair = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), labels)
    return logits, labels[labels != IGNORE], pair


@OBJECTIVES.register("mlm")
class MLMObjective(EncoderObjective):
    """Masked-language-model cross-entropy on the selected tokens (labels != -100)."""

    name = "mlm"
    data = "masked"

    def count(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def parts(self, model, batch: dict):
        logits, target, _ = _pretraining_forward(model, batch)
        loss, parts = _mlm_parts(logits, target)
        return loss, target.numel(), logits, parts


class _MLMPairObjective(MLMObjective):
    """MLM plus a 2-way classification of the segment pair from the pooled [CLS] (``pair_labels``)."""

    def parts(self, model, batch: dict):
        logits, target, pair_logits = _pretraining_forward(model, batch)
        mlm_sum, parts = _mlm_parts(logits, target)
        pair_logits = pair_logits.float()  # (B, 2)
        labels = batch["pair_labels"]
        pair_sum = F.cross_entropy(pair_logits, labels, reduction="sum")
        n_sel, n_pairs = max(target.numel(), 1), labels.numel()
        parts["pair_loss"] = (pair_sum.detach(), n_pairs)
        parts["pair_acc"] = ((pair_logits.argmax(-1) == labels).sum().detach(), n_pairs)
        return mlm_sum + pair_sum * (n_sel / n_pairs), target.numel(), (logits, pair_logits), parts


@OBJECTIVES.register("mlm_nsp")
class MLMNSPObjective(_MLMPairObjective):
    """BERT: MLM + next-sentence prediction (label 1 = B comes from another document)."""

    name = "mlm_nsp"
    data = "segments"


@OBJECTIVES.register("mlm_sop")
class MLMSOPObjective(_MLMPairObjective):
    """ALBERT: MLM + sentence-order prediction (label 1 = the two segments are swapped)."""

    name = "mlm_sop"
    data = "segments"


@OBJECTIVES.register("electra")
class ElectraObjective(MLMObjective):
    """Generator MLM + ``rtd_weight`` x discriminator BCE over every real token (Clark et al. 2020)."""

    name = "electra"
    data = "masked"

    def __init__(self, rtd_weight: float = 50.0):
        self.rtd_weight = rtd_weight

    def parts(self, model, batch: dict):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    original_ids=batch["original_ids"], token_type_ids=batch.get("token_type_ids"))
        gen_sum = F.cross_entropy(out.gen_logits.float(), out.gen_labels, reduction="sum")
        n_sel = out.gen_labels.numel()
        real = batch["attention_mask"].bool()
        logits, labels = out.disc_logits[real].float(), out.disc_labels[real]
        disc_sum = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
        n_real = int(real.sum())
        replaced = labels == 1
        parts = {
            "mlm_loss": (gen_sum.detach(), n_sel),
            "mlm_acc": ((out.gen_logits.argmax(-1) == out.gen_labels).sum(), n_sel),
            "rtd_loss": (disc_sum.detach(), n_real),
            "rtd_acc": (((logits > 0).long() == labels).sum(), n_real),
            "replaced_frac": (replaced.sum(), n_real),
            "replaced_recall": (((logits > 0) & replaced).sum(), max(int(replaced.sum()), 1)),
        }
        loss = gen_sum + self.rtd_weight * disc_sum * (max(n_sel, 1) / max(n_real, 1))
        return loss, n_sel, out, parts


@OBJECTIVES.register("classify")
class ClassifyObjective(EncoderObjective):
    """Cross-entropy of the class from the pooled sequence vector."""

    name = "classify"
    data = "task"

    def count(self, batch: dict) -> int:
        return batch["labels"].numel()

    def parts(self, model, batch: dict):
        logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).float()
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
        n = batch["labels"].numel()
        return loss, n, logits, {"acc": ((logits.argmax(-1) == batch["labels"]).sum(), n)}


@OBJECTIVES.register("qa")
class QAObjective(EncoderObjective):
    """Mean of the start and end cross-entropies per window (BERT section 4.2)."""

    name = "qa"
    data = "task"

    def count(self, batch: dict) -> int:
        return batch["start_positions"].numel()

    def parts(self, model, batch: dict):
        start, end = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        pad = ~batch["attention_mask"].bool()
        start = start.float().masked_fill(pad, -1e4)
        end = end.float().masked_fill(pad, -1e4)
        s, e = batch["start_positions"], batch["end_positions"]
        loss = (F.cross_entropy(start, s, reduction="sum") + F.cross_entropy(end, e, reduction="sum")) / 2
        n = s.numel()
        hit = ((start.argmax(-1) == s) & (end.argmax(-1) == e)).sum()
        return loss, n, (start, end), {"span_acc": (hit, n)}


@OBJECTIVES.register("similarity_cross")
class SimilarityCrossObjective(EncoderObjective):
    """Cross-encoder: binary cross-entropy of one logit against the score scaled to [0, 1]."""

    name = "similarity_cross"
    data = "task"

    def count(self, batch: dict) -> int:
        return batch["scores"].numel()

    def parts(self, model, batch: dict):
        logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).squeeze(-1)
        target = batch["scores"].float()
        loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum")
        n = target.numel()
        return loss, n, logits, {"abs_err": ((torch.sigmoid(logits.float()) - target).abs().sum().detach(), n)}


@OBJECTIVES.register("similarity_bi")
class SimilarityBiObjective(EncoderObjective):
    """Bi-encoder on cos(u, v). ``contrastive``: with d = 1 - cos and y = [score >= threshold],
    0.5 * (y d^2 + (1 - y) max(0, margin - d)^2) (Hadsell et al. 2006; sentence-transformers'
    ContrastiveLoss). ``cosine_mse``: (cos - score)^2 with the score scaled to [0, 1]."""

    name = "similarity_bi"
    data = "task"

    def __init__(self, loss: str = "contrastive", margin: float = 0.5, threshold: float = 0.5):
        self.loss, self.margin, self.threshold = loss, margin, threshold

    def count(self, batch: dict) -> int:
        return batch["scores"].numel()

    def parts(self, model, batch: dict):
        cos = model(batch["input_ids"], batch["attention_mask"], batch["b_input_ids"], batch["b_attention_mask"])
        target = batch["scores"].float()
        if self.loss == "contrastive":
            d = 1 - cos
            y = (target >= self.threshold).float()
            loss = 0.5 * (y * d ** 2 + (1 - y) * F.relu(self.margin - d) ** 2).sum()
        else:
            loss = ((cos - target) ** 2).sum()
        n = target.numel()
        return loss, n, cos, {"mean_cos": (cos.detach().sum(), n)}


def build_objective(name: str, enc) -> Objective:
    """The objective ``name`` configured from the recipe's ``encoder:`` section."""
    cls = OBJECTIVES.get(name)
    if cls is ElectraObjective:
        return cls(rtd_weight=enc.rtd_weight)
    if cls is SimilarityBiObjective:
        lo, hi = enc.score_range
        return cls(enc.similarity_loss, enc.contrastive_margin, (enc.threshold - lo) / (hi - lo))
    return cls()
