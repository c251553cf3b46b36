"""Direct Preference Optimization (Rafailov et al. 2023) and its IPO variant (Azar et al. 2023).

A batch holds B preference pairs as 2B sequences: rows [0, B) are the chosen responses and
rows [B, 2B) the rejected ones, labels only on the response tokens. With
``h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))`` (sequence log-probs,
summed over response tokens):

- sigmoid DPO: ``loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``
  (``eps`` = label smoothing, the conservative DPO of Mitchell 2023; eps = 0 is plain DPO);
- IPO: ``loss = (h - 1 / (2 * beta))^2`` (Azar et al. 2023, eq. 17, on summed log-probs).

With ``sft_weight`` alpha > 0 the per-token negative log-likelihood of the chosen response is
added, ``loss += alpha * (-log pi(y_w|x) / |y_w|)`` (RPO, Pang et al. 2024; TRL's ``rpo_alpha``;
Llama 3 adds the same term): DPO alone can lower both responses' likelihood, the NLL term keeps the
chosen one likely, which matters when starting from a weak model.

Rewards are ``beta * (log pi - log ref)``; preference accuracy is the share of pairs whose
chosen reward exceeds the rejected one.

The reference model is the frozen starting model. For a PEFT model it is the same network with
the adapters disabled (``model.disable_adapter()``), so no second copy is held in memory; for
full fine-tuning pass a frozen ``ref_model``. Reference log-probs found in the batch
(``ref_logps``, precomputed once by :func:`precompute_reference_logps`) are used instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.preference import collate_pairs
from .objectives import OBJECTIVES, LossOutput, Objective, model_inputs


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over supervised positions, per row. logits (N, T, V), labels (N, T)."""
    logits = logits[:, :-1, :]  # (N, T-1, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    target = labels[:, 1:]  # (N, T-1)
    mask = target != -100
    logp = torch.log_softmax(logits, dim=-1)
    picked = torch.gather(logp, 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    return (picked * mask).sum(-1)


def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Per-pair losses and metrics from policy (p) and reference (r) log-probs of chosen (c) and
    rejected (r) responses."""
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; valid: sigmoid, ipo")
    chosen_r = beta * (pc - rc).detach()
    rejected_r = beta * (pr - rr).detach()
    metrics = {
        "rewards/chosen": float(chosen_r.mean()), "rewards/rejected": float(rejected_r.mean()),
        "rewards/margin": float((chosen_r - rejected_r).mean()),
        "rewards/accuracy": float((chosen_r > rejected_r).float().mean()),
    }
    return losses, metrics


def chosen_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """Supervised tokens of each chosen row (rows [0, n) of a 2n-row pair batch), at least 1."""
    n = labels.shape[0] // 2
    return (labels[:n, 1:] != -100).sum(-1).clamp(min=1)


def has_adapters(model) -> bool:
    """Whether ``model`` (or the model a DDP wrapper holds) is a PEFT model."""
    return hasattr(getattr(model, "module", model), "disable_adapter")


def _disabled_adapters(model):
    """Context in which a PEFT model runs as its base model."""
    return getattr(model, "module", model).disable_adapter() if has_adapters(model) else None


@torch.no_grad()
def reference_logps(model, batch: dict, ref_model=None) -> torch.Tensor:
    if ref_model is not None:
        out = ref_model(**model_inputs(batch), use_cache=False)
        return sequence_logps(out.logits, batch["labels"])
    ctx = _disabled_adapters(model)
    if ctx is None:
        raise ValueError("DPO needs a reference: a PEFT (LoRA) model, whose adapters are disabled for the "
                         "reference pass, or an explicit frozen ref_model for full fine-tuning")
    was_training = model.training
    model.eval()  # no dropout in the reference pass
    with ctx:
        out = model(**model_inputs(batch), use_cache=False)
    model.train(was_training)
    return sequence_logps(out.logits, batch["labels"])


@OBJECTIVES.register("dpo")
class DPOObjective(Objective):
    """Pairs in, DPO/IPO loss out. ``count`` is the number of pairs."""

    name = "dpo"
    data = "pairs"

    @classmethod
    def from_recipe(cls, recipe, model=None, rows=(), collate=None, log=print, eval_rows=()) -> DPOObjective:
        """DPO against the frozen starting model: the base with adapters disabled for LoRA, a frozen
        copy for full fine-tuning; reference log-probs optionally precomputed once (for the training
        and the eval pairs, after which the frozen copy is released)."""
        import copy

        ref_model = None
        if recipe.adapter.type == "none":
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
            log("dpo: full fine-tuning, reference = a frozen copy of the starting model")
        cfg = recipe.dpo
        if cfg.precompute_ref:
            for part in (rows, eval_rows):
                precompute_reference_logps(model, part, collate, recipe.train.batch_size, ref_model,
                                           progress=recipe.train.progress)
            ref_model = None  # no longer needed: the batches carry ref_logps
        return cls(cfg.beta, cfg.loss_type, cfg.label_smoothing, ref_model, cfg.sft_weight)

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, ref_model=None,
                 sft_weight: float = 0.0):
        self.beta, self.loss_type, self.label_smoothing, self.ref_model = beta, loss_type, label_smoothing, ref_model
        self.sft_weight = sft_weight

    def count(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def pair_losses(self, pc, pr, rc, rr, chosen_tokens) -> tuple[torch.Tensor, dict]:
        """Per-pair DPO / IPO losses plus ``sft_weight`` x the per-token NLL of the chosen answer."""
        losses, metrics = dpo_loss(pc, pr, rc, rr, self.beta, self.loss_type, self.label_smoothing)
        if self.sft_weight > 0:
            nll = -pc / chosen_tokens.to(pc.device)
            losses = losses + self.sft_weight * nll
            metrics["nll/chosen"] = float(nll.detach().mean())
        return losses, metrics

    def __call__(self, model, batch: dict) -> LossOutput:
        n = batch["input_ids"].shape[0] // 2
        if "ref_logps" in batch:
            ref = batch["ref_logps"].to(batch["input_ids"].device)
        else:
            ref = reference_logps(model, batch, self.ref_model)
        out = model(**model_inputs(batch), use_cache=False)
        pol = sequence_logps(out.logits, batch["labels"])
        losses, metrics = self.pair_losses(pol[:n], pol[n:], ref[:n], ref[n:], chosen_token_counts(batch["labels"]))
        return LossOutput(losses.sum(), n, out, metrics)


@torch.no_grad()
def precompute_reference_logps(model, examples: list[dict], collate_fn, batch_size: int = 8, ref_model=None,
                               progress: bool = True) -> None:
    """Store each pair's reference log-probs in the example (``ref_chosen``/``ref_rejected``),
    computed once; the collate function passes them on as ``ref_logps``."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    it = range(0, len(examples), batch_size)
    for i in tqdm(it, desc="reference log-probs", disable=not progress):
        chunk = examples[i:i + batch_size]
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate_fn(chunk).items()}
        batch.pop("ref_logps", None)
        ref = reference_logps(model, batch, ref_model).cpu()
        n = len(chunk)
        for j, ex in enumerate(chunk):
            ex["ref_chosen"], ex["ref_rejected"] = float(ref[j]), float(ref[n + j])


