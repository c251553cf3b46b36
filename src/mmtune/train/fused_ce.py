"""Linear + cross-entropy without the full (tokens, vocab) logits.

The output head of a modern LLM is large (Qwen2: vocab 151,936): for 8,192 tokens the fp32
logits alone take 5 GB, their gradient as much again, and they are the peak of a LoRA step
(docs/reference/performance.md#anchor-measurements: 1.5B packed, 50.7 GiB plain vs 34.8 GiB with a fused loss). Here the
head and the loss run chunk by chunk over the tokens: each chunk's logits are computed, turned
into the loss and, when gradients are needed, immediately into the gradients of the hidden
states (and of the head weight if it trains), then dropped. Backward only scales the stored
gradients. This is the scheme of Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``
(Hsu et al. 2024, arXiv:2410.10989), which is used instead on CUDA when it is installed (the
``gpu`` extra); the chunked version below is plain PyTorch and runs anywhere.

Gradients: with p = softmax(z) and z = h W^T + b, d loss / dz = p - onehot(target) on each
supervised row (0 on ignored rows), so dh = (p - y) W, dW = (p - y)^T h, db = sum(p - y).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager

import torch

from .objectives import OBJECTIVES, CausalLMObjective, LossOutput, model_inputs

log = logging.getLogger("mmtune.train.fused_ce")


def default_chunk_size(n_tokens: int, hidden: int, vocab: int, min_rows: int = 1) -> int:
    """Rows per chunk such that a chunk's logits hold about as many numbers as the hidden states
    (Liger-Kernel ``fused_linear_cross_entropy.py``: ``inc_factor = cdiv(V, H)``,
    ``chunk_size = next_power_of_2(cdiv(BT, inc_factor))``), at least ``min_rows``."""
    rows = math.ceil(n_tokens / math.ceil(vocab / hidden))
    return max(min_rows, 2 ** math.ceil(math.log2(max(rows, 1))))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, by row chunks.

    forward(hidden (N, H), weight (V, H), bias (V,) | None, targets (N,), chunk_size, ignore_index)
    returns a scalar fp32 sum over the rows whose target is not ``ignore_index``. Gradients are
    computed in forward (chunk by chunk) for the inputs that need them and stored; backward
    multiplies them by the incoming scalar gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, ignore_index: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        n = hidden.shape[0]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]  # (c, H)
            t = targets[start:start + chunk_size]  # (c,)
            valid = t != ignore_index  # (c,)
            tgt = torch.where(valid, t, torch.zeros_like(t))
            z = torch.nn.functional.linear(h, weight, bias).float()  # (c, V)
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            picked = z.gather(1, tgt[:, None]).squeeze(1)  # (c,)
            total += ((lse - picked) * valid).sum()
            if not (need_h or need_w or need_b):
                continue
            # d loss / dz = softmax(z) - onehot(target), zero on ignored rows; computed in place.
            g = z.sub_(lse[:, None]).exp_()  # (c, V) softmax
            g[torch.arange(g.shape[0], device=g.device), tgt] -= 1.0
            g.mul_(valid[:, None])
            if need_h:
                grad_h[start:start + chunk_size] = (g.to(weight.dtype) @ weight).to(hidden.dtype)  # (c, H)
            if need_w:
                grad_w += g.t() @ h.float()  # (V, H)
            if need_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_out.float()
        gh = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * scale).to(w_dtype) if grad_w is not None else None
        gb = (grad_b * scale).to(b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None


def _liger_loss(ignore_index: int):
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = -100, reduction: str = "sum",
                         chunk_size: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets`` without materialising
    all the logits.

    Args:
        hidden: (N, H) hidden states (any leading shape is flattened).
        weight: (V, H) output head weight; bias: (V,) or None.
        targets: (N,) class ids; ``ignore_index`` rows carry no loss.
        reduction: ``sum`` (what mmtune objectives return) or ``mean`` over supervised rows.
        chunk_size: rows per chunk; default :func:`default_chunk_size`.
        backend: ``auto`` (Liger-Kernel on CUDA when installed, else ``chunked``), ``liger``,
            ``chunked``.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    targets = targets.reshape(-1)  # (N,)
    use_liger = backend == "liger" or (backend == "auto" and hidden.is_cuda)
    loss = None
    if use_liger:
        fn = _liger_loss(ignore_index)
        if fn is None and backend == "liger":
            raise ImportError("backend='liger' needs liger-kernel: pip install 'mmtune[gpu]'")
        if fn is not None:
            loss = fn(weight, hidden, targets, bias).float()
    if loss is None:
        # Rows without a target carry neither loss nor gradient: drop them before the head (in an SFT
        # batch most rows are prompt tokens; with SmolLM2's 49k vocabulary the head is a fifth of
        # a LoRA step's compute). Indexing keeps the gradient of ``hidden`` exact (zeros elsewhere).
        keep = targets != ignore_index  # (N,)
        if not bool(keep.all()):
            hidden, targets = hidden[keep], targets[keep]  # (n, H), (n,)
        # On GPUs at least 1024 rows per chunk: thinner matmuls underuse the tensor cores, and
        # 1024 x 151,936 fp32 logits (Qwen2's vocabulary) are 0.6 GB against 5 GB for 8k tokens.
        min_rows = 1024 if hidden.is_cuda else 1
        chunk = chunk_size or default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0], min_rows)
        loss = ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, ignore_index)
    if reduction == "mean":
        loss = loss / (targets != ignore_index).sum().clamp(min=1)
    return loss


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   bias: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss sum and supervised-token count from the last hidden states, like
    :func:`mmtune.train.objectives.shifted_token_loss` from logits: position t predicts
    labels[t + 1]; -100 marks positions without loss."""
    h = hidden[:, :-1, :]  # (B, T-1, H)
    target = labels[:, 1:]  # (B, T-1)
    loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), weight, target.reshape(-1), bias, **kwargs)
    return loss, (target != -100).sum()


