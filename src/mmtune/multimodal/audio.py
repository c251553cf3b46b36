"""Audio loading and log-Mel features for the speech path (Phi-4-multimodal geometry).

Geometry (docs/reference/multimodal.md#audio-features-and-token-rate): 16 kHz mono; 80 log-Mel bins from a 400-sample (25 ms)
window every 160 samples (10 ms), FFT size 512; ``frames = (n_samples - 400) // 160 + 1``
(no centre padding: the last partial window is dropped); the encoder's x8 convolutional
subsampling gives ``tokens = ceil(frames / 8)``, i.e. 80 ms per token and 12.5 tokens/s:
1 s -> 98 frames -> 13 tokens; 30 s -> 2998 frames -> 375 tokens; 30 min -> 22,500 tokens.

Two feature functions share that frame grid:

- :func:`log_mel` (the config default): Hann window, power spectrum, HTK-style triangular Mel
  filters (built here, :func:`mel_filterbank`), natural log with a floor of 1e-10: the common
  librosa / torchaudio log-Mel, for an encoder trained from scratch on it (the built-in demo).
- :func:`phi4_log_mel`: the exact recipe of the released Phi-4-multimodal feature extractor
  (Hamming window, per-frame pre-emphasis 0.97, int16 scaling, Kaldi Mel filters
  triangular in Mel space up to 7690 Hz, log floor 1.0), equal to transformers'
  ``Phi4MultimodalFeatureExtractor`` within 1e-3. Use it with Phi-4 audio weights; the
  ``mm-phi4-*`` recipes do. The two differ by about 20 on average (other scale, window and
  filters): an encoder trained on one cannot read the other.

Audio longer than the encoder should see at once is cut with :func:`chunked_log_mel` at frame
boundaries that are multiples of 8, so the chunks' token counts add up to the formula.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, MMTuneError
from ..registry import Registry

SAMPLE_RATE = 16000
WIN_LENGTH = 400  # 25 ms at 16 kHz
HOP_LENGTH = 160  # 10 ms at 16 kHz
N_FFT = 512
N_MELS = 80
SUBSAMPLING = 8  # conv subsampling of the encoder: 80 ms per audio token
LOG_FLOOR = 1e-10  # librosa.power_to_db's default ``amin``: log(0) is never taken

AUDIO_FEATURES: Registry[Callable[..., torch.Tensor]] = Registry("audio feature type")


# ----------------------------------------------------------------------------- loading

def load_audio(path: str | os.PathLike, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file (wav, flac, or anything libsndfile reads) as mono float32 at ``target_sr``.

    Several channels are averaged. Another sample rate is converted with a polyphase
    resampler (``scipy.signal.resample_poly``, Kaiser-windowed FIR low-pass), whose output has
    ``ceil(n * target_sr / sr)`` samples. A missing, unreadable or empty file raises
    :class:`~mmtune.errors.DataError` naming the file.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, "audio file not found; check the path (relative paths are "
                        "resolved against the dataset root)", reason="missing_file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (n, channels)
    except Exception as e:  # libsndfile raises LibsndfileError/RuntimeError/TypeError by version
        raise DataError(str(path), None, f"cannot decode audio ({type(e).__name__}: {e}); expected a "
                        "wav/flac file readable by libsndfile", reason="corrupt_audio") from e
    if data.shape[0] == 0:
        raise DataError(str(path), None, "audio file has no samples", reason="empty_audio")
    wave = data.mean(axis=1)  # (n,) stereo -> mono
    return resample(wave, sr, target_sr)


def resample(wave: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling by the reduced ratio target_sr/orig_sr; float32 out."""
    wave = np.asarray(wave, dtype=np.float32)
    if orig_sr == target_sr:
        return wave
    from scipy.signal import resample_poly

    g = math.gcd(int(orig_sr), int(target_sr))
    out = resample_poly(wave, target_sr // g, orig_sr // g)
    return np.ascontiguousarray(out, dtype=np.float32)


# ----------------------------------------------------------------------------- counts

def num_frames(n_samples: int, win: int = WIN_LENGTH, hop: int = HOP_LENGTH) -> int:
    """Feature frames of ``n_samples`` without centre padding: ``(n - win) // hop + 1`` (0 if n < win)."""
    return max(0, (int(n_samples) - win) // hop + 1)


def num_audio_tokens(n_samples: int, subsampling: int = SUBSAMPLING) -> int:
    """Audio tokens after the encoder's x8 subsampling: ``ceil(num_frames / 8)``."""
    return -(-num_frames(n_samples) // subsampling)


# ----------------------------------------------------------------------------- Mel filters

def hz_to_mel(f):
    """HTK Mel scale in Kaldi's form, ``1127 ln(1 + f/700)`` (Kaldi ``MelBanks::MelScale``)."""
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * np.expm1(np.asarray(m, dtype=np.float64) / 1127.0)


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                   f_min: float = 0.0, f_max: float | None = None, in_mel_space: bool = False) -> torch.Tensor:
    """Triangular Mel filters, ``(n_fft // 2 + 1, n_mels)`` float64, peaks 1, no area normalisation.

    ``n_mels + 2`` points equally spaced on the Mel scale between ``f_min`` and ``f_max``
    (default Nyquist); filter ``m`` rises from point m to m+1 and falls to m+2. With
    ``in_mel_space=False`` the triangles are linear in Hz (HTK, librosa ``htk=True,
    norm=None``, torchaudio ``mel_scale="htk"``); with ``True`` they are linear in Mel (Kaldi,
    as the Phi-4 feature extractor does). Either way neighbouring filters sum to 1 between the
    first and last centre frequency.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= {sample_rate / 2}, got f_min={f_min}, f_max={f_max}")
    bin_hz = np.arange(n_fft // 2 + 1) * sample_rate / n_fft  # (F,)
    pts_mel = np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)  # (M+2,)
    if in_mel_space:
        x, pts = hz_to_mel(bin_hz), pts_mel
    else:
        x, pts = bin_hz, mel_to_hz(pts_mel)
    lo, mid, hi = pts[:-2], pts[1:-1], pts[2:]  # (M,) each
    up = (x[:, None] - lo[None, :]) / (mid - lo)[None, :]  # (F, M)
    down = (hi[None, :] - x[:, None]) / (hi - mid)[None, :]  # (F, M)
    return torch.from_numpy(np.clip(np.minimum(up, down), 0.0, None))


# ----------------------------------------------------------------------------- features

def _as_wave(wave) -> torch.Tensor:
    t = torch.as_tensor(wave)
    if t.dim() != 1:
        raise MMTuneError(f"expected a mono waveform of shape (n_samples,), got shape {tuple(t.shape)}; "
                          "use load_audio() which averages channels")
    return t


def _check_length(n: int, win: int) -> None:
    if n < win:
        raise MMTuneError(f"audio has {n} samples, shorter than one analysis window ({win} samples = "
                          f"{1000 * win / SAMPLE_RATE:.0f} ms at 16 kHz); pad or drop this clip")


@AUDIO_FEATURES.register("log_mel")
def log_mel(wave, n_mels: int = N_MELS, win: int = WIN_LENGTH, hop: int = HOP_LENGTH, n_fft: int = N_FFT,
            sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Log-Mel features ``(frames, n_mels)`` float32 of a mono 16 kHz waveform.

    Frame ``t`` is samples ``[t*hop, t*hop + win)``, times a periodic Hann window of length
    ``win``, zero-padded to ``n_fft`` (``torch.stft`` centres a short window inside n_fft, so
    the signal is padded by (n_fft - win)/2 on both sides and ``center=False``; zero padding
    only changes the phase, not the power); power ``|X|^2``; HTK Mel filters
    (:func:`mel_filterbank`); ``ln(max(mel, 1e-10))``. Computed in float64 because the log of
    low-energy bands is sensitive to float32 FFT round-off; returned as float32.
    """
    x = _as_wave(wave).to(torch.float64)
    _check_length(x.numel(), win)
    side = (n_fft - win) // 2
    x = torch.nn.functional.pad(x, (side, n_fft - win - side))  # frames = (n - win)//hop + 1
    window = torch.hann_window(win, periodic=True, dtype=torch.float64)
    spec = torch.stft(x, n_fft=n_fft, hop_length=hop, win_length=win, window=window, center=False,
                      return_complex=True)  # (F, T)
    power = spec.real.square() + spec.imag.square()  # (F, T)
    mel = power.T @ mel_filterbank(n_mels, n_fft, sample_rate)  # (T, M)
    return torch.log(mel.clamp_min(LOG_FLOOR)).to(torch.float32)


@AUDIO_FEATURES.register("phi4_log_mel")
def phi4_log_mel(wave, n_mels: int = N_MELS, win: int = WIN_LENGTH, hop: int = HOP_LENGTH,
                 n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE, preemphasis: float = 0.97) -> torch.Tensor:
    """Phi-4-multimodal's log filterbank ``(frames, n_mels)`` float32, same frame grid as :func:`log_mel`.

    Follows transformers' ``Phi4MultimodalFeatureExtractor._torch_extract_fbank_features``
    (itself a port of the released ``processing_phi4mm.py``): pre-emphasis inside each frame
    (``y[i] = x[i] - 0.97 x[i-1]``, and ``y[0] = x[0] - 0.97 x[0]``), scale by 32768 (int16
    range), symmetric Hamming window, ``|rfft_512|^2``, Kaldi Mel filters triangular in Mel
    space over 0-7690 Hz, ``ln(max(., 1))``. The encoder's global mean/variance buffers
    normalise these afterwards.
    """
    x = _as_wave(wave).to(torch.float64)
    _check_length(x.numel(), win)
    frames = x.unfold(0, win, hop)  # (T, win)
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # (T, win): x[i-1], and x[0] at i=0
    frames = (frames - preemphasis * prev) * 32768.0
    window = torch.hamming_window(win, periodic=False, dtype=torch.float64)
    spec = torch.fft.rfft(frames * window, n=n_fft, dim=1)  # (T, F)
    power = spec.real.square() + spec.imag.square()
    fb = mel_filterbank(n_mels, n_fft, sample_rate, f_min=0.0, f_max=7690.0, in_mel_space=True)
    return torch.log((power @ fb).clamp_min(1.0)).to(torch.float32)  # (T, M)


def chunked_log_mel(wave, chunk_seconds: float = 30.0, features: str | Callable = "log_mel",
                    sample_rate: int = SAMPLE_RATE, win: int = WIN_LENGTH, hop: int = HOP_LENGTH,
                    subsampling: int = SUBSAMPLING) -> list[torch.Tensor]:
    """Features of long audio as a list of chunks, each ``(frames_k, n_mels)``.

    Chunks are cut on the global frame grid, not on the samples: chunk k holds frames
    ``[k*F, (k+1)*F)`` with ``F = chunk_seconds * sample_rate / hop`` rounded down to a multiple
    of ``subsampling`` (30 s -> 3000 frames -> 375 tokens), and reads samples
    ``[k*F*hop, (k*F + F - 1)*hop + win)``; consecutive chunks therefore overlap by
    ``win - hop`` = 240 samples, no frame straddling a boundary is lost, and the concatenated
    chunks equal the features of the whole clip. Since every chunk but the last has a
    multiple of 8 frames, ``sum(ceil(frames_k / 8)) == num_audio_tokens(n_samples)``.
    """
    fn = AUDIO_FEATURES.get(features) if isinstance(features, str) else features
    x = _as_wave(wave)
    total = num_frames(x.numel(), win, hop)
    _check_length(x.numel(), win)
    per_chunk = int(chunk_seconds * sample_rate / hop) // subsampling * subsampling
    if per_chunk < subsampling:
        raise MMTuneError(f"chunk_seconds={chunk_seconds} gives fewer than {subsampling} frames per chunk; "
                          f"use at least {subsampling * hop / sample_rate:.2f} s")
    out = []
    for start in range(0, total, per_chunk):
        n = min(per_chunk, total - start)
        out.append(fn(x[start * hop: (start + n - 1) * hop + win]))
    return out


# ----------------------------------------------------------------------------- batching

@dataclass
class AudioFeatureBatch:
    """Padded features of several clips.

    features: (B, T, n_mels) float, zero after each clip's length.
    lengths: (B,) long, real frames per clip.
    mask: (B, T) bool, True on real frames.
    """

    features: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor

    @property
    def token_lengths(self) -> torch.Tensor:
        """(B,) audio tokens per clip after x8 subsampling: ``ceil(lengths / 8)``."""
        return torch.div(self.lengths + SUBSAMPLING - 1, SUBSAMPLING, rounding_mode="floor")


def time_mask(lengths: torch.Tensor, t: int) -> torch.Tensor:
    """``(B, t)`` bool, True on the first ``lengths[b]`` frames of each row (real frames)."""
    return torch.arange(t, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)


def pad_audio_features(feats: Sequence[torch.Tensor], pad_value: float = 0.0,
                       pad_to_multiple_of: int | None = None) -> AudioFeatureBatch:
    """Right-pad ``(T_i, n_mels)`` feature tensors to a batch with lengths and a mask.

    ``pad_to_multiple_of=8`` makes the padded length a whole number of audio tokens.
    """
    if not feats:
        raise MMTuneError("pad_audio_features got an empty list of clips")
    n_mels = {f.shape[-1] for f in feats}
    if len(n_mels) != 1 or any(f.dim() != 2 for f in feats):
        raise MMTuneError(f"clips must all be (frames, n_mels) with one n_mels; got shapes "
                          f"{[tuple(f.shape) for f in feats]}")
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    t_max = int(lengths.max())
    if pad_to_multiple_of:
        t_max = -(-t_max // pad_to_multiple_of) * pad_to_multiple_of
    out = feats[0].new_full((len(feats), t_max, n_mels.pop()), pad_value)  # (B, T, M)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
    mask = torch.arange(t_max)[None, :] < lengths[:, None]  # (B, T)
    return AudioFeatureBatch(out, lengths, mask)
