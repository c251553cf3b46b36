"""Regularization strategies: EWC and online EWC.

EWC (Kirkpatrick et al. 2017, eq. 3) adds (lambda/2) * sum_i F_i (theta_i - theta*_i)^2 per past
task, with F the diagonal Fisher information at the task's final weights theta*. We estimate F
as the empirical Fisher: the mean over ``fisher_samples`` training examples of the squared
per-example gradient of the loss on the task's own labels, then divided by its largest entry.
Online EWC (Schwarz et al. 2018, "Progress & Compress", sec. 3.1) keeps one penalty:
F <- gamma * F + F_t, anchored at the latest weights.

Two conventions (``convention``), which give lambda very different units:

============================  ===============================  ===================================
                              ``mmtune`` (default)             ``avalanche`` (Avalanche 0.6
                                                               ``EWCPlugin``, mode separate)
============================  ===============================  ===================================
gradient per Fisher term      one example                      the mean loss of a mini-batch of
                              (``fisher_batch_size: 1``)       ``train.batch_size`` examples
examples                      ``fisher_samples`` (256)         the whole task
normalisation                 divided by the max entry         none
penalty                       (lambda/2) sum F (theta-theta*)^2  lambda sum F (theta-theta*)^2
============================  ===============================  ===================================

Squared mini-batch gradients are much smaller than squared per-example ones (the mean of B
gradients has about 1/B of their variance) and the max normalisation divides by a small number,
so the same run needs a far larger lambda under Avalanche's convention: on Split-Digits
(class-incremental, the shipped MLP) mmtune's lambda 100 is of the scale of Avalanche's ~2.3e6
(issue 17). The two Fishers differ in shape too, not only in scale, so the results differ:
class-incremental ACC over 5 seeds (``continual-digits``, points, mean +- sd): mmtune lambda 100:
20.7 +- 2.2; avalanche with ``guard: false``, lambda 1e4: 19.3 +- 0.1, 1e5: 20.0 +- 1.0, 1e6:
29.2 +- 1.3, 2.3e6: 29.5 +- 3.0, 1e7: 26.6 +- 4.7 (plasticity, mean R[j][j], falls from 98 to 85
over that range). Each of ``fisher_batch_size``, ``fisher_samples`` and ``fisher_norm`` may still
be set explicitly under either convention.

Guard against a too large lambda (docs/reference/continual.md#ewc-stiffness: a large lambda with plain SGD
diverges), in three parts:

1. Fisher normalisation (``fisher_norm: max``, the mmtune convention): each task's Fisher is divided by its
   largest entry, so F lies in [0, 1] and lambda is the stiffness of the most important weight,
   comparable across models, losses and dataset sizes (raw Fisher values span orders of
   magnitude with the loss scale). ``fisher_clamp`` caps entries further.
2. Stiffness check before each task: the penalty is a quadratic with curvature lambda * F_i
   along weight i (2 lambda F_i under the Avalanche convention, which has no 1/2), and gradient
   descent with step lr on a quadratic diverges when lr * curvature > 2 (the classic step-size
   bound). The stiffness ``lr * max_i curvature_i`` above
   ``max_stiffness`` (default 2) is a blow-up before any step is taken. (AdamW does not
   diverge there but oscillates around theta* and stops learning the new task: the same
   silent failure.)
3. Blow-up detection while training: with a stable optimiser the total loss does not rise far
   above its value at the start of the task, where the penalty is 0 (theta = theta*). A penalty
   above ``blowup_factor`` times the task loss of the task's first batch, or a non-finite one,
   is a blow-up (this also covers ``fisher_norm: none`` and ``max_stiffness: null``).

``guard: false`` turns both checks off explicitly (Avalanche has neither): the penalty is used as
given, however stiff. Needed to reproduce Avalanche's results with its large lambdas, whose
stiffness under AdamW is far above 2 without diverging.

On a blow-up, ``on_blowup: error`` (default) stops with a message naming the setting and a value
to try; ``on_blowup: scale`` lowers the effective lambda -- to stiffness 1 (lr * max curvature
= 1, the critically damped step) for the check before the task, or so that the penalty equals
the task's initial loss during training -- logs it and goes on. The scale is kept for later
tasks and reported (``strategy_state.scale`` / ``events``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ...errors import MMTuneError
from .base import (
    STRATEGIES,
    Strategy,
    StrategySettings,
    TaskInfo,
    eval_mode,
    isolated_rng,
    snapshot,
    trainable_params,
)


class EWCSettings(StrategySettings):
    lambda_: float = Field(100.0, alias="lambda", ge=0, description="Penalty strength lambda: (lambda/2) sum_i "
                           "F_i (theta_i - theta*_i)^2 with F normalised to a maximum of 1 (convention mmtune; 100 "
                           "is the best of 100 / 300 / 1000 / 10^4 / 10^5 on permuted Split-Digits), or lambda sum_i "
                           "F_i (theta_i - theta*_i)^2 with the raw mini-batch Fisher (convention avalanche).")
    convention: Literal["mmtune", "avalanche"] = Field(
        "mmtune", description="`mmtune`: per-example empirical Fisher on fisher_samples examples, max-normalised, "
        "penalty (lambda/2) sum F d^2. `avalanche`: as Avalanche's EWCPlugin: squared gradients of mini-batch "
        "mean losses (train.batch_size) over the whole task, not normalised, penalty lambda sum F d^2 (its lambda "
        "is ~2.3e4 times mmtune's on Split-Digits).")
    fisher_samples: int | None = Field(None, gt=0, description="Training examples of the task used to estimate "
                                       "its Fisher (default: 256 under mmtune, all under avalanche).")
    fisher_batch_size: int | None = Field(None, gt=0, description="Examples per gradient in the estimate (default: "
                                          "1 under mmtune, the per-example empirical Fisher; train.batch_size under "
                                          "avalanche). Larger is faster but underestimates the per-example Fisher.")
    fisher_norm: Literal["max", "none"] | None = Field(
        None, description="`max`: divide each task's Fisher by its largest entry (lambda then means the same on any "
        "model). `none`: raw squared gradients. Default: max under mmtune, none under avalanche.")
    fisher_clamp: float | None = Field(None, gt=0, description="Cap Fisher entries at this value (after "
                                       "normalisation).")
    guard: bool = Field(True, description="Check the stiffness before each task and watch for a blow-up while "
                        "training (below). false turns both off explicitly, as in Avalanche.")
    max_stiffness: float | None = Field(2.0, gt=0, description="Largest train.lr x max penalty curvature (lambda x "
                                        "max Fisher; 2x that under avalanche) allowed before a task (gradient "
                                        "descent on the penalty diverges above 2); null disables the check.")
    on_blowup: Literal["error", "scale"] = Field("error", description="When the penalty exceeds blowup_factor x "
                                                 "the task's initial loss: stop with an error naming lambda, or "
                                                 "scale lambda down automatically and continue.")
    blowup_factor: float = Field(100.0, gt=1, description="Penalty / initial task loss ratio treated as a "
                                 "blow-up.")


class OnlineEWCSettings(EWCSettings):
    gamma: float = Field(1.0, ge=0, le=1, description="Decay of the accumulated Fisher, F <- gamma F + F_t "
                         "(Schwarz et al. 2018).")


@STRATEGIES.register("ewc")
class EWC(Strategy):
    """Elastic weight consolidation: one quadratic penalty per past task."""

    name = "ewc"
    Settings = EWCSettings
    online = False

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        self.penalties: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []  # (Fisher, theta*)
        self.scale = 1.0  # lambda multiplier set by on_blowup: scale
        self.events: list[dict] = []
        self._initial_loss: float | None = None

    # ---------------------------------------------------------------- the convention's defaults
    @property
    def avalanche(self) -> bool:
        return self.settings.convention == "avalanche"

    @property
    def penalty_factor(self) -> float:
        """The factor in front of lambda: 1/2 (Kirkpatrick eq. 3) or 1 (Avalanche)."""
        return 1.0 if self.avalanche else 0.5

    def fisher_plan(self, n_rows: int) -> tuple[int, int, str]:
        """(examples, examples per gradient, normalisation) of the Fisher estimate for ``n_rows``."""
        s = self.settings
        samples = s.fisher_samples or (n_rows if self.avalanche else 256)
        batch = s.fisher_batch_size or (self.ctx.batch_size if self.avalanche else 1)
        norm = s.fisher_norm or ("none" if self.avalanche else "max")
        return min(samples, n_rows), batch, norm

    def before_task(self, model, task: TaskInfo) -> None:
        super().before_task(model, task)
        self._initial_loss = None
        self._params = trainable_params(model)
        self._check_stiffness()

    def _check_stiffness(self) -> None:
        s = self.settings
        if not self.penalties or s.max_stiffness is None or not s.guard:
            return
        total: dict[str, torch.Tensor] = {}
        for fisher, _ in self.penalties:
            for n, f in fisher.items():
                total[n] = total[n] + f if n in total else f
        f_max = max((float(f.max()) for f in total.values()), default=0.0)
        lam = s.lambda_ * self.scale
        stiffness = 2 * self.penalty_factor * lam * self.ctx.lr * f_max  # lr x curvature of the quadratic
        if stiffness <= s.max_stiffness:
            return
        if s.on_blowup == "error":
            raise MMTuneError(
                f"{self.name}: lambda={lam:g} is too large for train.lr={self.ctx.lr:g} before task '{self.task.name}': "
                f"lambda x lr x max Fisher = {stiffness:.3g} > max_stiffness {s.max_stiffness:g} (gradient descent on "
                f"the penalty diverges above 2; AdamW stops learning the task). Lower "
                f"continual.strategy.settings.{self.name}.lambda to at most "
                f"{s.max_stiffness / (2 * self.penalty_factor * self.ctx.lr * f_max):.4g}, "
                f"or set continual.strategy.settings.{self.name}.on_blowup: scale (or guard: false to keep it)")
        factor = 1.0 / stiffness
        self._rescale(factor, {"task": self.task.name, "stiffness": stiffness})

    def penalty(self) -> torch.Tensor:
        """sum over stored tasks of sum_i F_i (theta_i - theta*_i)^2 (without lambda/2)."""
        total = None
        for fisher, anchor in self.penalties:
            for n, f in fisher.items():
                p = self._params.get(n)
                if p is None:
                    continue
                term = (f * (p - anchor[n]) ** 2).sum()
                total = term if total is None else total + term
        return total

    def loss_terms(self, batch, outputs) -> dict[str, torch.Tensor]:
        if not self.penalties:
            return {}
        pen = self.penalty()
        if pen is None:
            return {}
        lam = self.settings.lambda_ * self.scale
        term = self.penalty_factor * lam * pen
        if not self.settings.guard:
            return {"ewc": term}
        task_loss = float(outputs.loss_sum.detach()) / max(float(outputs.count), 1.0)
        if self._initial_loss is None:
            self._initial_loss = max(task_loss, 1e-3)
        value = float(term.detach())
        limit = self.settings.blowup_factor * self._initial_loss
        if value != value or value in (float("inf"), float("-inf")) or value > limit:
            term = self._blowup(term, value, limit)
        return {"ewc": term}

    def _blowup(self, term: torch.Tensor, value: float, limit: float) -> torch.Tensor:
        s = self.settings
        finite = value == value and abs(value) != float("inf")
        if s.on_blowup == "error" or not finite:
            lam = s.lambda_ * self.scale
            suggest = lam * self._initial_loss / value if finite and value > 0 else lam * 1e-3
            raise MMTuneError(
                f"{self.name}: the penalty ({value:.3g}) exceeds {s.blowup_factor:g}x the loss at the start of task "
                f"'{self.task.name}' ({self._initial_loss:.3g}); lambda={lam:g} is too large for this learning rate "
                f"(the optimiser overshoots instead of learning the task). Lower "
                f"continual.strategy.settings.{self.name}.lambda (e.g. to {suggest:.3g}) or train.lr, or set "
                f"continual.strategy.settings.{self.name}.on_blowup: scale")
        factor = self._initial_loss / value
        self._rescale(factor, {"task": self.task.name, "penalty": value, "limit": limit})
        return term * factor

    def _rescale(self, factor: float, event: dict) -> None:
        self.scale *= factor
        self.events.append({**event, "lambda_scale": self.scale})
        self.ctx.log(f"{self.name}: lambda too large on task '{self.task.name}' ({event}); effective lambda scaled to "
                     f"{self.settings.lambda_ * self.scale:.3g}")

    def fisher(self, model, rows: list) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher of the trainable parameters on (a sample of) ``rows``."""
        s = self.settings
        params = trainable_params(model)
        names, tensors = list(params), list(params.values())
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        k, bs, norm = self.fisher_plan(len(rows))
        idx = self.rng.sample(range(len(rows)), k)
        # mmtune: each chunk's squared gradient weighs len(chunk) / k (with bs = 1 the mean of the
        # squared per-example gradients). Avalanche: the plain mean over the mini-batches, a short
        # last batch weighing as much as a full one (EWCPlugin.compute_importances).
        n_batches = -(-k // bs)
        with eval_mode(model), isolated_rng(self.draw_seed()):
            for i in range(0, k, bs):
                chunk = [rows[j] for j in idx[i:i + bs]]
                loss, _ = self.mean_loss(model, chunk)
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                for n, g in zip(names, grads):
                    if g is not None:
                        fisher[n] += g.detach().float() ** 2 * (1.0 if self.avalanche else len(chunk))
        for f in fisher.values():
            f /= max(n_batches if self.avalanche else k, 1)
        if norm == "max":
            top = max((float(f.max()) for f in fisher.values()), default=0.0)
            if top > 0:
                for f in fisher.values():
                    f /= top
        if s.fisher_clamp is not None:
            for f in fisher.values():
                f.clamp_(max=s.fisher_clamp)
        return fisher

    def after_task(self, model, task: TaskInfo, rows: list) -> None:
        fisher = self.fisher(model, rows)
        anchor = snapshot(model)
        if self.online and self.penalties:
            old, _ = self.penalties[0]
            gamma = self.settings.gamma
            fisher = {n: gamma * old[n] + f if n in old else f for n, f in fisher.items()}
            self.penalties = [(fisher, anchor)]
        else:
            self.penalties.append((fisher, anchor))

    def state_dict(self) -> dict:
        cpu = [({n: f.cpu() for n, f in F.items()}, {n: a.cpu() for n, a in A.items()}) for F, A in self.penalties]
        return {**super().state_dict(), "penalties": cpu, "scale": self.scale, "events": list(self.events)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        dev = self.ctx.device
        self.penalties = [({n: f.to(dev) for n, f in F.items()}, {n: a.to(dev) for n, a in A.items()})
                          for F, A in state["penalties"]]
        self.scale, self.events = state["scale"], list(state["events"])


@STRATEGIES.register("online_ewc")
class OnlineEWC(EWC):
    """Online EWC: a single running Fisher and anchor."""

    name = "online_ewc"
    Settings = OnlineEWCSettings
    online = True
