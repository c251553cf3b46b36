"""The image modality: a vision tower, its projector, the ``<|image|>`` placeholder, tiling.

Images are tiled (``phi4`` or ``internvl`` mode, :mod:`mmtune.multimodal.tiling`), every tile of
a batch goes through the tower (:class:`~mmtune.multimodal.vision.VisionTower`) in one call, then
each image's tiles through the projector (PROJECTORS, ``(N_tiles, h, w, C) -> (num_tokens, H)``).
Components: ``vision_encoder``, ``vision_projector`` (recipe section ``multimodal.vision``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import ConfigError, MMTuneError
from ...util import default_cache_root
from ..adapters import encoder_lora_spec, inject_encoder_lora
from ..groups import IMAGE_TAG
from ..projectors import build_projector
from ..tiling import internvl_tiles, normalize, phi4_crops
from ..vision import VisionTower, build_tiny_vision_tower
from . import MODALITIES, ModalityPath, stages_use_lora

BUILTIN_VISION = "builtin:tiny-siglip"


@dataclass
class ImageInput:
    """One image, tiled: ``pixels`` uint8 ``(N_tiles, 3, C, C)`` (4x smaller than floats; normalised
    on use), the tiler's ``grid`` / ``sub_token_grid``, and the ``num_tokens`` it occupies.
    ``global_view``: Phi-4's float global view ``(3, C, C)`` in pixel/255 units, stored as float16
    (error <= 5e-4, against 2e-3 for 8 bits, and no clipping of bicubic overshoot); it replaces the
    last tile of ``pixels`` on use. ``patch_mask``: ``(N_tiles, h, w)`` bool, False on patches of
    padding (Phi-4 tiling), passed to the vision tower's attention."""

    pixels: torch.Tensor
    grid: tuple[int, int]
    sub_token_grid: tuple[int, int]
    num_tokens: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    global_view: torch.Tensor | None = None
    patch_mask: torch.Tensor | None = None

    @property
    def num_tiles(self) -> int:
        return int(self.pixels.shape[0])

    def pixel_values(self) -> torch.Tensor:
        """``(N, 3, C, C)`` float32 ``(pixel/255 - mean)/std``, the same arithmetic as
        :meth:`mmtune.multimodal.tiling.TiledImage.pixel_values`."""

        x = self.pixels.float() / 255.0  # (N, 3, C, C)
        if self.global_view is not None:
            x[-1] = self.global_view.float()
        return normalize(x, self.mean, self.std)


@dataclass
class ImageProcessor:
    """Tiling settings of the vision path (saved in processor.json)."""

    tiling: str
    crop_size: int
    max_crops: int
    min_crops: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def tile(self, image):

        if self.tiling == "phi4":
            return phi4_crops(image, crop_size=self.crop_size, max_crops=self.max_crops, patch_size=self.patch_size,
                              mean=self.mean, std=self.std)
        return internvl_tiles(image, image_size=self.crop_size, min_num=self.min_crops, max_num=self.max_crops,
                              patch_size=self.patch_size, mean=self.mean, std=self.std)