@torch.no_grad()
def preference_accuracy(model, examples: list[dict], pad_id: int, beta: float = 0.1, batch_size: int = 16,
                        ref_model=None) -> dict:
    """Share of held-out pairs where the policy gives the chosen response a higher log-prob than
    the rejected one; with a reference (``ref_model``, or a PEFT model's adapters disabled) also
    the share whose implicit reward is higher, and the mean reward margin."""

    device = next(model.parameters()).device
    was = model.training
    model.eval()
    with_ref = ref_model is not None or has_adapters(model)
    wins, logp_wins, margins, n = 0, 0, 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        b = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items() if k != "ref_logps"}
        pol = sequence_logps(model(**model_inputs(b), use_cache=False).logits, b["labels"])
        k = len(chunk)
        logp_wins += int((pol[:k] > pol[k:]).sum())
        n += k
        if with_ref:
            ref = reference_logps(model, b, ref_model)
            rc, rr = beta * (pol[:k] - ref[:k]), beta * (pol[k:] - ref[k:])
            wins += int((rc > rr).sum())
            margins += float((rc - rr).sum())
    model.train(was)
    out = {"logp_preference_accuracy": logp_wins / n, "n": n}
    if with_ref:
        out.update(preference_accuracy=wins / n, reward_margin=margins / n)
    return out
