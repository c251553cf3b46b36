"""Composition of any causal LM with a vision tower and an audio encoder: :class:`ComposedModel`.

The language model is untouched transformers code; images and audio enter it as input
embeddings (the LLaVA / Phi-4 / InternVL design, docs/reference/multimodal.md#composition-through-input-embeddings):

1. the tokenizer gains two special tokens (``<|image|>``, ``<|audio|>``; embeddings resized);
   each ``<image>`` / ``<audio>`` tag of a prompt becomes a run of exactly as many of them as
   the image or clip has feature tokens (:meth:`ComposedModel.image_num_tokens`, known before
   the encoders run);
2. images are tiled (``phi4`` or ``internvl`` mode), every tile goes through the vision tower
   in one batch, each image's tiles through the projector; clips become log-Mel features, run
   through the audio encoder as one padded batch, each clip's valid outputs through the audio
   projector the router picked (speech, or vision-speech for image+audio samples);
3. the LM's input embeddings at placeholder positions are replaced by those features, in
   order (the k-th placeholder run of the batch, row-major, takes the k-th image), and the LM
   runs on ``inputs_embeds`` with the router's adapter active.

Packed rows (position ids restarting per sample, no attention mask, ``use_cache=False``) keep
samples isolated in transformers 5.x with ``inputs_embeds`` exactly as with ``input_ids``.

Saved layout (:meth:`ComposedModel.save`, :func:`load_composed`)::

    mmtune_composed.json      what to rebuild: config, token ids, components, adapters, router
    processor.json            image tiling and audio feature settings
    language_model/           the base LM (save_pretrained; LoRA weights removed)
    adapters/<name>/          one PEFT adapter directory per modality adapter
    tokenizer/                the tokenizer with the placeholder tokens
    vision_encoder.safetensors, vision_projector.safetensors, audio_encoder.safetensors,
    audio_projector.safetensors, audio_projector_vs.safetensors   one file per component
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, DataError, MMTuneError
from .config import AdapterSpec, MultimodalConfig
from .groups import AUDIO_TAG, IMAGE_TAG  # noqa: F401 - kept importable from here
from .router import SPEECH_PROJECTOR, ModalityRouter, Route, group_of

log = logging.getLogger(__name__)

FORMAT = "mmtune-composed"
FORMAT_VERSION = 1
CONFIG_FILE = "mmtune_composed.json"
PROCESSOR_FILE = "processor.json"
#: Component attribute names; ``llm`` is :attr:`ComposedModel.language_model`.
ENCODER_COMPONENTS = ("vision_encoder", "vision_projector", "audio_encoder", "audio_projector", "audio_projector_vs")
BUILTIN_VISION = "builtin:tiny-siglip"
BUILTIN_AUDIO = "builtin:tiny-conformer"


# ---------------------------------------------------------------------------------------------
# Processed inputs


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
        from .tiling import normalize

        x = self.pixels.float() / 255.0  # (N, 3, C, C)
        if self.global_view is not None:
            x[-1] = self.global_view.float()
        return normalize(x, self.mean, self.std)


@dataclass
class AudioInput:
    """One clip: features ``(frames, n_mels)`` float32 and the ``num_tokens`` it occupies."""

    features: torch.Tensor
    num_tokens: int


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
        from .tiling import internvl_tiles, phi4_crops

        if self.tiling == "phi4":
            return phi4_crops(image, crop_size=self.crop_size, max_crops=self.max_crops, patch_size=self.patch_size,
                              mean=self.mean, std=self.std)
        return internvl_tiles(image, image_size=self.crop_size, min_num=self.min_crops, max_num=self.max_crops,
                              patch_size=self.patch_size, mean=self.mean, std=self.std)


@dataclass
class AudioProcessor:
    """Feature settings of the audio path: ``log_mel`` / ``phi4_log_mel`` (Conformer) or ``whisper``."""

    features: str
    sample_rate: int = 16000


@dataclass
class ComposedOutput:
    """Output of :meth:`ComposedModel.forward`: the LM's logits (and cache), the route taken, and
    the mean next-token loss when labels were given."""

    logits: torch.Tensor
    route: Route
    past_key_values: object = None
    loss: torch.Tensor | None = None


def _base_lm(lm: nn.Module) -> nn.Module:
    return lm.get_base_model() if hasattr(lm, "peft_config") else lm


# ---------------------------------------------------------------------------------------------
# The model


class ComposedModel(nn.Module):
    """A causal LM with optional vision and audio paths and a modality router.

    Args:
        language_model: a transformers causal LM, or a PEFT model of one holding the modality
            adapters (see :func:`compose`).
        tokenizer: its tokenizer, with the placeholder tokens added (None only for parameter
            counting on the meta device).
        router: picks adapter and audio projector per modality group.
        vision_encoder / vision_projector: a :class:`~mmtune.multimodal.vision.VisionTower` and a
            PROJECTORS module (``(N_tiles, h, w, C) -> (num_tokens, H)``).
        audio_encoder: a Conformer or Whisper tower (``(B, T, n_mels), lengths -> (B, T', d),
            lengths'``); audio_projector / audio_projector_vs: its two projectors.
        image_processor / audio_processor: preprocessing settings.
        spec: the :class:`MultimodalConfig` as a dict (saved with the model).
    """

    def __init__(self, language_model: nn.Module, tokenizer, router: ModalityRouter, *,
                 vision_encoder: nn.Module | None = None, vision_projector: nn.Module | None = None,
                 audio_encoder: nn.Module | None = None, audio_projector: nn.Module | None = None,
                 audio_projector_vs: nn.Module | None = None, image_processor: ImageProcessor | None = None,
                 audio_processor: AudioProcessor | None = None, image_token: str = "<|image|>",
                 audio_token: str = "<|audio|>", spec: dict | None = None):
        super().__init__()
        self.language_model = language_model
        self.vision_encoder = vision_encoder
        self.vision_projector = vision_projector
        self.audio_encoder = audio_encoder
        self.audio_projector = audio_projector
        self.audio_projector_vs = audio_projector_vs
        self.tokenizer = tokenizer
        self.router = router
        self.image_processor = image_processor
        self.audio_processor = audio_processor
        self.image_token, self.audio_token = image_token, audio_token
        self.spec = spec or {}
        self.image_token_id = self._token_id(image_token) if vision_encoder is not None else None
        self.audio_token_id = self._token_id(audio_token) if audio_encoder is not None else None

    def _token_id(self, token: str) -> int | None:
        if self.tokenizer is None:
            return None
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(f"placeholder token {token!r} is not a single token of the tokenizer; it is added by "
                              "compose() (add_placeholder_tokens)")
        return ids[0]

    # -- components ---------------------------------------------------------------------------
    def component(self, name: str) -> nn.Module | None:
        """The module of component ``name`` (``llm`` or one of ENCODER_COMPONENTS), or None."""
        if name == "llm":
            return self.language_model
        if name not in ENCODER_COMPONENTS:
            raise ConfigError(f"unknown component '{name}'; components: llm, {', '.join(ENCODER_COMPONENTS)}")
        return getattr(self, name)

    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return _base_lm(self.language_model).get_input_embeddings().weight.dtype

    @property
    def hidden_size(self) -> int:
        return _base_lm(self.language_model).get_input_embeddings().embedding_dim

    # -- preprocessing ------------------------------------------------------------------------
    def image_grid(self) -> tuple[int, int]:
        """``(h, w)`` patch grid of one crop."""
        c, p = self.image_processor.crop_size, self.image_processor.patch_size
        return c // p, c // p

    def process_image(self, image) -> ImageInput:
        """A PIL image -> tiles and token count for this model (DataError for unusable images)."""
        if self.vision_encoder is None:
            raise MMTuneError("this model has no vision path: it cannot take images (configure multimodal.vision)")
        import numpy as np

        tiled = self.image_processor.tile(image)
        arr = np.stack([np.asarray(t.convert("RGB"), dtype=np.uint8) for t in tiled.tiles])  # (N, C, C, 3)
        pixels = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # (N, 3, C, C)
        h, w = self.image_grid()
        n = self.vision_projector.num_tokens(tiled.num_tiles, h, w, tiled.grid, tiled.sub_token_grid)
        glob = tiled.global_view.to(torch.float16) if tiled.global_view is not None else None
        return ImageInput(pixels, tuple(tiled.grid), tuple(tiled.sub_token_grid), int(n), tuple(tiled.mean),
                          tuple(tiled.std), glob, tiled.patch_mask)

    def image_num_tokens(self, image) -> int:
        return self.process_image(image).num_tokens

    def process_audio(self, wave) -> AudioInput:
        """A mono 16 kHz waveform -> features and token count for this model."""
        if self.audio_encoder is None:
            raise MMTuneError("this model has no audio path: it cannot take audio (configure multimodal.audio)")
        from .audio import AUDIO_FEATURES, num_frames

        kind = self.audio_processor.features
        if kind == "whisper":
            feats, real = self.audio_encoder.features(wave)
            if real < 1:
                raise DataError(None, None, "audio clip is shorter than one Whisper frame (10 ms)", "empty_audio")
            feats = feats[:real]  # (T, n_mels)
        else:
            n = len(wave)
            if num_frames(n) < 1:
                raise DataError(None, None, f"audio clip has {n} samples, shorter than one 25 ms analysis window; "
                                "pad or drop it", "short_audio")
            feats = AUDIO_FEATURES.get(kind)(torch.as_tensor(wave))  # (T, n_mels)
        tokens = int(self.audio_encoder.output_lengths(torch.tensor([feats.shape[0]]))[0])
        return AudioInput(feats.contiguous(), tokens)

    # -- encoders -----------------------------------------------------------------------------
    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """All tiles of ``images`` through the tower in one batch, then each image's tiles through
        the projector: ``(sum of num_tokens, H)``, image by image."""
        pixels = torch.cat([im.pixel_values() for im in images]).to(self.device)  # (sum N, 3, C, C)
        mask = None
        if any(im.patch_mask is not None for im in images) and getattr(self.vision_encoder, "supports_patch_mask", False):
            h, w = self.vision_encoder.grid_size(*pixels.shape[-2:])
            mask = torch.cat([im.patch_mask if im.patch_mask is not None else
                              torch.ones(im.num_tiles, h, w, dtype=torch.bool) for im in images])  # (sum N, h, w)
        feats = self.vision_encoder(pixels, patch_mask=mask)  # (sum N, h, w, C); padding never attended to
        out, k = [], 0
        for im in images:
            emb = self.vision_projector(feats[k:k + im.num_tiles], im.grid, im.sub_token_grid)  # (num_tokens, H)
            if emb.shape[0] != im.num_tokens:
                raise MMTuneError(f"projector gave {emb.shape[0]} tokens for an image prepared for {im.num_tokens}; "
                                  "the data was prepared for another vision configuration")
            out.append(emb)
            k += im.num_tiles
        return torch.cat(out)

    def encode_audios(self, audios: Sequence[AudioInput], projector: str) -> torch.Tensor:
        """The clips through the encoder as one padded batch, then each clip's valid frames through
        ``projector``: ``(sum of num_tokens, H)``, clip by clip."""
        from .audio import pad_audio_features

        batch = pad_audio_features([a.features for a in audios])
        param = next(self.audio_encoder.parameters())
        hidden, lengths = self.audio_encoder(batch.features.to(param.device, param.dtype),
                                             batch.lengths.to(param.device))  # (B, T', d), (B,)
        proj = getattr(self, projector)
        if proj is None:
            raise MMTuneError(f"the route needs the {projector} but this model has none")
        out = []
        for i, a in enumerate(audios):
            n = int(lengths[i])
            if n != a.num_tokens:
                raise MMTuneError(f"audio encoder gave {n} tokens for a clip prepared for {a.num_tokens}")
            out.append(proj(hidden[i, :n].reshape(1, n, 1, -1)))  # a clip is a 1 x T grid -> (n, H)
        return torch.cat(out)

    def embed(self, input_ids: torch.Tensor, images: Sequence[ImageInput], audios: Sequence[AudioInput],
              route: Route) -> torch.Tensor:
        """``(B, T)`` ids -> ``(B, T, H)`` input embeddings with the features at placeholder positions."""
        embeds = _base_lm(self.language_model).get_input_embeddings()(input_ids)  # (B, T, H)
        for kind, token_id, items in (("image", self.image_token_id, images), ("audio", self.audio_token_id, audios)):
            if token_id is None:
                if items:
                    raise MMTuneError(f"got {len(items)} {kind}(s) but this model has no {kind} path")
                continue
            mask = input_ids == token_id  # (B, T)
            n_slots = int(mask.sum())
            n_feats = sum(x.num_tokens for x in items)
            if n_slots != n_feats:
                raise MMTuneError(f"the batch has {n_slots} {kind} placeholder tokens but its {len(items)} {kind}(s) "
                                  f"have {n_feats} feature tokens; each <{kind}> tag must be expanded by the data "
                                  "pipeline (mmtune.multimodal.data) for this model")
            if not items:
                continue
            if kind == "image":
                feats = self.encode_images(items)
            else:
                feats = self.encode_audios(items, route.audio_projector or SPEECH_PROJECTOR)
            embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), feats.to(embeds.dtype))
        return embeds

    # -- forward ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                images: Sequence[ImageInput] = (), audios: Sequence[AudioInput] = (), group: str | None = None,
                past_key_values=None, use_cache: bool = False) -> ComposedOutput:
        """Logits of the LM on ``input_ids`` with the features of ``images`` / ``audios`` in place.

        ``group`` is the batch's modality group (one route per call); by default it is inferred
        from whether any image / audio is given. Packed rows: pass ``position_ids`` and no
        ``attention_mask``. ``labels`` (aligned with the inputs, -100 = no loss) give ``loss``,
        the mean next-token cross-entropy.
        """
        device = self.device
        input_ids = input_ids.to(device)
        route = self.router.route(group or group_of(len(images), len(audios)), n_samples=input_ids.shape[0])
        embeds = self.embed(input_ids, images, audios, route)
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

    # -- saving -------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the composed layout (module docstring) into ``directory`` atomically."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            lm = self.language_model
            base = _base_lm(lm)
            base.save_pretrained(tmp / "language_model", state_dict=_lm_base_state(base))
            adapters = sorted(lm.peft_config) if hasattr(lm, "peft_config") else []
            if adapters:
                # The resized embeddings are saved once, with the base LM, not in every adapter.
                lm.save_pretrained(tmp / "adapters", selected_adapters=adapters, save_embedding_layers=False)
                for name in adapters:  # PEFT writes a non-"default" adapter into a subfolder of its name
                    if name == "default":
                        raise ConfigError("an adapter may not be named 'default' (PEFT reserves the name)")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp / "tokenizer")
            components = {}
            for name in ENCODER_COMPONENTS:
                module = getattr(self, name)
                if module is None:
                    continue
                state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
                save_file(state, str(tmp / f"{name}.safetensors"), metadata={"format": "pt", "component": name})
                components[name] = _describe_component(name, module)
            info = {"format": FORMAT, "version": FORMAT_VERSION, "multimodal": self.spec, "adapters": adapters,
                    "router": self.router.to_dict(), "image_token": self.image_token, "audio_token": self.audio_token,
                    "components": components, "hidden_size": self.hidden_size}
            (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=1))
            proc = {"image": asdict(self.image_processor) if self.image_processor else None,
                    "audio": asdict(self.audio_processor) if self.audio_processor else None}
            (tmp / PROCESSOR_FILE).write_text(json.dumps(proc, indent=1))
            whisper_fe = getattr(self.audio_encoder, "feature_extractor", None)
            if whisper_fe is not None:
                whisper_fe.save_pretrained(tmp / "audio_feature_extractor")
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
                os.replace(out, old / "x")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    def save_pretrained(self, directory: str | os.PathLike, safe_serialization: bool = True,
                        state_dict: dict | None = None, **_) -> None:
        """The trainer's checkpoint hook (:func:`mmtune.train.checkpoint.save_model`): the whole
        state dict in one ``model.safetensors``, each shared tensor (tied embeddings) once, which
        :func:`mmtune.train.checkpoint.load_model_weights` reads back for ``--resume``. The
        composed layout for use and export is :meth:`save`."""
        from safetensors.torch import save_file

        state = self.state_dict() if state_dict is None else state_dict
        seen, out = set(), {}
        for k, v in state.items():
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if key in seen:
                continue
            seen.add(key)
            out[k] = v.detach().contiguous().cpu()
        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file(out, str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})


def _lm_base_state(base: nn.Module) -> dict[str, torch.Tensor]:
    """The base LM's weights without LoRA: PEFT's ``x.base_layer.weight`` back to ``x.weight``,
    ``lora_*`` tensors dropped."""
    out = {}
    for k, v in base.state_dict().items():
        if ".lora_" in k:
            continue
        if ".modules_to_save." in k or ".original_module." in k:
            raise ConfigError(f"cannot save {k}: modules_to_save is not supported for composed-model adapters")
        out[k.replace(".base_layer.", ".")] = v
    return out


def _encoder_lora_spec(module: nn.Module) -> dict | None:
    return getattr(module, "_mmtune_lora", None)


def _describe_component(name: str, module: nn.Module) -> dict:
    """What :func:`load_composed` needs to rebuild ``module`` before loading its weights."""
    if name == "vision_encoder":
        return {"kind": "vision_tower", "config": module.model.config.to_dict(),
                "feature_layer": -1 if module.pruned else module.feature_layer, "pruned": module.pruned,
                "image_mean": list(module.image_mean), "image_std": list(module.image_std),
                "lora": _encoder_lora_spec(module.model)}
    if name == "audio_encoder":
        from .conformer import ConformerEncoder

        if isinstance(module, ConformerEncoder):
            return {"kind": "conformer", "config": asdict(module.config), "lora": _encoder_lora_spec(module)}
        return {"kind": "whisper", "config": module.encoder.config.to_dict(), "lora": _encoder_lora_spec(module)}
    return {"kind": "projector", "name": module.projector_name, "in_dim": module.in_dim, "out_dim": module.out_dim}


# ---------------------------------------------------------------------------------------------
# Building


def add_placeholder_tokens(tokenizer, tokens: Sequence[str]) -> int:
    """Add ``tokens`` as special tokens (never split, never merged with neighbours); returns how
    many were new. The caller resizes the LM's embeddings."""
    vocab = tokenizer.get_vocab()
    new = [t for t in tokens if t not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    return len(new)


def _lora_config(spec: AdapterSpec):
    from ..config import AdapterConfig
    from ..models.adapters import lora_config

    return lora_config(AdapterConfig(type="lora", r=spec.r, alpha=spec.alpha, dropout=spec.dropout,
                                     targets=spec.targets))


def add_adapters(language_model: nn.Module, specs: Sequence[AdapterSpec]) -> nn.Module:
    """The LM wrapped by PEFT with one LoRA adapter per spec (B = 0: each starts as the identity)."""
    if not specs:
        return language_model
    from peft import get_peft_model

    for s in specs:
        if s.name == "default":
            raise ConfigError("adapter name 'default' is reserved by PEFT; name adapters after their modality")
    first, *rest = specs
    try:
        model = get_peft_model(language_model, _lora_config(first), adapter_name=first.name)
        for s in rest:
            model.add_adapter(s.name, _lora_config(s))
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in language_model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"multimodal.adapters: {str(e).splitlines()[0]}. Linear layers of this model: "
                          f"{', '.join(names)} (or use all-linear)") from None
    return model


def inject_encoder_lora(module: nn.Module, spec: AdapterSpec | dict) -> nn.Module:
    """LoRA (PEFT ``inject_adapter_in_model``) on an encoder's linear layers, always active; the
    spec is remembered on the module so that saving and loading re-inject it."""
    from peft import inject_adapter_in_model

    from ..config import AdapterConfig
    from ..models.adapters import lora_config

    spec = spec if isinstance(spec, dict) else spec.model_dump()
    targets = spec["targets"]
    if targets == "all-linear":  # every linear layer of the encoder (PEFT's shorthand skips a model's head)
        targets = sorted({n for n, m in module.named_modules() if isinstance(m, nn.Linear)})
    cfg = lora_config(AdapterConfig(type="lora", r=spec["r"], alpha=spec["alpha"], dropout=spec["dropout"]),
                      task_type=None, targets=targets)
    try:
        inject_adapter_in_model(cfg, module, adapter_name="default")
    except ValueError as e:
        raise ConfigError(f"encoder LoRA: {str(e).splitlines()[0]}") from None
    module._mmtune_lora = spec
    return module


def _projector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    from .projectors import PROJECTORS

    module = PROJECTORS.get(name)(in_dim=in_dim, out_dim=out_dim)
    module.projector_name = name
    return module


def default_cache_root() -> Path:
    from ..util import default_cache_root as root

    return root()


def build_vision_tower(vision_cfg, cache_root: str | Path | None = None):
    """The configured vision tower: ``builtin:tiny-siglip`` (built once into the cache) or a local dir."""
    from .vision import VisionTower, build_tiny_vision_tower

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


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def build_audio_encoder(audio_cfg) -> nn.Module:
    """The configured audio encoder: ``builtin:tiny-conformer`` (random init, seeded), a
    save_conformer directory, or a Whisper checkpoint (encoder: whisper)."""
    from .conformer import AUDIO_ENCODERS, build_conformer, load_conformer

    if audio_cfg.encoder == "whisper":
        if audio_cfg.path.startswith("builtin:"):
            raise ConfigError("multimodal.audio: encoder whisper needs `path` to a local Whisper checkpoint")
        return AUDIO_ENCODERS.get("whisper")(audio_cfg.path)
    if audio_cfg.path == BUILTIN_AUDIO:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(audio_cfg.seed)
            return build_conformer(d_model=audio_cfg.d_model, n_layers=audio_cfg.n_layers, n_heads=audio_cfg.n_heads,
                                   ffn_dim=audio_cfg.ffn_dim, conv_kernel=audio_cfg.conv_kernel,
                                   subsampling_channels=audio_cfg.subsampling_channels)
    if audio_cfg.path.startswith("builtin:"):
        raise ConfigError(f"multimodal.audio.path '{audio_cfg.path}': unknown built-in; valid: {BUILTIN_AUDIO}")
    return load_conformer(audio_cfg.path)


def _uses_encoder_lora(cfg: MultimodalConfig, component: str) -> bool:
    return any(getattr(s.trainable, component) == "lora" for s in cfg.stages)


def compose(language_model: nn.Module, tokenizer, cfg: MultimodalConfig, *, vision_encoder: nn.Module | None = None,
            audio_encoder: nn.Module | None = None, seed: int = 0) -> ComposedModel:
    """Join a causal LM with encoders per ``cfg``: placeholder tokens (embeddings resized),
    projectors (seeded init), modality adapters, encoder LoRA where a stage asks for it, router.

    Building under ``torch.device("meta")`` with ``tokenizer=None`` gives a model for counting
    parameters without memory.
    """
    if cfg.vision is not None and vision_encoder is None:
        raise ConfigError("multimodal.vision is configured: pass the vision tower (build_vision_tower)")
    if cfg.audio is not None and audio_encoder is None:
        raise ConfigError("multimodal.audio is configured: pass the audio encoder (build_audio_encoder)")
    if tokenizer is not None:
        tokens = ([cfg.image_token] if cfg.vision else []) + ([cfg.audio_token] if cfg.audio else [])
        if add_placeholder_tokens(tokenizer, tokens):
            language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            _init_new_rows(language_model, len(tokens))
    hidden = language_model.get_input_embeddings().embedding_dim
    lm_dtype = language_model.get_input_embeddings().weight.dtype
    vision_projector = audio_projector = audio_projector_vs = None
    image_processor = audio_processor = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.vision is not None:
            vision_projector = _projector(cfg.vision.projector, vision_encoder.hidden_size, hidden).to(lm_dtype)
            crop = cfg.vision.crop_size or vision_encoder.image_size
            image_processor = ImageProcessor(cfg.vision.tiling, crop, cfg.vision.max_crops, cfg.vision.min_crops,
                                             vision_encoder.patch_size, tuple(vision_encoder.image_mean),
                                             tuple(vision_encoder.image_std))
            if _uses_encoder_lora(cfg, "vision_encoder"):
                inject_encoder_lora(vision_encoder.model, cfg.vision.lora)
        if cfg.audio is not None:
            audio_projector = _projector(cfg.audio.projector, audio_encoder.hidden_size, hidden).to(lm_dtype)
            if cfg.builds_vision_speech:
                audio_projector_vs = _projector(cfg.audio.projector, audio_encoder.hidden_size, hidden).to(lm_dtype)
            kind = "whisper" if cfg.audio.encoder == "whisper" else cfg.audio.features
            audio_processor = AudioProcessor(kind)
            if _uses_encoder_lora(cfg, "audio_encoder"):
                inject_encoder_lora(audio_encoder, cfg.audio.lora)
        language_model = add_adapters(language_model, cfg.adapters)
    router = ModalityRouter(cfg.resolved_router(), vision_speech=cfg.builds_vision_speech)
    return ComposedModel(language_model, tokenizer, router, vision_encoder=vision_encoder,
                         vision_projector=vision_projector, audio_encoder=audio_encoder,
                         audio_projector=audio_projector, audio_projector_vs=audio_projector_vs,
                         image_processor=image_processor, audio_processor=audio_processor,
                         image_token=cfg.image_token, audio_token=cfg.audio_token,
                         spec=cfg.model_dump(mode="json"))


@torch.no_grad()
def _init_new_rows(language_model: nn.Module, n: int) -> None:
    """New placeholder rows of the input embeddings: the mean of the old rows. Their input
    embeddings are always replaced by features; the rows matter only as output logits (tied
    heads), which generation masks out."""
    emb = language_model.get_input_embeddings().weight
    if emb.device.type == "meta":
        return
    emb[-n:] = emb[:-n].mean(dim=0, keepdim=True)
    head = language_model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != emb.data_ptr():
        head.weight[-n:] = head.weight[:-n].mean(dim=0, keepdim=True)


def build_composed_model(mm_cfg: MultimodalConfig, model_cfg, cache_root: str | Path | None = None,
                         seed: int = 0) -> ComposedModel:
    """A fresh composed model from a recipe's ``multimodal`` and ``model`` sections."""
    from ..models.loading import load_model, load_tokenizer, resolve_model_path

    if model_cfg.quantization != "none":
        raise ConfigError("model.quantization is not supported for multimodal recipes yet; use quantization: none")
    base = resolve_model_path(model_cfg.path)
    tokenizer = load_tokenizer(base, trust_remote_code=model_cfg.trust_remote_code)
    lm = load_model(model_cfg, None, training=True)
    vision = build_vision_tower(mm_cfg.vision, cache_root) if mm_cfg.vision is not None else None
    audio = build_audio_encoder(mm_cfg.audio) if mm_cfg.audio is not None else None
    if vision is not None:
        vision.to(lm.dtype)
    if audio is not None:
        audio.to(lm.dtype)
    model = compose(lm, tokenizer, mm_cfg, vision_encoder=vision, audio_encoder=audio, seed=seed)
    model.base_model_path = str(base)
    return model


def tiny_composed(overrides: dict | None = None, cache_root: str | Path | None = None, seed: int = 0) -> ComposedModel:
    """The built-in tiny LM (:func:`mmtune.models.tiny.ensure_tiny`) composed with builtin:tiny-siglip,
    builtin:tiny-conformer, a vision and a speech LoRA (r 8) and the vision-speech projector;
    ``overrides`` update the ``multimodal`` section (for tests and benchmarks)."""
    from ..config import ModelConfig

    spec = {"vision": {"max_crops": 4}, "audio": {},
            "adapters": [{"name": "vision", "r": 8, "alpha": 16}, {"name": "speech", "r": 8, "alpha": 16}],
            "stages": [{"name": "sft", "sources": [], "trainable": {"llm": "lora"}, "adapter": "vision"}]}
    spec.update(overrides or {})
    return build_composed_model(MultimodalConfig.model_validate(spec), ModelConfig(path="builtin:tiny",
                                                                                  dtype="float32"),
                                cache_root, seed)


# ---------------------------------------------------------------------------------------------
# Loading


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError:
        raise MMTuneError(f"{path} not found: not a composed model directory (written by ComposedModel.save)") from None
    except ValueError as e:
        raise MMTuneError(f"{path}: invalid JSON ({e})") from None


def _load_component(directory: Path, name: str, desc: dict, state: dict) -> nn.Module:
    if desc["kind"] == "projector":
        module = _projector(desc["name"], desc["in_dim"], desc["out_dim"])
    elif desc["kind"] == "vision_tower":
        from transformers import CONFIG_MAPPING

        from .vision import VisionTower

        cfg = dict(desc["config"])
        config = CONFIG_MAPPING[cfg.pop("model_type")].from_dict(cfg)
        module = VisionTower.from_config(config, feature_layer=desc["feature_layer"], prune=desc["pruned"])
        module.image_mean, module.image_std = tuple(desc["image_mean"]), tuple(desc["image_std"])
        if desc.get("lora"):
            inject_encoder_lora(module.model, desc["lora"])
    elif desc["kind"] == "conformer":
        from .conformer import ConformerConfig, build_conformer

        module = build_conformer(ConformerConfig(**desc["config"]))
        if desc.get("lora"):
            inject_encoder_lora(module, desc["lora"])
    elif desc["kind"] == "whisper":
        from transformers import WhisperConfig, WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        from .conformer import WhisperAudioTower

        fe_dir = directory / "audio_feature_extractor"
        fe = WhisperFeatureExtractor.from_pretrained(str(fe_dir)) if fe_dir.is_dir() else None
        module = WhisperAudioTower(WhisperEncoder(WhisperConfig.from_dict(desc["config"])).eval(), fe)
        if desc.get("lora"):
            inject_encoder_lora(module, desc["lora"])
    else:
        raise MMTuneError(f"{directory / CONFIG_FILE}: unknown component kind {desc['kind']!r} for {name}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MMTuneError(f"{directory / (name + '.safetensors')}: weights do not match {CONFIG_FILE}: "
                          f"{str(e).splitlines()[0]}") from None
    return module


def load_composed(directory: str | os.PathLike, dtype: str = "float32", device: str | None = None,
                  trainable: bool = False) -> ComposedModel:
    """Inverse of :meth:`ComposedModel.save`. ``trainable=False`` freezes every parameter and
    returns the model in eval mode; ``True`` leaves trainability to a stage."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models.loading import resolve_dtype, set_offline

    d = Path(directory)
    info = _read_json(d / CONFIG_FILE)
    if info.get("format") != FORMAT:
        raise MMTuneError(f"{d / CONFIG_FILE}: format is {info.get('format')!r}, expected {FORMAT!r}")
    proc = _read_json(d / PROCESSOR_FILE)
    set_offline()
    torch_dtype = resolve_dtype(dtype)
    lm = AutoModelForCausalLM.from_pretrained(d / "language_model", dtype=torch_dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(d / "tokenizer", local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    adapters = info.get("adapters", [])
    if adapters:
        from peft import PeftModel

        first, *rest = adapters
        lm = PeftModel.from_pretrained(lm, d / "adapters" / first, adapter_name=first, is_trainable=trainable)
        for name in rest:
            lm.load_adapter(d / "adapters" / name, adapter_name=name, is_trainable=trainable)
    modules = {}
    for name, desc in info["components"].items():
        modules[name] = _load_component(d, name, desc, load_file(str(d / f"{name}.safetensors"))).to(torch_dtype)
    image_proc = ImageProcessor(**{**proc["image"], "mean": tuple(proc["image"]["mean"]),
                                   "std": tuple(proc["image"]["std"])}) if proc.get("image") else None
    audio_proc = AudioProcessor(**proc["audio"]) if proc.get("audio") else None
    model = ComposedModel(lm, tokenizer, ModalityRouter.from_dict(info["router"]), **modules,
                          image_processor=image_proc, audio_processor=audio_proc, image_token=info["image_token"],
                          audio_token=info["audio_token"], spec=info.get("multimodal", {}))
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def multimodal_config_of(directory: str | os.PathLike) -> MultimodalConfig:
    """The :class:`MultimodalConfig` a composed model directory was built with."""
    return MultimodalConfig.model_validate(_read_json(Path(directory) / CONFIG_FILE)["multimodal"])


# ---------------------------------------------------------------------------------------------
# Merging and counting


def merge_composed(directory: str | os.PathLike, adapter_name: str | None, out: str | os.PathLike,
                   overwrite: bool = False) -> Path:
    """Write a copy of the composed model at ``directory`` to ``out``.

    ``adapter_name=None`` keeps the modality adapters separate, as Phi-4-multimodal ships them
    (base weights shared, the router picks per input). With a name, that adapter is folded into
    the LM weights (PEFT ``merge_and_unload``) and all adapters are dropped: every input then
    runs the merged weights, text included, and the router routes everything to the base, i.e.
    the merged model. Merging one adapter changes text behaviour; that is the price of a
    single set of weights.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MMTuneError(f"output directory '{out}' exists and is not empty; choose another or pass overwrite=True")
    model = load_composed(directory, device="cpu")
    if adapter_name is not None:
        lm = model.language_model
        names = sorted(lm.peft_config) if hasattr(lm, "peft_config") else []
        if adapter_name not in names:
            raise MMTuneError(f"{directory}: no adapter '{adapter_name}' to merge; adapters: {', '.join(names) or 'none'}")
        lm.set_adapter(adapter_name)
        model.language_model = lm.merge_and_unload(adapter_names=[adapter_name])
        table = {g: None for g in model.router.table}
        model.router = ModalityRouter(table, model.router.vision_speech)
        spec = copy.deepcopy(model.spec)
        spec["adapters"] = []
        spec["router"] = {"text": "none", "image": "none", "audio": "none", "image_audio": "none"}
        spec["merged_adapter"] = adapter_name
        model.spec = spec
    model.save(out)
    return out


def parameter_counts(model: ComposedModel) -> dict[str, int]:
    """Parameters per component, the LM's base weights and each LM adapter separately (works on
    the meta device). Keys: ``llm``, ``adapter/<name>``, the encoder components present, ``total``."""
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
    for name in ENCODER_COMPONENTS:
        module = getattr(model, name)
        if module is not None:
            counts[name] = sum(p.numel() for p in module.parameters())
    counts["total"] = sum(v for k, v in counts.items())
    return counts


def phi4_mm_config(max_crops: int = 36) -> MultimodalConfig:
    """Phi-4-multimodal's composition (docs/reference/multimodal.md#phi-4-multimodal) as a config: SigLIP-so400m 448 px,
    penultimate layer, phi4 tiling, phi4_avgpool projector; Phi-4 Conformer; LoRA_V r=256/512/0.0
    and LoRA_A r=320/640/0.01 on qkv_proj, o_proj, gate_up_proj, down_proj; the vision-speech
    projector; a single placeholder stage (for counting and building only)."""
    from .config import PHI4_LORA_TARGETS

    return MultimodalConfig.model_validate({
        "vision": {"path": "phi4-siglip", "feature_layer": -2, "tiling": "phi4", "crop_size": 448,
                   "max_crops": max_crops, "projector": "phi4_avgpool"},
        "audio": {"encoder": "conformer", "path": "phi4-conformer", "projector": "mlp2x_gelu"},
        "adapters": [{"name": "vision", "r": 256, "alpha": 512, "dropout": 0.0, "targets": PHI4_LORA_TARGETS},
                     {"name": "speech", "r": 320, "alpha": 640, "dropout": 0.01, "targets": PHI4_LORA_TARGETS}],
        "stages": [{"name": "count", "sources": []}],
    })


def phi4_mini_config():
    """transformers ``Phi3Config`` in Phi-4-mini's geometry (docs/reference/multimodal.md#phi-4-mini-language-model)."""
    from transformers import Phi3Config

    return Phi3Config(hidden_size=3072, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
                      intermediate_size=8192, vocab_size=200064, tie_word_embeddings=True, partial_rotary_factor=0.75,
                      max_position_embeddings=131072)


def build_phi4_mm_on_meta(max_crops: int = 36) -> ComposedModel:
    """Our components in Phi-4-multimodal geometry on the meta device (no memory): Phi-4-mini LM,
    SigLIP-so400m tower (features of layer -2: 26 of 27 layers kept), Phi-4 Conformer, the
    three projectors and both LoRAs."""
    from transformers import AutoModelForCausalLM

    from .conformer import build_conformer, phi4_conformer_config
    from .vision import VisionTower, build_vision_config

    cfg = phi4_mm_config(max_crops)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(phi4_mini_config())
        vision = VisionTower.from_config(build_vision_config("siglip"), feature_layer=-2)
        audio = build_conformer(phi4_conformer_config(), device="meta")
        return compose(lm, None, cfg, vision_encoder=vision, audio_encoder=audio)


def find_composed(path: str | Path) -> Path | None:
    """The composed model directory ``path`` names: itself, or a run's ``final``."""
    p = Path(path)
    for cand in (p, p / "final"):
        if (cand / CONFIG_FILE).is_file():
            return cand
    return None