@MODALITIES.register("image")
class ImagePath(ModalityPath):
    """Vision tower + projector + tiling (module docstring)."""

    name = "image"
    tag = IMAGE_TAG
    default_token = "<|image|>"
    default_adapter = "vision"
    config_key = "vision"
    COMPONENTS = {"vision_encoder": "encoder", "vision_projector": "projector"}
    order = 0

    def __init__(self, encoder: nn.Module, projector: nn.Module, processor: ImageProcessor,
                 token: str | None = None):
        super().__init__(processor, token)
        self.encoder = encoder
        self.projector = projector

    def grid(self) -> tuple[int, int]:
        """``(h, w)`` patch grid of one crop."""
        c, p = self.processor.crop_size, self.processor.patch_size
        return c // p, c // p

    def process(self, image) -> ImageInput:
        """A PIL image -> tiles and token count (DataError for unusable images)."""
        import numpy as np

        tiled = self.processor.tile(image)
        arr = np.stack([np.asarray(t.convert("RGB"), dtype=np.uint8) for t in tiled.tiles])  # (N, C, C, 3)
        pixels = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # (N, 3, C, C)
        h, w = self.grid()
        n = self.projector.num_tokens(tiled.num_tiles, h, w, tiled.grid, tiled.sub_token_grid)
        glob = tiled.global_view.to(torch.float16) if tiled.global_view is not None else None
        return ImageInput(pixels, tuple(tiled.grid), tuple(tiled.sub_token_grid), int(n), tuple(tiled.mean),
                          tuple(tiled.std), glob, tiled.patch_mask)

    def encode(self, images: Sequence[ImageInput], route=None) -> torch.Tensor:
        """All tiles of ``images`` through the tower in one batch, then each image's tiles through
        the projector: ``(sum of num_tokens, H)``, image by image."""
        device = next(self.encoder.parameters()).device
        pixels = torch.cat([im.pixel_values() for im in images]).to(device)  # (sum N, 3, C, C)
        mask = None
        if any(im.patch_mask is not None for im in images) and getattr(self.encoder, "supports_patch_mask", False):
            h, w = self.encoder.grid_size(*pixels.shape[-2:])
            mask = torch.cat([im.patch_mask if im.patch_mask is not None else
                              torch.ones(im.num_tiles, h, w, dtype=torch.bool) for im in images])  # (sum N, h, w)
        feats = self.encoder(pixels, patch_mask=mask)  # (sum N, h, w, C); padding never attended to
        out, k = [], 0
        for im in images:
            emb = self.projector(feats[k:k + im.num_tiles], im.grid, im.sub_token_grid)  # (num_tokens, H)
            if emb.shape[0] != im.num_tokens:
                raise MMTuneError(f"projector gave {emb.shape[0]} tokens for an image prepared for {im.num_tokens}; "
                                  "the data was prepared for another vision configuration")
            out.append(emb)
            k += im.num_tiles
        return torch.cat(out)

    # -- building, saving, loading -----------------------------------------------------------
    @classmethod
    def build_encoder(cls, vision_cfg, cache_root: str | Path | None = None) -> nn.Module:
        return build_vision_tower(vision_cfg, cache_root)

    @classmethod
    def build(cls, vision_cfg, mm_cfg, encoder: nn.Module, hidden: int, dtype: torch.dtype,
              token: str | None = None) -> ImagePath:

        projector = build_projector(vision_cfg.projector, encoder.hidden_size, hidden).to(dtype)
        crop = vision_cfg.crop_size or encoder.image_size
        processor = ImageProcessor(vision_cfg.tiling, crop, vision_cfg.max_crops, vision_cfg.min_crops,
                                   encoder.patch_size, tuple(encoder.image_mean), tuple(encoder.image_std))
        if stages_use_lora(mm_cfg, "vision_encoder"):
            inject_encoder_lora(encoder.model, vision_cfg.lora)
        return cls(encoder, projector, processor, token or mm_cfg.image_token)

    def describe_component(self, component: str, module: nn.Module) -> dict:
        if component == "vision_encoder":
            return {"kind": "vision_tower", "config": module.model.config.to_dict(),
                    "feature_layer": -1 if module.pruned else module.feature_layer, "pruned": module.pruned,
                    "image_mean": list(module.image_mean), "image_std": list(module.image_std),
                    "lora": encoder_lora_spec(module.model)}
        return super().describe_component(component, module)

    @classmethod
    def load_component(cls, directory: Path, component: str, desc: dict) -> nn.Module:
        if desc["kind"] != "vision_tower":
            return super().load_component(directory, component, desc)
        from transformers import CONFIG_MAPPING

        cfg = dict(desc["config"])
        config = CONFIG_MAPPING[cfg.pop("model_type")].from_dict(cfg)
        module = VisionTower.from_config(config, feature_layer=desc["feature_layer"], prune=desc["pruned"])
        module.image_mean, module.image_std = tuple(desc["image_mean"]), tuple(desc["image_std"])
        if desc.get("lora"):
            inject_encoder_lora(module.model, desc["lora"])
        return module

    @classmethod
    def from_saved(cls, modules: dict[str, nn.Module], processor: dict | None, token: str | None) -> ImagePath:
        proc = ImageProcessor(**{**processor, "mean": tuple(processor["mean"]), "std": tuple(processor["std"])})
        return cls(modules["vision_encoder"], modules["vision_projector"], proc, token)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def build_vision_tower(vision_cfg, cache_root: str | Path | None = None):
    """The configured vision tower: ``builtin:tiny-siglip`` (built once into the cache) or a local dir."""

    path = vision_cfg.path
    if path == BUILTIN_VISION:
        t = vision_cfg.tiny
        root = Path(cache_root) if cache_root is not None else default_cache_root()
        target = root / f"tiny-siglip-{t.image_size}-{t.patch_size}-{t.hidden}-{t.layers}-{t.heads}-{t.seed}"
        if not (target / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=".tiny-siglip-", dir=_mkdir(root)))
            try:
                build_tiny_vision_tower(tmp, kind="siglip", image_size=t.image_size, patch_size=t.patch_size,
                                        hidden=t.hidden, layers=t.layers, heads=t.heads, seed=t.seed)
                try:
                    os.replace(tmp, target)
                except OSError:
                    if not (target / "config.json").is_file():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        path = str(target)
    elif path.startswith("builtin:"):
        raise ConfigError(f"multimodal.vision.path '{path}': unknown built-in; valid: {BUILTIN_VISION}")
    return VisionTower.from_pretrained(path, feature_layer=vision_cfg.feature_layer)
