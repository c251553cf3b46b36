"""One training loop for every objective.

The loop owns data order, gradient accumulation, mixed precision, clipping, the LR schedule,
NaN handling, evaluation, logging and checkpoints. What a batch's loss *is* lives in an
:class:`~mmtune.train.objectives.Objective`; extra loss terms (continual-learning strategies,
auxiliary losses) come from plugins whose hooks mirror the loop:

``loss_terms(batch, outputs) -> {name: tensor}``  added to the loss (averaged over the
micro-batches of a step) and logged under ``name``; ``after_backward(model)`` may edit
gradients (A-GEM projection); ``after_step(step)``. A plugin never touches the loop's state.

Data order is a pure function of (seed, epoch, batch index), and checkpoints store the data
position and every RNG, so ``resume`` continues exactly where a run stopped.

Under torch.distributed each process takes its slice of every global micro-batch, and the
loss is normalised by the number of items in the whole optimizer step over all processes,
so N processes give the same update as one process with the same global batch.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..errors import MMTuneError
from .checkpoint import (
    clean_stale_checkpoint_dirs,
    full_model_state_dict,
    is_sharded,
    latest_checkpoint,
    load_model_weights,
    load_optimizer_state_dict,
    load_trainer_state,
    optimizer_state_dict,
    save_checkpoint,
)
from .metrics_log import MetricsLogger
from .objectives import LossOutput, Objective
from .optim import build_optimizer, build_scheduler


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batches_per_epoch(cfg, n_rows: int, world: int = 1) -> int:
    """Micro-batches per epoch of ``n_rows`` training rows (``cfg``: a :class:`TrainConfig`)."""
    return max(1, math.ceil(n_rows / (cfg.batch_size * world)))


def planned_steps(cfg, n_rows: int, world: int = 1) -> int:
    """Optimizer steps a run of ``cfg`` over ``n_rows`` rows takes: ``max_steps``, else the epochs."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * batches_per_epoch(cfg, n_rows, world) / cfg.grad_accum))


