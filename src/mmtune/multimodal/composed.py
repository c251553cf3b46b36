"""The composed model: a causal LM with modality paths and a modality router (early fusion).

:class:`ComposedModel` is torchtune's ``EarlyFusionModel(decoder, encoders: Dict,
encoder_tokens: Dict)`` for transformers LMs: the language model is untouched transformers code,
each modality is an entry of :attr:`ComposedModel.modalities`, an ``nn.ModuleDict`` of
:class:`~mmtune.multimodal.modalities.ModalityPath` keyed by modality name (``image``,
``audio``, ...), and the routing groups (``text``, ``image``, ``audio``, ``image+audio``, ...)
are derived from the modalities present. A forward pass embeds the prompt, writes each
modality's features over its placeholder tokens (:mod:`mmtune.multimodal.embedding`) and runs
the LM on ``inputs_embeds`` with the route's adapter active (:mod:`mmtune.multimodal.router`).

Parameter names. The paths' encoders and projectors are registered on the model under their
component names (``vision_encoder``, ``vision_projector``, ``audio_encoder``, ...), the names
recipes use under ``trainable:`` and every saved checkpoint uses; ``modalities`` is a view onto
the same modules (not a second registration), so ``named_parameters()``, ``state_dict()`` and
checkpoints written before the paths existed keep their keys (``vision_projector.mlp.0.weight``).

Packed rows (position ids restarting per sample, no attention mask, ``use_cache=False``) keep
samples isolated in transformers 5.x with ``inputs_embeds`` exactly as with ``input_ids``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, MMTuneError
from .adapters import base_lm
from .checkpoint import save_composed, save_state
from .embedding import placeholder_mask, scatter_features
from .groups import group_name, modality_groups
from .modalities import ModalityPath, modality_classes
from .router import ModalityRouter, Route


@dataclass
class ComposedOutput:
    """Output of :meth:`ComposedModel.forward`: the LM's logits (and cache), the route taken, and
    the mean next-token loss when labels were given."""

    logits: torch.Tensor
    route: Route
    past_key_values: object = None
    loss: torch.Tensor | None = None


class ComposedModel(nn.Module):
    """A causal LM with modality paths and a modality router.

    Args:
        language_model: a transformers causal LM, or a PEFT model of one holding the modality
            adapters (see :func:`~mmtune.multimodal.build.compose`).
        tokenizer: its tokenizer, with the placeholder tokens added (None only for parameter
            counting on the meta device).
        router: picks the adapter (and audio projector) per modality group; its table must
            cover every group of the modalities present.
        modalities: ``{modality name: ModalityPath}`` (``image``, ``audio``, ...), in order.
        spec: the :class:`~mmtune.multimodal.config.MultimodalConfig` as a dict (saved with the model).
    """

    def __init__(self, language_model: nn.Module, tokenizer, router: ModalityRouter,
                 modalities: Mapping[str, ModalityPath] | None = None, spec: dict | None = None):
        super().__init__()
        self.language_model = language_model
        paths = dict(modalities or {})
        for name, path in paths.items():
            if path.name != name:
                raise ConfigError(f"modality path '{path.name}' given under the name '{name}'")
        # every component of every known modality is an attribute (None when absent) ...
        for cls in modality_classes():
            for comp in cls.COMPONENTS:
                setattr(self, comp, None)
        # ... and the present ones are registered under their component names, in path order
        for path in paths.values():
            for comp, module in path.components().items():
                setattr(self, comp, module)
        object.__setattr__(self, "modalities", nn.ModuleDict(paths))  # a view: not a second registration
        self.tokenizer = tokenizer
        self.router = router
        self.spec = spec or {}
        for path in paths.values():
            path.token_id = self._token_id(path.token)
        missing = [g for g in self.groups if g not in router.table]
        if missing:
            raise ConfigError(f"router table lacks groups {missing} of the modalities {', '.join(paths)}")

    modalities: nn.ModuleDict

    def __setattr__(self, name: str, value) -> None:
        """Assigning a component (``model.vision_projector = new``) also updates its path's view."""
        super().__setattr__(name, value)
        for path in self.__dict__.get("modalities", {}).values():
            if name in path.COMPONENTS:
                setattr(path, path.COMPONENTS[name], value)

    def _token_id(self, token: str) -> int | None:
        if self.tokenizer is None:
            return None
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(f"placeholder token {token!r} is not a single token of the tokenizer; it is added by "
                              "compose() (add_placeholder_tokens)")
        return ids[0]

    # -- modalities and components ------------------------------------------------------------
    @property
    def groups(self) -> tuple[str, ...]:
        """The routing groups of the modalities present: ``text`` and every combination."""
        return modality_groups(list(self.modalities))

    def path(self, modality: str) -> ModalityPath | None:
        return self.modalities[modality] if modality in self.modalities else None

    def components(self) -> dict[str, nn.Module]:
        """``{component name: module}`` of every present modality, in path order (``llm`` excluded)."""
        return {c: m for p in self.modalities.values() for c, m in p.components().items() if m is not None}

    def component(self, name: str) -> nn.Module | None:
        """The module of component ``name`` (``llm`` or a modality component), or None if absent."""
        if name == "llm":
            return self.language_model
        known = [c for cls in modality_classes() for c in cls.COMPONENTS]
        if name not in known:
            raise ConfigError(f"unknown component '{name}'; components: llm, {', '.join(known)}")
        return getattr(self, name)

    def route_components(self, route: Route) -> tuple[str, ...]:
        """The components a batch of ``route`` runs through (besides the LM)."""
        out: tuple[str, ...] = ()
        for m in route.group.split("+"):
            if m in self.modalities:
                out += self.modalities[m].route_components(route)
        return out

    def _token(self, modality: str) -> str:
        path = self.path(modality)
        if path is not None:
            return path.token
        return self.spec.get(f"{modality}_token") or next(c.default_token for c in modality_classes()
                                                          if c.name == modality)

    @property
    def image_token(self) -> str:
        return self._token("image")

    @property
    def audio_token(self) -> str:
        return self._token("audio")

    @property
    def image_token_id(self) -> int | None:
        return self.modalities["image"].token_id if "image" in self.modalities else None

    @property
    def audio_token_id(self) -> int | None:
        return self.modalities["audio"].token_id if "audio" in self.modalities else None

    @property
    def image_processor(self):
        return self.modalities["image"].processor if "image" in self.modalities else None

    @property
    def audio_processor(self):
        return self.modalities["audio"].processor if "audio" in self.modalities else None

    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return base_lm(self.language_model).get_input_embeddings().weight.dtype

    @property
    def hidden_size(self) -> int:
        return base_lm(self.language_model).get_input_embeddings().embedding_dim

    # -- preprocessing ------------------------------------------------------------------------
    def process(self, modality: str, raw):
        """Raw media of ``modality`` -> a processed item with ``num_tokens``."""
        if modality not in self.modalities:
            raise MMTuneError(f"this model has no {modality} path: it cannot take {modality} input")
        return self.modalities[modality].process(raw)

    def image_grid(self) -> tuple[int, int]:
        """``(h, w)`` patch grid of one crop."""
        return self.modalities["image"].grid()

    def process_image(self, image):
        """A PIL image -> tiles and token count for this model (DataError for unusable images)."""
        if "image" not in self.modalities:
            raise MMTuneError("this model has no vision path: it cannot take images (configure multimodal.vision)")
        return self.modalities["image"].process(image)

    def image_num_tokens(self, image) -> int:
        return self.process_image(image).num_tokens

    def process_audio(self, wave):
        """A mono 16 kHz waveform -> features and token count for this model."""
        if "audio" not in self.modalities:
            raise MMTuneError("this model has no audio path: it cannot take audio (configure multimodal.audio)")
        return self.modalities["audio"].process(wave)

    # -- encoders -----------------------------------------------------------------------------
    def encode_images(self, images: Sequence) -> torch.Tensor:
        """``(sum of num_tokens, H)``: the images through the vision path, image by image."""
        return self.modalities["image"].encode(images)

    def encode_audios(self, audios: Sequence, projector: str) -> torch.Tensor:
        """``(sum of num_tokens, H)``: the clips through the audio encoder and ``projector``."""
        return self.modalities["audio"].encode(audios, projector=projector)

    def _media(self, images: Sequence, audios: Sequence, media: Mapping[str, Sequence] | None) -> dict[str, list]:
        out = {k: list(v) for k, v in (media or {}).items()}
        for name, items in (("image", images), ("audio", audios)):
            if items:
                out[name] = out.get(name, []) + list(items)
        return out

    def group_of(self, media: Mapping[str, Sequence]) -> str:
        """The group of a sample holding ``media`` (``{modality: items}``)."""
        return group_name({k: len(v) for k, v in media.items()}, list(self.modalities))

    def embed(self, input_ids: torch.Tensor, images: Sequence = (), audios: Sequence = (), route: Route | None = None,
              media: Mapping[str, Sequence] | None = None) -> torch.Tensor:
        """``(B, T)`` ids -> ``(B, T, H)`` input embeddings with the features at placeholder positions;
        ``route`` names the projectors (the audio path's speech or vision-speech one)."""
        items = self._media(images, audios, media)
        for kind, got in items.items():
            if got and kind not in self.modalities:
                raise MMTuneError(f"got {len(got)} {kind}(s) but this model has no {kind} path")
        embeds = base_lm(self.language_model).get_input_embeddings()(input_ids)  # (B, T, H)
        for name, path in self.modalities.items():
            got = items.get(name, [])
            if path.token_id is None:
                continue
            mask = placeholder_mask(input_ids, path.token_id, sum(x.num_tokens for x in got), len(got), name, path.tag)
            if got:
                embeds = scatter_features(embeds, mask, path.encode(got, route))
        return embeds

    # -- forward ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                images: Sequence = (), audios: Sequence = (), group: str | None = None,
                past_key_values=None, use_cache: bool = False,
                media: Mapping[str, Sequence] | None = None) -> ComposedOutput:
        """Logits of the LM on ``input_ids`` with the features of the media in place.

        Media: ``images`` / ``audios``, or ``media={modality: items}`` for any modality.
        ``group`` is the batch's modality group (one route per call); by default it is inferred
        from which media are given. Packed rows: pass ``position_ids`` and no
        ``attention_mask``. ``labels`` (aligned with the inputs, -100 = no loss) give ``loss``,
        the mean next-token cross-entropy.
        """
        device = self.device
        input_ids = input_ids.to(device)
        items = self._media(images, audios, media)
        route = self.router.route(group or self.group_of(items), n_samples=input_ids.shape[0])
        embeds = self.embed(input_ids, route=route, media=items)
        kwargs = {k: v.to(device) for k, v in (("position_ids", position_ids), ("attention_mask", attention_mask))
                  if v is not None}
        with self.router.activate(self.language_model, route):
            out = self.language_model(inputs_embeds=embeds, past_key_values=past_key_values, use_cache=use_cache,
                                      **kwargs)
        loss = None
        if labels is not None:
            from ..models.losses import shifted_token_loss

            loss_sum, n = shifted_token_loss(out.logits, labels.to(device))
            loss = loss_sum / n.clamp_min(1)
        return ComposedOutput(out.logits, route, getattr(out, "past_key_values", None), loss)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the composed layout (:mod:`mmtune.multimodal.checkpoint`) into ``directory`` atomically."""

        return save_composed(self, directory)

    def save_pretrained(self, directory: str | os.PathLike, safe_serialization: bool = True,
                        state_dict: dict | None = None, **_) -> None:
        """The trainer's checkpoint hook (:func:`mmtune.train.checkpoint.save_model`): the whole
        state dict in one ``model.safetensors``, each shared tensor (tied embeddings) once, which
        :func:`mmtune.train.checkpoint.load_model_weights` reads back for ``--resume``. The
        composed layout for use and export is :meth:`save`."""

        save_state(self.state_dict() if state_dict is None else state_dict, directory)


def parameter_counts(model: ComposedModel) -> dict[str, int]:
    """Parameters per component, the LM's base weights and each LM adapter separately (works on
    the meta device). Keys: ``llm``, ``adapter/<name>``, the modality components present, ``total``."""
    counts: dict[str, int] = {}
    lm = model.language_model
    adapters = sorted(lm.peft_config) if hasattr(lm, "peft_config") else []
    base = 0
    for name, p in lm.named_parameters():
        owner = next((a for a in adapters if f".{a}." in name and ".lora_" in name), None)
        if owner is None:
            base += p.numel()
        else:
            counts[f"adapter/{owner}"] = counts.get(f"adapter/{owner}", 0) + p.numel()
    counts["llm"] = base
    for name, module in model.components().items():
        counts[name] = sum(p.numel() for p in module.parameters())
    counts["total"] = sum(v for k, v in counts.items())
    return counts
