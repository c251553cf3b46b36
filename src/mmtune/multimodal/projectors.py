"""Projectors: encoder patch features of one image -> a flat sequence of LM-width embeddings.

Every projector takes the features of one image's tiles, ``(N_tiles, h, w, C)`` (the grids
:class:`~mmtune.multimodal.vision.VisionTower` returns, tiles in the order of
:class:`~mmtune.multimodal.tiling.TiledImage`), and returns ``(num_tokens, H)``: the embeddings
that replace the image's placeholder tokens, in order. ``num_tokens(...)`` predicts that length
without running the module, so prompts can be built before the encoder runs.

Registered builders (``PROJECTORS.get(name)(in_dim=C, out_dim=H, ...)``):

- ``mlp2x_gelu``: LLaVA-1.5 ``Linear(C,H)-GELU-Linear(H,H)`` on every patch (no reduction).
- ``internvl_pixel_shuffle``: InternVL ``mlp1``: pixel shuffle 0.5, then
  ``LayerNorm(4C)-Linear(4C,H)-GELU-Linear(H,H)``; 256 tokens per 448 px tile.
- ``phi4_avgpool``: Phi-4-multimodal image embedding: 2x2 average pooling, the HD layout with a
  learned row-newline and sub/global separator, then ``Linear(C,H)-GELU-Linear(H,H)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import PROJECTORS  # noqa: F401 - defined there so recipes check names without torch
from .pixel_shuffle import avg_pool_2x2, pixel_shuffle


def _check_features(features: torch.Tensor, in_dim: int, name: str) -> None:
    if features.dim() != 4 or features.shape[-1] != in_dim:
        raise ConfigError(f"projector '{name}' expects encoder features (N_tiles, h, w, {in_dim}), got "
                          f"{tuple(features.shape)}; set the projector's in_dim to the encoder hidden size")


class MLP2xGELU(nn.Module):
    """LLaVA-1.5's ``mlp2x_gelu`` connector (Liu et al. 2023, "Improved Baselines with Visual
    Instruction Tuning", section 3.2): one token per patch."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def num_tokens(self, num_tiles: int, h: int, w: int, grid=None, sub_token_grid=None) -> int:
        return num_tiles * h * w

    def forward(self, features: torch.Tensor, grid=None, sub_token_grid=None) -> torch.Tensor:
        _check_features(features, self.in_dim, "mlp2x_gelu")
        return self.mlp(features.reshape(-1, self.in_dim))  # (N*h*w, C) -> (N*h*w, H)


