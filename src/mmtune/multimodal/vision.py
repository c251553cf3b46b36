"""Vision towers: any transformers image encoder as a source of ``(N, h, w, C)`` patch grids.

:class:`VisionTower` wraps a SigLIP, CLIP or ViT vision model (or the vision half of a full
CLIP/SigLIP checkpoint) loaded from a local directory. It returns the hidden states of one
chosen layer (``feature_layer``, default -2: the penultimate layer, as LLaVA-1.5 and Phi-4 use;
InternVL uses -1) with any CLS token dropped, reshaped to the patch grid.

By default the tower is *pruned*: encoder layers after the feature layer and the modules that
only read the last layer (post-LayerNorm, pooling head) are removed. They cost compute, and
when the tower is trained their parameters would receive no gradient (which DDP rejects).
``hidden_states[-1]`` of the pruned tower is ``hidden_states[feature_layer]`` of the full one.

Padding: Phi-4 pads a crop white to its grid and passes the patch mask into the vision
attention (``Phi4MultimodalImageEmbedding.get_img_features`` -> ``Phi4MultimodalVisionModel(
patch_attention_mask=...)``). ``forward(pixels, patch_mask)`` does the same on a SigLIP tower:
padded patches are masked as attention keys, and the position embeddings of the content patches
are those of Phi4MultimodalVisionEmbeddings (NaViT-style: the content region's fractional
coordinates bucketed onto the position table, :func:`phi4_patch_position_ids`). Without a mask
(InternVL tiles, CLIP / ViT towers) the tower runs as transformers defines it.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

# Per architecture (config.model_type of the vision model): the modules that run only after the
# last encoder layer, relative to the model or to its ``vision_model`` where it has one (older
# transformers wrap CLIP/SigLIP that way). The encoder's layer list is found by its length.
_POST_ENCODER = {
    "siglip_vision_model": ("post_layernorm", "head"),
    "clip_vision_model": ("post_layernorm",),
    "vit": ("layernorm", "pooler"),
}

# Default normalisation per architecture when the directory has no preprocessor_config.json
# (SigLIP and ViT checkpoints use 0.5/0.5; CLIP uses the OpenAI statistics).
_DEFAULT_MEAN_STD = {
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip_vision_model": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

_KINDS = ("siglip", "clip", "vit")


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report (a full CLIP/SigLIP checkpoint lists its text tower as
    'unexpected' keys, which is exactly what we want to skip)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def _vision_config(config, path: str):
    """The vision part of ``config``: itself, or ``config.vision_config`` for a full model."""
    sub = getattr(config, "vision_config", None)
    if sub is not None:
        return sub
    if hasattr(config, "image_size") and hasattr(config, "patch_size"):
        return config
    raise ConfigError(f"{path}: model_type '{getattr(config, 'model_type', '?')}' is not a vision model; "
                      f"expected a SigLIP, CLIP or ViT vision tower or a full CLIP/SigLIP checkpoint")


def _model_class(vision_config, path: str):
    from transformers import AutoModel

    try:
        return AutoModel._model_mapping[type(vision_config)]
    except KeyError:
        raise ConfigError(f"{path}: transformers has no model class for vision config "
                          f"'{vision_config.model_type}'") from None


def load_vision_model(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load the vision model stored in the local directory ``path`` (no downloads).

    A full CLIP/SigLIP checkpoint yields its vision tower (``CLIPVisionModel``,
    ``SiglipVisionModel``); its text tower's weights are skipped.
    """
    from transformers import AutoConfig

    path = str(path)
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"vision tower '{path}' is not a local model directory (no config.json); "
                          f"give the directory written by save_pretrained")
    try:
        full_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}/config.json cannot be read by transformers: {e}") from None
    config = _vision_config(full_config, path)
    cls = _model_class(config, path)
    with _quiet_transformers():
        return cls.from_pretrained(path, config=config, dtype=dtype)


def _get(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _set(module: nn.Module, dotted: str, value: nn.Module) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, last, value)