class Trainer:
    """Train ``model`` on ``train_rows`` with ``objective``.

    Args:
        model: an nn.Module (transformers, PEFT or plain); trainable = ``requires_grad``.
        objective: computes the summed loss of a batch (see objectives.py).
        train_rows: a sequence of examples; the loop batches them (``cfg.batch_size`` per
            process and micro-batch) in a seeded order that changes every epoch.
        collate_fn: ``list[example] -> batch dict``. If it accepts an ``rng`` keyword it gets a
            torch.Generator seeded by (seed, epoch, batch index): dynamic masking re-drawn each
            epoch, reproducible on resume.
        cfg: the recipe's ``train`` section.
        eval_rows: examples for the periodic eval loss.
        plugins: objects with any of ``loss_terms``, ``after_backward``, ``after_step``,
            ``state_dict``/``load_state_dict``.
        optimizer_groups: per-component parameter groups, e.g. ``[{"params": [...], "lr": 1e-3}]``.
        tokenizer: saved with every checkpoint.
        generate_fn: ``(model, prompt) -> str`` used for ``cfg.eval_prompts``.
        recipe: the recipe as a dict, saved with checkpoints.
        meta: extra fields for each checkpoint's meta.json (adapter type, base model dir).
    """

    def __init__(self, model, objective: Objective, train_rows: Sequence, collate_fn: Callable, cfg: TrainConfig,
                 *, eval_rows: Sequence | None = None, plugins: Sequence = (), optimizer_groups=None,
                 tokenizer=None, generate_fn: Callable | None = None, recipe: dict | None = None,
                 meta: dict | None = None, device: torch.device | str | None = None,
                 train_module=None, stop_flag: Callable[[], bool] | None = None):
        self.model = model
        # The module whose forward runs (a DDP/FSDP wrapper); checkpoints save ``model``.
        self.train_module = train_module if train_module is not None else model
        self.objective = objective
        self.train_rows = train_rows
        self.collate_fn = collate_fn
        self._collate_takes_rng = "rng" in inspect.signature(collate_fn).parameters
        self.cfg = cfg
        self.eval_rows = eval_rows
        self.plugins = list(plugins)
        self.tokenizer = tokenizer
        self.generate_fn = generate_fn
        self.recipe = recipe
        self.meta = meta or {}
        self.stop_flag = stop_flag
        self.rank, self.world = _world()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.out = Path(cfg.output_dir)
        if len(train_rows) == 0:
            raise MMTuneError("no training examples left after data preparation; see the data report above")
        self.batches_per_epoch = batches_per_epoch(cfg, len(train_rows), self.world)
        self.total_steps = planned_steps(cfg, len(train_rows), self.world)
        self.optimizer = build_optimizer(model, cfg, optimizer_groups)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self.step = 0  # optimizer steps done
        self.micro = 0  # global micro-batches consumed (data position)
        self.skipped_steps = 0
        self.tokens_seen = 0
        self.history: list[dict] = []
        self.use_bf16 = (cfg.precision == "bf16") or (
            cfg.precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())

    # ------------------------------------------------------------------ data order
    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_rows), generator=g).tolist()

    def _micro_batch(self, micro: int) -> dict:
        epoch, idx = divmod(micro, self.batches_per_epoch)
        if not hasattr(self, "_order_cache") or self._order_cache[0] != epoch:
            self._order_cache = (epoch, self._order(epoch))
        order = self._order_cache[1]
        gb = self.cfg.batch_size * self.world
        chunk = order[idx * gb:(idx + 1) * gb]
        # Every process takes its contiguous slice of the global micro-batch.
        per = math.ceil(len(chunk) / self.world)
        mine = chunk[self.rank * per:(self.rank + 1) * per] or chunk[-1:]
        rows = [self.train_rows[i] for i in mine]
        if self._collate_takes_rng:
            g = torch.Generator().manual_seed((self.cfg.seed * 7919 + epoch) * 1_000_003 + idx)
            batch = self.collate_fn(rows, rng=g)
        else:
            batch = self.collate_fn(rows)
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "step": self.step, "micro": self.micro, "skipped_steps": self.skipped_steps,
            # Keyed by parameter name and unsharded, so it resumes on any number of processes.
            "tokens_seen": self.tokens_seen, "optimizer": optimizer_state_dict(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "history": self.history,
            "plugins": [p.state_dict() if hasattr(p, "state_dict") else None for p in self.plugins],
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro = state["step"], state["micro"]
        self.skipped_steps, self.tokens_seen = state["skipped_steps"], state["tokens_seen"]
        load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = state.get("history", [])
        for p, s in zip(self.plugins, state.get("plugins", [])):
            if s is not None and hasattr(p, "load_state_dict"):
                p.load_state_dict(s)
        set_rng_state(state["rng"])

    def save(self, name: str | None = None) -> Path | None:
        """Write a checkpoint (rank 0 writes; every rank waits for it)."""
        path = None
        # Gathering sharded (FSDP2 / ZeRO-3) weights and optimizer state is collective: every
        # rank takes part, rank 0 receives the full tensors and writes them.
        state, weights = self.state_dict(), full_model_state_dict(self.model)
        if self.rank == 0:
            path = save_checkpoint(self.out, self.step, self.model, state, tokenizer=self.tokenizer,
                                   recipe=self.recipe, meta={**self.meta, "world_size": self.world},
                                   keep_last=self.cfg.keep_last, name=name, model_state=weights)
        if self.world > 1:
            dist.barrier()
        return path

    def resume_from(self, ckpt: Path) -> None:
        load_model_weights(self.model, Path(ckpt) / "model")
        self.load_state_dict(load_trainer_state(ckpt))

    # ------------------------------------------------------------------ loop
    def _autocast(self):
        if self.use_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _step_count(self, batches: list[dict]) -> float:
        n = float(sum(self.objective.count(b) for b in batches))
        if self.world > 1:
            t = torch.tensor([n], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            n = float(t.item())
        return max(n, 1.0)

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics."""
        cfg = self.cfg
        self.train_module.train()
        batches = [self._micro_batch(self.micro + i) for i in range(cfg.grad_accum)]
        total = self._step_count(batches)
        loss_total, terms_total, n_tokens, obj_metrics = 0.0, {}, 0, {}
        finite = True
        for i, batch in enumerate(batches):
            sync = nullcontext()
            if self.world > 1 and i < len(batches) - 1 and hasattr(self.train_module, "no_sync"):
                sync = self.train_module.no_sync()
            with sync:
                with self._autocast():
                    out: LossOutput = self.objective(self.train_module, batch)
                    loss = out.loss_sum * (self.world / total)
                    for p in self.plugins:
                        if hasattr(p, "loss_terms"):
                            for name, term in p.loss_terms(batch, out).items():
                                loss = loss + term / cfg.grad_accum
                                terms_total[name] = terms_total.get(name, 0.0) + float(term.detach()) / cfg.grad_accum
                if not torch.isfinite(loss):
                    finite = False
                    break
                loss.backward()
            loss_total += float(out.loss_sum.detach())
            for k, v in out.metrics.items():  # objective metrics (e.g. DPO rewards): mean over micro-batches
                obj_metrics[k] = obj_metrics.get(k, 0.0) + float(v) / cfg.grad_accum
            if "input_ids" in batch:
                n_tokens += int(batch["input_ids"].numel() if "attention_mask" not in batch
                                else batch["attention_mask"].sum())
        self.micro += cfg.grad_accum
        if self.world > 1:
            t = torch.tensor([loss_total, 0.0 if finite else 1.0], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            loss_total, finite = float(t[0]), bool(t[1] == 0)
        lr = self.scheduler.get_last_lr()[0]
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.nan_policy == "stop":
                raise MMTuneError(f"loss is NaN/inf at step {self.step + 1}; stopped. The last good checkpoint "
                                  f"is kept in {self.out / 'checkpoints'}. Lower train.lr, or set "
                                  "train.nan_policy=skip to skip such steps.")
            self.skipped_steps += 1
            self.step += 1
            self.scheduler.step()
            return {"step": self.step, "skipped": True, "lr": lr}
        for p in self.plugins:
            if hasattr(p, "after_backward"):
                p.after_backward(self.model)
        grad_norm = None
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        # No visible gradients: DeepSpeed ZeRO keeps them partitioned and clips in its own step.
        if cfg.max_grad_norm is not None and params:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            # Under FSDP2 the norm is a DTensor reduced over the shards of all ranks.
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        for p in self.plugins:
            if hasattr(p, "after_step"):
                p.after_step(self.step)
        self.tokens_seen += n_tokens * self.world
        metrics = {"step": self.step, "loss": loss_total / total, "lr": lr, "tokens": n_tokens * self.world,
                   "epoch": self.micro / self.batches_per_epoch}
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        metrics.update(terms_total)
        metrics.update(obj_metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-weighted eval loss over ``eval_rows`` and generations for ``eval_prompts``."""
        metrics: dict = {}
        self.train_module.eval()
        if self.eval_rows:
            loss_sum, count = 0.0, 0.0
            bs = self.cfg.batch_size
            # Every rank runs the same number of forwards (under FSDP2 / ZeRO-3 a forward gathers
            # weights collectively): a rank past the end re-runs its first rows without counting them.
            for j in range(math.ceil(len(self.eval_rows) / (bs * self.world))):
                i = self.rank * bs + j * bs * self.world
                counted = i < len(self.eval_rows)
                i = i if counted else self.rank * bs % len(self.eval_rows)
                batch = self.collate_fn(list(self.eval_rows[i:i + bs]))
                batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                with self._autocast():
                    out = self.objective(self.train_module, batch)
                if counted:
                    loss_sum += float(out.loss_sum)
                    count += float(out.count)
            if self.world > 1:
                t = torch.tensor([loss_sum, count], dtype=torch.float64, device=self.device)
                dist.all_reduce(t)
                loss_sum, count = float(t[0]), float(t[1])
            metrics["eval_loss"] = loss_sum / max(count, 1.0)
        # A sharded model (FSDP2, ZeRO-3) gathers weights in every forward, so all ranks generate
        # (greedy, the same tokens everywhere); rank 0 keeps the samples.
        if self.generate_fn is not None and self.cfg.eval_prompts and (self.rank == 0 or is_sharded(self.model)):
            samples = [{"prompt": p, "output": self.generate_fn(self.model, p)} for p in self.cfg.eval_prompts]
            if self.rank == 0:
                metrics["samples"] = samples
        self.train_module.train()
        return metrics

    def _defer_sigint(self):
        """First Ctrl-C: finish the current step, save a checkpoint and stop. Second: abort at once.
        Returns the function that restores the previous handler."""
        import signal
        import threading

        self._interrupted = False
        if threading.current_thread() is not threading.main_thread() or self.world > 1:
            # Under torchrun every rank gets the signal and the launcher stops the group; a
            # per-rank flag could make ranks stop at different steps and hang in the save.
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True
            print("\nmmtune: stopping after this step and saving a checkpoint (Ctrl-C again to abort)", flush=True)

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)

    def fit(self, resume: bool | str | Path = False) -> dict:
        """Train to ``total_steps``. ``resume``: True (latest checkpoint in output_dir) or a path."""
        cfg = self.cfg
        if self.rank == 0:  # saves killed mid-way leave .tmp-* dirs; drop those no live process writes
            clean_stale_checkpoint_dirs(self.out)
        if resume:
            ckpt = latest_checkpoint(self.out) if resume is True else Path(resume)
            if ckpt is None:
                raise MMTuneError(f"--resume: no complete checkpoint in {self.out / 'checkpoints'}")
            self.resume_from(ckpt)
        else:
            seed_everything(cfg.seed)
        log = MetricsLogger(self.out, enabled=self.rank == 0, tensorboard=cfg.tensorboard)
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        t_last, tok_last = time.perf_counter(), self.tokens_seen
        stopped = False
        restore_sigint = self._defer_sigint()
        try:
            while self.step < self.total_steps:
                m = self.train_step()
                self.history.append({k: v for k, v in m.items() if k != "samples"})
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    m["tokens_per_s"] = (self.tokens_seen - tok_last) / max(now - t_last, 1e-9)
                    t_last, tok_last = now, self.tokens_seen
                    log.log(m)
                    if bar is not None and "loss" in m:
                        bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}")
                if bar is not None:
                    bar.update(1)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    em = self.evaluate()
                    log.log({"step": self.step, **em})
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save()
                if self.stop_flag is not None and self.stop_flag():
                    stopped = True
                    break
                if self._interrupted:
                    break
        finally:
            if bar is not None:
                bar.close()
            restore_sigint()
        if self._interrupted:
            path = self.save()
            raise MMTuneError(f"interrupted at step {self.step}; checkpoint saved to {path}; continue with --resume")
        final_eval = self.evaluate() if (self.eval_rows or cfg.eval_prompts) else {}
        if final_eval:
            log.log({"step": self.step, **final_eval})
        self.save()
        log.close()
        losses = [h["loss"] for h in self.history if "loss" in h]
        return {"steps": self.step, "final_loss": losses[-1] if losses else None, "losses": losses,
                "skipped_steps": self.skipped_steps, "stopped": stopped, **final_eval}
