"""Building a composed model: :func:`compose` joins a causal LM with modality paths, and
:func:`build_composed_model` builds the LM and the encoders a recipe names first.

Every modality configured in the recipe's ``multimodal`` section (its path's ``config_key``:
``vision``, ``audio``, ...) gets its path, in the paths' canonical order; the router's table
covers every group of the modalities present (groups the recipe's ``router`` section does not
name take the adapter named after the modality, as ``auto`` does).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..models.loading import load_model, load_tokenizer, resolve_model_path
from .adapters import add_adapters, add_placeholder_tokens, init_new_rows
from .composed import ComposedModel
from .config import MultimodalConfig
from .groups import modality_groups
from .modalities import ModalityPath, modality_classes
from .router import ModalityRouter


def _configured(cfg: MultimodalConfig) -> list[tuple[type[ModalityPath], object]]:
    """``(path class, its config section)`` of every modality ``cfg`` configures, in order."""
    return [(cls, getattr(cfg, cls.config_key, None)) for cls in modality_classes()
            if getattr(cfg, cls.config_key, None) is not None]


def router_table(cfg: MultimodalConfig, paths: Mapping[str, ModalityPath]) -> dict[str, str | None]:
    """``cfg.resolved_router()`` completed for every group of ``paths``: a group it does not name
    takes its first modality's adapter (a single modality: the adapter of its ``default_adapter``
    name, if there is one, else the base model)."""
    table = dict(cfg.resolved_router())
    names = cfg.adapter_names()
    for group in modality_groups(list(paths)):
        if group in table:
            continue
        first = group.split("+")[0]
        if first in table:
            table[group] = table[first]
        else:
            default = paths[first].default_adapter
            table[group] = default if default in names else None
    return table


def compose(language_model: nn.Module, tokenizer, cfg: MultimodalConfig, *, vision_encoder: nn.Module | None = None,
            audio_encoder: nn.Module | None = None, encoders: Mapping[str, nn.Module] | None = None,
            seed: int = 0) -> ComposedModel:
    """Join a causal LM with encoders per ``cfg``: placeholder tokens (embeddings resized),
    projectors (seeded init), modality adapters, encoder LoRA where a stage asks for it, router.

    ``encoders``: ``{modality name: encoder}``; ``vision_encoder`` / ``audio_encoder`` are the
    ``image`` / ``audio`` entries. Building under ``torch.device("meta")`` with
    ``tokenizer=None`` gives a model for counting parameters without memory.
    """
    given = dict(encoders or {})
    for name, enc in (("image", vision_encoder), ("audio", audio_encoder)):
        if enc is not None:
            given[name] = enc
    configured = _configured(cfg)
    for cls, _ in configured:
        if cls.name not in given:
            raise ConfigError(f"multimodal.{cls.config_key} is configured: pass its encoder "
                              f"({cls.__name__}.build_encoder)")
    if tokenizer is not None:
        tokens = [getattr(cfg, f"{cls.name}_token", None) or cls.default_token for cls, _ in configured]
        if add_placeholder_tokens(tokenizer, tokens):
            language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            init_new_rows(language_model, len(tokens))
    hidden = language_model.get_input_embeddings().embedding_dim
    lm_dtype = language_model.get_input_embeddings().weight.dtype
    paths: dict[str, ModalityPath] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for cls, section in configured:
            paths[cls.name] = cls.build(section, cfg, given[cls.name], hidden, lm_dtype,
                                        getattr(cfg, f"{cls.name}_token", None))
        language_model = add_adapters(language_model, cfg.adapters)
    router = ModalityRouter(router_table(cfg, paths), vision_speech=cfg.builds_vision_speech,
                            groups=modality_groups(list(paths)))
    return ComposedModel(language_model, tokenizer, router, paths, spec=cfg.model_dump(mode="json"))


def build_composed_model(mm_cfg: MultimodalConfig, model_cfg, cache_root: str | Path | None = None,
                         seed: int = 0) -> ComposedModel:
    """A fresh composed model from a recipe's ``multimodal`` and ``model`` sections."""

    if model_cfg.quantization != "none":
        raise ConfigError("model.quantization is not supported for multimodal recipes yet; use quantization: none")
    base = resolve_model_path(model_cfg.path)
    tokenizer = load_tokenizer(base, trust_remote_code=model_cfg.trust_remote_code)
    lm = load_model(model_cfg, None, training=True)
    encoders = {cls.name: cls.build_encoder(section, cache_root).to(lm.dtype) for cls, section in _configured(mm_cfg)}
    model = compose(lm, tokenizer, mm_cfg, encoders=encoders, seed=seed)
    model.base_model_path = str(base)
    return model


def tiny_composed(overrides: dict | None = None, cache_root: str | Path | None = None, seed: int = 0) -> ComposedModel:
    """The built-in tiny LM (:func:`mmtune.models.tiny.ensure_tiny`) composed with builtin:tiny-siglip,
    builtin:tiny-conformer, a vision and a speech LoRA (r 8) and the vision-speech projector;
    ``overrides`` update the ``multimodal`` section (for tests and benchmarks)."""

    spec = {"vision": {"max_crops": 4}, "audio": {},
            "adapters": [{"name": "vision", "r": 8, "alpha": 16}, {"name": "speech", "r": 8, "alpha": 16}],
            "stages": [{"name": "sft", "sources": [], "trainable": {"llm": "lora"}, "adapter": "vision"}]}
    spec.update(overrides or {})
    return build_composed_model(MultimodalConfig.model_validate(spec), ModelConfig(path="builtin:tiny",
                                                                                  dtype="float32"),
                                cache_root, seed)
