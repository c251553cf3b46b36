"""Whisper's encoder as an audio tower of a composed model: a transformers ``WhisperEncoder`` behind
the :class:`~mmtune.multimodal.conformer.ConformerEncoder` interface (``(B, T, n_mels), lengths ->
(B, T', d), lengths'``), and the loader of a local Whisper checkpoint's encoder (the ``whisper``
entry of AUDIO_ENCODERS)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, MMTuneError
from ..registry import AUDIO_ENCODERS
from .audio import time_mask

CONFIG_NAME = "config.json"


class WhisperAudioTower(nn.Module):
    """A transformers ``WhisperEncoder`` behind the :class:`ConformerEncoder` interface.

    Token rate: Whisper subsamples x2 (conv1 stride 1, conv2 stride 2: ``ceil(T/2)``), giving
    50 tokens/s (20 ms each; 1500 per 30 s window) against the Conformer's 12.5 tokens/s (80 ms;
    375 per 30 s): 4x more LM positions per second of audio unless the projector stacks frames.
    Whisper always encodes a full 30 s window (``2 * max_source_positions`` frames, absolute
    positions, no attention mask), so inputs are right-padded to it and outputs cropped to
    ``ceil(T/2)``; padding does change Whisper's outputs, unlike the Conformer's.
    Features: Whisper was trained on its own log-Mel (``log10``, centred STFT with n_fft 400,
    Slaney Mel, clamped to max-8 and scaled (x+4)/4, silence-padded to 30 s), not on
    :func:`~mmtune.multimodal.audio.log_mel`; use :meth:`features` with pretrained weights.
    """

    subsampling = 2

    def __init__(self, encoder: nn.Module, feature_extractor=None):
        super().__init__()
        self.encoder = encoder
        cfg = encoder.config
        self.d_model, self.n_mels = cfg.d_model, cfg.num_mel_bins
        self.hidden_size = cfg.d_model
        self.max_frames = 2 * cfg.max_source_positions
        self.feature_extractor = feature_extractor

    def features(self, wave) -> tuple[torch.Tensor, int]:
        """Whisper's own features of a 16 kHz clip: ((max_frames, n_mels), real frames)."""
        from transformers import WhisperFeatureExtractor

        fe = self.feature_extractor
        if fe is None:  # Whisper's defaults, with the window length of this checkpoint
            fe = WhisperFeatureExtractor(feature_size=self.n_mels)
            fe.n_samples, fe.nb_max_frames = self.max_frames * fe.hop_length, self.max_frames
        wave = torch.as_tensor(wave, dtype=torch.float32).numpy()
        feats = fe(wave, sampling_rate=16000, return_tensors="pt").input_features[0]  # (n_mels, frames)
        return feats.T.contiguous(), min(len(wave) // fe.hop_length, self.max_frames)

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(lengths + 1, 2, rounding_mode="floor")

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, T, n_mels), lengths (B,) -> (hidden (B, ceil(T/2), d), ceil(lengths/2))."""
        b, t, m = feats.shape
        if m != self.n_mels:
            raise MMTuneError(f"Whisper tower expects {self.n_mels} Mel bins, got {m}")
        if t > self.max_frames:
            raise MMTuneError(f"Whisper encodes at most {self.max_frames} frames ({self.max_frames // 100} s); "
                              f"got {t}: cut the clip with chunked_log_mel(chunk_seconds=30)")
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=feats.device)
        x = F.pad(feats.transpose(1, 2), (0, self.max_frames - t))  # (B, n_mels, max_frames)
        hidden = self.encoder(input_features=x.to(self.encoder.conv1.weight.dtype)).last_hidden_state
        t_out = (t + 1) // 2
        out_lengths = self.output_lengths(lengths.to(device=feats.device, dtype=torch.long))
        hidden = hidden[:, :t_out]  # (B, ceil(T/2), d)
        return hidden * time_mask(out_lengths, t_out)[..., None].to(hidden.dtype), out_lengths


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(directory / shard)))
        return state
    raise ConfigError(f"{directory}: no model.safetensors or model.safetensors.index.json (only safetensors "
                      "checkpoints are read; re-save with save_pretrained(safe_serialization=True))")


@AUDIO_ENCODERS.register("whisper")
def load_whisper_encoder(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> WhisperAudioTower:
    """Encoder of a local Whisper checkpoint (``WhisperModel``, ``WhisperForConditionalGeneration``
    or a bare ``WhisperEncoder`` saved with ``save_pretrained``); the decoder is never loaded."""
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise ConfigError(f"{directory}: no {CONFIG_NAME}; load_whisper_encoder reads a local directory written "
                          "by save_pretrained (mmtune never downloads models)")
    config = WhisperConfig.from_pretrained(str(directory))
    state = _read_safetensors(directory)
    prefix = next((p for p in ("model.encoder.", "encoder.", "") if f"{p}conv1.weight" in state), None)
    if prefix is None:
        raise ConfigError(f"{directory}: no Whisper encoder weights found (looked for conv1.weight under "
                          "'model.encoder.', 'encoder.' or no prefix)")
    encoder = WhisperEncoder(config)
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, _ = encoder.load_state_dict(sub, strict=False)
    if missing:
        raise ConfigError(f"{directory}: Whisper encoder weights missing: {missing[:5]}")
    fe = None
    if (directory / "preprocessor_config.json").is_file():
        fe = WhisperFeatureExtractor.from_pretrained(str(directory))
    tower = WhisperAudioTower(encoder.eval(), fe)
    return tower.to(dtype) if dtype is not None else tower
