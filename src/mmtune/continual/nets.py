"""Small classifiers for the Split-Digits benchmark (scikit-learn's 8x8 digits, 64 inputs).

Both return a :class:`ClassifierOut` with the logits and the penultimate features, so that
feature distillation needs no forward hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ClassifierOut:
    logits: torch.Tensor  # (B, C)
    features: torch.Tensor  # (B, H), the input of the output layer
    aux: dict = field(default_factory=dict)  # extra tensors (e.g. the L2P key-matching loss)


class DigitsMLP(nn.Module):
    """``in_dim -> hidden (x depth, ReLU) -> classes``. Linear layers are ``fcs.0 .. fcs.{depth-1}``
    and ``head`` (the names LoRA strategies target)."""

    def __init__(self, in_dim: int = 64, hidden: int = 256, depth: int = 2, classes: int = 10):
        super().__init__()
        dims = [in_dim] + [hidden] * depth
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> ClassifierOut:
        h = x
        for fc in self.fcs:
            h = F.relu(fc(h))
        return ClassifierOut(self.head(h), h)


class DigitsTransformer(nn.Module):
    """A tiny ViT-style encoder over the 8 pixel rows of a digit.

    Tokens: a learned CLS token, optional prefix tokens (prompts, see the ``l2p`` strategy), then
    the 8 rows, each a linear projection of its 8 pixels plus a learned position embedding.
    Pre-norm encoder layers (``nn.TransformerEncoderLayer(norm_first=True)``), a final LayerNorm,
    and a linear head on the CLS output (as in ViT, Dosovitskiy et al. 2021, section 3.1).
    """

    rows = 8

    def __init__(self, in_dim: int = 64, hidden: int = 64, depth: int = 2, heads: int = 4, classes: int = 10):
        super().__init__()
        if in_dim % self.rows:
            raise ValueError(f"in_dim {in_dim} is not a multiple of {self.rows} rows")
        self.hidden = hidden
        self.patch = nn.Linear(in_dim // self.rows, hidden)
        self.pos = nn.Parameter(torch.randn(self.rows, hidden) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
        layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        rows = x.reshape(B, self.rows, -1)  # (B, 8, 8)
        return self.patch(rows) + self.pos  # (B, 8, D)

    def encode(self, tokens: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """CLS feature (B, D) of ``[CLS, prefix, tokens]``; ``prefix`` is (B, P, D) or None."""
        B = tokens.shape[0]
        parts = [self.cls.expand(B, -1, -1)]  # (B, 1, D)
        if prefix is not None:
            parts.append(prefix)
        parts.append(tokens)
        h = self.encoder(torch.cat(parts, dim=1))  # (B, 1 + P + 8, D)
        return self.norm(h[:, 0])  # (B, D)

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> ClassifierOut:
        feat = self.encode(self.embed(x), prefix)
        return ClassifierOut(self.head(feat), feat)


def build_digits_net(arch: str, hidden: int, depth: int, heads: int = 4, classes: int = 10) -> nn.Module:
    if arch == "mlp":
        return DigitsMLP(64, hidden, depth, classes)
    if arch == "transformer":
        return DigitsTransformer(64, hidden, depth, heads, classes)
    raise ValueError(f"unknown digits net {arch!r}; valid: mlp, transformer")
