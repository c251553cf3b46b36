"""The audio modality: a Conformer or Whisper encoder, its projectors, ``<|audio|>``, log-Mel features.

Clips become log-Mel features (:mod:`mmtune.multimodal.audio`; Whisper's own extractor for a
Whisper encoder), run through the encoder as one padded batch, and each clip's valid outputs
through the projector the route names: ``audio_projector`` (speech), or ``audio_projector_vs``
(Phi-4's vision-speech projector) for audio of samples that also hold an image. Components:
``audio_encoder``, ``audio_projector``, ``audio_projector_vs`` (recipe section ``multimodal.audio``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import ConfigError, DataError, MMTuneError
from ..adapters import encoder_lora_spec, inject_encoder_lora
from ..audio import AUDIO_FEATURES, num_frames, pad_audio_features
from ..conformer import AUDIO_ENCODERS, build_conformer, load_conformer
from ..groups import AUDIO_TAG
from ..projectors import build_projector
from . import MODALITIES, ModalityPath, stages_use_lora

BUILTIN_AUDIO = "builtin:tiny-conformer"
SPEECH_PROJECTOR = "audio_projector"
VISION_SPEECH_PROJECTOR = "audio_projector_vs"


@dataclass
class AudioInput:
    """One clip: features ``(frames, n_mels)`` float32 and the ``num_tokens`` it occupies."""

    features: torch.Tensor
    num_tokens: int


@dataclass
class AudioProcessor:
    """Feature settings of the audio path: ``log_mel`` / ``phi4_log_mel`` (Conformer) or ``whisper``."""

    features: str
    sample_rate: int = 16000


@MODALITIES.register("audio")
class AudioPath(ModalityPath):
    """Audio encoder + speech and vision-speech projectors + log-Mel features (module docstring)."""

    name = "audio"
    tag = AUDIO_TAG
    default_token = "<|audio|>"
    default_adapter = "speech"
    config_key = "audio"
    COMPONENTS = {"audio_encoder": "encoder", SPEECH_PROJECTOR: "projector", VISION_SPEECH_PROJECTOR: "projector_vs"}
    order = 1

    def __init__(self, encoder: nn.Module, projector: nn.Module, processor: AudioProcessor,
                 projector_vs: nn.Module | None = None, token: str | None = None):
        super().__init__(processor, token)
        self.encoder = encoder
        self.projector = projector
        self.projector_vs = projector_vs

    def process(self, wave) -> AudioInput:
        """A mono 16 kHz waveform -> features and token count."""

        kind = self.processor.features
        if kind == "whisper":
            feats, real = self.encoder.features(wave)
            if real < 1:
                raise DataError(None, None, "audio clip is shorter than one Whisper frame (10 ms)", "empty_audio")
            feats = feats[:real]  # (T, n_mels)
        else:
            n = len(wave)
            if num_frames(n) < 1:
                raise DataError(None, None, f"audio clip has {n} samples, shorter than one 25 ms analysis window; "
                                "pad or drop it", "short_audio")
            feats = AUDIO_FEATURES.get(kind)(torch.as_tensor(wave))  # (T, n_mels)
        tokens = int(self.encoder.output_lengths(torch.tensor([feats.shape[0]]))[0])
        return AudioInput(feats.contiguous(), tokens)

    def route_components(self, route) -> tuple[str, ...]:
        """The encoder and the projector of the route: the vision-speech one for audio beside an
        image unless the route says otherwise."""
        default = VISION_SPEECH_PROJECTOR if "image" in route.group.split("+") else SPEECH_PROJECTOR
        return "audio_encoder", route.audio_projector or default

    def encode(self, audios: Sequence[AudioInput], route=None, projector: str | None = None) -> torch.Tensor:
        """The clips through the encoder as one padded batch, then each clip's valid frames through
        ``projector`` (default: the route's): ``(sum of num_tokens, H)``, clip by clip."""

        projector = projector or (route.audio_projector if route is not None else None) or SPEECH_PROJECTOR
        batch = pad_audio_features([a.features for a in audios])
        param = next(self.encoder.parameters())
        hidden, lengths = self.encoder(batch.features.to(param.device, param.dtype),
                                       batch.lengths.to(param.device))  # (B, T', d), (B,)
        proj = self.components().get(projector)
        if proj is None:
            raise MMTuneError(f"the route needs the {projector} but this model has none")
        out = []
        for i, a in enumerate(audios):
            n = int(lengths[i])
            if n != a.num_tokens:
                raise MMTuneError(f"audio encoder gave {n} tokens for a clip prepared for {a.num_tokens}")
            out.append(proj(hidden[i, :n].reshape(1, n, 1, -1)))  # a clip is a 1 x T grid -> (n, H)
        return torch.cat(out)

    # -- building, saving, loading -----------------------------------------------------------
    @classmethod
    def build_encoder(cls, audio_cfg, cache_root: str | Path | None = None) -> nn.Module:
        return build_audio_encoder(audio_cfg)

    @classmethod
    def build(cls, audio_cfg, mm_cfg, encoder: nn.Module, hidden: int, dtype: torch.dtype,
              token: str | None = None) -> AudioPath:

        projector = build_projector(audio_cfg.projector, encoder.hidden_size, hidden).to(dtype)
        projector_vs = None
        if mm_cfg.builds_vision_speech:
            projector_vs = build_projector(audio_cfg.projector, encoder.hidden_size, hidden).to(dtype)
        processor = AudioProcessor("whisper" if audio_cfg.encoder == "whisper" else audio_cfg.features)
        if stages_use_lora(mm_cfg, "audio_encoder"):
            inject_encoder_lora(encoder, audio_cfg.lora)
        return cls(encoder, projector, processor, projector_vs, token or mm_cfg.audio_token)

    def save_files(self, directory: Path) -> None:
        fe = getattr(self.encoder, "feature_extractor", None)  # Whisper's, saved beside the weights
        if fe is not None:
            fe.save_pretrained(directory / "audio_feature_extractor")

    def describe_component(self, component: str, module: nn.Module) -> dict:
        if component == "audio_encoder":
            from ..conformer import ConformerEncoder

            if isinstance(module, ConformerEncoder):
                return {"kind": "conformer", "config": asdict(module.config), "lora": encoder_lora_spec(module)}
            return {"kind": "whisper", "config": module.encoder.config.to_dict(), "lora": encoder_lora_spec(module)}
        return super().describe_component(component, module)

    @classmethod
    def load_component(cls, directory: Path, component: str, desc: dict) -> nn.Module:
        if desc["kind"] == "conformer":
            from ..conformer import ConformerConfig, build_conformer

            module = build_conformer(ConformerConfig(**desc["config"]))
        elif desc["kind"] == "whisper":
            from transformers import WhisperConfig, WhisperFeatureExtractor
            from transformers.models.whisper.modeling_whisper import WhisperEncoder

            from ..whisper import WhisperAudioTower

            fe_dir = directory / "audio_feature_extractor"
            fe = WhisperFeatureExtractor.from_pretrained(str(fe_dir)) if fe_dir.is_dir() else None
            module = WhisperAudioTower(WhisperEncoder(WhisperConfig.from_dict(desc["config"])).eval(), fe)
        else:
            return super().load_component(directory, component, desc)
        if desc.get("lora"):
            inject_encoder_lora(module, desc["lora"])
        return module

    @classmethod
    def from_saved(cls, modules: dict[str, nn.Module], processor: dict | None, token: str | None) -> AudioPath:
        return cls(modules["audio_encoder"], modules[SPEECH_PROJECTOR], AudioProcessor(**processor),
                   modules.get(VISION_SPEECH_PROJECTOR), token)


def build_audio_encoder(audio_cfg) -> nn.Module:
    """The configured audio encoder: ``builtin:tiny-conformer`` (random init, seeded), a
    save_conformer directory, or a Whisper checkpoint (encoder: whisper)."""

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