class VisionTower(nn.Module):
    """Patch features of a transformers vision model at one layer, as ``(N, h, w, C)``.

    ``model``: a SigLIP/CLIP/ViT vision model (see :func:`load_vision_model`).
    ``feature_layer``: index into the model's ``hidden_states`` (0 = embeddings, -1 = last
    layer before any post-LayerNorm, -2 = penultimate).
    ``prune``: drop the layers after ``feature_layer`` and the post-encoder modules (known
    architectures only: siglip, clip, vit; others run in full). ``pruned`` says whether it did.
    """

    def __init__(self, model: nn.Module, feature_layer: int = -2, prune: bool = True):
        super().__init__()
        config = model.config
        num_layers = config.num_hidden_layers
        index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
        if not 1 <= index <= num_layers:
            raise ConfigError(f"feature_layer {feature_layer} is out of range for a vision tower with "
                              f"{num_layers} layers; use -1..-{num_layers} or 1..{num_layers}")
        self.model = model
        self.feature_layer = feature_layer
        self.image_size = int(config.image_size)
        self.patch_size = int(config.patch_size)
        self.hidden_size = int(config.hidden_size)
        mean, std = _DEFAULT_MEAN_STD.get(config.model_type, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
        self.image_mean, self.image_std = mean, std
        self._index = feature_layer
        base = getattr(model, "vision_model", model)
        post = _POST_ENCODER.get(config.model_type)
        layer_lists = [name for name, mod in base.named_modules()
                       if isinstance(mod, nn.ModuleList) and len(mod) == num_layers]
        self.pruned = bool(prune and post is not None and len(layer_lists) == 1)
        if self.pruned:
            layers = _get(base, layer_lists[0])
            _set(base, layer_lists[0], nn.ModuleList(list(layers)[:index]))
            for name in post:
                if _get(base, name) is not None:
                    _set(base, name, nn.Identity())
            config.num_hidden_layers = index
            self._index = -1

    @classmethod
    def from_pretrained(cls, path: str | Path, feature_layer: int = -2, prune: bool = True,
                        dtype: torch.dtype | None = None) -> VisionTower:
        tower = cls(load_vision_model(path, dtype=dtype), feature_layer=feature_layer, prune=prune)
        pre = Path(path) / "preprocessor_config.json"
        if pre.is_file():
            spec = json.loads(pre.read_text())
            if "image_mean" in spec and "image_std" in spec:
                tower.image_mean, tower.image_std = tuple(spec["image_mean"]), tuple(spec["image_std"])
        return tower

    @classmethod
    def from_config(cls, config, feature_layer: int = -2, prune: bool = True) -> VisionTower:
        """A randomly initialised tower (use under ``torch.device('meta')`` to count parameters)."""
        vision = copy.deepcopy(_vision_config(config, "<config>"))
        return cls(_model_class(vision, "<config>")(vision), feature_layer=feature_layer, prune=prune)

    def grid_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """``(h, w)`` patch grid for an input of ``height x width`` px (default: the config size)."""
        return (height or self.image_size) // self.patch_size, (width or self.image_size) // self.patch_size

    @property
    def supports_patch_mask(self) -> bool:
        """Whether :meth:`forward` takes a ``patch_mask`` (SigLIP towers, as Phi-4's)."""
        return self.model.config.model_type == "siglip_vision_model"

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, 3, H, W)`` pixels -> ``(N, H/patch, W/patch, C)`` features of ``feature_layer``.

        ``patch_mask``: ``(N, H/patch, W/patch)`` bool, False on patches of padding; those are
        never attended to (SigLIP towers only, see the module docstring)."""
        n, _, height, width = pixel_values.shape
        h, w = self.grid_size(height, width)
        if patch_mask is not None:
            if not self.supports_patch_mask:
                raise ConfigError(f"a patch mask needs a SigLIP vision tower, this one is "
                                  f"'{self.model.config.model_type}'")
            if tuple(patch_mask.shape) != (n, h, w):
                raise ConfigError(f"patch_mask has shape {tuple(patch_mask.shape)}, expected {(n, h, w)}")
            hidden = self._masked_siglip(pixel_values, patch_mask.to(pixel_values.device, torch.bool))  # (N, h*w, C)
            return hidden.reshape(n, h, w, hidden.shape[-1])  # (N, h, w, C)
        interpolate = (height, width) != (self.image_size, self.image_size)
        dtype = next(self.model.parameters()).dtype
        kwargs = {"interpolate_pos_encoding": True} if interpolate else {}
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True, **kwargs)
        hidden = out.hidden_states[self._index]  # (N, T, C)
        extra = hidden.shape[1] - h * w
        if extra < 0:
            raise ConfigError(f"vision tower returned {hidden.shape[1]} tokens for a {h}x{w} patch grid")
        hidden = hidden[:, extra:]  # (N, h*w, C): drop CLS (CLIP, ViT) or other prefix tokens
        return hidden.reshape(n, h, w, hidden.shape[-1])  # (N, h, w, C)

    def _masked_siglip(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """``hidden_states[feature_layer]`` ``(N, h*w, C)`` of the SigLIP tower with padded patches
        masked as keys and Phi-4's position ids, as Phi4MultimodalVisionModel computes them."""
        base = getattr(self.model, "vision_model", self.model)
        emb = base.embeddings
        dtype = emb.patch_embedding.weight.dtype
        n = pixel_values.shape[0]
        x = emb.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # (N, h*w, C)
        x = x + emb.position_embedding(phi4_patch_position_ids(patch_mask, emb.image_size // emb.patch_size))
        keep = patch_mask.reshape(n, 1, 1, -1)  # (N, 1, 1, h*w): key mask, broadcast over heads and queries
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        hidden = [x]
        for layer in base.encoder.layers:
            x = layer(x, bias)
            hidden.append(x)
        return hidden[self._index]


def phi4_patch_position_ids(patch_mask: torch.Tensor, side: int) -> torch.Tensor:
    """``(N, h*w)`` position ids of the patches of ``patch_mask`` ``(N, h, w)`` on a ``side x side``
    position table, as Phi4MultimodalVisionEmbeddings.forward computes them (NaViT's
    fractional-coordinate bucketing): a content region of ``rows x cols`` patches is spread over the
    whole table, padded patches get id 0 (they are masked anyway). A full ``side x side`` mask gives
    the identity whenever ``1/side`` is exact in float32 (side a power of two, e.g. 32 at 448/14)."""
    n, h, w = patch_mask.shape
    device = patch_mask.device
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
    step_h = 1.0 / patch_mask[:, :, 0].sum(dim=1)  # (N,): 1 / content rows
    step_w = 1.0 / patch_mask[:, 0, :].sum(dim=1)  # (N,): 1 / content cols
    frac_h = (torch.arange(h, device=device, dtype=torch.float32)[None, :] * step_h[:, None]).clamp(max=1.0 - 1e-6)
    frac_w = (torch.arange(w, device=device, dtype=torch.float32)[None, :] * step_w[:, None]).clamp(max=1.0 - 1e-6)
    rows = torch.bucketize(frac_h, boundaries, right=True)  # (N, h)
    cols = torch.bucketize(frac_w, boundaries, right=True)  # (N, w)
    ids = (rows[:, :, None] * side + cols[:, None, :]).reshape(n, -1)  # (N, h*w)
    return torch.where(patch_mask.reshape(n, -1), ids, torch.zeros_like(ids))


def build_vision_config(kind: str = "siglip", image_size: int = 448, patch_size: int = 14, hidden: int = 1152,
                        layers: int = 27, heads: int = 16, intermediate: int | None = None):
    """A transformers vision config of ``kind`` (siglip | clip | vit) with the given geometry.

    The defaults are SigLIP-so400m at 448 px as used by Phi-4-multimodal (27 layers, width
    1152, MLP 4304, 16 heads, patch 14; docs/reference/multimodal.md#siglip-vision-tower). ``intermediate`` defaults to
    4 x hidden (4304 for so400m's 1152 when kind is siglip at the default width).
    """
    from transformers import CLIPVisionConfig, SiglipVisionConfig, ViTConfig

    if intermediate is None:
        intermediate = 4304 if (kind == "siglip" and hidden == 1152) else 4 * hidden
    common = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size)
    if kind == "siglip":
        return SiglipVisionConfig(**common)
    if kind == "clip":
        return CLIPVisionConfig(**common)
    if kind == "vit":
        return ViTConfig(**common)
    raise ConfigError(f"unknown vision tower kind '{kind}'; valid: {', '.join(_KINDS)}")


def build_tiny_vision_tower(out_dir: str | Path, kind: str = "siglip", image_size: int = 28, patch_size: int = 14,
                            hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int | None = None,
                            full_model: bool = False, seed: int = 0) -> Path:
    """Save a small randomly initialised vision tower to ``out_dir`` with ``save_pretrained``.

    For tests and demos (no downloads). ``full_model=True`` saves a whole CLIP/SigLIP model
    (tiny text tower included) to exercise loading the vision half of a full checkpoint.
    """
    from transformers import AutoModel, CLIPConfig, SiglipConfig

    vision = build_vision_config(kind, image_size, patch_size, hidden, layers, heads, intermediate)
    torch.manual_seed(seed)
    if full_model:
        if kind not in ("siglip", "clip"):
            raise ConfigError(f"full_model=True needs kind siglip or clip, got '{kind}'")
        text = dict(hidden_size=hidden, intermediate_size=vision.intermediate_size, num_hidden_layers=1,
                    num_attention_heads=heads, vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        config_cls = SiglipConfig if kind == "siglip" else CLIPConfig
        model = AutoModel.from_config(config_cls(vision_config=vision.to_dict(), text_config=text))
    else:
        model = AutoModel.from_config(vision)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