def unwrap(model):
    """The model inside DDP / DeepSpeed wrappers (FSDP2 shards the module in place)."""
    while True:
        if hasattr(model, "engine") and hasattr(model.engine, "module"):  # mmtune.distributed.EngineForward
            model = model.engine.module
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


class LossHead(torch.nn.Module):
    """Stands in for the output head during one forward: instead of logits it returns the
    summed next-token loss of the hidden states it receives (a scalar), computed with the head's
    weight by :func:`causal_lm_loss`.

    The loss is computed inside the model's forward on purpose: FSDP2 gathers the root's
    parameters (the head among them) for the forward and frees them after it, and DDP hooks
    the forward, so reading the weight there is what every strategy expects.
    """

    def __init__(self, head: torch.nn.Linear, labels: torch.Tensor, **kwargs):
        super().__init__()
        self.__dict__["head"] = head  # not a submodule: its parameters stay registered where they were
        self.labels, self.kwargs = labels, kwargs
        self.count = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        loss, self.count = causal_lm_loss(hidden, self.head.weight, self.labels, self.head.bias, **self.kwargs)
        return loss


@contextmanager
def loss_head(model, labels: torch.Tensor, **kwargs):
    """While inside, ``model``'s output head is a :class:`LossHead` for ``labels``: the forward's
    ``logits`` is the summed loss. Yields the LossHead; the head is restored on exit."""
    inner = unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = base.get_output_embeddings()
    swap = LossHead(head, labels, **kwargs)
    base.set_output_embeddings(swap)
    try:
        yield swap
    finally:
        base.set_output_embeddings(head)


def supports_fused_head(model) -> str | None:
    """None when the fused loss applies to ``model``, else why not."""
    inner = unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if not hasattr(base, "get_output_embeddings") or base.get_output_embeddings() is None:
        return "the model has no output embeddings"
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the output head is a {type(head).__name__} (adapted or wrapped), not a plain Linear"
    cfg = getattr(base, "config", None)
    if getattr(cfg, "final_logit_softcapping", None):
        return "the model soft-caps its logits (final_logit_softcapping)"
    return None


@OBJECTIVES.register("sft-fused")
class FusedCausalLMObjective(CausalLMObjective):
    """:class:`CausalLMObjective` (the same loss) with the output head fused into a chunked
    cross-entropy, so the (tokens, vocab) logits are never held. Falls back to the plain
    objective, once logged, for models it cannot fuse (a wrapped head, soft-capped logits).
    Its :class:`LossOutput` carries no model outputs (there are no logits): plugins that read
    logits (distillation-style continual strategies) need the plain ``sft`` objective."""

    name = "sft-fused"

    def __init__(self, chunk_size: int | None = None, backend: str = "auto"):
        self.chunk_size, self.backend = chunk_size, backend
        self._reason: str | None = None
        self._checked = False

    def __call__(self, model, batch: dict) -> LossOutput:
        if not self._checked:
            self._reason, self._checked = supports_fused_head(model), True
            if self._reason:
                log.info("fused cross-entropy off: %s; using the plain loss", self._reason)
        if self._reason:
            return super().__call__(model, batch)
        inputs = model_inputs(batch)  # with the flash varlen boundaries when the batch has them
        with loss_head(model, batch["labels"], chunk_size=self.chunk_size, backend=self.backend) as head:
            out = model(**inputs, use_cache=False)
        return LossOutput(out.logits, head.count, None)  # the head returned the summed loss as logits