class InternVLPixelShuffleProjector(nn.Module):
    """InternVL's ``mlp1`` after ``pixel_shuffle(downsample_ratio=0.5)`` (Chen et al. 2024,
    InternVL 1.5 section 3.2; ``InternVLMultiModalProjector`` in transformers): 4x fewer tokens,
    each carrying a 2x2 neighbourhood. The LayerNorm acts on the stacked ``4C`` features."""

    def __init__(self, in_dim: int, out_dim: int, scale: float = 0.5):
        super().__init__()
        self.in_dim, self.out_dim, self.scale = in_dim, out_dim, scale
        k = round(1 / scale)
        wide = in_dim * k * k
        self.mlp = nn.Sequential(nn.LayerNorm(wide), nn.Linear(wide, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def num_tokens(self, num_tiles: int, h: int, w: int, grid=None, sub_token_grid=None) -> int:
        k = round(1 / self.scale)
        return num_tiles * (h // k) * (w // k)

    def forward(self, features: torch.Tensor, grid=None, sub_token_grid=None) -> torch.Tensor:
        _check_features(features, self.in_dim, "internvl_pixel_shuffle")
        x = pixel_shuffle(features, self.scale)  # (N, h/2, w/2, 4C)
        x = x.reshape(-1, x.shape[-1])  # (N*h/2*w/2, 4C), tile by tile, row-major
        return self.mlp(x)  # (N*h/2*w/2, H)


class Phi4AvgPoolProjector(nn.Module):
    """Phi-4-multimodal's image embedding (``Phi4MultimodalImageEmbedding`` in transformers;
    ``sub_GN``/``glb_GN`` in Microsoft's modeling_phi4mm.py).

    Input: the features of ``rows*cols`` sub-crops (row-major) followed by the global view,
    ``(rows*cols + 1, m, m, C)``. Each crop is 2x2 average pooled to ``s x s`` (s = 16 for
    448/14). The sub-crops are joined into one ``(rows*s, cols*s)`` token grid, cropped to the
    ``sub_token_grid`` that carries content (padding rows/cols dropped), and a learned newline
    vector ends each token row. Then one learned separator vector, then the global view's
    ``s`` rows each ending with the newline. The 2-layer MLP projects the whole sequence, newline
    and separator included; they live in encoder space (width C) as in Phi-4. Both vectors start
    at zero, as in Phi-4 (``nn.Parameter(torch.zeros(...))``); training moves them.
    The length is :func:`~mmtune.multimodal.tiling.phi4_num_tokens`.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.newline = nn.Parameter(torch.zeros(in_dim))  # Phi-4 sub_img_feature_extensor / sub_GN
        self.separator = nn.Parameter(torch.zeros(in_dim))  # Phi-4 global_img_feature_extensor / glb_GN
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    @staticmethod
    def _layout(num_tiles: int, h: int, w: int, grid, sub_token_grid) -> tuple[int, int, int, int, int]:
        rows, cols = grid if grid is not None else (1, 1)
        if rows * cols + 1 != num_tiles:
            raise ConfigError(f"phi4_avgpool projector got {num_tiles} tiles for a {rows}x{cols} grid; expected "
                              f"{rows * cols} sub-crops + 1 global view (use the phi4 tiler)")
        if h != w:
            raise ConfigError(f"phi4_avgpool projector expects square crops, got a {h}x{w} patch grid")
        s = (h + 1) // 2
        vr, vc = sub_token_grid if sub_token_grid is not None else (rows * s, cols * s)
        if not (0 < vr <= rows * s and 0 < vc <= cols * s):
            raise ConfigError(f"sub_token_grid {sub_token_grid} does not fit a {rows}x{cols} grid of {s}x{s} tokens")
        return rows, cols, s, vr, vc

    def num_tokens(self, num_tiles: int, h: int, w: int, grid=None, sub_token_grid=None) -> int:
        rows, cols, s, vr, vc = self._layout(num_tiles, h, w, grid, sub_token_grid)
        return vr * (vc + 1) + 1 + s * (s + 1)

    def forward(self, features: torch.Tensor, grid=None, sub_token_grid=None) -> torch.Tensor:
        _check_features(features, self.in_dim, "phi4_avgpool")
        n, h, w, c = features.shape
        rows, cols, s, vr, vc = self._layout(n, h, w, grid, sub_token_grid)
        pooled = avg_pool_2x2(features)  # (N, s, s, C)
        sub = pooled[:-1].reshape(rows, cols, s, s, c)  # (rows, cols, s, s, C)
        sub = sub.permute(0, 2, 1, 3, 4).reshape(rows * s, cols * s, c)  # (rows*s, cols*s, C)
        sub = sub[:vr, :vc]  # (vr, vc, C): drop token rows/cols in the padding
        sub = torch.cat([sub, self.newline.expand(vr, 1, c).to(sub.dtype)], dim=1)  # (vr, vc+1, C)
        glb = pooled[-1]  # (s, s, C)
        glb = torch.cat([glb, self.newline.expand(s, 1, c).to(glb.dtype)], dim=1)  # (s, s+1, C)
        seq = torch.cat([sub.reshape(-1, c), self.separator.view(1, c).to(sub.dtype), glb.reshape(-1, c)])
        return self.mlp(seq)  # (vr*(vc+1) + 1 + s*(s+1), H)


@PROJECTORS.register("mlp2x_gelu")
def build_mlp2x_gelu(in_dim: int, out_dim: int) -> MLP2xGELU:
    return MLP2xGELU(in_dim, out_dim)


@PROJECTORS.register("internvl_pixel_shuffle")
def build_internvl_pixel_shuffle(in_dim: int, out_dim: int, scale: float = 0.5) -> InternVLPixelShuffleProjector:
    return InternVLPixelShuffleProjector(in_dim, out_dim, scale)


@PROJECTORS.register("phi4_avgpool")
def build_phi4_avgpool(in_dim: int, out_dim: int) -> Phi4AvgPoolProjector:
    return Phi4AvgPoolProjector(in_dim, out_dim)


def build_projector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    """The registered projector ``name`` from ``in_dim`` encoder features to ``out_dim`` LM width; it
    remembers its name (``projector_name``) for saving."""
    module = PROJECTORS.get(name)(in_dim=in_dim, out_dim=out_dim)
    module.projector_name = name
    return module
